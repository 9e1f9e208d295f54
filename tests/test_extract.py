"""lora.extract: the best rank-K LoRA of W_ft − W0 (checked against a dense float64 SVD), streamed from two
checkpoints or from a toolkit full fine-tuning, loaded by peft without a warning; the Krylov route; bad input."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import D

from lora import extract, lowrank
from lora.adapter_io import base_fingerprint, load_adapter

REL = 1e-6  # float32 factors of a float64 truncation: ~ eps32·√K relative (see test_resize)


def _best(dW: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(dW.double(), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _run(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = extract.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


QUERY = "encoder.layer.{}.attention.self.query"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny BERT base and a "fine-tuned" copy: layer 0's and 1's query changed (rank 3 plus noise), value
    unchanged, and one LayerNorm changed."""
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("extract")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64)
    base = BertModel(cfg).eval()
    base.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    deltas = {}
    with torch.no_grad():
        for i in (0, 1):
            w = base.get_submodule(QUERY.format(i)).weight
            deltas[QUERY.format(i)] = (torch.randn(D, 3, generator=g) @ torch.randn(3, D, generator=g) * 0.05
                                       + torch.randn(D, D, generator=g) * 0.002)
            w.add_(deltas[QUERY.format(i)])
        base.encoder.layer[0].output.LayerNorm.weight.add_(0.01)
    base.save_pretrained(root / "ft")
    return root, deltas


def test_extracted_adapter_is_the_best_rank_k_and_loads_in_peft_without_warning(pair, tmp_path, caplog):
    root, _ = pair
    rc, _, err = _run(["--base", root / "base", "--finetuned", root / "ft", "--rank", 2, "--out", tmp_path / "x"])
    assert rc == 2 and "encoder.layer.0.output.LayerNorm.weight" in _one_line(err) and "--others" in err
    assert not (tmp_path / "x").exists()

    rc, out, err = _run(["--base", root / "base", "--finetuned", root / "ft", "--rank", 2, "--out", tmp_path / "x",
                         "--others", "save"])
    assert rc == 0, err
    assert "unchanged, skipped:" in out and "attention.self.value" in out
    ad = load_adapter(tmp_path / "x")
    w0, w1 = load_file(str(root / "base" / "model.safetensors")), load_file(str(root / "ft" / "model.safetensors"))
    assert sorted(ad.factors) == [QUERY.format(0), QUERY.format(1)]
    for key, f in ad.factors.items():
        dW = w1[f"{key}.weight"].double() - w0[f"{key}.weight"].double()  # ΔW as stored, float32 rounding included
        assert f.scaling == 1.0 and _rel(f.B @ f.A, _best(dW, 2)) < REL, key
    assert "encoder.layer.0.output.LayerNorm" in ad.config["modules_to_save"]
    assert set(ad.extra_tensors) == {"encoder.layer.0.output.LayerNorm.weight", "encoder.layer.0.output.LayerNorm.bias"}
    report = json.loads((tmp_path / "x" / "extract.json").read_text())
    assert report["unchanged_modules"] and report["other_changed_tensors"] == {
        "encoder.layer.0.output.LayerNorm.weight": "saved"}

    from peft import PeftModel
    from transformers import AutoModel

    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(AutoModel.from_pretrained(root / "base"), tmp_path / "x").eval()
    assert not [str(w.message) for w in caught if "peft" in str(w.filename) or "PEFT" in str(w.message)]
    assert not [r for r in caplog.records if r.name.startswith("peft")]
    merged = pm.merge_and_unload()
    ln = merged.encoder.layer[0].output.LayerNorm.weight
    assert torch.equal(ln, w1["encoder.layer.0.output.LayerNorm.weight"])  # the saved module, in full
    # with --others drop the LayerNorm is left out and listed
    rc, out, err = _run(["--base", root / "base", "--finetuned", root / "ft", "--energy", 0.9, "--out",
                         tmp_path / "y", "--others", "drop"])
    assert rc == 0 and "(dropped)" in out and load_adapter(tmp_path / "y").config["modules_to_save"] is None


def test_streamed_fingerprint_is_base_fingerprint(pair):
    from transformers import AutoModel

    root, deltas = pair
    ck = extract.Checkpoint(root / "base", "--base")
    meta = extract.meta_model(root / "base", "--base")
    names = extract._names_in_model(ck, {n for n, _ in meta.named_parameters()}, meta.base_model_prefix)
    paths = sorted(deltas)
    model = AutoModel.from_pretrained(root / "base")
    assert extract.streamed_fingerprint(ck, names, meta, paths) == base_fingerprint(model, module_paths=paths)


def test_krylov_top_k_matches_the_dense_svd():
    """Above dense_max: block Krylov with a float64 Rayleigh–Ritz, on a slowly decaying spectrum (σ_i = 1/i plus a
    noise floor), is the dense optimum within 1e-9 in energy and 1e-6 in ΔW_K."""
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(300, 260, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(260, 260, generator=g, dtype=torch.float64))[0]
    S = 1.0 / torch.arange(1, 261, dtype=torch.float64) + 1e-3
    dW = (U * S) @ V.T
    A, B, k = lowrank.dense_truncation(dW, 10, None, module="m", dense_max=100, dtype=torch.float64)
    _, _, d = lowrank.dense_truncation(dW, 10, None, module="m", dtype=torch.float64)
    assert k.method == "krylov" and d.method == "dense"
    assert k.kept == pytest.approx(d.kept, rel=1e-9) and _rel(B @ A, _best(dW, 10)) < REL
    _, _, ke = lowrank.dense_truncation(dW, None, 0.5, module="m", dense_max=100)
    assert ke.rank == lowrank.energy_rank(S, 0.5)


def _full_ft_dir(tmp_path, minilm_path):
    """A toolkit full fine-tuning directory (lora.full_ft's format) on a tiny BertForSequenceClassification base."""
    from transformers import BertConfig, BertForSequenceClassification

    from lora.full_ft import DELTA_NAME, DESCRIPTION_NAME, HEAD_NAME

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, num_labels=3)
    model = BertForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(2)
    deltas = {f"bert.{QUERY.format(i)}": torch.randn(D, D, generator=g) * 0.01 for i in (0, 1)}
    ft = tmp_path / "full"
    ft.mkdir()
    save_file(deltas, str(ft / DELTA_NAME))
    save_file({"classifier.weight": torch.randn(3, D, generator=g), "classifier.bias": torch.zeros(3)},
              str(ft / HEAD_NAME))
    (ft / DESCRIPTION_NAME).write_text(json.dumps({
        "format": "lora-structure-full-finetune/1", "base_model_name_or_path": str(tmp_path / "base"),
        "base_fingerprint": base_fingerprint(model, module_paths=["bert"]), "modules_to_save": ["classifier"],
        "task": "chatterbot"}))
    return ft, deltas


def test_a_full_finetuning_directory_brings_its_head(tmp_path, minilm_path):
    ft, deltas = _full_ft_dir(tmp_path, minilm_path)
    rc, _, err = _run(["--finetuned", ft, "--rank", 4, "--out", tmp_path / "x", "--quiet"])
    assert rc == 0, err
    ad = load_adapter(tmp_path / "x")
    assert ad.task_type == "SEQ_CLS" and ad.config["modules_to_save"] == ["classifier"]
    assert set(ad.extra_tensors) == {"classifier.weight", "classifier.bias"}
    for key, dW in deltas.items():
        assert _rel(ad.factors[key].B @ ad.factors[key].A, _best(dW, 4)) < REL
    from lora.adapter_io import apply_adapter, base_model_for

    apply_adapter(base_model_for(ad), ad)  # the fingerprint it records is its base's


def test_bad_input_is_one_line_exit_2(pair, tmp_path, minilm_path):
    root, _ = pair
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(tmp_path / "other")
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "config.json").write_text((root / "ft" / "config.json").read_text())
    t = load_file(str(root / "ft" / "model.safetensors"))
    t.pop("encoder.layer.1.attention.self.value.weight")
    save_file(t, str(missing / "model.safetensors"))
    ft, _ = _full_ft_dir(tmp_path, minilm_path)
    cases = [
        (["--base", tmp_path / "other", "--finetuned", root / "ft", "--rank", 2], "mismatched models"),
        (["--base", root / "base", "--finetuned", missing, "--rank", 2], "lacks encoder.layer.1.attention.self.value"),
        (["--base", root / "base", "--finetuned", root / "ft", "--rank", 33, "--others", "drop"], "--rank 33: above 32"),
        (["--base", root / "base", "--finetuned", root / "ft", "--energy", 0], "--energy 0: must be in (0, 1]"),
        (["--base", root / "ft", "--finetuned", ft, "--rank", 2], "fingerprint mismatch"),
    ]
    for args, message in cases:
        rc, _, err = _run([*args, "--out", tmp_path / "out"])
        assert rc == 2 and message in _one_line(err), (args, err)
        assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    rc, _, err = _run(["--finetuned", ft, "--rank", 2, "--out", tmp_path / "out"])
    assert rc == 2 and "already exists" in _one_line(err)


def test_help_explains():
    text = " ".join(extract.build_parser().format_help().split())
    assert "W_ft − W0" in text and "--others" in text and "its head comes along" in text

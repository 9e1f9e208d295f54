"""lora.resize and the maths of lora.lowrank: the best rank-K approximation (checked against a dense float64 SVD),
the PEFT layout peft loads without a warning, lora.merge, peft's own convert_to_lora, and bad input."""

from __future__ import annotations

import errno
import json
import logging
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from tiny_models import make_adapter, tiny_bert_model

from lora import lowrank, merge, resize
from lora.adapter_io import load_adapter, save_adapter
from lora.inject import inject_lora

# Tolerance: the truncation is computed in float64 from QR + an r × r SVD (backward error ~ eps·√r·‖ΔW‖) and the
# written factors are float32, so B'A' differs from the float64 ΔW_K by ~ eps32·√K·‖ΔW_K‖ ≈ 1e-7·√8 relative;
# 1e-6 (the bound) leaves a factor 3.
REL = 1e-6


def _best(dW: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(dW.double(), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_resize_factors_is_the_dense_best_rank_k_and_balanced():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(16, 40, generator=g, dtype=torch.float64), torch.randn(30, 16, generator=g, dtype=torch.float64)
    dW = 0.5 * B @ A
    A2, B2, kept = lowrank.resize_factors(A, B, 0.5, 5, module="m")
    assert A2.shape == (5, 40) and B2.shape == (30, 5)
    assert _rel(B2 @ A2, _best(dW, 5)) < 1e-12  # float64 all the way
    assert torch.allclose(A2.norm(dim=1), B2.norm(dim=0), rtol=1e-12)  # balanced: both carry sqrt(σ_i)
    S = torch.linalg.svdvals(dW)
    assert kept.kept == pytest.approx(float((S[:5] ** 2).sum() / (S**2).sum()), rel=1e-12)
    assert kept.rel_error == pytest.approx(float((dW - _best(dW, 5)).norm() / dW.norm()), rel=1e-10)
    assert kept.phi == pytest.approx(1.0, abs=1e-12) and kept.gap == pytest.approx(float(S[5] / S[4]), rel=1e-10)
    # the energy rule: the smallest K with cumulative σ² ≥ F·total, as peft's convert_to_lora picks it
    from peft.tuners.lora.conversion import _find_cutoff_index

    for f in (0.3, 0.5, 0.9, 0.99, 1.0):
        assert lowrank.energy_rank(S, f) == _find_cutoff_index(S.float(), f), f
    _, _, k9 = lowrank.resize_factors(A, B, 0.5, None, energy=0.9)
    assert k9.kept >= 0.9 and k9.rank == lowrank.energy_rank(S, 0.9)


def test_phi_drops_where_the_kth_direction_is_not_determined():
    """Equal σ_K and σ_{K+1}: the written directions are one valid choice among many, φ says how far from V_K."""
    V = torch.linalg.qr(torch.randn(20, 4, dtype=torch.float64))[0]
    assert lowrank.phi(V[:, :2], V[:, :2]) == pytest.approx(1.0)
    assert lowrank.phi(V[:, 2:], V[:, :2]) == pytest.approx(0.0, abs=1e-12)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("resize")
    tiny_bert_model().save_pretrained(root / "base")
    factors = make_adapter(root / "base", root / "r8", r=8, seed=0)
    return root, factors


def _run(argv) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = resize.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def test_resized_adapter_is_the_best_rank_k_loads_in_peft_without_warning_and_merges(bert, tmp_path, caplog):
    root, factors = bert
    rc, out, err = _run(["--adapter", root / "r8", "--rank", 3, "--out", tmp_path / "r3"])
    assert rc == 0, err
    assert "total (4 modules)" in out
    new = load_adapter(tmp_path / "r3")
    assert new.rank == 3 and new.alpha == 3.0 and new.config["rank_pattern"] == {}
    for key, f in factors.items():
        g = new.factors[key]
        assert g.rank == 3 and g.scaling == 1.0
        assert _rel(g.B @ g.A, _best(f.scaling * f.B @ f.A, 3)) < REL, key
    report = json.loads((tmp_path / "r3" / "resize.json").read_text())
    assert report["total"]["modules"] == 4 and 0 < report["total"]["kept"] < 1
    assert new.base_fingerprint == load_adapter(root / "r8").base_fingerprint  # the same base

    from peft import PeftModel
    from transformers import AutoModel

    from lora.adapter_io import apply_adapter

    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(AutoModel.from_pretrained(root / "base"), tmp_path / "r3").eval()
    assert not [str(w.message) for w in caught if "peft" in str(w.filename) or "PEFT" in str(w.message)], \
        [str(w.message) for w in caught]
    assert not [r for r in caplog.records if r.name.startswith("peft")]
    ours = AutoModel.from_pretrained(root / "base").eval()
    apply_adapter(ours, new)
    ids = torch.tensor([[1, 5, 7, 9, 3]])
    with torch.no_grad():
        assert torch.allclose(pm(input_ids=ids).last_hidden_state, ours(input_ids=ids).last_hidden_state, atol=1e-5)
    assert merge.main(["--adapter", str(tmp_path / "r3"), "--out", str(tmp_path / "merged"), "--quiet"]) == 0


def test_a_resized_adapter_matches_peft_convert_to_lora(bert):
    """peft 0.22's convert_to_lora on the loaded LoRA: the same ΔW_K (it uses a dense float32 SVD and puts Σ in B,
    we a float64 factored SVD and balanced factors; both set lora_alpha = r, so the scale is 1), the same energy
    ranks."""
    from peft import PeftModel
    from peft.tuners.lora.conversion import convert_to_lora
    from transformers import AutoModel

    root, _ = bert
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Converting a PEFT adapter to LoRA that is already a LoRA adapter"
        pm = PeftModel.from_pretrained(AutoModel.from_pretrained(root / "base"), root / "r8").eval()
        cfg, state = convert_to_lora(pm, 3)
        cfg_e, state_e = convert_to_lora(pm, 0.9)
    assert cfg.r == cfg.lora_alpha == 3 and not cfg.use_rslora
    adapter = load_adapter(root / "r8")
    _, _, tensors, kept = resize.resize(adapter, resize.ResizeRule(rank=3))
    _, _, _, kept_e = resize.resize(adapter, resize.ResizeRule(energy=0.9))
    for k in kept:
        path = k.module
        ours = tensors[f"base_model.model.{path}.lora_B.weight"] @ tensors[f"base_model.model.{path}.lora_A.weight"]
        theirs = state[f"base_model.model.{path}.lora_B.weight"] @ state[f"base_model.model.{path}.lora_A.weight"]
        # peft's float32 SVD of a float32 ΔW: ~ eps32·√d relative (d = 32)
        assert _rel(theirs, ours) < 1e-5, path
    peft_ranks = {k: v for k, v in cfg_e.rank_pattern.items()}
    for k in kept_e:
        assert peft_ranks.get(k.module, cfg_e.r) == k.rank, k.module


def test_rank_pattern_energy_rslora_and_gpt2_layouts(tmp_path):
    """GPT-2: the fused c_attn (q, v slices) resized per slice, a Conv1D c_proj, rsLoRA scale; ranks per module from
    a pattern file; every ΔW is the best approximation at its rank."""
    from peft_adapters import GPT2_KW
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**GPT2_KW)).eval()
    mods = inject_lora(model, ["q", "v", "mlp.c_proj"], r=6, alpha=4, seed=0, init="gaussian", use_rslora=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in mods.values():
            for name, p in m.named_parameters():
                if name.startswith("lora_"):
                    p.add_(torch.randn(p.shape, generator=g) * 0.2)
    save_adapter(model, tmp_path / "a", base_model_name_or_path="gpt2-tiny", seed=0)
    orig = load_adapter(tmp_path / "a")
    pattern = {"transformer.h.0.attn.c_attn:q": 2, "h.1.mlp.c_proj": 4}
    (tmp_path / "p.json").write_text(json.dumps(pattern))
    rc, _, err = _run(["--adapter", tmp_path / "a", "--rank-pattern", tmp_path / "p.json", "--out", tmp_path / "b",
                       "--quiet"])
    assert rc == 0, err
    new = load_adapter(tmp_path / "b")
    assert new.use_rslora and new.config["fan_in_fan_out"]
    want = {k: 6 for k in orig.factors} | {"transformer.h.0.attn.c_attn:q": 2, "transformer.h.1.mlp.c_proj": 4}
    for key, f in orig.factors.items():
        g2 = new.factors[key]
        assert g2.scaling == pytest.approx(1.0)
        dW = f.scaling * f.B.double() @ f.A.double()
        assert _rel(g2.B @ g2.A, _best(dW, want[key])) < REL, key
        assert torch.linalg.matrix_rank(g2.B.double() @ g2.A.double()) == want[key]
    rc, _, err = _run(["--adapter", tmp_path / "a", "--energy", "0.8", "--out", tmp_path / "c", "--quiet"])
    assert rc == 0, err
    kept = {k["module"]: k for k in json.loads((tmp_path / "c" / "resize.json").read_text())["modules"]}
    for key, f in orig.factors.items():
        S = torch.linalg.svdvals(f.scaling * f.B.double() @ f.A.double())
        assert kept[key]["rank"] == lowrank.energy_rank(S, 0.8) and kept[key]["kept"] >= 0.8, key


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["--rank", "9"], "--rank 9: above the adapter's rank 8"),
    (["--rank", "0"], "--rank 0: must be at least 1"),
    (["--energy", "0"], "--energy 0: must be in (0, 1]"),
    (["--energy", "1.5"], "--energy 1.5: must be in (0, 1]"),
    (["--rank-pattern", "PATTERN"], "matches no module"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(bert, tmp_path, args, message):
    root, _ = bert
    (tmp_path / "p.json").write_text(json.dumps({"no_such_module": 2}))
    args = [str(tmp_path / "p.json") if a == "PATTERN" else a for a in args]
    rc, _, err = _run(["--adapter", root / "r8", *args, "--out", tmp_path / "out"])
    assert rc == 2 and message in _one_line(err)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_existing_out_is_refused_unless_overwrite(bert, tmp_path):
    root, _ = bert
    (tmp_path / "out").mkdir()
    rc, _, err = _run(["--adapter", root / "r8", "--rank", 2, "--out", tmp_path / "out"])
    assert rc == 2 and "already exists" in _one_line(err)
    assert _run(["--adapter", root / "r8", "--rank", 2, "--out", tmp_path / "out", "--overwrite", "--quiet"])[0] == 0


def test_a_full_disk_is_one_line_and_leaves_nothing(bert, tmp_path, monkeypatch):
    import safetensors.torch

    root, _ = bert

    def full(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(errno.ENOSPC)} (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    rc, _, err = _run(["--adapter", root / "r8", "--rank", 2, "--out", tmp_path / "out"])
    assert rc == 2 and _one_line(err) == f"error: {tmp_path / 'out'}: cannot write: no space left on device"
    assert list(tmp_path.iterdir()) == []


def test_dora_and_pissa_are_refused_with_the_reason(tmp_path):
    from peft_adapters import peft_adapter, save_bases

    bases = save_bases(tmp_path)
    for kw, why in (({"use_dora": True}, "DoRA"), ({"init_lora_weights": "pissa"}, "rebuilds the residual base")):
        out = peft_adapter(bases["bert"], tmp_path / str(len(why)), r=4, lora_alpha=8, target_modules=["query"], **kw)
        rc, _, err = _run(["--adapter", out, "--rank", 2, "--out", tmp_path / "x"])
        assert rc == 2 and why in _one_line(err) and not (tmp_path / "x").exists()


def test_help_explains():
    text = " ".join(resize.build_parser().format_help().split())
    assert "Eckart" in text and "--energy" in text and "--rank-pattern" in text and "DoRA" in text

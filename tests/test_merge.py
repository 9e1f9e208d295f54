"""lora.merge: the merged directory is a plain transformers model equal to peft's merge_and_unload."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from numerics import forward64
from tiny_models import peft_named_adapters

from lora.adapter_io import save_adapter
from lora.inject import inject_lora
from lora.merge import main as merge_main

peft = pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402

IDS = torch.tensor([[1, 5, 7, 9, 11, 3], [2, 4, 6, 8, 10, 12]])


def _quiet_load(cls, path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(path, **kwargs).eval()


def _perturb(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name or name.startswith("classifier"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _peft_merged(cls, base_dir: Path, adapter_dir: Path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(_quiet_load(cls, base_dir, **kwargs), adapter_dir)
        return pm.merge_and_unload().eval()


# Two float32 merges W0 + s·(B A) (ours and peft's), r + 2 roundings each, differ by at most γ_(2r+4) times
# |W0| + s|B||A| per element, on any CPU (numerics). Here: factors 0.3·N(0, 1) (max |B||A| 1.3 at r = 4,
# d = 384), s ≤ 2.9 (rsLoRA), |W0| < 0.8 (MiniLM's q, v; the tiny bases' are < 0.1): γ_12 · 4.6 = 3.3e-6.
# A wrong slice, scale or transpose moves a weight by O(0.1).
MERGE_ATOL = 1e-5
# Outputs of two merged models, both run in float64 (numerics.forward64): what is left is those weight
# differences carried through a two- or six-layer encoder with LayerNorm, O(1e-6) on O(1) outputs (the largest
# seen under every forced kernel choice in .ci/run: 2e-6); 1e-4 against O(0.1) for a wrong merge.
OUTPUT_ATOL = 1e-4


def _assert_state_close(ours: torch.nn.Module, ref: torch.nn.Module, *, atol: float = MERGE_ATOL) -> None:
    a, b = ours.state_dict(), ref.state_dict()
    assert set(a) == set(b)
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst <= atol, worst


@pytest.mark.float_sensitive
def test_merge_bert_classifier_matches_peft(tmp_path, minilm_path):
    """The real MiniLM base (d=384, 6 layers) with a task head: merged == peft's merge_and_unload."""
    from transformers import AutoModel, AutoModelForSequenceClassification, BertForSequenceClassification

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = BertForSequenceClassification.from_pretrained(minilm_path, num_labels=4).eval()
    inject_lora(model, ["q", "v"], r=4, alpha=8, seed=0, layers=[0, 5])
    _perturb(model)
    expected_logits = forward64(model, input_ids=IDS)
    ad = save_adapter(model, tmp_path / "ad", base_model_name_or_path=minilm_path, modules_to_save=["classifier"],
                      task_type="SEQ_CLS")
    out = tmp_path / "merged"
    assert merge_main(["--adapter", str(ad), "--out", str(out), "--quiet"]) == 0
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    ref = _peft_merged(AutoModelForSequenceClassification, Path(minilm_path), ad, num_labels=4)
    merged_cls = _quiet_load(AutoModelForSequenceClassification, out)
    _assert_state_close(merged_cls, ref)
    merged_logits = forward64(merged_cls, input_ids=IDS)
    torch.testing.assert_close(merged_logits, expected_logits, atol=OUTPUT_ATOL, rtol=0)
    # AutoModel (no head, no LoRA code) loads it, and the encoder equals peft's merged encoder
    enc = _quiet_load(AutoModel, out)
    torch.testing.assert_close(forward64(enc, input_ids=IDS), forward64(ref.bert, input_ids=IDS),
                               atol=OUTPUT_ATOL, rtol=0)


@pytest.mark.float_sensitive
def test_merge_resolves_the_embedded_default_id_and_hints_base_for_a_hub_id(tmp_path, minilm_path, capsys):
    """An adapter that records the embedded default's hub id merges offline, from the installed package, as the
    analysis resolves it; an unreachable hub id is refused with the way out (--base PATH)."""
    import json

    from transformers import AutoModel

    from lora.config import DEFAULT_MODEL

    model = _quiet_load(AutoModel, minilm_path).eval()
    inject_lora(model, ["q", "v"], r=2, alpha=4, seed=0, layers=[0])
    _perturb(model)
    expected = forward64(model, input_ids=IDS)
    ad = save_adapter(model, tmp_path / "ad", base_model_name_or_path=DEFAULT_MODEL)
    assert merge_main(["--adapter", str(ad), "--out", str(tmp_path / "merged"), "--quiet"]) == 0
    got = forward64(_quiet_load(AutoModel, tmp_path / "merged"), input_ids=IDS)
    torch.testing.assert_close(got, expected, atol=OUTPUT_ATOL, rtol=0)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "some-org/not-on-this-machine"
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert merge_main(["--adapter", str(ad), "--out", str(tmp_path / "m2"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "some-org/not-on-this-machine" in err[0] and "pass --base PATH" in err[0]
    assert not (tmp_path / "m2").exists()


@pytest.mark.float_sensitive
def test_merge_gpt2_fused_qv_matches_peft(tmp_path):
    from transformers import AutoModel, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(base_dir)
    model = _quiet_load(GPT2LMHeadModel, base_dir)
    inject_lora(model, ["q", "v"], r=2, alpha=4, use_rslora=True, seed=0)
    _perturb(model)
    ad = save_adapter(model, tmp_path / "ad", base_model_name_or_path=str(base_dir))
    out = tmp_path / "merged"
    assert merge_main(["--adapter", str(ad), "--out", str(out), "--quiet"]) == 0
    ref = _peft_merged(GPT2LMHeadModel, base_dir, ad)
    _assert_state_close(_quiet_load(GPT2LMHeadModel, out), ref)
    base = _quiet_load(AutoModel, base_dir)
    merged = _quiet_load(AutoModel, out)
    w_delta = merged.h[0].attn.c_attn.weight - base.h[0].attn.c_attn.weight
    assert w_delta[:, 32:64].abs().max() == 0 and w_delta[:, :32].abs().max() > 0  # k untouched, q changed


def test_merge_refuses_existing_out_and_wrong_base(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    kw = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    base_dir, other_dir = tmp_path / "base", tmp_path / "other"
    BertModel(BertConfig(**kw)).save_pretrained(base_dir)
    BertModel(BertConfig(**kw)).save_pretrained(other_dir)  # same shapes, other weights
    model = _quiet_load(BertModel, base_dir)
    inject_lora(model, ["q"], r=2, alpha=2)
    ad = save_adapter(model, tmp_path / "ad", base_model_name_or_path=str(base_dir))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    assert merge_main(["--adapter", str(ad), "--out", str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err and [p.name for p in out.iterdir()] == ["keep"]
    new = tmp_path / "new"
    assert merge_main(["--adapter", str(ad), "--base", str(other_dir), "--out", str(new), "--quiet"]) == 2
    assert "fingerprint differs" in capsys.readouterr().err and not new.exists()
    assert merge_main(["--adapter", str(ad), "--base", str(tmp_path / "nope"), "--out", str(new), "--quiet"]) == 2
    assert "--base" in capsys.readouterr().err and not new.exists()
    assert merge_main(["--adapter", str(ad), "--base", str(other_dir), "--out", str(new), "--quiet",
                       "--no-fingerprint-check"]) == 0
    assert merge_main(["--adapter", str(ad), "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert (out / "config.json").is_file() and not (out / "keep").exists()


@pytest.mark.float_sensitive
def test_merge_genuine_peft_classifier_adapter(tmp_path):
    """A peft-written SEQ_CLS adapter (no lora_toolkit, no num_labels): the head size comes from its tensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    kw = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    base_dir = tmp_path / "base"
    BertForSequenceClassification(BertConfig(num_labels=5, **kw)).save_pretrained(base_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(_quiet_load(BertForSequenceClassification, base_dir),
                            LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
        pm.base_model.model.config._name_or_path = str(base_dir)
        _perturb(pm)
        pm.save_pretrained(tmp_path / "peft")
    cfg = (tmp_path / "peft" / "adapter_config.json").read_text()
    assert "lora_toolkit" not in cfg
    out = tmp_path / "merged"
    argv = ["--adapter", str(tmp_path / "peft"), "--base", str(base_dir), "--out", str(out), "--quiet"]
    assert merge_main(argv) == 0
    ref = _peft_merged(AutoModelForSequenceClassification, base_dir, tmp_path / "peft", num_labels=5)
    merged = _quiet_load(AutoModelForSequenceClassification, out)
    _assert_state_close(merged, ref)
    base = _quiet_load(AutoModelForSequenceClassification, base_dir)
    assert not torch.allclose(merged.classifier.weight, base.classifier.weight)  # the trained head was applied


def _gpt2_base(base_dir: Path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(base_dir)
    return GPT2LMHeadModel


@pytest.mark.float_sensitive
@pytest.mark.parametrize("writer", ["peft", "ours"])
def test_merge_gpt2_c_proj_and_c_fc_matches_peft(tmp_path, writer):
    """LoRA on GPT-2's whole Conv1D modules (attn.c_proj, mlp.c_proj, mlp.c_fc), written by peft or by our
    injector: lora.merge equals peft's merge_and_unload, and the merged model computes the adapted model."""
    from peft import LoraConfig, get_peft_model

    base_dir = tmp_path / "base"
    cls = _gpt2_base(base_dir)
    if writer == "peft":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(_quiet_load(cls, base_dir), LoraConfig(
                r=2, lora_alpha=6, target_modules=["c_proj", "c_fc"], fan_in_fan_out=True, task_type="CAUSAL_LM"))
            model.base_model.model.config._name_or_path = str(base_dir)
            _perturb(model)
            model.save_pretrained(tmp_path / "ad")
        ad = tmp_path / "ad"
    else:
        model = _quiet_load(cls, base_dir)
        inject_lora(model, ["c_proj", "c_fc"], r=2, alpha=6, seed=0)
        _perturb(model)
        ad = save_adapter(model, tmp_path / "ad", base_model_name_or_path=str(base_dir), task_type="CAUSAL_LM")
    adapted_logits = forward64(model, input_ids=IDS)
    out = tmp_path / "merged"
    assert merge_main(["--adapter", str(ad), "--out", str(out), "--quiet"]) == 0
    ref = _peft_merged(cls, base_dir, ad)
    merged = _quiet_load(cls, out)
    _assert_state_close(merged, ref)
    merged_logits = forward64(merged, input_ids=IDS)
    torch.testing.assert_close(merged_logits, forward64(ref, input_ids=IDS), atol=OUTPUT_ATOL, rtol=0)
    torch.testing.assert_close(merged_logits, adapted_logits, atol=OUTPUT_ATOL, rtol=0)
    base = _quiet_load(cls, base_dir)
    for name in ("h.0.attn.c_proj", "h.0.mlp.c_proj", "h.0.mlp.c_fc", "h.1.mlp.c_fc"):
        assert not torch.equal(merged.transformer.get_submodule(name).weight, base.transformer.get_submodule(name).weight)
    # c_attn was not adapted: untouched, bit for bit
    assert torch.equal(merged.transformer.h[0].attn.c_attn.weight, base.transformer.h[0].attn.c_attn.weight)


@pytest.mark.float_sensitive
def test_merge_of_peft_named_adapters(tmp_path, capsys):
    """A folder of named adapters: the parent alone is refused with their names (one line, exit 2, nothing
    written); PARENT/NAME merges that adapter exactly as peft merges it."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(base_dir)
    peft_named_adapters(base_dir, tmp_path)
    assert sorted(p.name for p in (tmp_path / "named").iterdir() if p.is_dir()) == ["other", "third"]
    assert not (tmp_path / "named" / "adapter_config.json").exists()
    capsys.readouterr()
    assert merge_main(["--adapter", str(tmp_path / "named"), "--out", str(tmp_path / "m0"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "named adapter(s) (other, third)" in err and not (tmp_path / "m0").exists()
    for i, ad in enumerate((tmp_path / "named" / "third", tmp_path / "both" / "other", tmp_path / "both")):
        out = tmp_path / f"m{i + 1}"
        assert merge_main(["--adapter", str(ad), "--out", str(out)]) == 0
        _assert_state_close(_quiet_load(BertModel, out), _peft_merged(BertModel, base_dir, ad))
    # the folder's own adapter is peft's 'default', as PeftModel.from_pretrained(folder) loads it; the others named
    printed = capsys.readouterr().out
    assert printed.count("also holds named adapters") == 1 and "also holds named adapters other (merge one" in printed

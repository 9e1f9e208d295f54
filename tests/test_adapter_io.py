"""lora.adapter_io: PEFT-layout round trips (ours <-> real peft), fused GPT-2 q/v, loralib import, bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from numerics import F64_MODEL_ATOL, assert_f32_close, forward64
from safetensors.torch import load_file, save_file

from lora.adapter_io import (
    CONFIG_NAME,
    INIT_NAME,
    PREFIX,
    TOOLKIT_CONFIG_KEYS,
    TOOLKIT_FILE,
    WEIGHTS_NAME,
    apply_adapter,
    base_fingerprint,
    load_adapter,
    load_base_weights,
    load_loralib_checkpoint,
    save_adapter,
)
from lora.errors import UserError
from lora.inject import inject_lora, lora_modules
from lora.layers import LoRAFusedQKV
from lora.merge import main as merge_main

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

BERT_KW = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=64)
IDS = torch.tensor([[1, 5, 7, 9, 11, 3], [2, 4, 6, 8, 10, 12]])


def _bert_cls():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(num_labels=3, **BERT_KW)).eval()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A saved tiny BERT classifier base; its classifier is re-drawn on every load, like a real task head."""
    d = tmp_path_factory.mktemp("bert_base")
    _bert_cls().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gpt2_base")
    _gpt2().save_pretrained(d)
    return d


def _load(d: Path, cls_name: str):
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, cls_name).from_pretrained(d).eval()


def _perturb(model, seed: int = 1) -> None:
    """Give every LoRA factor (and trainable head) nonzero random values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name or name.startswith("classifier"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _trained_bert(bert_dir: Path, *, use_rslora: bool = False, embeddings: bool = False):
    model = _load(bert_dir, "BertForSequenceClassification")
    targets = ["query", "value"] + (["word_embeddings"] if embeddings else [])
    inject_lora(model, targets, r=4, alpha=8, use_rslora=use_rslora, seed=3)
    _perturb(model)
    return model


def _trained_gpt2(gpt2_dir: Path, *, use_rslora: bool = False):
    model = _load(gpt2_dir, "GPT2LMHeadModel")
    inject_lora(model, ["q", "v"], r=2, alpha=6, use_rslora=use_rslora, seed=3)
    _perturb(model)
    return model


def _logits(model) -> torch.Tensor:
    """Logits on a float64 copy (numerics.forward64): the comparisons below are then about the weights and the
    maths, not about which float32 kernel this CPU picked."""
    return forward64(model, input_ids=IDS)


# ------------------------------------------------------------------------------------------------ ours -> ours


@pytest.mark.float_sensitive
def test_round_trip_ours_to_ours(tmp_path, bert_dir):
    model = _trained_bert(bert_dir, embeddings=True)
    init = {k: torch.randn(4, 32) for k in ("bert.encoder.layer.0.attention.self.query",)}
    out = save_adapter(model, tmp_path / "ad", base_model_name_or_path=str(bert_dir), seed=7,
                       modules_to_save=["classifier"], task_type="SEQ_CLS", init_A=init,
                       extra_config={"init": "kaiming", "lora_toolkit": {"nested_init": True}})
    ad = load_adapter(out)
    assert (ad.rank, ad.alpha, ad.seed, ad.task_type) == (4, 8.0, 7, "SEQ_CLS")
    assert ad.config["init"] == "kaiming" and ad.config["lora_toolkit"]["nested_init"] is True
    assert ad.base_fingerprint == base_fingerprint(model)
    for path, m in lora_modules(model).items():
        f = ad.factors[path]
        assert torch.equal(f.A, m.lora_A) and torch.equal(f.B, m.lora_B) and f.scaling == m.scaling
    assert torch.equal(ad.init_A["bert.encoder.layer.0.attention.self.query"],
                       init["bert.encoder.layer.0.attention.self.query"])
    assert set(ad.extra_tensors) == {"classifier.weight", "classifier.bias"}
    fresh = _load(bert_dir, "BertForSequenceClassification")
    assert not torch.allclose(_logits(fresh), _logits(model))  # the head really is re-drawn
    apply_adapter(fresh, ad)
    torch.testing.assert_close(_logits(fresh), _logits(model), atol=F64_MODEL_ATOL, rtol=0)


def _peft_config_fields() -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(LoraConfig)}


@pytest.mark.float_sensitive
@pytest.mark.parametrize("model_kind", ["bert_head", "gpt2_fused_and_c_proj"])
def test_ours_keeps_adapter_config_to_peft_fields_and_loads_in_peft_without_a_warning(
        tmp_path, bert_dir, gpt2_dir, model_kind, caplog):
    """adapter_config.json holds only LoraConfig fields of the installed peft; our keys are in lora_toolkit.json,
    and PeftModel.from_pretrained emits no warning (warnings module or logging) about our adapter."""
    import logging

    if model_kind == "bert_head":
        model, base_dir, cls = _trained_bert(bert_dir), bert_dir, "BertForSequenceClassification"
        kw = dict(modules_to_save=["classifier"], task_type="SEQ_CLS")
    else:
        model, base_dir, cls = _load(gpt2_dir, "GPT2LMHeadModel"), gpt2_dir, "GPT2LMHeadModel"
        inject_lora(model, ["q", "v", "c_proj"], r=2, alpha=6, seed=3)
        _perturb(model)
        kw = dict(task_type="CAUSAL_LM")
    ad = save_adapter(model, tmp_path / "ad", base_model_name_or_path=str(base_dir), seed=5,
                      extra_config={"init": "kaiming"}, **kw)
    cfg = json.loads((ad / CONFIG_NAME).read_text())
    assert set(cfg) <= _peft_config_fields(), set(cfg) - _peft_config_fields()
    ours = json.loads((ad / TOOLKIT_FILE).read_text())
    assert set(ours) == set(TOOLKIT_CONFIG_KEYS) and ours["seed"] == 5 and ours["init"] == "kaiming"
    assert ours["lora_toolkit"]["format_version"] == 2
    base = _load(base_dir, cls)
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(base, ad).eval()
    ours_warned = [w for w in caught if "peft" in w.filename or "peft" in str(w.message).lower()
                   or "unexpected" in str(w.message).lower()]
    assert ours_warned == [], [str(w.message) for w in ours_warned]
    assert [r.getMessage() for r in caplog.records] == []
    # and it is the same adapter
    torch.testing.assert_close(_logits(pm), _logits(model), atol=F64_MODEL_ATOL, rtol=0)


def test_old_layout_with_our_keys_in_adapter_config_is_still_read(tmp_path, gpt2_dir):
    """Adapters written before the sidecar (format 1) kept seed, base_fingerprint, init and lora_toolkit inside
    adapter_config.json: read_adapter_config returns the same view, so loading, fused slices and the fingerprint
    check still work; a key in both files is taken from the sidecar."""
    from lora.adapter_io import read_adapter_config

    model = _trained_gpt2(gpt2_dir)
    new = save_adapter(model, tmp_path / "new", base_model_name_or_path=str(gpt2_dir), seed=4,
                       extra_config={"init": "gaussian"})
    old = tmp_path / "old"
    old.mkdir()
    for f in (WEIGHTS_NAME,):
        (old / f).write_bytes((new / f).read_bytes())
    merged_cfg = {**json.loads((new / CONFIG_NAME).read_text()), **json.loads((new / TOOLKIT_FILE).read_text())}
    (old / CONFIG_NAME).write_text(json.dumps(merged_cfg))
    assert read_adapter_config(old) == read_adapter_config(new) == merged_cfg
    a_old, a_new = load_adapter(old), load_adapter(new)
    assert (a_old.seed, a_old.base_fingerprint, a_old.config["init"]) == (4, a_new.base_fingerprint, "gaussian")
    assert sorted(a_old.factors) == sorted(a_new.factors) == [f"transformer.h.{i}.attn.c_attn:{s}"
                                                              for i in (0, 1) for s in "qv"]
    for k, f in a_new.factors.items():
        assert torch.equal(f.A, a_old.factors[k].A) and torch.equal(f.B, a_old.factors[k].B)
    apply_adapter(_load(gpt2_dir, "GPT2LMHeadModel"), a_old)  # the recorded fingerprint is checked and matches
    (old / TOOLKIT_FILE).write_text(json.dumps({"seed": 9}))
    assert load_adapter(old).seed == 9


def test_save_refuses_existing_dir_and_overwrites_on_request(tmp_path, bert_dir):
    model = _trained_bert(bert_dir)
    save_adapter(model, tmp_path / "ad", base_model_name_or_path=None)
    with pytest.raises(UserError, match="already exists"):
        save_adapter(model, tmp_path / "ad", base_model_name_or_path=None)
    save_adapter(model, tmp_path / "ad", base_model_name_or_path="x", overwrite=True)
    assert load_adapter(tmp_path / "ad").base_model_name_or_path == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no temporary leftovers


# ------------------------------------------------------------------------------------------------ ours -> peft


@pytest.mark.float_sensitive
@pytest.mark.parametrize("use_rslora", [False, True])
def test_ours_loads_in_peft_with_task_head(tmp_path, bert_dir, use_rslora):
    model = _trained_bert(bert_dir, use_rslora=use_rslora, embeddings=True)
    save_adapter(model, tmp_path / "ad", base_model_name_or_path=str(bert_dir), modules_to_save=["classifier"],
                 task_type="SEQ_CLS")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about our extra config keys, as documented
        pm = PeftModel.from_pretrained(_load(bert_dir, "BertForSequenceClassification"), tmp_path / "ad").eval()
    torch.testing.assert_close(_logits(pm), _logits(model), atol=F64_MODEL_ATOL, rtol=0)


@pytest.mark.float_sensitive
@pytest.mark.parametrize("use_rslora", [False, True])
def test_fused_gpt2_qv_exports_to_peft_and_back_exactly(tmp_path, gpt2_dir, use_rslora):
    model = _trained_gpt2(gpt2_dir, use_rslora=use_rslora)
    save_adapter(model, tmp_path / "ad", base_model_name_or_path=str(gpt2_dir))
    cfg = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["rank_pattern"]["transformer.h.0.attn.c_attn"] == 4
    expected_alpha = 6 * (math.sqrt(2) if use_rslora else 2)
    assert cfg["alpha_pattern"]["transformer.h.0.attn.c_attn"] == pytest.approx(expected_alpha)
    tensors = load_file(tmp_path / "ad" / WEIGHTS_NAME)
    B = tensors[f"{PREFIX}transformer.h.0.attn.c_attn.lora_B.weight"]
    assert B.shape == (96, 4) and torch.count_nonzero(B[32:64]) == 0  # k rows stay zero
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(_load(gpt2_dir, "GPT2LMHeadModel"), tmp_path / "ad").eval()
    torch.testing.assert_close(_logits(pm), _logits(model), atol=F64_MODEL_ATOL, rtol=0)
    # back to ours: the original per-slice A, B and scale, bit for bit
    ad = load_adapter(tmp_path / "ad")
    assert sorted(ad.factors) == [f"transformer.h.{i}.attn.c_attn:{s}" for i in range(2) for s in "qv"]
    for path, m in lora_modules(model).items():
        for s, f in m.factors().items():
            g = ad.factors[f"{path}:{s}"]
            assert torch.equal(g.A, f.A) and torch.equal(g.B, f.B) and g.scaling == f.scaling


# ------------------------------------------------------------------------------------------------ peft -> ours


@pytest.mark.float_sensitive
def test_peft_adapter_loads_in_ours(tmp_path, bert_dir):
    base = _load(bert_dir, "BertForSequenceClassification")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "word_embeddings"],
                     modules_to_save=["classifier"], task_type="SEQ_CLS",
                     rank_pattern={"value": 2}, alpha_pattern={"value": 5})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(base, cfg)
        _perturb(pm)
        pm.eval()
        pm.save_pretrained(tmp_path / "peft", save_embedding_layers=True)  # also writes the embedding table
    ad = load_adapter(tmp_path / "peft")
    assert "bert.embeddings.word_embeddings.base_layer.weight" in ad.extra_tensors
    assert ad.factors["bert.embeddings.word_embeddings"].A.shape == (4, 100)
    assert ad.factors["bert.encoder.layer.0.attention.self.value"].rank == 2
    assert ad.factors["bert.encoder.layer.0.attention.self.value"].scaling == 5 / 2
    ours = _load(bert_dir, "BertForSequenceClassification")
    apply_adapter(ours, ad)
    torch.testing.assert_close(_logits(ours), _logits(pm), atol=F64_MODEL_ATOL, rtol=0)


@pytest.mark.float_sensitive
def test_genuine_peft_c_attn_adapter_loads_as_qkv_slices(tmp_path, gpt2_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(_load(gpt2_dir, "GPT2LMHeadModel"),
                            LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn"], fan_in_fan_out=True))
        _perturb(pm)
        pm.eval()
        pm.save_pretrained(tmp_path / "peft")
    ad = load_adapter(tmp_path / "peft")
    A = load_file(tmp_path / "peft" / WEIGHTS_NAME)[f"{PREFIX}transformer.h.1.attn.c_attn.lora_A.weight"]
    for s in "qkv":
        assert torch.equal(ad.factors[f"transformer.h.1.attn.c_attn:{s}"].A, A)
    ours = _load(gpt2_dir, "GPT2LMHeadModel")
    apply_adapter(ours, ad)
    torch.testing.assert_close(_logits(ours), _logits(pm), atol=F64_MODEL_ATOL, rtol=0)


def test_missing_base_model_prefix_is_refused(tmp_path, bert_dir):
    model = _trained_bert(bert_dir)
    d = save_adapter(model, tmp_path / "ad", base_model_name_or_path=None)
    t = load_file(d / WEIGHTS_NAME)
    save_file({k.removeprefix(PREFIX): v for k, v in t.items()}, d / WEIGHTS_NAME)
    with pytest.raises(UserError, match="prefix"):
        load_adapter(d)


# ------------------------------------------------------------------------------------------------ loralib


def _loralib_merged_linear_forward(x, weight_t, bias, lora_A, lora_B, enable_lora, scaling):
    """loralib.MergedLinear.forward (fan_in_fan_out=True, as in its GPT-2 example), transcribed."""
    out_features = weight_t.shape[1]
    result = F.linear(x, weight_t.T, bias=bias)
    after_A = F.linear(x, lora_A)
    after_B = F.conv1d(after_A.transpose(-2, -1), lora_B.unsqueeze(-1), groups=sum(enable_lora)).transpose(-2, -1)
    lora_ind = torch.zeros(out_features, dtype=torch.bool).view(len(enable_lora), -1)
    lora_ind[enable_lora, :] = True
    lora_ind = lora_ind.view(-1)
    padded = x.new_zeros((*after_B.shape[:-1], out_features)).view(-1, out_features)
    padded[:, lora_ind] = after_B.reshape(-1, out_features // len(enable_lora) * sum(enable_lora))
    return result + padded.view(*after_B.shape[:-1], out_features) * scaling


@pytest.mark.float_sensitive
def test_loralib_merged_linear_checkpoint(tmp_path, gpt2_dir):
    r, alpha, d = 2, 16.0, 32
    g = torch.Generator().manual_seed(5)
    sd = {}
    for i in range(2):
        sd[f"transformer.h.{i}.attn.c_attn.lora_A"] = torch.randn(2 * r, d, generator=g)  # (r·n, d_in)
        sd[f"transformer.h.{i}.attn.c_attn.lora_B"] = torch.randn(2 * d, r, generator=g)  # (d_out·n, r)
    torch.save({"model_state_dict": sd}, tmp_path / "lora.pt")
    ad = load_loralib_checkpoint(tmp_path / "lora.pt", alpha=alpha, base_model_name_or_path=str(gpt2_dir))
    assert sorted(ad.factors) == [f"transformer.h.{i}.attn.c_attn:{s}" for i in range(2) for s in "qv"]
    model = _load(gpt2_dir, "GPT2LMHeadModel")
    layers = apply_adapter(model, ad)
    x = torch.randn(3, 5, d, generator=g)
    for i in range(2):
        m = layers[f"transformer.h.{i}.attn.c_attn"]
        assert isinstance(m, LoRAFusedQKV) and m.slices == ("q", "v")
        args = (x, m.base.weight, m.base.bias, sd[f"transformer.h.{i}.attn.c_attn.lora_A"],
                sd[f"transformer.h.{i}.attn.c_attn.lora_B"])
        # loralib's forward in float64 is the reference; ours runs in float32: x W + b (d + 1 roundings)
        # beside s·B(A x) (d + r + 1), then their sum (1), so γ_(d+r+2) times the same forward on |x|, |W|,
        # |b|, |A|, |B|, per element: N(0, 1) factors and s = 8 make outputs of O(100) whose terms can cancel
        # (the element that failed a 1e-5 atol/rtol on AVX-512 was such a one).
        qv = [True, False, True]
        ref = _loralib_merged_linear_forward(*(t.double() for t in args), qv, alpha / r)
        mag = _loralib_merged_linear_forward(*(t.double().abs() for t in args), qv, alpha / r)
        with torch.no_grad():
            assert_f32_close(m(x), ref, mag, rounds=d + r + 2, what=f"layer {i}")


@pytest.mark.float_sensitive
def test_merge_cli_takes_a_loralib_qkv_checkpoint(tmp_path, gpt2_dir, capsys):
    """python -m lora.merge on a loralib .pt: a q,k,v MergedLinear c_attn (enable_lora from the shapes, or named
    either way) and a whole c_proj merge to loralib's own W0 + ΔW (its forward, transcribed)."""
    r, alpha, d = 2, 8.0, 32
    g = torch.Generator().manual_seed(7)
    sd = {"transformer.h.0.attn.c_attn.lora_A": torch.randn(3 * r, d, generator=g),  # (r·3, d_in)
          "transformer.h.0.attn.c_attn.lora_B": torch.randn(3 * d, r, generator=g),  # (d_out·3, r)
          "transformer.h.1.attn.c_proj.lora_A": torch.randn(r, d, generator=g),
          "transformer.h.1.attn.c_proj.lora_B": torch.randn(d, r, generator=g)}
    torch.save(sd, tmp_path / "qkv.pt")
    base = _load(gpt2_dir, "GPT2Model")
    x = torch.randn(2, 5, d, generator=g)
    c_attn = base.h[0].attn.c_attn
    # References in float64; the merge rounds in float32: W + s·(B A)ᵀ (r + 2 roundings), then x W + b
    # (d + 1), each bounded by γ_N times the same expression on absolute values (numerics).
    args = (x, c_attn.weight, c_attn.bias, sd["transformer.h.0.attn.c_attn.lora_A"],
            sd["transformer.h.0.attn.c_attn.lora_B"])
    ref = _loralib_merged_linear_forward(*(t.double() for t in args), [True, True, True], alpha / r)
    mag = _loralib_merged_linear_forward(*(t.double().abs() for t in args), [True, True, True], alpha / r)
    W, A, B = (t.double() for t in (base.h[1].attn.c_proj.weight, sd["transformer.h.1.attn.c_proj.lora_A"],
                                    sd["transformer.h.1.attn.c_proj.lora_B"]))
    ref_proj, mag_proj = W + (alpha / r) * (B @ A).T, W.abs() + (alpha / r) * (B.abs() @ A.abs()).T
    for i, flag in enumerate(([], ["--enable-lora", "q,k,v"], ["--enable-lora", "True,True,True"])):
        out = tmp_path / f"merged{i}"
        argv = ["--adapter", str(tmp_path / "qkv.pt"), "--alpha", str(alpha), "--base", str(gpt2_dir), "--out",
                str(out), "--quiet", *flag]
        assert merge_main(argv) == 0
        merged = _load(out, "GPT2Model")
        with torch.no_grad():
            assert_f32_close(merged.h[0].attn.c_attn(x), ref, mag, rounds=d + r + 3, what="c_attn")
        assert_f32_close(merged.h[1].attn.c_proj.weight, ref_proj, mag_proj, rounds=r + 2, what="c_proj")
    # The paper's q,v flags do not fit a q,k,v checkpoint: one line naming the way out, nothing written.
    capsys.readouterr()
    argv = ["--adapter", str(tmp_path / "qkv.pt"), "--alpha", "8", "--base", str(gpt2_dir), "--out",
            str(tmp_path / "bad"), "--quiet", "--enable-lora", "q,v"]
    assert merge_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--enable-lora" in err and "qkv.pt" in err and not (tmp_path / "bad").exists()


@pytest.mark.float_sensitive
def test_merge_cli_equals_real_loralib_merged_linear(tmp_path, gpt2_dir):
    """The real loralib package as the reference: a MergedLinear(enable_lora=[True, False, True],
    fan_in_fan_out=True) on GPT-2's c_attn, its checkpoint merged by ``python -m lora.merge`` equals loralib's own
    merge (``eval()`` folds s·ΔW into the weight)."""
    loralib = pytest.importorskip("loralib")
    r, alpha = 2, 8
    base = _load(gpt2_dir, "GPT2Model")
    c_attn = base.h[0].attn.c_attn  # Conv1D, weight (d_in, 3·d_out)
    d_in, d_out3 = c_attn.weight.shape
    layer = loralib.MergedLinear(d_in, d_out3, r=r, lora_alpha=alpha, enable_lora=[True, False, True],
                                 fan_in_fan_out=True)
    with torch.no_grad():
        layer.weight.copy_(c_attn.weight)  # fan_in_fan_out: loralib stores (d_in, d_out) as Conv1D does
        layer.bias.copy_(c_attn.bias)
        g = torch.Generator().manual_seed(11)
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    torch.save({f"h.0.attn.c_attn.{k}": v for k, v in loralib.lora_state_dict(layer).items()}, tmp_path / "qv.pt")
    out = tmp_path / "merged"
    assert merge_main(["--adapter", str(tmp_path / "qv.pt"), "--alpha", str(alpha), "--base", str(gpt2_dir),
                       "--enable-lora", "q,v", "--out", str(out), "--quiet"]) == 0
    x = torch.randn(2, 5, d_in, generator=g)
    # Two float32 merges then forwards, each W + s·ΔW (r + 2 roundings) then x W + b (d_in + 1): γ_N over both
    # sides times the forward on absolute values (numerics).
    parts = (x, c_attn.weight, c_attn.bias, layer.lora_A, layer.lora_B)
    absolute = (t.detach().double().abs() for t in parts)
    mag = _loralib_merged_linear_forward(*absolute, [True, False, True], alpha / r)
    layer.eval()  # loralib merges here
    merged = _load(out, "GPT2Model")
    with torch.no_grad():
        assert_f32_close(merged.h[0].attn.c_attn(x), layer(x), mag, rounds=2 * (d_in + r + 3))


def test_loralib_enable_lora_flags_and_inference(tmp_path):
    from lora.adapter_io import parse_enable_lora

    assert parse_enable_lora("q,v") == parse_enable_lora("True,False,True") == (True, False, True)
    assert parse_enable_lora("v, q") == (True, False, True) and parse_enable_lora("k") == (False, True, False)
    for bad in ("q,x", "True,False", "False,False,False", "", "q,q"):
        with pytest.raises(UserError, match="--enable-lora"):
            parse_enable_lora(bad)
    d, r = 8, 2
    torch.save({"h.0.attn.c_attn.lora_A": torch.randn(r, d), "h.0.attn.c_attn.lora_B": torch.randn(d, r)},
               tmp_path / "one.pt")
    with pytest.raises(UserError, match="name the adapted slices with --enable-lora"):
        load_loralib_checkpoint(tmp_path / "one.pt", alpha=1, enable_lora=None)  # one group: q, k or v?
    ad = load_loralib_checkpoint(tmp_path / "one.pt", alpha=1, enable_lora=(False, True, False))
    assert sorted(ad.factors) == ["h.0.attn.c_attn:k"]
    torch.save({"h.0.attn.c_attn.lora_A": torch.randn(2 * r, d), "h.0.attn.c_attn.lora_B": torch.randn(2 * d, r)},
               tmp_path / "two.pt")
    assert sorted(load_loralib_checkpoint(tmp_path / "two.pt", alpha=1, enable_lora=None).factors) == [
        "h.0.attn.c_attn:q", "h.0.attn.c_attn:v"]


def test_loralib_plain_linear_checkpoint(tmp_path, bert_dir):
    g = torch.Generator().manual_seed(6)
    sd = {"bert.encoder.layer.1.attention.self.query.lora_A": torch.randn(4, 32, generator=g),
          "bert.encoder.layer.1.attention.self.query.lora_B": torch.randn(32, 4, generator=g),
          "bert.encoder.layer.1.attention.self.query.weight": torch.randn(32, 32)}  # non-LoRA keys are ignored
    torch.save(sd, tmp_path / "lora.pt")
    ad = load_loralib_checkpoint(tmp_path / "lora.pt", alpha=8)
    f = ad.factors["bert.encoder.layer.1.attention.self.query"]
    assert f.scaling == 2.0 and torch.equal(f.B, sd["bert.encoder.layer.1.attention.self.query.lora_B"])
    torch.save({"x.lora_A": torch.randn(4, 8)}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="only lora_A"):
        load_loralib_checkpoint(tmp_path / "bad.pt", alpha=8)


# ------------------------------------------------------------------------------------------------ base weights


def test_fingerprint_and_wrong_base(tmp_path, bert_dir):
    plain = _load(bert_dir, "BertForSequenceClassification")
    paths = [f"bert.encoder.layer.{i}.attention.self.{n}" for i in range(2) for n in ("query", "value")]
    whole, adapted = base_fingerprint(plain, module_paths=["bert"]), base_fingerprint(plain, module_paths=paths)
    model = _trained_bert(bert_dir)  # same base weights, LoRA injected and trained
    assert base_fingerprint(model) == adapted and base_fingerprint(model, module_paths=["bert"]) == whole
    d = save_adapter(model, tmp_path / "ad", base_model_name_or_path=str(bert_dir))
    other = _bert_cls()
    with torch.no_grad():
        other.bert.encoder.layer[0].attention.self.query.weight.add_(1e-3)
    with pytest.raises(UserError, match=r"ad: base model fingerprint differs"):
        apply_adapter(other, load_adapter(d))
    apply_adapter(other, load_adapter(d), check_fingerprint=False)  # the escape hatch


@pytest.mark.float_sensitive
def test_load_base_weights_orientation(tmp_path, gpt2_dir, bert_dir):
    model = _trained_gpt2(gpt2_dir)
    d = save_adapter(model, tmp_path / "ad", base_model_name_or_path=str(gpt2_dir))
    w0 = load_base_weights(d)
    base = _load(gpt2_dir, "GPT2LMHeadModel")
    W = base.transformer.h[1].attn.c_attn.weight  # Conv1D (d_in, 3 d_out)
    assert w0["transformer.h.1.attn.c_attn:v"].dtype == torch.float64
    torch.testing.assert_close(w0["transformer.h.1.attn.c_attn:v"], W[:, 64:96].T.double())
    # the slice really is the v projection: x @ W[:, v] == F.linear(x, W0_v)
    x = torch.randn(4, 32)
    bias = base.transformer.h[1].attn.c_attn.bias[64:96].double()
    w_v = w0["transformer.h.1.attn.c_attn:v"]
    # float32 x W + b against float64: d + 1 = 33 roundings on |x| |W| + |b| (numerics)
    assert_f32_close(base.transformer.h[1].attn.c_attn(x)[:, 64:96], x.double() @ w_v.T + bias,
                     x.double().abs() @ w_v.abs().T + bias.abs(), rounds=33)
    bw = load_base_weights(bert_dir, ["encoder.layer.0.attention.self.query", "bert.embeddings.word_embeddings"])
    bert = _load(bert_dir, "BertModel")
    assert torch.equal(bw["encoder.layer.0.attention.self.query"],
                       bert.encoder.layer[0].attention.self.query.weight.double())
    assert bw["bert.embeddings.word_embeddings"].shape == (32, 100)  # (dim, vocab): nn.Linear orientation
    assert torch.equal(load_base_weights(model, ["transformer.h.1.attn.c_attn:v"])["transformer.h.1.attn.c_attn:v"],
                       w0["transformer.h.1.attn.c_attn:v"])  # a loaded LoRA model gives W0, not W0 + ΔW


# ------------------------------------------------------------------------------------------------ bad input


def _good(tmp_path, bert_dir) -> Path:
    return save_adapter(_trained_bert(bert_dir), tmp_path / "ad", base_model_name_or_path=str(bert_dir))


def _edit_tensors(d: Path, fn) -> None:
    t = load_file(d / WEIGHTS_NAME)
    fn(t)
    save_file(t, d / WEIGHTS_NAME)


def _edit_config(d: Path, fn) -> None:
    c = json.loads((d / CONFIG_NAME).read_text())
    fn(c)
    (d / CONFIG_NAME).write_text(json.dumps(c))


Q0 = f"{PREFIX}bert.encoder.layer.0.attention.self.query"
BAD_INPUTS = {
    "missing_dir": (lambda d: d.rename(d.with_name("gone")), "does not exist"),
    "file_not_dir": (lambda d: (__import__("shutil").rmtree(d), d.write_text("x")), "is a file"),
    "empty_dir": (lambda d: [p.unlink() for p in d.iterdir()], "empty"),
    "missing_config": (lambda d: (d / CONFIG_NAME).unlink(), "adapter_config.json: missing"),
    "invalid_json": (lambda d: (d / CONFIG_NAME).write_text("{not json"), "invalid JSON"),
    "not_object": (lambda d: (d / CONFIG_NAME).write_text("[1, 2]"), "JSON object"),
    "missing_field": (lambda d: _edit_config(d, lambda c: c.pop("r")), "missing field"),
    "not_lora": (lambda d: _edit_config(d, lambda c: c.update(peft_type="IA3")), "only 'LORA'"),
    "missing_weights": (lambda d: (d / WEIGHTS_NAME).unlink(), "safetensors: missing"),
    "truncated_weights": (lambda d: (d / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes()[:-100]),
                          "not a readable safetensors"),
    "corrupt_weights": (lambda d: (d / WEIGHTS_NAME).write_bytes(b"\x00garbage" * 10), "not a readable safetensors"),
    "missing_B": (lambda d: _edit_tensors(d, lambda t: t.pop(f"{Q0}.lora_B.weight")), "no lora_B"),
    "missing_A": (lambda d: _edit_tensors(d, lambda t: t.pop(f"{Q0}.lora_A.weight")), "no lora_A"),
    "AB_mismatch": (lambda d: _edit_tensors(d, lambda t: t.update({f"{Q0}.lora_B.weight": torch.zeros(32, 3)})),
                    "do not form B @ A"),
    "rank_vs_r": (lambda d: _edit_config(d, lambda c: c.update(r=8)), "r=8"),
    "nan": (lambda d: _edit_tensors(d, lambda t: t[f"{Q0}.lora_A.weight"].__setitem__((0, 0), float("nan"))),
            "NaN or Inf"),
    "inf": (lambda d: _edit_tensors(d, lambda t: t[f"{Q0}.lora_B.weight"].__setitem__((1, 1), float("inf"))),
            "NaN or Inf"),
    # our sidecar (lora_toolkit.json): the line names it
    "sidecar_invalid_json": (lambda d: (d / TOOLKIT_FILE).write_text("{"), "lora_toolkit.json: invalid JSON"),
    "sidecar_not_object": (lambda d: (d / TOOLKIT_FILE).write_text("[]"), "lora_toolkit.json: expected a JSON object"),
    "sidecar_unknown_key": (lambda d: (d / TOOLKIT_FILE).write_text('{"lora_alpha": 3}'),
                            "lora_toolkit.json: unknown key"),
    "sidecar_bad_seed": (lambda d: (d / TOOLKIT_FILE).write_text('{"seed": "zero"}'),
                         "lora_toolkit.json: seed must be an integer"),
    "bad_init": (lambda d: save_file({"bert.encoder.layer.0.attention.self.query": torch.zeros(2, 32)},
                                     d / INIT_NAME), "init.safetensors"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_adapter_raises_user_error_naming_the_file(tmp_path, bert_dir, case, capsys):
    d = _good(tmp_path, bert_dir)
    breaker, message = BAD_INPUTS[case]
    breaker(d)
    with pytest.raises(UserError, match=message) as exc:
        load_adapter(d)
    assert str(d) in str(exc.value) and "\n" not in str(exc.value)
    # the CLI: one line, exit 2, nothing at --out
    capsys.readouterr()
    assert merge_main(["--adapter", str(d), "--out", str(tmp_path / "merged"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(d) in err and not (tmp_path / "merged").exists()


def test_shape_mismatch_with_base_names_file_and_module(tmp_path, bert_dir):
    from transformers import BertConfig, BertForSequenceClassification

    d = _good(tmp_path, bert_dir)
    bigger = BertForSequenceClassification(BertConfig(num_labels=3, **{**BERT_KW, "hidden_size": 48})).eval()
    with pytest.raises(UserError, match=r"ad: module bert.encoder.layer.0.attention.self.query.*do not fit"):
        apply_adapter(bigger, load_adapter(d), check_fingerprint=False)
    assert not lora_modules(bigger)  # nothing was injected


def test_cli_subprocess_bad_input_and_existing_out(tmp_path, bert_dir):
    """One real process: a bad adapter with --overwrite of an existing --out leaves that --out untouched."""
    d = _good(tmp_path, bert_dir)
    (d / CONFIG_NAME).write_text("{oops")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "lora.merge", "--adapter", str(d), "--out", str(existing),
                           "--overwrite"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and "invalid JSON" in proc.stderr
    assert [p.name for p in existing.iterdir()] == ["keep.txt"] and (existing / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "existing"]  # no temporary leftovers


def test_stored_dtype_is_kept(tmp_path, bert_dir):
    d = _good(tmp_path, bert_dir)
    _edit_tensors(d, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    ad = load_adapter(d)
    assert {f.A.dtype for f in ad.factors.values()} == {torch.bfloat16}


@pytest.mark.float_sensitive
def test_mixed_ranks_round_trip_through_peft(tmp_path, bert_dir):
    model = _load(bert_dir, "BertForSequenceClassification")
    inject_lora(model, ["query"], r=4, alpha=8)
    inject_lora(model, ["value"], r=2, alpha=3, layers=[1])
    _perturb(model)
    d = save_adapter(model, tmp_path / "ad", base_model_name_or_path=str(bert_dir), modules_to_save=["classifier"])
    ad = load_adapter(d)
    assert ad.factors["bert.encoder.layer.1.attention.self.value"].scaling == 1.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(_load(bert_dir, "BertForSequenceClassification"), d).eval()
    torch.testing.assert_close(_logits(pm), _logits(model), atol=F64_MODEL_ATOL, rtol=0)


def test_fused_adapter_trained_further_in_peft_loads_as_shared_A_slices(tmp_path, gpt2_dir):
    d = save_adapter(_trained_gpt2(gpt2_dir), tmp_path / "ad", base_model_name_or_path=str(gpt2_dir))
    key = f"{PREFIX}transformer.h.0.attn.c_attn.lora_B.weight"
    _edit_tensors(d, lambda t: t[key][32:64].fill_(0.5))  # k rows no longer zero
    with pytest.warns(UserWarning, match="block-structured"):
        ad = load_adapter(d)
    B = load_file(d / WEIGHTS_NAME)[key]
    f = ad.factors["transformer.h.0.attn.c_attn:k"]
    assert f.rank == 4 and torch.equal(f.B, B[32:64])
    assert sorted(k for k in ad.factors if k.startswith("transformer.h.1.")) == [
        "transformer.h.1.attn.c_attn:q", "transformer.h.1.attn.c_attn:v"]  # the untouched layer still splits

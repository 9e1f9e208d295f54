"""lora.dora: DoRA adapters written by peft load with their magnitudes and merge to peft's merge_and_unload
(Linear, Embedding, GPT-2's fused Conv1D c_attn, and on a PiSSA residual); inconsistent files are refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora.adapter_io import PREFIX, WEIGHTS_NAME, apply_adapter, load_adapter, save_adapter
from lora.dora import dora_weight, row_norms
from lora.errors import UserError
from lora.inject import inject_lora
from lora.merge import main as merge_main

pytest.importorskip("peft")
from peft_adapters import load, max_state_diff, output, peft_adapter, peft_merged, save_bases  # noqa: E402


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return save_bases(tmp_path_factory.mktemp("bases"))


@pytest.mark.float_sensitive
def test_dora_weight_at_init_is_w0_and_rescales_rows():
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(5, 7, generator=g, dtype=torch.float64)
    zero = torch.zeros_like(W0)
    torch.testing.assert_close(dora_weight(W0, zero, row_norms(W0)), W0)  # B = 0, m = ‖W0‖_c: no change
    m = torch.arange(1.0, 6.0, dtype=torch.float64)
    out = dora_weight(W0, zero, m)
    torch.testing.assert_close(row_norms(out), m)  # each row now has norm m_i, direction kept
    torch.testing.assert_close(out / row_norms(out)[:, None], W0 / row_norms(W0)[:, None])
    with pytest.raises(ValueError, match=r"m \(4,\)"):
        dora_weight(W0, zero, m[:4])


MERGE_CASES = {
    "bert_linear_and_embedding": ("bert", dict(r=4, lora_alpha=8, use_dora=True,
                                               target_modules=["query", "value", "word_embeddings"])),
    "bert_rslora_patterns": ("bert", dict(r=4, lora_alpha=8, use_dora=True, use_rslora=True, target_modules=["key"],
                                          rank_pattern={"layer.1.attention.self.key": 2})),
    "gpt2_fused_c_attn": ("gpt2", dict(r=2, lora_alpha=4, use_dora=True, target_modules=["c_attn"],
                                       fan_in_fan_out=True)),
    # the whole Conv1D modules (LoRAConv1D): DoRA's norm is taken over W as (d_out, d_in), not as stored
    "gpt2_c_proj_c_fc": ("gpt2", dict(r=2, lora_alpha=4, use_dora=True, target_modules=["c_proj", "c_fc"],
                                      fan_in_fan_out=True)),
    "gpt2_pissa_dora_c_fc": ("gpt2", dict(r=2, lora_alpha=4, use_dora=True, init_lora_weights="pissa",
                                          target_modules=["c_fc"], fan_in_fan_out=True)),
    "bert_pissa_dora": ("bert", dict(r=4, lora_alpha=8, use_dora=True, init_lora_weights="pissa",
                                     target_modules=["query", "value"])),
}


@pytest.mark.float_sensitive
@pytest.mark.parametrize("case", sorted(MERGE_CASES))
def test_merge_equals_peft(bases, tmp_path, case):
    name, kw = MERGE_CASES[case]
    base = bases[name]
    ad = peft_adapter(base, tmp_path / "ad", **kw)
    adapter = load_adapter(ad)
    assert set(adapter.magnitudes) == set(adapter.factors)
    assert all(adapter.magnitudes[k].shape == (f.B.shape[0],) for k, f in adapter.factors.items())
    out = tmp_path / "merged"
    assert merge_main(["--adapter", str(ad), "--base", str(base), "--out", str(out), "--quiet"]) == 0
    ours, ref = load(out, like=base), peft_merged(base, ad)
    # Ours is float64 rounded once; peft's float32 W' = m/‖W0 + s·B A‖_c ⊙ (W0 + s·B A) rounds along
    # r + d_in + 6 ≤ 138 steps on |W'| < 1 (γ_138 = 8e-6, numerics), plus, for PiSSA, its float32 SVD
    # (test_init_residual._factorization_bound: ≤ 2e-5 on BERT's q, v, ≤ 9e-5 on GPT-2's 128x32 c_fc): 2e-4
    # holds on any CPU (2e-7 measured). The outputs run in float64 (peft_adapters.output), so only those weight
    # differences reach them (5e-7 measured); plain LoRA in place of DoRA is > 5e-3 off (below).
    assert max_state_diff(ours, ref) <= 2e-4
    torch.testing.assert_close(output(ours), output(ref), atol=2e-4, rtol=0)
    # DoRA is not plain LoRA: W0 + s·B·A alone is far from it
    plain = load(base)
    apply_adapter(plain, adapter, allow_dora=True)
    assert (output(plain) - output(ref)).abs().max() > 50 * 1e-4


def test_apply_adapter_refuses_dora_unless_the_caller_merges(bases, tmp_path):
    ad = peft_adapter(bases["bert"], tmp_path / "ad", r=2, lora_alpha=4, use_dora=True, target_modules=["query"])
    model = load(bases["bert"])
    with pytest.raises(UserError, match="DoRA adapter .* cannot run as plain LoRA layers; merge it"):
        apply_adapter(model, load_adapter(ad))
    assert not any("lora" in n for n, _ in model.named_modules())  # nothing injected


Q0 = f"{PREFIX}encoder.layer.0.attention.self.query"


def _edit(d, tensors=None, config=None):
    if tensors is not None:
        t = load_file(d / WEIGHTS_NAME)
        tensors(t)
        save_file(t, d / WEIGHTS_NAME)
    if config is not None:
        c = json.loads((d / "adapter_config.json").read_text())
        config(c)
        (d / "adapter_config.json").write_text(json.dumps(c))


BAD = {
    "magnitude_without_use_dora": (dict(config=lambda c: c.update(use_dora=False)), "no use_dora: true"),
    "use_dora_without_magnitude": (dict(tensors=lambda t: t.pop(f"{Q0}.lora_magnitude_vector")),
                                   "has no lora_magnitude_vector"),
    "magnitude_wrong_shape": (dict(tensors=lambda t: t.update({f"{Q0}.lora_magnitude_vector": torch.ones(31)})),
                              r"lora_magnitude_vector \(31,\) is not \(32,\)"),
    "magnitude_nan": (dict(tensors=lambda t: t[f"{Q0}.lora_magnitude_vector"].__setitem__(0, float("nan"))),
                      "NaN or Inf"),
    "magnitude_orphan": (dict(tensors=lambda t: t.update({f"{PREFIX}pooler.dense.lora_magnitude_vector":
                                                          torch.ones(32)})), "has no lora_A/lora_B"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_inconsistent_dora_files_are_refused_in_one_line(bases, tmp_path, capsys, case):
    ad = peft_adapter(bases["bert"], tmp_path / "ad", r=2, lora_alpha=4, use_dora=True, target_modules=["query"])
    edits, message = BAD[case]
    _edit(ad, **edits)
    with pytest.raises(UserError, match=message):
        load_adapter(ad)
    out = tmp_path / "merged"
    assert merge_main(["--adapter", str(ad), "--base", str(bases["bert"]), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(ad) in err and not out.exists()


def test_dora_on_our_fused_qv_layout_is_refused(bases, tmp_path):
    """Our q/v-only fused c_attn export leaves k unadapted; a DoRA magnitude would rescale k too: refused."""
    model = load(bases["gpt2"])
    inject_lora(model, ["q", "v"], r=2, alpha=4, seed=0)
    ad = save_adapter(model, tmp_path / "ad", base_model_name_or_path=str(bases["gpt2"]))
    magnitudes = {f"{PREFIX}transformer.h.{i}.attn.c_attn.lora_magnitude_vector": torch.ones(96) for i in (0, 1)}
    _edit(ad, tensors=lambda t: t.update(magnitudes), config=lambda c: c.update(use_dora=True))
    with pytest.raises(UserError, match=r"DoRA on a fused q/k/v module with slices \['q', 'v'\] only"):
        load_adapter(ad)

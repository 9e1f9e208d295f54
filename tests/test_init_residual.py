"""lora.init_residual: PiSSA / OLoRA adapters saved without conversion merge and load as peft loads them (on the
residual W − s·B₀A₀ that peft rebuilds), converted ones as plain LoRA; inits that cannot be rebuilt are refused
with the conversion route."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from numerics import U32, assert_f32_close, assert_within, gamma
from torch import nn

from lora.adapter_io import apply_adapter, load_adapter, load_base_weights
from lora.errors import UserError
from lora.init_residual import CONVERSION_ROUTE, base_changing_init, residual_weight, truncated_svd_residual
from lora.merge import main as merge_main

pytest.importorskip("peft")
from peft_adapters import (  # noqa: E402
    load,
    max_state_diff,
    output,
    peft_adapter,
    peft_loaded,
    peft_merged,
    save_bases,
)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return save_bases(tmp_path_factory.mktemp("bases"))


# ------------------------------------------------------------------------------------------------ the rule
@pytest.mark.parametrize("init, kind", [(True, None), (False, None), ("gaussian", None), ("eva", None),
                                        ("orthogonal", None), ("mica", None), ("pissa", "pissa"),
                                        ("olora", "olora"), ("OLoRA", "olora")])
def test_inits_that_change_the_base_are_named(init, kind):
    assert base_changing_init({"init_lora_weights": init}, "ad") == kind
    assert base_changing_init({}, "ad") is None  # peft's default: true


@pytest.mark.parametrize("init, words", [
    ("pissa_niter_4", ["randomized SVD", "path_initial_model_for_weight_conversion"]),
    ("corda", ["CorDA", "path_initial_model_for_weight_conversion"]),
    ("lora_ga", ["LoRA-GA", "path_initial_model_for_weight_conversion"]),
    ("loftq", ["LoftQ", "--base", "init_lora_weights to true"]),
    ("pissa_sometimes", ["not an init peft knows"]),
    (3, ["must be true, false or a string"]),
])
def test_inits_that_cannot_be_rebuilt_are_refused_with_the_way_out(init, words):
    with pytest.raises(UserError) as exc:
        base_changing_init({"init_lora_weights": init}, "some/adapter")
    msg = str(exc.value)
    assert msg.startswith("some/adapter: ") and "\n" not in msg and all(w in msg for w in words), msg


# ------------------------------------------------------------------------------------------------ the maths
@pytest.mark.float_sensitive
def test_pissa_residual_of_a_rank_r_weight_is_zero_and_keeps_the_tail():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(9, 9, generator=g, dtype=torch.float64))
    S = torch.tensor([9.0, 7, 5, 3, 2, 1, 0.5, 0.25, 0.1], dtype=torch.float64)
    W = (U[:, :9] * S) @ V.T
    res = truncated_svd_residual(W, 3)
    torch.testing.assert_close(res, (U[:, 3:9] * S[3:]) @ V[:, 3:].T)  # W minus its top-3 triplets
    assert torch.linalg.matrix_norm(truncated_svd_residual((U[:, :3] * S[:3]) @ V[:, :3].T, 3)) < 1e-12


@pytest.mark.float_sensitive
def test_olora_residual_removes_s_times_the_projection_on_the_first_r_stored_columns():
    torch.manual_seed(0)
    lin = nn.Linear(6, 10)  # weight (10, 6): QR over its columns, i.e. the input dimensions
    W = lin.weight.detach().double()
    res = residual_weight(lin, init="olora", r=2, scaling=0.5, where="ad", path="x").double()
    Q, _ = torch.linalg.qr(W[:, :2])
    # ours is computed in float64 and rounded once to the float32 weight: one rounding of |W − s·Q Qᵀ W|, plus
    # float64 noise far below it (numerics)
    ref = W - 0.5 * Q @ Q.T @ W
    assert_f32_close(res, ref, W.abs() + 0.5 * Q.abs() @ Q.abs().T @ W.abs(), rounds=2)
    assert residual_weight(nn.Embedding(10, 4), init="pissa", r=2, scaling=1.0, where="ad", path="e") is None
    with pytest.raises(UserError, match="ad: module c: init_lora_weights 'pissa' on a Conv2d"):
        residual_weight(nn.Conv2d(2, 2, 1), init="pissa", r=1, scaling=1.0, where="ad", path="c")


# ------------------------------------------------------------------------------------------------ against peft
def _factorization_bound(W: torch.Tensor, init: str, r: int, scaling: float) -> float:
    """How far peft's float32 residual may sit from ours (float64) for a ``(d_out, d_in)`` W, elementwise.

    peft factors W in float32 with LAPACK's SVD (PiSSA) or QR (OLoRA), which are normwise backward stable:
    the factors are exact for some W + E with ‖E‖₂ ≈ n·u·‖W‖₂ (n the larger dimension: the usual size of
    that error; the proven constant is larger). The residual then moves by ‖E‖₂ (1 + s·κ), κ the
    conditioning of the subspace removed: σ₁/(σ_r − σ_(r+1)) for PiSSA's top r singular triplets (Wedin's
    theorem; peft removes them unscaled, s = 1), σ₁/σ_min(W[:, :r]) for OLoRA's span of the first r columns.
    The final W − s·B A rounds r + 2 more times on |W| + s|B||A| ≤ (1 + s)·‖W‖₂ per element
    (numerics.gamma). With these bases' gaps (σ₁/gap up to 90) the bound runs from 1e-6 to 4e-5; a wrong
    orientation or slice is off by O(0.1).
    """
    W = W.to(torch.float64)
    sv = torch.linalg.svdvals(W)
    if init == "pissa":
        kappa, scaling = sv[0] / (sv[r - 1] - sv[r]), 1.0
    else:
        kappa = sv[0] / torch.linalg.svdvals(W[:, :r])[-1]
    n = max(W.shape)
    return float(n * U32 * sv[0] * (1 + scaling * kappa) + gamma(r + 2) * (1 + scaling) * sv[0])


def _peft_w0(pm, key: str) -> torch.Tensor:
    """The weight peft's loaded model adapts for a module key, in nn.Linear orientation."""
    path, _, s = key.partition(":")
    layer = pm.base_model.model.get_submodule(path)
    w = layer.base_layer.weight.detach().double()
    if type(layer.base_layer).__name__ == "Conv1D":
        w = w.T
        if s:
            d = w.shape[0] // 3
            w = w[("q", "k", "v").index(s) * d :][:d]
    return w


LOAD_CASES = {
    "pissa_bert": ("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights="pissa")),
    "olora_bert_patterns": ("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights="olora",
                                         rank_pattern={"value": 2}, alpha_pattern={"value": 3})),
    "olora_bert_rslora": ("bert", dict(r=4, lora_alpha=8, target_modules=["key"], init_lora_weights="olora",
                                       use_rslora=True)),
    "pissa_gpt2_fused_c_attn": ("gpt2", dict(r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights="pissa",
                                             fan_in_fan_out=True)),
    "olora_gpt2_square_conv1d": ("gpt2", dict(r=2, lora_alpha=6, target_modules=r".*attn\.c_proj",
                                              init_lora_weights="olora", fan_in_fan_out=True)),
}


@pytest.mark.float_sensitive
@pytest.mark.parametrize("case", sorted(LOAD_CASES))
def test_base_weights_are_the_residual_peft_adapts(bases, tmp_path, case):
    """load_base_weights (the analysis's W0) equals the weight in peft's loaded model, not the stored one."""
    name, kw = LOAD_CASES[case]
    ad = peft_adapter(bases[name], tmp_path / "ad", **kw)
    pm = peft_loaded(bases[name], ad)
    ours = load_base_weights(ad, base=str(bases[name]))
    stored = load_base_weights(bases[name], list(ours))
    factors = load_adapter(ad).factors
    assert set(ours) == set(factors)
    for key, W in ours.items():
        f = factors[key]
        bound = _factorization_bound(stored[key], kw["init_lora_weights"], f.rank, f.scaling)
        assert_within(W, _peft_w0(pm, key), bound, key)
        assert (W - stored[key]).abs().max() > 1e-3, key  # the init did change the base


MERGE_CASES = {k: LOAD_CASES[k] for k in ("pissa_bert", "olora_bert_patterns", "pissa_gpt2_fused_c_attn")}


@pytest.mark.float_sensitive
@pytest.mark.parametrize("case", sorted(MERGE_CASES))
def test_merge_equals_peft_unconverted_and_converted(bases, tmp_path, case):
    """Saved without conversion (peft rebuilds W_res on load) and with it (plain LoRA of rank 2r on W): both merge
    to peft's merge_and_unload, and to the same model, the one that was trained."""
    name, kw = MERGE_CASES[case]
    base = bases[name]
    conv = peft_adapter(base, tmp_path / "ad", convert=True, **kw)
    raw = conv.with_name("ad_raw")
    assert load_adapter(raw).config["init_lora_weights"] == kw["init_lora_weights"]
    assert load_adapter(conv).config["init_lora_weights"] is True and load_adapter(conv).rank == 2 * kw["r"]
    # The merged weights differ from peft's by its float32 factorization (_factorization_bound, ≤ 4e-5 on
    # these bases) and merge roundings (γ_(r+2), < 1e-7 relative): 1e-4 holds on any CPU (5e-7 measured).
    # Outputs are run in float64 (peft_adapters.output), so only those weight differences reach them: 5e-7
    # measured under every forced kernel choice, against 1e-4 here and > 5e-3 for the naive merge below.
    outs = {}
    for d in (raw, conv):
        out = tmp_path / f"merged_{d.name}"
        assert merge_main(["--adapter", str(d), "--base", str(base), "--out", str(out), "--quiet"]) == 0
        ours, ref = load(out, like=base), peft_merged(base, d)
        assert max_state_diff(ours, ref) <= 1e-4
        outs[d.name] = output(ours)
        torch.testing.assert_close(outs[d.name], output(ref), atol=1e-4, rtol=0)
    torch.testing.assert_close(outs["ad_raw"], outs["ad"], atol=1e-4, rtol=0)
    # what ignoring init_lora_weights gives (s·B·A added to the stored W) is far from the model peft runs
    naive = tmp_path / "naive"
    shutil.copytree(raw, naive)
    cfg = json.loads((naive / "adapter_config.json").read_text())
    (naive / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": True}))
    argv = ["--adapter", str(naive), "--base", str(base), "--out", str(tmp_path / "merged_naive"), "--quiet"]
    assert merge_main(argv) == 0
    assert (output(load(tmp_path / "merged_naive", like=base)) - outs["ad_raw"]).abs().max() > 50 * 1e-4


@pytest.mark.float_sensitive
def test_apply_adapter_runs_the_model_peft_runs(bases, tmp_path):
    """Unmerged: the injected layers sit on W_res, so the forward equals peft's PeftModel (not only the merge)."""
    name, kw = LOAD_CASES["olora_bert_patterns"]
    ad = peft_adapter(bases[name], tmp_path / "ad", **kw)
    model = load(bases[name])
    apply_adapter(model, load_adapter(ad))
    # float64 forwards of float32 weights that differ by peft's float32 QR (_factorization_bound: ≤ 3e-6
    # here); 5e-9 measured on the O(1) hidden states
    torch.testing.assert_close(output(model), output(peft_loaded(bases[name], ad)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa_niter_4", "corda", "lora_ga"])
def test_merge_refuses_what_cannot_be_rebuilt_in_one_line(bases, tmp_path, capsys, init):
    ad = peft_adapter(bases["bert"], tmp_path / "ad", r=4, lora_alpha=8, target_modules=["query"])
    cfg = ad / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"init_lora_weights": true', f'"init_lora_weights": "{init}"'))
    out = tmp_path / "merged"
    assert merge_main(["--adapter", str(ad), "--base", str(bases["bert"]), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and init in err and CONVERSION_ROUTE in err and not out.exists()
    with pytest.raises(UserError, match=init):
        load_base_weights(ad, base=str(bases["bert"]))

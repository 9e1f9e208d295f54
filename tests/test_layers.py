"""lora.layers: the maths of each LoRA layer against explicit dense computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_f32_close
from scipy import stats
from torch import nn

from lora.inject import inject_lora, lora_modules, mark_only_lora_trainable
from lora.layers import (
    LoRAConv1D,
    LoRAEmbedding,
    LoRAFactors,
    LoRAFusedQKV,
    LoRALinear,
    delta_weight,
    init_lora_A_,
    lora_scaling,
)


def _randomize_B(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.rpartition(".")[2].startswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g))


def _conv1d(d_in, d_out_total, seed=0):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(seed)
    c = Conv1D(d_out_total, d_in)
    with torch.no_grad():
        c.weight.normal_()
        c.bias.normal_()
    return c


def _dense64(base, factors, x):
    """A Conv1D (``y = x W + b``, ``W`` stored ``(d_in, n·d_out)``) plus ``s·ΔWᵀ`` on the slices
    ``factors`` name (``""``: the whole output; else q, k, v thirds), applied to ``x`` in float64, and the
    same on absolute values (the magnitude the float32 rounding is relative to, numerics)."""
    W, b, x = base.weight.detach().double(), base.bias.detach().double(), x.double()
    W_abs = W.abs()
    d = W.shape[1] // 3
    for s, f in factors.items():
        cols = slice(None) if not s else slice("qkv".index(s) * d, ("qkv".index(s) + 1) * d)
        A, B = f.A.double(), f.B.double()
        W[:, cols] += f.scaling * (B @ A).T
        W_abs[:, cols] += f.scaling * (B.abs() @ A.abs()).T
    return x @ W + b, x.abs() @ W_abs + b.abs()


def _dense_abs(layer, kind, mag, x):
    """``|x| (|W0| + s|B||A|)ᵀ + |b|`` for the layer of test_merged_equals_unmerged (one-hot ids for an
    embedding), from the per-matrix magnitudes ``mag`` ((d_out, d_in) each)."""
    if kind == "embedding":
        return F.embedding(x, mag[""].T)
    if kind == "fused":
        d = layer.d_out
        full = layer.base.weight.detach().double().abs().T.clone()  # (3·d_out, d_in), k rows unadapted
        for s, m in mag.items():
            full["qkv".index(s) * d:("qkv".index(s) + 1) * d] = m
    else:
        full = mag[""]
    return x.double().abs() @ full.T + layer.base.bias.detach().double().abs()


@pytest.mark.float_sensitive
def test_delta_weight_is_scaled_product_and_checks_shapes():
    A, B = torch.randn(3, 7), torch.randn(5, 3)
    # float32 against float64: r = 3 products summed, the scale by 0.5 exact (numerics)
    ref, mag = 0.5 * B.double() @ A.double(), 0.5 * B.abs().double() @ A.abs().double()
    assert_f32_close(delta_weight(A, B, 0.5), ref, mag, rounds=3)
    assert LoRAFactors(A, B, 2.0).rank == 3
    with pytest.raises(ValueError, match=r"\(3, 7\)"):
        delta_weight(A, torch.randn(5, 4), 1.0)


@pytest.mark.float_sensitive
def test_scaling_paper_and_rslora():
    assert lora_scaling(8, 16) == 2.0
    assert lora_scaling(16, 8, use_rslora=True) == 2.0
    with pytest.raises(ValueError):
        lora_scaling(0, 1)
    base = nn.Linear(16, 12)
    layer = LoRALinear(base, r=4, alpha=3, use_rslora=True)
    _randomize_B(layer)
    x = torch.randn(5, 16)
    with torch.no_grad():
        lora_part = layer(x) - base(x)
    # float32 against float64: x Aᵀ (16), then Bᵀ (4), the scale, the sum with the base output and its removal
    # (3), each relative to the terms of W x + b + s·B A x (numerics)
    x64, A, B, W, b = (t.detach().double() for t in (x, layer.lora_A, layer.lora_B, base.weight, base.bias))
    s = 3 / math.sqrt(4)
    mag = x64.abs() @ W.abs().T + b.abs() + s * x64.abs() @ A.abs().T @ B.abs().T
    assert_f32_close(lora_part, s * x64 @ A.T @ B.T, mag, rounds=16 + 4 + 3)


@pytest.mark.float_sensitive
@pytest.mark.parametrize("kind", ["linear", "conv1d", "fused", "embedding"])
def test_merged_equals_unmerged_and_unmerge_restores(kind):
    torch.manual_seed(0)
    if kind == "linear":
        base, x = nn.Linear(10, 8), torch.randn(4, 10)
        layer = LoRALinear(base, r=3, alpha=6)
    elif kind == "conv1d":
        base, x = _conv1d(10, 8), torch.randn(2, 4, 10)
        layer = LoRAConv1D(base, r=3, alpha=6)
    elif kind == "fused":
        base, x = _conv1d(10, 24), torch.randn(2, 4, 10)
        layer = LoRAFusedQKV(base, slices=("q", "v"), r=3, alpha=6)
    else:
        base, x = nn.Embedding(20, 8), torch.tensor([[1, 4, 19, 0]])
        layer = LoRAEmbedding(base, r=3, alpha=6)
    _randomize_B(layer)
    w0 = base.weight.detach().clone()
    W0 = {s: w.double().clone() for s, w in layer.base_weights().items()}  # (d_out, d_in) per adapted matrix
    # |W0| + s|B||A| per matrix: what each merged weight's rounding is relative to (numerics)
    mag = {s: w.abs() + f.scaling * f.B.double().abs() @ f.A.double().abs() for (s, w), f in
           zip(W0.items(), layer.factors().values(), strict=True)}
    d_in, r = 10 if kind != "embedding" else 20, 3
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert not torch.equal(base.weight, w0)
        # merged x (W0 + ΔW)ᵀ + b (r + 2 roundings on the weight, d_in + 1 on the product) against the
        # unmerged x W0ᵀ + b + s·B A x (d_in + r + 2): γ over both, relative to |x| (|W0| + s|B||A|)ᵀ + |b|
        out_mag = _dense_abs(layer, kind, mag, x)
        assert_f32_close(layer(x), unmerged, out_mag, rounds=2 * d_in + 2 * r + 5, what=kind)
        # W0 is still recoverable while merged: (W0 + ΔW) − ΔW rounds twice, ΔW itself computed twice (r + 1
        # each), all relative to |W0| + s|B||A|
        for s, w in layer.base_weights().items():
            assert_f32_close(w, W0[s], mag[s], rounds=2 * r + 4, what=f"{kind} W0 {s}")
        layer.unmerge()
    for s, w in layer.base_weights().items():
        assert_f32_close(w, W0[s], mag[s], rounds=2 * r + 4, what=f"{kind} unmerged {s}")


@pytest.mark.float_sensitive
def test_zero_B_is_the_base_model(tiny_bert):
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = tiny_bert(input_ids=ids).last_hidden_state
        inject_lora(tiny_bert, ["q", "k", "v", "o"], r=4, alpha=16, init="gaussian")
        after = tiny_bert(input_ids=ids).last_hidden_state
    assert torch.equal(before, after)  # exact on any CPU: with B = 0 the branch adds exact zeros


def test_gradients_reach_only_lora_and_head(tiny_bert):
    inject_lora(tiny_bert, ["q", "v"], r=2, alpha=4)
    _randomize_B(tiny_bert)  # with B = 0, A's gradient is zero; make both nonzero
    for save in ((), ("pooler",)):
        mark_only_lora_trainable(tiny_bert, modules_to_save=save)
        tiny_bert.zero_grad(set_to_none=True)
        tiny_bert(input_ids=torch.tensor([[1, 2, 3, 4]])).pooler_output.square().sum().backward()
        for name, p in tiny_bert.named_parameters():
            expected = ".lora_" in name or (bool(save) and name.startswith("pooler."))
            assert (p.grad is not None and p.grad.abs().sum() > 0) == expected, name


def test_eval_and_train_never_change_weights(tiny_gpt2):
    inject_lora(tiny_gpt2, ["q", "v"], r=2, alpha=4)
    _randomize_B(tiny_gpt2)
    before = {k: v.clone() for k, v in tiny_gpt2.state_dict().items()}
    for _ in range(2):
        tiny_gpt2.eval()
        tiny_gpt2(input_ids=torch.tensor([[1, 2, 3]]))
        tiny_gpt2.train()
        tiny_gpt2(input_ids=torch.tensor([[1, 2, 3]]))
    after = tiny_gpt2.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m.merged for m in lora_modules(tiny_gpt2).values())


def test_init_schemes_follow_their_distributions():
    d_in = 512
    gen = torch.Generator().manual_seed(0)
    A = init_lora_A_(torch.empty(64, d_in), "gaussian", generator=gen)
    assert stats.kstest((A * math.sqrt(d_in)).flatten().numpy(), "norm").pvalue > 1e-3  # N(0, 1/d_in)
    K = init_lora_A_(torch.empty(64, d_in), "kaiming", generator=gen)
    bound = 1 / math.sqrt(d_in)
    assert K.abs().max() <= bound
    assert stats.kstest(K.flatten().numpy(), "uniform", args=(-bound, 2 * bound)).pvalue > 1e-3
    # kaiming_uniform_(a=sqrt(5)) as loralib/PEFT use it has the same bound 1/sqrt(fan_in)
    ref = nn.init.kaiming_uniform_(torch.empty(64, d_in), a=math.sqrt(5))
    assert ref.abs().max() <= bound and ref.abs().max() > 0.99 * bound
    with pytest.raises(ValueError, match="unknown init"):
        init_lora_A_(torch.empty(2, 3), "xavier")


def test_nested_init_across_ranks(tiny_bert):
    import copy

    small, big, indep = copy.deepcopy(tiny_bert), copy.deepcopy(tiny_bert), copy.deepcopy(tiny_bert)
    a8 = inject_lora(small, ["q"], r=8, alpha=8, seed=3, init="gaussian")
    a32 = inject_lora(big, ["q"], r=32, alpha=8, seed=3, init="gaussian")
    a8i = inject_lora(indep, ["q"], r=8, alpha=8, seed=3, init="gaussian", init_seed_per_rank=True)
    for path in a8:
        assert torch.equal(a8[path].lora_A, a32[path].lora_A[:8])
        assert not torch.equal(a8i[path].lora_A, a8[path].lora_A)
    paths = list(a8)
    assert not torch.equal(a8[paths[0]].lora_A, a8[paths[1]].lora_A)  # each module draws its own A


@pytest.mark.float_sensitive
def test_fused_qkv_equals_dense_computation():
    d = 8
    base = _conv1d(6, 3 * d)
    layer = LoRAFusedQKV(base, slices=("v", "q"), r=2, alpha=3)
    assert layer.slices == ("q", "v")
    _randomize_B(layer)
    x = torch.randn(3, 5, 6)
    ref, mag = _dense64(base, layer.factors(), x)  # W (d_in, 3d) plus s·ΔWᵀ on the q and v thirds
    with torch.no_grad():  # float32 against float64: x W + b (6 + 1) beside s·B A x (6 + 2 + 1), summed (1)
        assert_f32_close(layer(x), ref, mag, rounds=6 + 2 + 2)
    assert torch.equal(layer.base_weights()["v"], base.weight[:, 2 * d:].T)  # a view: no arithmetic
    with pytest.raises(ValueError, match="slices"):
        LoRAFusedQKV(base, slices=("q", "x"), r=2, alpha=3)
    with pytest.raises(ValueError, match="rank"):
        LoRAFusedQKV(base, slices=("q",), r=9, alpha=3)


@pytest.mark.float_sensitive
def test_conv1d_lora_equals_dense_computation():
    """A whole Conv1D (GPT-2 c_proj / c_fc, stored (d_in, d_out)): y = x (W + ΔWᵀ) + b, ΔW = s·B A (d_out, d_in)."""
    base = _conv1d(6, 10)
    layer = LoRAConv1D(base, r=2, alpha=3, use_rslora=True)
    assert layer.lora_A.shape == (2, 6) and layer.lora_B.shape == (10, 2) and layer.scaling == 3 / math.sqrt(2)
    _randomize_B(layer)
    x = torch.randn(3, 5, 6)
    ref, mag = _dense64(base, layer.factors(), x)
    with torch.no_grad():  # float32 against float64: x W + b (6 + 1) beside s·B A x (6 + 2 + 1), summed (1)
        assert_f32_close(layer(x), ref, mag, rounds=6 + 2 + 2)
    assert torch.equal(layer.base_weights()[""], base.weight.T)  # nn.Linear orientation (d_out, d_in), a view
    with pytest.raises(ValueError, match="rank"):
        LoRAConv1D(base, r=7, alpha=3)
    with pytest.raises(TypeError, match="Conv1D"):
        LoRAConv1D(nn.ReLU(), r=1, alpha=1)


@pytest.mark.float_sensitive
def test_embedding_lora_equals_dense_table():
    torch.manual_seed(0)
    base = nn.Embedding(30, 8, padding_idx=0)
    layer = LoRAEmbedding(base, r=3, alpha=6)
    _randomize_B(layer)
    f = layer.factors()[""]
    E, A, B = base.weight.detach().double(), f.A.double(), f.B.double()
    ids = torch.tensor([[0, 3, 29, 7]])
    # float32 against float64 E + s (B A)ᵀ, (num, dim): the lookups are exact, then r = 3 products, the scale
    # and the sum, relative to |E| + s (|B| |A|)ᵀ (numerics)
    table, mag = E + f.scaling * (B @ A).T, E.abs() + f.scaling * (B.abs() @ A.abs()).T
    with torch.no_grad():
        assert_f32_close(layer(ids), F.embedding(ids, table), F.embedding(ids, mag), rounds=3 + 2)
    assert layer.lora_A.shape == (3, 30) and layer.lora_B.shape == (8, 3)
    with pytest.raises(TypeError):
        LoRAEmbedding(nn.Linear(3, 3), r=1, alpha=1)


def test_linear_rank_bounds():
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(4, 3), r=4, alpha=1)
    with pytest.raises(TypeError):
        LoRALinear(nn.Embedding(3, 3), r=1, alpha=1)


@pytest.mark.float_sensitive
def test_merge_into_bf16_rounds_once():
    """A bf16 base: W0 + ΔW is summed in float32 and rounded to bf16 once (rounding ΔW to bf16 first, then adding in
    bf16, rounds twice); a float32 base is the plain sum, as before."""
    from lora.layers import LoRALinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    w0 = lin.weight.detach().clone()
    layer = LoRALinear(lin, r=4, alpha=8)
    # float32 factors on a bf16 base, as a loaded adapter has them
    layer.lora_A = torch.nn.Parameter(torch.randn(4, 64))
    layer.lora_B = torch.nn.Parameter(0.01 * torch.randn(48, 4))
    delta = layer._delta().detach()
    assert delta.dtype == torch.float32
    layer.merge()
    # exact on any CPU: elementwise IEEE sums and casts, and the same ΔW tensor on both sides
    assert torch.equal(layer.base.weight, (w0.float() + delta.float()).to(torch.bfloat16))
    twice = w0 + delta.to(torch.bfloat16)  # the old way: ΔW rounded to bf16, then the sum rounded again
    assert not torch.equal(twice, layer.base.weight)  # the two roundings differ somewhere on this draw
    layer.unmerge()
    assert float((layer.base.weight.detach().float() - w0.float()).abs().max()) < 1e-2

    lin32 = torch.nn.Linear(64, 48, bias=False)
    w32 = lin32.weight.detach().clone()
    l32 = LoRALinear(lin32, r=4, alpha=8)
    with torch.no_grad():
        l32.lora_B.normal_(0, 0.01)
    l32.merge()
    assert torch.equal(l32.base.weight, w32 + l32._delta().detach())

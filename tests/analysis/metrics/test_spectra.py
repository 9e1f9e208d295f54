"""lora_analysis.metrics.spectra: effective ranks on analytic spectra; intruder dimensions against PEFT's reference."""

from __future__ import annotations

import math
import re

import pytest
import torch

from lora_analysis.metrics.linalg import top_singular
from lora_analysis.metrics.spectra import (
    IntruderResult,
    energy_rank,
    entropy_effective_rank,
    intruder_dimensions,
    numerical_rank,
    spectrum_summary,
    stable_rank,
)

F64 = torch.float64


def test_ranks_analytic():
    flat = torch.ones(4, dtype=F64)
    assert stable_rank(flat) == pytest.approx(4.0)
    assert entropy_effective_rank(flat) == pytest.approx(4.0)
    assert energy_rank(flat, fraction=0.5) == 2 and energy_rank(flat, fraction=1.0) == 4
    spike = torch.tensor([2.0, 0.0, 0.0], dtype=F64)
    assert stable_rank(spike) == 1.0 and entropy_effective_rank(spike) == pytest.approx(1.0)
    assert energy_rank(torch.tensor([3.0, 1.0]), fraction=0.9) == 1  # 9 / 10 of the energy
    assert energy_rank(torch.tensor([1.0, 3.0]), fraction=0.95) == 2  # sorted first
    S = torch.tensor([3.0, 2.0, 1.0], dtype=F64)
    p = S / S.sum()
    assert entropy_effective_rank(S) == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert stable_rank(S) == pytest.approx(14 / 9)
    zero = torch.zeros(3)
    assert stable_rank(zero) == entropy_effective_rank(zero) == energy_rank(zero) == numerical_rank(zero) == 0
    assert numerical_rank(torch.tensor([1.0, 1e-12, 0.0])) == 1


@pytest.mark.parametrize("bad,match", [(torch.ones(2, 2), r"\(2, 2\)"), (torch.tensor([1.0, -1.0]), "non-negative"),
                                       (torch.tensor([float("nan")]), "NaN"), (torch.ones(0), r"\(0,\)")])
def test_ranks_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        stable_rank(bad)
    with pytest.raises(ValueError, match="fraction"):
        energy_rank(torch.ones(2), fraction=1.5)


@pytest.mark.float_sensitive
def test_spectrum_summary_planted_rank():
    g = torch.Generator().manual_seed(0)
    # r = 8 factors holding a rank-3 update with singular values 3, 2, 1.
    U = torch.linalg.qr(torch.randn(30, 3, generator=g, dtype=F64))[0]
    V = torch.linalg.qr(torch.randn(20, 3, generator=g, dtype=F64))[0]
    B = torch.cat([U * torch.tensor([3.0, 2.0, 1.0], dtype=F64), torch.zeros(30, 5, dtype=F64)], dim=1)
    A = torch.cat([V.T, torch.randn(5, 20, generator=g, dtype=F64)])
    summ = spectrum_summary(A, B, scaling=0.5)
    assert summ.singular_values.shape == (8,)
    torch.testing.assert_close(summ.singular_values[:3], torch.tensor([1.5, 1.0, 0.5], dtype=F64))
    assert summ.numerical_rank == 3 and summ.spectral == pytest.approx(1.5)
    assert summ.frobenius == pytest.approx(math.sqrt(1.5**2 + 1 + 0.25))
    assert summ.stable_rank == pytest.approx((1.5**2 + 1 + 0.25) / 1.5**2)
    assert summ.energy_rank == 2 and summ.energy_fraction == 0.9  # (2.25 + 1) / 3.5 = 0.93


def _peft_reference(W: torch.Tensor, W_merged: torch.Tensor, top_k: int, eps: float) -> list[int]:
    # The computation in peft/tuners/lora/intruders.py (Shuttleworth et al., 2024), inlined: that function
    # needs a PEFT model object, and our metric must stay free of model plumbing.
    U_base, _, _ = torch.linalg.svd(W, full_matrices=False)
    U_merged, _, _ = torch.linalg.svd(W_merged, full_matrices=False)
    cos_sim = (U_merged.T @ U_base).abs().max(dim=1).values
    return torch.where(cos_sim[:top_k] < eps)[0].tolist()


@pytest.mark.float_sensitive
def test_intruder_dimensions_planted():
    g = torch.Generator().manual_seed(1)
    W0 = torch.randn(40, 30, generator=g, dtype=F64)
    ws = top_singular(W0)
    # A new dominant direction: an even mix of W0's four weakest singular directions has |cos| = 0.5 with each
    # of them and 0 with the rest, so after a large boost it becomes the top singular vector and an intruder
    # at threshold 0.6 (W0's own part perturbs the cosine slightly, hence not 0.5).
    u = ws.U[:, -4:].sum(1, keepdim=True) / 2
    v = ws.V[:, -4:].sum(1, keepdim=True) / 2
    res = intruder_dimensions(W0, v.T, u, scaling=100.0, k=5, threshold=0.6)
    assert isinstance(res, IntruderResult)
    assert res.indices[:1] == (0,) and res.count >= 1  # the planted direction is the new top one
    assert res.max_cosine.shape == res.is_intruder.shape == res.singular_values.shape == (5,)
    assert _peft_reference(W0, W0 + 100.0 * u @ v.T, 5, 0.6) == list(res.indices)
    # A boost of an existing direction is not an intruder.
    res2 = intruder_dimensions(W0, ws.V[:, 3:4].T, ws.U[:, 3:4], scaling=100.0, k=5)
    assert res2.count == 0 and res2.max_cosine[0].item() == pytest.approx(1.0, abs=1e-8)
    shared = intruder_dimensions(W0, ws.V[:, 3:4].T, ws.U[:, 3:4], scaling=100.0, k=5, w0_svd=ws)
    torch.testing.assert_close(shared.max_cosine, res2.max_cosine)
    assert intruder_dimensions(W0, v.T, u, scaling=100.0, k=5, threshold=0.6, side="right").indices[:1] == (0,)


def test_intruder_dimensions_bad_input():
    W0 = torch.randn(10, 8, dtype=F64)
    A, B = torch.randn(2, 8, dtype=F64), torch.randn(10, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"W0 \(8, 10\)"):
        intruder_dimensions(W0.T, A, B, scaling=1.0)
    with pytest.raises(ValueError, match="k=9"):
        intruder_dimensions(W0, A, B, scaling=1.0, k=9)
    with pytest.raises(ValueError, match="threshold"):
        intruder_dimensions(W0, A, B, scaling=1.0, k=3, threshold=0.0)
    with pytest.raises(ValueError, match="full SVD"):
        intruder_dimensions(W0, A, B, scaling=1.0, k=3, w0_svd=top_singular(W0, k=3))


def _peft_intruder_counts(peft_model) -> dict[str, int]:
    """peft's own intruders.py (reduce_intruder_dimension) on every LoRA layer: its logged count per layer."""
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    lines: list[str] = []
    reduce_intruder_dimension(peft_model, top_k=10, threshold_epsilon=0.5, logging_sink=lines.append)
    rx = re.compile(r"base_model\.model\.(?P<name>\S+): (?:No intruders|Intruders: (?P<n>\d+))")
    return {m["name"]: int(m["n"] or 0) for m in map(rx.fullmatch, lines) if m}


def test_intruder_orientation_against_peft_on_gpt2_conv1d_and_bert_linear():
    """W0 is (d_out, d_in) for every layer type, so side='left' is the output space everywhere. peft's intruders.py
    SVDs the stored weight: on a Linear its count is our default; on a Conv1D (stored (d_in, d_out)) it is ours
    with side='right', and on the fused c_attn it is the fused [W_q; W_k; W_v] counted once with side='right'.
    We count c_attn per slice instead (W_q, W_v each with its own ΔW): documented in intruder_dimensions."""
    import inspect
    import warnings

    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.intruders import reduce_intruder_dimension
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    torch.manual_seed(0)
    gpt2 = GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16)).double().eval()
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64)).double().eval()
    seen = {"conv1d": 0, "fused": 0, "linear": 0, "sides_differ": 0}
    # peft 0.22 brings a fan_in_fan_out weight to the (out, in) layout before its SVD, so its Conv1D count became
    # our default (side='left'); before, it SVD'd the stored (in, out) weight, which is our side='right'
    peft_transposes = "fan_in_fan_out" in inspect.getsource(reduce_intruder_dimension)
    for model, targets in ((gpt2, ["c_attn", "c_proj", "c_fc"]), (bert, ["query", "value"])):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fan_in_fan_out on GPT-2's Conv1D is what peft wants; quiet its notice
            pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=64, target_modules=targets,
                                                  fan_in_fan_out=model is gpt2))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * 0.5)
        layers = {n[len("base_model.model."):]: m for n, m in pm.named_modules() if hasattr(m, "lora_A")
                  and "default" in getattr(m, "lora_A", {})}
        # read the factors before peft's function adds its mitigated adapter
        parts = {n: (m.get_base_layer().weight.detach().clone(), m.lora_A["default"].weight.detach().clone(),
                     m.lora_B["default"].weight.detach().clone(), m.scaling["default"]) for n, m in layers.items()}
        ref = _peft_intruder_counts(pm)
        assert sorted(ref) == sorted(parts) and len(parts) >= 4
        for name, (stored, A, B, s) in parts.items():
            conv1d = model is gpt2
            W0 = stored.T if conv1d else stored  # (d_out, d_in) for every layer type
            left = intruder_dimensions(W0, A, B, scaling=s, k=10).count
            right = intruder_dimensions(W0, A, B, scaling=s, k=10, side="right").count
            assert ref[name] == (right if conv1d and not peft_transposes else left), (name, ref[name], left, right)
            seen["sides_differ"] += left != right
            # c_attn: peft's one count of the fused [W_q; W_k; W_v]; ours is per slice (tables/test_build.py)
            seen["fused" if name.endswith("c_attn") else "conv1d" if conv1d else "linear"] += 1
    # the comparison was not vacuous: every kind was seen, and left and right counts do differ somewhere
    assert seen["conv1d"] >= 4 and seen["fused"] == 2 and seen["linear"] == 4 and seen["sides_differ"] > 0, seen

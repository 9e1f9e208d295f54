"""lora_analysis.metrics.spectra: effective ranks on analytic spectra; intruder dimensions against PEFT's reference."""

from __future__ import annotations

import math

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

"""tests/numerics.py: the float32 bound holds for products on any kernel, and still catches a real mistake."""

from __future__ import annotations

import pytest
import torch
from numerics import U32, assert_f32_close, assert_within, forward64, gamma

pytestmark = pytest.mark.float_sensitive


def _factors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, A, B = (torch.randn(*s, generator=g) for s in ((64, 384), (8, 384), (384, 8)))
    return x, A, B


def test_gamma_is_highams():
    assert gamma(1) == pytest.approx(U32 / (1 - U32)) and gamma(384) == pytest.approx(384 * U32, rel=1e-4)
    with pytest.raises(AssertionError):
        gamma(2**23)  # n·u ≥ 1/2: no bound


def test_float32_products_stay_within_the_bound_and_a_real_mistake_does_not():
    """s·(x Aᵀ) Bᵀ in float32 (d = 384, r = 8, N(0, 1) factors, outputs that cancel) against float64: within
    γ_(d+r+1) times the product on absolute values, whatever kernel ran; the same with B's last row halved or
    the scale off by 1e-3 relative is not. (The worst case is loose for a long sum: here the terms' absolute
    sum is ~30x the result, so the bound is ~7e-4 of the result, not 2.3e-5.)"""
    x, A, B = _factors()
    s = 2.0
    x64, A64, B64 = x.double(), A.double(), B.double()
    ref, mag = s * (x64 @ A64.T) @ B64.T, s * (x64.abs() @ A64.abs().T) @ B64.abs().T
    got = s * (x @ A.T) @ B.T
    assert_f32_close(got, ref, mag, rounds=384 + 8 + 1)
    assert (got.double() - ref).abs().max() > 0  # float32 did round: the check is not vacuous
    bad_B = B.clone()
    bad_B[-1] *= 0.5
    with pytest.raises(AssertionError, match="beyond the bound"):
        assert_f32_close(s * (x @ A.T) @ bad_B.T, ref, mag, rounds=384 + 8 + 1)
    with pytest.raises(AssertionError, match="beyond the bound"):
        assert_f32_close(got * (1 + 1e-3), ref, mag, rounds=384 + 8 + 1)


def test_assert_within_names_the_worst_element():
    ref = torch.zeros(3, 4, dtype=torch.float64)
    got = ref.clone()
    got[1, 2], got[2, 3] = 1e-3, 5e-4
    assert_within(got, ref, 1e-3)  # on the bound passes
    with pytest.raises(AssertionError, match=r"x: 2 of 12 elements beyond the bound; worst at \(1, 2\)"):
        assert_within(got, ref, 1e-4, "x")
    with pytest.raises(AssertionError):
        assert_within(got, ref[:2], 1.0)  # shapes must agree


def test_forward64_runs_a_float64_copy_and_leaves_the_model_alone(tiny_bert):
    ids = torch.tensor([[1, 2, 3]])
    out = forward64(tiny_bert, input_ids=ids)
    assert out.dtype == torch.float64 and next(tiny_bert.parameters()).dtype == torch.float32
    with torch.no_grad():
        out32 = tiny_bert(input_ids=ids).last_hidden_state
    # the float32 forward's own rounding, ~1e-6 on these O(1) LayerNorm outputs; a float64 copy agrees to it
    torch.testing.assert_close(out32.double(), out, atol=1e-5, rtol=0)

"""lora_analysis.metrics.spectra.intruder_dimensions without W0's full SVD (the certified partial route): counts
and decisions against the dense float64 route on a power-law W0 at d = 1536 (dense_max lowered to force it)."""

from __future__ import annotations

import pytest
import torch

from lora_analysis.metrics.linalg import top_singular, top_singular_triplets
from lora_analysis.metrics.spectra import intruder_dimensions

pytestmark = pytest.mark.float_sensitive  # rerun under forced MKL/ATen kernels by .ci/run
F64 = torch.float64
D = 1536


@pytest.fixture(scope="module")
def w0():
    """A power-law W0 (σ_i = i^-0.6, like a pretrained weight) and its dense SVD."""
    g = torch.Generator().manual_seed(11)
    s = torch.arange(1, D + 1, dtype=F64) ** -0.6
    U, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=F64))
    W0 = (U * s) @ V.T
    return W0, top_singular(W0)


def _rank1(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (A (1, d_in), B (d_out, 1)) of u vᵀ with unit u, v."""
    return (v / v.norm()).reshape(1, -1), (u / u.norm()).reshape(-1, 1)


def _both(W0, dense, A, B, scaling, **kw):
    got = intruder_dimensions(W0, A, B, scaling=scaling, dense_max=0, **kw)
    ref = intruder_dimensions(W0, A, B, scaling=scaling, w0_svd=dense, **kw)
    assert ref.decided_by == ("dense",) * 10
    assert got.indices == ref.indices and got.count == ref.count
    torch.testing.assert_close(got.singular_values, ref.singular_values, rtol=1e-10, atol=0)
    held = got.decided_by.count("head")  # where decided by W0's held directions the cosine is the dense one
    if held and "dense" not in got.decided_by:
        h = torch.tensor([d == "head" for d in got.decided_by])
        assert bool((got.max_cosine[h] <= ref.max_cosine[h] + 1e-6).all())
    return got, ref


def test_no_intruder_small_update(w0):
    W0, dense = w0
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(8, D, generator=g, dtype=F64), torch.randn(D, 8, generator=g, dtype=F64)
    got, ref = _both(W0, dense, A, B, 1e-4)
    assert got.count == 0 and set(got.decided_by) == {"head"} and got.w0_directions == 64


def test_planted_intruders_random_directions(w0):
    """Three strong random rank-1 directions: the top three of W0 + ΔW, new to W0 (intruders, decided by the
    Gauss-quadrature bound); the rest are W0's own."""
    W0, dense = w0
    g = torch.Generator().manual_seed(2)
    A = torch.linalg.qr(torch.randn(D, 3, generator=g, dtype=F64))[0].T
    B = torch.linalg.qr(torch.randn(D, 3, generator=g, dtype=F64))[0] * torch.tensor([4.0, 3.5, 3.0], dtype=F64)
    got, ref = _both(W0, dense, A, B, 1.0)
    assert got.indices == (0, 1, 2)
    assert set(got.decided_by[:3]) <= {"lanczos", "norm"} and "dense" not in got.decided_by
    # side="right" too
    _both(W0, dense, A, B, 1.0, side="right")


def test_amplified_tail_direction_falls_back_to_dense(w0):
    """ΔW lifts W0's 900th direction into the top: |cos| = 1 with a direction of W0 that no partial SVD holds,
    and its spectral measure is one atom: undecided at every m, so the dense route decides (not an intruder)."""
    W0, dense = w0
    A, B = _rank1(dense.U[:, 899], dense.V[:, 899])
    got, ref = _both(W0, dense, A, B, 3.0)
    assert 0 not in got.indices and got.decided_by == ("dense",) * 10


@pytest.mark.parametrize("c", [0.52, 0.48])
def test_near_threshold_cosine(w0, c):
    """The new top direction has |cos| ≈ c with W0's 5th left vector and ~0.07 with every other: 0.52 is not an
    intruder, 0.48 is; both decided as the dense route does."""
    W0, dense = w0
    g = torch.Generator().manual_seed(3)
    r = torch.randn(D, generator=g, dtype=F64)
    x5 = dense.U[:, 4]
    r = r - x5 * (x5 @ r)
    u = c * x5 + (1 - c * c) ** 0.5 * r / r.norm()
    A, B = _rank1(u, torch.randn(D, generator=g, dtype=F64))
    got, ref = _both(W0, dense, A, B, 20.0)
    assert abs(float(ref.max_cosine[0]) - c) < 0.01
    assert (0 in got.indices) == (c < 0.5)
    assert "dense" not in got.decided_by


def test_given_partial_w0_svd_and_bad_input(w0):
    W0, dense = w0
    g = torch.Generator().manual_seed(4)
    A, B = torch.randn(4, D, generator=g, dtype=F64), torch.randn(D, 4, generator=g, dtype=F64)
    part = top_singular_triplets(W0, 120, dense_max=0)
    assert part.certificate is not None
    got = intruder_dimensions(W0, A, B, scaling=0.5, w0_svd=part, dense_max=0)
    ref = intruder_dimensions(W0, A, B, scaling=0.5, w0_svd=dense)
    assert got.indices == ref.indices and got.w0_directions >= 120
    with pytest.raises(ValueError, match="full SVD"):
        intruder_dimensions(W0, A, B, scaling=0.5, w0_svd=dense.truncate(120))  # partial without a certificate

"""lora_analysis.metrics.linalg.top_singular_triplets: the Krylov route against a dense float64 SVD, and its
certificate's bounds against the dense truth, on realistic spectra (power laws, a spiked random bulk)."""

from __future__ import annotations

import math

import pytest
import torch

from lora_analysis.metrics.linalg import top_singular, top_singular_triplets

pytestmark = pytest.mark.float_sensitive  # rerun under forced MKL/ATen kernels by .ci/run
F64 = torch.float64


def _with_spectrum(s: torch.Tensor, d_out: int, d_in: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = s.shape[0]
    U, _ = torch.linalg.qr(torch.randn(d_out, n, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(d_in, n, generator=g, dtype=F64))
    return (U * s) @ V.T


def _power_law(d_out: int, d_in: int, alpha: float, seed: int = 0) -> torch.Tensor:
    """σ_i = i^-α: the decay of pretrained weights (α ≈ 0.5 … 1)."""
    return _with_spectrum(torch.arange(1, min(d_out, d_in) + 1, dtype=F64) ** -alpha, d_out, d_in, seed)


def _sine(A: torch.Tensor, B: torch.Tensor) -> float:
    """Sine of the largest principal angle between the column spaces of orthonormal A and B (same width)."""
    return float(torch.linalg.matrix_norm(A - B @ (B.T @ A), ord=2))


def _check_against_dense(W: torch.Tensor, k: int, svd) -> None:
    """Every number within 1e-6 relative of the dense float64 SVD, and every bound of the certificate holds."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    V = Vh.T
    assert svd.U.shape == (W.shape[0], k) and svd.V.shape == (W.shape[1], k) and svd.S.shape == (k,)
    assert svd.U.dtype == svd.S.dtype == svd.V.dtype == F64
    torch.testing.assert_close(svd.S, S[:k], rtol=1e-12, atol=0)
    c = svd.certificate
    assert c is not None and c.residuals.shape == c.sigma_error.shape == c.subspace_sine.shape == (k,)
    err = S[:k] - svd.S
    assert bool((err >= -1e-14 * S[0]).all()) and bool((err <= c.sigma_error + 1e-15 * S[0]).all())
    assert S[k] <= c.tail and c.tail <= 1.01 * S[k]  # a bound, and a tight one
    # the residual it reports is the residual (W v = σ u holds by construction)
    res = torch.linalg.vector_norm(W.T @ svd.U - svd.V * svd.S, dim=0)
    res = torch.maximum(res, torch.linalg.vector_norm(W @ svd.V - svd.U * svd.S, dim=0))
    assert bool((res <= c.residuals).all())
    for i in sorted({1, 2, k // 3, k // 2, k - 1, k} & set(range(1, k + 1))):
        true = max(_sine(svd.U[:, :i], U[:, :i]), _sine(svd.V[:, :i], V[:, :i]))
        assert true <= float(c.subspace_sine[i - 1]) + 1e-13, (i, true, float(c.subspace_sine[i - 1]))
        assert true < 1e-6
    cos = (svd.V * V[:, :k]).sum(0).abs()
    vec = (1 - cos.square()).clamp(min=0).sqrt()
    assert bool((vec <= c.vector_sine + 1e-7).all())  # 1e-7: sqrt(1 − cos²) loses half the digits near 0


@pytest.mark.parametrize("alpha,k", [(0.5, 100), (1.0, 150)])
def test_triplets_power_law_match_dense_and_certificate_holds(alpha, k):
    W = _power_law(1536, 1536, alpha)
    svd = top_singular_triplets(W, k, dense_max=0)
    _check_against_dense(W, k, svd)
    c = svd.certificate
    assert 2 * k <= c.krylov_dim <= 768 and c.failure_probability <= 1e-9
    assert float(c.subspace_sine.max()) < 1e-3 and float(c.sigma_error.max()) < 1e-10 * float(svd.S[0])


@pytest.mark.parametrize("shape", [(1024, 2752), (2752, 1024)])
def test_triplets_rectangular_both_orientations(shape):
    W = _power_law(*shape, alpha=0.7, seed=1)
    _check_against_dense(W, 64, top_singular_triplets(W, 64, dense_max=0))


def test_triplets_k1_and_the_fallbacks():
    W = _power_law(1200, 1100, 0.8, seed=2)
    _check_against_dense(W, 1, top_singular_triplets(W, 1, dense_max=0))
    # 2 (k + block) >= min(d): dense, exactly top_singular's numbers, no certificate
    dense = top_singular_triplets(W, 520, dense_max=0)
    ref = top_singular(W, k=520)
    assert dense.certificate is None and torch.equal(dense.S, ref.S) and torch.equal(dense.U, ref.U)
    # below dense_max: the dense route, bit for bit
    small = top_singular_triplets(W[:300, :200], 20)
    assert small.certificate is None and torch.equal(small.V, top_singular(W[:300, :200], k=20).V)


def test_triplets_spiked_bulk_spikes_converge_bulk_falls_back():
    """benchmarks/cases_svd.py's 7B stand-in at d = 1536: 32 spikes over a Gaussian bulk. The spikes are found by
    Krylov; the top 100 reach into the bulk (relative gaps ~1e-3), where the Krylov space would exceed d/2:
    the dense route, said by certificate=None."""
    from benchmarks.cases_svd import base_weight

    W = base_weight(0, "q", 1536)
    _check_against_dense(W, 24, top_singular_triplets(W, 24, dense_max=0))
    bulk = top_singular_triplets(W, 100, dense_max=0)
    assert bulk.certificate is None
    torch.testing.assert_close(bulk.S, torch.linalg.svdvals(W)[:100], rtol=1e-13, atol=0)


def test_triplets_exact_ties():
    """σ = 3 (x4), 2 (x4), then a power law: the tie blocks' subspaces are certified at their ends only (inside a
    tie a single vector is not defined and its sine bound is 1)."""
    n = 1100
    s = torch.cat([torch.full((4,), 3.0, dtype=F64), torch.full((4,), 2.0, dtype=F64),
                   torch.arange(9, n + 1, dtype=F64) ** -0.7])
    W = _with_spectrum(s, n, n, seed=3)
    svd = top_singular_triplets(W, 40, dense_max=0)
    c = svd.certificate
    torch.testing.assert_close(svd.S, s[:40], rtol=1e-12, atol=0)
    U, _, _ = torch.linalg.svd(W, full_matrices=False)
    for i in (4, 8, 40):  # the gap after 40 is 1.8 % of σ_40²: a looser bound there
        assert _sine(svd.U[:, :i], U[:, :i]) <= float(c.subspace_sine[i - 1]) < (1e-8 if i < 40 else 1e-4)
    assert bool((c.vector_sine[:8] == 1).all()) and bool((c.subspace_sine[[0, 1, 2, 4, 5, 6]] == 1).all())


def test_triplets_truncate_keeps_a_valid_certificate():
    W = _power_law(1100, 1100, 1.0, seed=4)
    svd = top_singular_triplets(W, 60, dense_max=0)
    t = svd.truncate(20)
    _check_against_dense(W, 20, t)
    assert t.certificate.krylov_dim == svd.certificate.krylov_dim
    assert math.isclose(t.certificate.tail, float(svd.S[20] + svd.certificate.sigma_error[20]))


@pytest.mark.parametrize("k,match", [(0, "k=0"), (1101, "k=1101")])
def test_triplets_bad_k(k, match):
    with pytest.raises(ValueError, match=match):
        top_singular_triplets(torch.ones(1100, 1200), k, dense_max=0)


def test_triplets_non_finite():
    W = torch.ones(1100, 1100)
    W[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        top_singular_triplets(W, 5, dense_max=0)

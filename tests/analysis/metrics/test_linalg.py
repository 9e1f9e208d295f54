"""lora_analysis.metrics.linalg: factored SVD against a dense SVD of the formed ΔW, the W-SVD cache, bases, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora.layers import delta_weight
from lora_analysis.metrics.linalg import (
    SVD,
    WeightSVDCache,
    factored_svd,
    left_singular_vectors,
    orthonormal_basis,
    right_singular_vectors,
    top_singular,
    top_singular_values,
    weight_fingerprint,
)

pytestmark = pytest.mark.float_sensitive  # rerun under forced MKL/ATen kernels by .ci/run


def _factors(d_out: int, d_in: int, r: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, d_in, generator=g, dtype=dtype), torch.randn(d_out, r, generator=g, dtype=dtype)


def _assert_orthonormal(M: torch.Tensor) -> None:
    torch.testing.assert_close(M.T @ M, torch.eye(M.shape[1], dtype=torch.float64), atol=1e-10, rtol=0)


@pytest.mark.parametrize("d_out,d_in,r,scaling", [(40, 30, 4, 2.0), (30, 50, 8, 0.25), (16, 16, 16, -1.5)])
def test_factored_svd_matches_dense_svd(d_out, d_in, r, scaling):
    A, B = _factors(d_out, d_in, r)
    svd = factored_svd(A, B, scaling=scaling)
    dense = delta_weight(A, B, scaling)
    S_ref = torch.linalg.svdvals(dense)[:r]
    assert svd.U.shape == (d_out, r) and svd.S.shape == (r,) and svd.V.shape == (d_in, r)
    assert svd.U.dtype == svd.S.dtype == svd.V.dtype == torch.float64
    torch.testing.assert_close(svd.S, S_ref, rtol=1e-6, atol=1e-12)
    assert bool((svd.S >= 0).all()) and bool((svd.S[:-1] >= svd.S[1:]).all())
    _assert_orthonormal(svd.U)
    _assert_orthonormal(svd.V)
    torch.testing.assert_close(svd.matrix(), dense, rtol=1e-6, atol=1e-10)
    # Singular vectors agree with the dense ones up to sign (distinct singular values).
    U_ref, _, Vh_ref = torch.linalg.svd(dense)
    torch.testing.assert_close((svd.U * U_ref[:, :r]).sum(0).abs(), torch.ones(r, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close((svd.V * Vh_ref[:r].T).sum(0).abs(), torch.ones(r, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_factored_svd_analytic_rank_one():
    A = torch.zeros(1, 5)
    A[0, 1] = 2.0
    B = torch.zeros(4, 1)
    B[0, 0] = 1.0
    svd = factored_svd(A, B, scaling=3.0)
    torch.testing.assert_close(svd.S, torch.tensor([6.0], dtype=torch.float64))
    assert abs(svd.U[0, 0].item()) == pytest.approx(1.0) and abs(svd.V[1, 0].item()) == pytest.approx(1.0)


def test_factored_svd_rank_deficient_keeps_shapes():
    A, _ = _factors(12, 10, 4)
    svd = factored_svd(A, torch.zeros(12, 4), scaling=2.0)  # B = 0 at step 0
    assert svd.U.shape == (12, 4) and svd.V.shape == (10, 4)
    assert torch.count_nonzero(svd.S) == 0
    # Rank 2 out of r = 4: two zero singular values, reconstruction still exact.
    A, B = _factors(12, 10, 2)
    A4, B4 = torch.cat([A, A]), torch.cat([B, torch.zeros(12, 2, dtype=B.dtype)], dim=1)
    svd = factored_svd(A4, B4)
    assert svd.S[2:].abs().max() < 1e-10
    torch.testing.assert_close(svd.matrix(), B @ A, atol=1e-10, rtol=0)


def test_factored_svd_upcasts_half_precision():
    A, B = _factors(20, 24, 4, dtype=torch.float32)
    svd = factored_svd(A.to(torch.bfloat16), B.to(torch.float16), scaling=1.0)
    assert svd.S.dtype == torch.float64
    ref = torch.linalg.svdvals(B.half().double() @ A.to(torch.bfloat16).double())
    torch.testing.assert_close(svd.S, ref[:4], rtol=1e-6, atol=1e-9)


def test_factored_svd_rank_larger_than_dims():
    A, B = _factors(3, 5, 8)  # r = 8 > d_out = 3
    svd = factored_svd(A, B)
    assert svd.k == 3
    torch.testing.assert_close(svd.matrix(), B @ A, rtol=1e-8, atol=1e-8)


@settings(max_examples=25, deadline=None)
@given(d_out=st.integers(1, 12), d_in=st.integers(1, 12), r=st.integers(1, 6), seed=st.integers(0, 10_000),
       scaling=st.floats(-4, 4, allow_nan=False).filter(lambda s: abs(s) > 1e-3))
def test_factored_svd_reconstructs_property(d_out, d_in, r, seed, scaling):
    A, B = _factors(d_out, d_in, r, seed)
    svd = factored_svd(A, B, scaling=scaling)
    torch.testing.assert_close(svd.matrix(), delta_weight(A, B, scaling), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(svd.S, torch.linalg.svdvals(delta_weight(A, B, scaling))[: svd.k], rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize(
    "A,B,match",
    [
        (torch.ones(4, 10), torch.ones(8, 3), r"\(4, 10\).*\(8, 3\)"),
        (torch.ones(4), torch.ones(8, 4), r"\(4,\)"),
        (torch.ones(0, 10), torch.ones(8, 0), r"\(0, 10\)"),
        (torch.full((2, 3), float("nan")), torch.ones(4, 2), "NaN or Inf.*\\(2, 3\\)"),
        (torch.ones(2, 3), torch.full((4, 2), float("inf")), "NaN or Inf.*\\(4, 2\\)"),
    ],
)
def test_factored_svd_bad_input(A, B, match):
    with pytest.raises(ValueError, match=match):
        factored_svd(A, B)


def test_factored_svd_bad_scaling():
    A, B = _factors(4, 4, 2)
    with pytest.raises(ValueError, match="scaling"):
        factored_svd(A, B, scaling=float("nan"))


def test_top_singular_and_truncate():
    W = torch.randn(30, 20, generator=torch.Generator().manual_seed(1))
    svd = top_singular(W, k=5)
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    torch.testing.assert_close(svd.S, S[:5])
    assert svd.U.shape == (30, 5) and svd.V.shape == (20, 5)
    assert top_singular(W).k == 20
    assert svd.truncate(2).S.shape == (2,)
    with pytest.raises(ValueError, match="top 6 of an SVD holding 5"):
        svd.truncate(6)
    with pytest.raises(ValueError, match=r"k=21.*\(30, 20\)"):
        top_singular(W, k=21)


def test_weight_svd_cache_computes_once_per_weight():
    g = torch.Generator().manual_seed(2)
    W1, W2 = torch.randn(16, 12, generator=g), torch.randn(16, 12, generator=g)
    cache = WeightSVDCache()
    a = cache.get("layer.q", W1, k=2)
    b = cache.get("layer.q", W1.clone(), k=8)  # same content, another tensor object: reused
    assert cache.computed == 1
    torch.testing.assert_close(a.S, b.S[:2])
    cache.get("layer.q", W2, k=2)  # same key, different weight (another base model): a new entry
    cache.get("layer.v", W1)
    assert cache.computed == 3 and len(cache) == 3
    assert weight_fingerprint(W1) == weight_fingerprint(W1.clone()) != weight_fingerprint(W2)
    assert isinstance(cache.get("layer.v", W1), SVD) and cache.computed == 3


def test_orthonormal_basis_like_scipy_orth():
    from scipy.linalg import orth

    g = torch.Generator().manual_seed(3)
    M = torch.randn(10, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 6, generator=g, dtype=torch.float64)
    Q = orthonormal_basis(M)
    assert Q.shape == (10, 3)
    _assert_orthonormal(Q)
    Q_ref = torch.from_numpy(orth(M.numpy()))
    torch.testing.assert_close(Q @ Q.T, Q_ref @ Q_ref.T, atol=1e-10, rtol=0)  # same projector
    with pytest.raises(ValueError, match=r"\(4, 2\) is zero"):
        orthonormal_basis(torch.zeros(4, 2))


def test_singular_vector_helpers():
    A, B = _factors(9, 11, 3)
    V = right_singular_vectors(A)
    U = left_singular_vectors(B)
    assert V.shape == (11, 3) and U.shape == (9, 3)
    _assert_orthonormal(V)
    _assert_orthonormal(U)
    # Ordered by singular value: ‖A v_1‖ ≥ ‖A v_2‖ ≥ ‖A v_3‖.
    norms = (A @ V).norm(dim=0)
    assert bool((norms[:-1] >= norms[1:]).all())
    with pytest.raises(ValueError, match=r"A \(r, d_in\).*\(3, 4, 5\)"):
        right_singular_vectors(torch.ones(3, 4, 5))


# ------------------------------------------------------------------------------------ W's top singular values
def _clustered(d_out: int, d_in: int, seed: int = 0) -> torch.Tensor:
    """A W whose spectrum is the hard case of a subspace iteration: 8 well separated values, then 80 values
    within 0.3 % of each other (a bulk edge; the top-64 boundary falls inside it), then a decaying rest."""
    g = torch.Generator().manual_seed(seed)
    n = min(d_out, d_in)
    s = torch.cat([torch.linspace(20, 8, 8, dtype=torch.float64),
                   2.0 * (1 - 0.003 * torch.rand(80, generator=g, dtype=torch.float64)).sort(descending=True).values,
                   torch.linspace(1.9, 0.01, n - 88, dtype=torch.float64)])
    U, _ = torch.linalg.qr(torch.randn(d_out, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d_in, n, generator=g, dtype=torch.float64))
    return (U * s) @ V.T


@pytest.mark.parametrize("shape", [(700, 600), (600, 700)])
def test_top_singular_values_krylov_matches_svdvals_on_a_cluster(shape):
    """Block Krylov (forced with dense_max=0) against svdvals: the Ky Fan sums Table 7 uses to 1e-9, each value
    to 1e-6, with σ_9 … σ_88 clustered within 0.3 % (the boundary of the top 64 inside the cluster)."""
    W = _clustered(*shape)
    ref = torch.linalg.svdvals(W)
    for k in (8, 64):
        got = top_singular_values(W, k, dense_max=0, block=16)
        assert got.shape == (k,) and got.dtype == torch.float64
        ky_fan = float(got.pow(2).sum().sqrt() / ref[:k].pow(2).sum().sqrt() - 1)
        assert abs(ky_fan) < 1e-9
        torch.testing.assert_close(got, ref[:k], rtol=1e-6, atol=0)


def test_top_singular_values_dense_route_and_bad_input():
    W = _clustered(120, 100)
    torch.testing.assert_close(top_singular_values(W, 5), torch.linalg.svdvals(W)[:5], rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="k=101"):
        top_singular_values(W, 101)
    with pytest.raises(ValueError, match="NaN or Inf"):
        top_singular_values(torch.full((4, 4), float("inf")), 2)

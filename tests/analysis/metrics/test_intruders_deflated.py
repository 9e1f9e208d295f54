"""lora_analysis.metrics.spectra.intruder_dimensions' partial route, round 2: the outside bound on the deflated
operator (power laws as slow as pretrained weights', the benchmark's adapter strengths), the tall side (a kernel
that holds no singular vector), clusters of near-tied W0 directions, and a shared dense fallback; all against the
dense float64 route (dense_max lowered to force the partial one)."""

from __future__ import annotations

import math

import pytest
import torch

from lora_analysis.metrics.linalg import factored_svd, top_singular, top_singular_triplets
from lora_analysis.metrics.spectra import _gram_floor, _outside_bound, intruder_dimensions

pytestmark = pytest.mark.float_sensitive  # rerun under forced MKL/ATen kernels by .ci/run
F64 = torch.float64


def _w0(s: torch.Tensor, d_out: int, d_in: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d_out, s.shape[0], generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(d_in, s.shape[0], generator=g, dtype=F64))
    return (U * s) @ V.T


def _power(n: int, alpha: float) -> torch.Tensor:
    return torch.arange(1, n + 1, dtype=F64) ** -alpha


def _adapter(d_out: int, d_in: int, strength: float, sigma10: float, r: int = 64, seed: int = 1):
    """benchmarks/cases_report7b.py's adapters: Gaussian A, B scaled to σ_1(ΔW) = strength · σ_10(W0)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, d_in, generator=g, dtype=F64) / math.sqrt(d_in)
    B = torch.randn(d_out, r, generator=g, dtype=F64)
    return A, B * (strength * sigma10 / float(factored_svd(A, B).S[0]))


def _against_dense(W0, dense, A, B, *, side="left", **kw):
    got = intruder_dimensions(W0, A, B, scaling=1.0, side=side, **({"dense_max": 0} | kw))
    ref = intruder_dimensions(W0, A, B, scaling=1.0, side=side, w0_svd=dense)
    assert got.indices == ref.indices, (got.decided_by, ref.max_cosine)
    return got, ref


@pytest.fixture(scope="module", params=[0.4, 0.6])
def power_w0(request):
    alpha = request.param
    s = _power(1536, alpha)
    W0 = _w0(s, 1536, 1536, seed=int(alpha * 10))
    return W0, top_singular(W0), s


@pytest.mark.parametrize("strength", [0.1, 0.5, 3.0])
def test_bench_strengths_decided_without_dense(power_w0, strength):
    """σ_i = i^-α, α = 0.4 (the benchmark's) and 0.6; ΔW's σ_1 at 0.1, 0.5, 3 × σ_10: every count equals the
    dense one without W0's full SVD, and the 3× adapter's intruders are decided by the Lanczos bound."""
    W0, dense, s = power_w0
    A, B = _adapter(1536, 1536, strength, float(s[9]))
    got, ref = _against_dense(W0, dense, A, B)
    assert "dense" not in got.decided_by
    if strength == 3.0:
        assert ref.count >= 8 and got.decided_by.count("lanczos") >= 8
    else:
        assert ref.count == 0


def test_outside_bound_holds_and_fails_where_it_must(power_w0):
    """The bound is ≥ the true max_{i>m} |x_iᵀ z| (dense eigenvectors); for z = one of W0's own tail vectors
    (|x_iᵀ z| = 1) it stays ≥ 1: it cannot call that direction new."""
    W0, dense, s = power_w0
    base = top_singular_triplets(W0, 64, dense_max=0)
    A, B = _adapter(1536, 1536, 3.0, float(s[9]))
    Y = top_singular_triplets(W0 + B @ A, 4, dense_max=0).U
    X = base.U
    Z = Y - X @ (X.T @ Y)
    Z = torch.cat([Z / Z.norm(dim=0), dense.U[:, 700:701]], dim=1)
    bound = _outside_bound(W0, base, "left", Z, torch.zeros(5), max_steps=128)
    true = (dense.U[:, 64:].T @ Z).abs().amax(dim=0)
    assert bool((bound >= true).all()), (bound, true)
    assert float(bound[:4].max()) < 0.5 and float(bound[4]) >= 1.0


@pytest.mark.parametrize("shape,side", [((3072, 1152), "left"), ((1152, 3072), "right")])
def test_tall_side_kernel_decided(shape, side):
    """gate/up's left side (and down's right side): M has a kernel of dimension d − n that holds most of z's
    mass and no singular vector of W0; the bound on the other side's Gram matrix decides without the dense
    route, with the dense count."""
    s = _power(min(shape), 0.4)
    W0 = _w0(s, *shape, seed=5)
    dense = top_singular(W0)
    for strength in (0.5, 3.0):
        A, B = _adapter(*shape, strength, float(s[9]))
        got, ref = _against_dense(W0, dense, A, B, side=side)
        assert "dense" not in got.decided_by
    assert got.count == ref.count >= 8 and got.decided_by.count("lanczos") >= 8


def test_tall_side_tiny_sigma_min_is_not_excused():
    """A tall W0 whose last singular values are 1e-9 (nearly rank-deficient): its last left vector is a singular
    vector all the same. ΔW lifts exactly that vector to the top: the dense route says "not an intruder", and the
    bounds, with no usable floor under σ_min, must not say otherwise (they leave it to the dense route)."""
    n = 1152
    s = torch.cat([_power(n - 8, 0.4), torch.linspace(2e-9, 1e-9, 8, dtype=F64)])
    W0 = _w0(s, 3072, n, seed=6)
    dense = top_singular(W0)
    assert _gram_floor(W0) <= float(s[-1]) ** 2
    u, v = dense.U[:, -1], dense.V[:, -1]
    got, ref = _against_dense(W0, dense, v.reshape(1, -1), 3.0 * u.reshape(-1, 1))
    assert 0 not in ref.indices and got.decided_by[0] in ("head", "dense")


def test_gram_floor_bounds_sigma_min():
    s = _power(1152, 0.5)
    W0 = _w0(s, 3072, 1152, seed=7)
    low = _gram_floor(W0)
    assert 0.3 * float(s[-1]) ** 2 <= low <= float(s[-1]) ** 2


def test_near_tied_w0_directions_cluster_bound():
    """W0's 21st-28th directions in two exact ties: single vectors there have no sine bound (1), which blocked
    every "lanczos" decision (its held upper bound ≥ √2); the ties' subspaces do have one, and the cluster bound
    lets the 3x adapter's intruders be decided without the dense route."""
    n = 1536
    s = _power(n, 0.5)
    s[20:24], s[24:28] = s[20], s[24]
    W0 = _w0(s, n, n, seed=8)
    dense = top_singular(W0)
    base = top_singular_triplets(W0, 64, dense_max=0)
    assert bool((base.certificate.vector_sine[20:28] == 1).all())
    A, B = _adapter(n, n, 3.0, float(s[9]))
    got, ref = _against_dense(W0, dense, A, B, w0_svd=base)
    assert ref.count >= 8 and "dense" not in got.decided_by


def test_shared_dense_fallback_computed_once():
    """An adapter set on one W0 whose directions only the dense route decides (ΔW lifts W0's 900th direction):
    with a memoised ``w0_full`` W0's full SVD is computed once for all of them; a wrong one is refused."""
    n = 1100
    s = _power(n, 0.6)
    W0 = _w0(s, n, n, seed=9)
    dense = top_singular(W0)
    calls = []

    def w0_full():
        calls.append(1)
        return dense

    memo = {}

    def shared():
        if "svd" not in memo:
            memo["svd"] = w0_full()
        return memo["svd"]

    for scale in (3.0, 4.0, 5.0):
        u, v = dense.U[:, 899], dense.V[:, 899]
        got = intruder_dimensions(W0, v.reshape(1, -1), scale * u.reshape(-1, 1), scaling=1.0, dense_max=0,
                                  w0_full=shared)
        ref = intruder_dimensions(W0, v.reshape(1, -1), scale * u.reshape(-1, 1), scaling=1.0, w0_svd=dense)
        assert got.decided_by == ("dense",) * 10 and got.indices == ref.indices and 0 not in got.indices
    assert len(calls) == 1
    with pytest.raises(ValueError, match="w0_full"):
        intruder_dimensions(W0, v.reshape(1, -1), 3.0 * u.reshape(-1, 1), scaling=1.0, dense_max=0,
                            w0_full=lambda: dense.truncate(100))

"""lora_analysis.subspace: φ grid (Section 7.2) on analytic cases, against a direct loop and scipy, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import subspace_angles

from lora_analysis.metrics.linalg import factored_svd, right_singular_vectors, top_singular
from lora_analysis.metrics.subspace import (
    InitControl,
    grassmann_distance,
    init_control,
    phi_diagonal,
    phi_grid,
    phi_weight_vs_delta,
    principal_angles,
    random_phi_expected,
    random_phi_sampled,
    subspace_similarity,
)

pytestmark = pytest.mark.float_sensitive  # rerun under forced MKL/ATen kernels by .ci/run

F64 = torch.float64


def _gauss(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _ortho(d: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.linalg.qr(_gauss(d, k, seed=seed))[0]


def test_phi_grid_matches_direct_definition():
    U1, U2 = _ortho(20, 5, seed=1), _ortho(20, 7, seed=2)
    phi = phi_grid(U1, U2)
    assert phi.shape == (5, 7) and phi.dtype == F64
    for i in range(1, 6):
        for j in range(1, 8):
            direct = torch.linalg.matrix_norm(U1[:, :i].T @ U2[:, :j]).square() / min(i, j)
            assert phi[i - 1, j - 1].item() == pytest.approx(direct.item(), rel=1e-12, abs=1e-15)


def test_phi_analytic_cases():
    U = _ortho(16, 6)
    torch.testing.assert_close(phi_grid(U, U).diagonal(), torch.ones(6, dtype=F64))
    # Nested subspaces: span(U[:, :3]) is inside span(U) -> φ(i, j) = 1 whenever i ≤ 3 and j ≥ i... and for all
    # (i, j=6) since the 6-dimensional subspace contains everything in the first.
    phi = phi_grid(U[:, :3], U)
    torch.testing.assert_close(phi[:, -1], torch.ones(3, dtype=F64))
    eye = torch.eye(16, dtype=F64)
    torch.testing.assert_close(phi_grid(eye[:, :4], eye[:, 4:10]), torch.zeros(4, 6, dtype=F64))
    # Identical A up to a change of basis inside the row space: φ(r, r) = 1.
    A = _gauss(4, 30)
    mix = _gauss(4, 4, seed=9)
    assert subspace_similarity(A, mix @ A)[-1, -1].item() == pytest.approx(1.0, abs=1e-10)


@settings(max_examples=25, deadline=None)
@given(d=st.integers(4, 24), r1=st.integers(1, 4), r2=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_phi_in_unit_interval_and_symmetric(d, r1, r2, seed):
    A1, A2 = _gauss(r1, d, seed=seed), _gauss(r2, d, seed=seed + 1)
    phi = subspace_similarity(A1, A2)
    assert phi.shape == (r1, r2)
    assert bool((phi >= 0).all()) and bool((phi <= 1).all())
    torch.testing.assert_close(subspace_similarity(A2, A1), phi.T, rtol=1e-10, atol=1e-12)


def test_subspace_similarity_side_b_uses_left_singular_vectors():
    B1, B2 = _gauss(12, 3, seed=4), _gauss(12, 5, seed=5)
    ref = phi_grid(torch.linalg.svd(B1, full_matrices=False)[0], torch.linalg.svd(B2, full_matrices=False)[0])
    torch.testing.assert_close(subspace_similarity(B1, B2, side="B"), ref)
    with pytest.raises(ValueError, match="side"):
        subspace_similarity(B1, B2, side="C")


def test_phi_diagonal():
    U = _ortho(10, 4)
    torch.testing.assert_close(phi_diagonal(phi_grid(U, U)), torch.ones(4, dtype=F64))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        phi_diagonal(torch.ones(3))


@pytest.mark.parametrize("k1,k2", [(3, 3), (2, 5), (6, 4)])
def test_principal_angles_match_scipy(k1, k2):
    U1, U2 = _gauss(15, k1, seed=7), _gauss(15, k2, seed=8)
    ref = np.sort(subspace_angles(U1.numpy(), U2.numpy()))
    ours = principal_angles(U1, U2)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-6, atol=1e-12)
    assert grassmann_distance(U1, U2) == pytest.approx(float(np.sqrt((ref**2).sum())), rel=1e-6)


def test_principal_angles_small_angles_accurate():
    # A rotation by 1e-7 rad: arccos alone would lose this angle entirely.
    d = 6
    U1 = torch.eye(d, dtype=F64)[:, :1]
    t = 1e-7
    U2 = torch.zeros(d, 1, dtype=F64)
    U2[0, 0], U2[1, 0] = math.cos(t), math.sin(t)
    assert principal_angles(U1, U2).item() == pytest.approx(t, rel=1e-6)
    np.testing.assert_allclose(principal_angles(U1, U2).numpy(), subspace_angles(U1.numpy(), U2.numpy()), rtol=1e-6)


def test_principal_angles_analytic():
    eye = torch.eye(8, dtype=F64)
    torch.testing.assert_close(principal_angles(eye[:, :3], eye[:, 3:6]), torch.full((3,), math.pi / 2, dtype=F64))
    assert grassmann_distance(eye[:, :3], eye[:, :3] @ _ortho(3, 3)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match=r"\(8, 3\).*\(7, 3\)"):
        principal_angles(eye[:, :3], torch.eye(7, dtype=F64)[:, :3])


def test_random_phi_expected_and_sampled():
    exp = random_phi_expected(3, 5, d=50)
    assert exp.shape == (3, 5)
    assert exp[0, 4].item() == pytest.approx(5 / 50) and exp[2, 1].item() == pytest.approx(3 / 50)
    samples = torch.stack([random_phi_sampled(4, 6, d=40, seed=s) for s in range(300)])
    mean = samples.mean(0)
    # Each φ entry is an average of ≥ 1 squared inner products with variance O(1/d²); 300 draws -> error ~ 0.01.
    torch.testing.assert_close(mean, random_phi_expected(4, 6, d=40), atol=0.012, rtol=0)
    torch.testing.assert_close(random_phi_sampled(4, 6, d=40, seed=3), random_phi_sampled(4, 6, d=40, seed=3))
    with pytest.raises(ValueError, match="i_max"):
        random_phi_expected(0, 3, d=10)
    with pytest.raises(ValueError, match="j_max"):
        random_phi_sampled(2, 11, d=10)


def test_phi_weight_vs_delta_planted():
    W = _gauss(30, 24, seed=11)
    ws = top_singular(W)
    # ΔW along W's top-2 right singular directions: φ(i, j) = 1 for i ≥ j within those two.
    A = ws.V[:, :2].T.contiguous()
    B = _gauss(30, 2, seed=12)
    phi = phi_weight_vs_delta(W, A, B, scaling=2.0, i_max=5)
    assert phi.shape == (5, 2)
    assert phi[1, 1].item() == pytest.approx(1.0, abs=1e-10)
    torch.testing.assert_close(phi_weight_vs_delta(W, A, B, scaling=2.0, i_max=5, w_svd=ws), phi)
    dw = factored_svd(A, B, scaling=2.0)
    ref_left = phi_grid(ws.U[:, :5], dw.U)
    torch.testing.assert_close(phi_weight_vs_delta(W, A, B, scaling=2.0, i_max=5, side="left"), ref_left)
    with pytest.raises(ValueError, match="j_max=3"):
        phi_weight_vs_delta(W, A, B, scaling=1.0, i_max=5, j_max=3)
    with pytest.raises(ValueError, match=r"W \(24, 30\)"):
        phi_weight_vs_delta(W.T, A, B, scaling=1.0, i_max=5)


def test_init_control_separates_shared_start():
    d = 60
    g = torch.Generator().manual_seed(0)
    start64 = torch.randn(16, d, generator=g, dtype=F64)
    start8 = start64[:4].clone()  # nested init: the small start is the big start's first rows
    learned = torch.randn(1, d, generator=g, dtype=F64)  # one shared learned direction
    A8 = start8 + torch.randn(4, 1, generator=g, dtype=F64) @ learned * 10
    A64 = start64 + torch.randn(16, 1, generator=g, dtype=F64) @ learned * 10
    ctl = init_control(A8, start8, A64, start64)
    assert isinstance(ctl, InitControl)
    assert ctl.phi.shape == ctl.phi_learned.shape == ctl.phi_init.shape == (4, 16)
    assert ctl.phi_init[3, 15].item() == pytest.approx(1.0, abs=1e-10)  # nested starts share everything
    assert ctl.phi_learned[0, 0].item() == pytest.approx(1.0, abs=1e-10)  # the learned change is rank one
    torch.testing.assert_close(ctl.phi, subspace_similarity(A8, A64))
    with pytest.raises(ValueError, match=r"\(4, 60\).*\(16, 60\)"):
        init_control(A8, start64, A64, start64)
    with pytest.raises(ValueError, match="A1 - A1_init is zero"):
        init_control(start8, start8, A64, start64)


@pytest.mark.parametrize(
    "U1,U2,match",
    [
        (torch.ones(5, 2), torch.eye(5)[:, :2], r"\(5, 2\) does not have orthonormal"),
        (torch.eye(5)[:, :2], torch.eye(6)[:, :2], r"\(5, 2\).*\(6, 2\)"),
        (torch.eye(3)[:, :0], torch.eye(3), r"\(3, 0\)"),
        (torch.full((4, 1), float("nan")), torch.eye(4)[:, :1], "NaN"),
        (torch.ones(2, 3), torch.ones(2, 3), "3 columns cannot be orthonormal"),
    ],
)
def test_phi_grid_bad_input(U1, U2, match):
    with pytest.raises(ValueError, match=match):
        phi_grid(U1, U2)


def test_subspace_similarity_bad_input():
    with pytest.raises(ValueError, match=r"\(2, 10\).*\(2, 11\)"):
        subspace_similarity(_gauss(2, 10), _gauss(2, 11))
    with pytest.raises(ValueError, match="Inf"):
        subspace_similarity(torch.full((2, 10), float("inf")), _gauss(2, 10))
    assert right_singular_vectors(_gauss(2, 10)).shape == (10, 2)


def test_shared_dimensions_counts_planted_overlap():
    from lora_analysis.metrics.subspace import shared_dimensions

    d, K = 200, 3
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(d, 3 + 2 * 9, generator=g, dtype=F64))[0]
    U1 = torch.cat([Q[:, :K], Q[:, K : K + 9]], dim=1)  # K shared directions first, then unrelated ones
    U2 = torch.cat([Q[:, :K], Q[:, K + 9 :]], dim=1)
    curve = shared_dimensions(phi_grid(U1, U2), d=d)
    assert curve.shape == (12,)
    torch.testing.assert_close(curve[:K], torch.arange(1, K + 1, dtype=F64) - torch.arange(1, K + 1, dtype=F64) ** 2 / d)
    assert round(float(curve.max())) == K
    with pytest.raises(ValueError, match="d must be an int >= 12"):
        shared_dimensions(phi_grid(U1, U2), d=5)


def test_phi_delta_with_and_without_the_top_direction():
    """Identical ΔW directions: φ = 1 everywhere. A shared top direction with the rest orthogonal: φ(1, 1) = 1 on
    the whole, and the directions after it (dW-top) share nothing."""
    from lora_analysis.metrics.subspace import phi_delta

    Q, _ = torch.linalg.qr(torch.randn(50, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    same = phi_delta(Q[:, :4], Q[:, :8])
    assert same["dW"].shape == (4, 8) and same["dW-top"].shape == (3, 7)
    assert torch.allclose(same["dW"], torch.ones(4, 8, dtype=torch.float64), atol=1e-12)  # rounding of QᵀQ
    top_only = phi_delta(Q[:, [0, 1, 2]], Q[:, [0, 3, 4, 5]])
    assert float(top_only["dW"][0, 0]) == pytest.approx(1.0, abs=1e-12)
    assert float(top_only["dW-top"].abs().max()) < 1e-12
    assert "dW-top" not in phi_delta(Q[:, :1], Q[:, :4])  # one direction: nothing after the top


def test_start_null_sees_nested_starts():
    """Independent starts: the mean φ on ΔW = G·A_init is the random-subspace baseline max(i, j)/d. Nested starts
    (the small start is the first rows of the large one) share directions before anything is learned."""
    from lora_analysis.metrics.subspace import start_null

    d, g = 200, torch.Generator().manual_seed(1)
    A_large = torch.randn(16, d, generator=g, dtype=torch.float64)
    A_other = torch.randn(2, d, generator=g, dtype=torch.float64)
    nested = start_null(A_large[:2], A_large, d_out=30, draws=64, seed=0)["start_null"]
    indep = start_null(A_other, A_large, d_out=30, draws=64, seed=0)["start_null"]
    expected = random_phi_expected(2, 16, d=d)
    # Monte Carlo: φ(i, j) of random subspaces has sd of order its mean; 64 draws put the mean within ~3 sd/8
    assert torch.allclose(indep, expected, rtol=0.5, atol=0.01)
    assert float(nested[1, 15]) == pytest.approx(1.0, abs=1e-12)  # A_2's row space lies inside A_16's
    assert float(nested[0, 0]) > 5 * float(indep[0, 0])

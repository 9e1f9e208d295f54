"""lora_analysis.projection: Table 7 (Section 7.3) on planted analytic cases, a dense reference, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from lora.layers import delta_weight
from lora_analysis.metrics.linalg import WeightSVDCache, top_singular
from lora_analysis.metrics.projection import Table7Row, projection_norm, random_orthonormal, table7_row

pytestmark = pytest.mark.float_sensitive  # rerun under forced MKL/ATen kernels by .ci/run

F64 = torch.float64


def _weight(d_out: int = 40, d_in: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_projection_norm_on_own_singular_vectors():
    W = _weight()
    svd = top_singular(W, k=5)
    assert projection_norm(W, svd.U, svd.V) == pytest.approx(float(svd.S.norm()), rel=1e-12)
    eye_out, eye_in = torch.eye(40, dtype=F64), torch.eye(32, dtype=F64)
    assert projection_norm(W, eye_out, eye_in) == pytest.approx(float(W.norm()), rel=1e-12)


@pytest.mark.parametrize("j,alpha", [(20, 5.0), (31, 0.7)])
def test_table7_planted_low_energy_direction(j, alpha):
    """ΔW = α·u_j v_jᵀ along a weak singular pair of W: delta = σ_j, amplification = α / σ_j."""
    W = _weight()
    ws = top_singular(W)
    u, v, sigma = ws.U[:, j : j + 1], ws.V[:, j : j + 1], ws.S[j].item()
    row = table7_row(W, v.T, u, scaling=alpha)  # A = vᵀ (1, d_in), B = u (d_out, 1)
    assert isinstance(row, Table7Row) and row.rank == 1
    assert row.delta == pytest.approx(sigma, rel=1e-10)
    assert row.dw_norm == pytest.approx(alpha, rel=1e-12)
    assert row.amplification == pytest.approx(alpha / sigma, rel=1e-10)
    assert row.weight == pytest.approx(ws.S[0].item(), rel=1e-12)
    assert row.w_norm == pytest.approx(float(W.norm()), rel=1e-12)
    assert row.weight > row.delta  # a weak direction projects less than W's top one


def test_table7_matches_dense_reference():
    W = _weight(seed=1)
    g = torch.Generator().manual_seed(2)
    A, B = torch.randn(4, 32, generator=g, dtype=F64), torch.randn(40, 4, generator=g, dtype=F64)
    s = 8 / 4
    dense = delta_weight(A, B, s)
    U, S, Vh = torch.linalg.svd(dense)
    row = table7_row(W, A, B, scaling=s)
    assert row.delta == pytest.approx(float((U[:, :4].T @ W @ Vh[:4].T).norm()), rel=1e-6)
    assert row.dw_norm == pytest.approx(float(dense.norm()), rel=1e-10)
    assert row.amplification == pytest.approx(row.dw_norm / row.delta, rel=1e-12)
    assert set(row.as_dict()) == {"delta", "weight", "random", "w_norm", "dw_norm", "amplification", "rank",
                                  "random_expected", "random_mean", "random_sd", "delta_over_random", "z",
                                  "amplification_random"}
    # top < r uses the top-k subspaces of both.
    row2 = table7_row(W, A, B, scaling=s, top=2)
    assert row2.rank == 2
    assert row2.delta == pytest.approx(float((U[:, :2].T @ W @ Vh[:2].T).norm()), rel=1e-6)


def test_table7_random_is_seeded_and_near_its_expectation():
    W = _weight(200, 160, seed=3)
    g = torch.Generator().manual_seed(4)
    A, B = torch.randn(8, 160, generator=g, dtype=F64), torch.randn(200, 8, generator=g, dtype=F64)
    r0 = table7_row(W, A, B, scaling=1.0, random_seed=0)
    assert r0.random == table7_row(W, A, B, scaling=1.0, random_seed=0).random
    assert r0.random != table7_row(W, A, B, scaling=1.0, random_seed=1).random
    # E‖Uᵀ W V‖_F² = k² ‖W‖_F² / (d_out d_in) for independent Haar U, V.
    expected = 8 * float(W.norm()) / math.sqrt(200 * 160)
    assert 0.5 * expected < r0.random < 1.5 * expected


def test_table7_shared_w_svd_gives_same_row():
    W = _weight(seed=5)
    g = torch.Generator().manual_seed(6)
    cache = WeightSVDCache()
    for r in (2, 8):
        A, B = torch.randn(r, 32, generator=g, dtype=F64), torch.randn(40, r, generator=g, dtype=F64)
        shared = table7_row(W, A, B, scaling=2.0, w_svd=cache.get("q", W))
        # W's column from the cached SVD's values or from svdvals: the same values up to rounding
        assert shared.as_dict() == pytest.approx(table7_row(W, A, B, scaling=2.0).as_dict(), rel=1e-13, nan_ok=True)
    assert cache.computed == 1


def test_table7_zero_update():
    W = _weight()
    row = table7_row(W, torch.randn(2, 32, dtype=F64), torch.zeros(40, 2, dtype=F64), scaling=1.0)
    assert row.dw_norm == 0.0
    assert row.delta > 0 and row.amplification == 0.0  # zero update: U, V arbitrary, nothing amplified


def test_random_orthonormal():
    Q = random_orthonormal(10, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(Q.T @ Q, torch.eye(4, dtype=F64))
    with pytest.raises(ValueError, match="k=11"):
        random_orthonormal(10, 11, generator=torch.Generator())


def test_bad_input():
    W = _weight()
    A, B = torch.randn(4, 32, dtype=F64), torch.randn(40, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"\(32, 40\)"):
        table7_row(W.T, A, B, scaling=1.0)
    with pytest.raises(ValueError, match="top=5"):
        table7_row(W, A, B, scaling=1.0, top=5)
    with pytest.raises(ValueError, match="NaN or Inf"):
        table7_row(W.clone().fill_(float("nan")), A, B, scaling=1.0)
    with pytest.raises(ValueError, match=r"U \(39, 2\).*\(40, 32\)"):
        projection_norm(W, torch.ones(39, 2), torch.ones(32, 2))
    with pytest.raises(ValueError, match="holding 2"):
        table7_row(W, A, B, scaling=1.0, w_svd=top_singular(W, k=2))


# ------------------------------------------------------------------------------------------- the random null
@pytest.mark.parametrize(("d_out", "d_in", "k"), [(48, 48, 4), (64, 32, 8), (40, 96, 16)])
def test_expected_random_projection_matches_sampling(d_out, d_in, k):
    """E‖UᵀWV‖_F² = k²‖W‖_F²/(d_out d_in) for Haar-random U, V: the analytic null against 4,000 draws."""
    from lora_analysis.metrics.projection import expected_random_projection, sampled_random_projection

    g = torch.Generator().manual_seed(7)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) @ torch.diag(torch.linspace(3, 0.1, d_in,
                                                                                         dtype=torch.float64))
    expected = expected_random_projection(float(W.norm()), k, d_out, d_in)
    squares = torch.tensor([projection_norm(W, random_orthonormal(d_out, k, generator=g),
                                            random_orthonormal(d_in, k, generator=g)) ** 2 for _ in range(4000)])
    se = float(squares.std()) / 4000**0.5
    assert float(squares.mean()) == pytest.approx(expected**2, abs=4 * se)  # the second moment, exactly
    null = sampled_random_projection(W, k, n=400, seed=1)
    assert null.mean <= expected * 1.01 and null.mean == pytest.approx(expected, rel=0.08)  # Jensen: just below
    assert 0 < null.sd < null.mean


def test_expected_random_projection_reproduces_the_papers_random_column():
    from lora_analysis.metrics.projection import expected_random_projection

    # Table 7: ‖W_q‖_F = 61.95, d = 12,288: random 0.02 at k=4 and 0.33 at k=64
    assert expected_random_projection(61.95, 4, 12288, 12288) == pytest.approx(0.02, abs=0.001)
    assert expected_random_projection(61.95, 64, 12288, 12288) == pytest.approx(0.33, abs=0.01)
    with pytest.raises(ValueError):
        expected_random_projection(1.0, 0, 4, 4)


def test_table7_row_carries_the_null():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(40, 40, generator=g, dtype=torch.float64)
    A, B = torch.randn(4, 40, generator=g, dtype=torch.float64), torch.randn(40, 4, generator=g, dtype=torch.float64)
    row = table7_row(W, A, B, scaling=0.5, null_draws=16)
    assert row.random_expected == pytest.approx(4 * float(W.norm()) / 40)
    assert row.delta_over_random == pytest.approx(row.delta / row.random_expected)
    assert row.amplification_random == pytest.approx(row.dw_norm / row.random_expected)
    assert row.z == pytest.approx((row.delta - row.random_mean) / row.random_sd)
    assert math.isnan(table7_row(W, A, B, scaling=0.5).z)  # no draws: only the analytic null


# ------------------------------------------------------------------------------------------- the batched path
def _deltas(d_out: int, d_in: int, ranks=(2, 8), seeds=(0, 1)):
    out = []
    for r in ranks:
        for s in seeds:
            g = torch.Generator().manual_seed(100 * r + s)
            out.append((torch.randn(r, d_in, generator=g, dtype=F64), torch.randn(d_out, r, generator=g, dtype=F64),
                        0.5 * r, None))
    return out


def test_table7_rows_equal_one_table7_row_per_delta():
    """One GEMM for every rank and seed, the random pair and null drawn once per k: the rows separate calls give."""
    from lora_analysis.metrics.projection import table7_rows

    W = _weight(60, 50, seed=8)
    deltas = _deltas(60, 50) + [(*_deltas(60, 50, ranks=(8,), seeds=(3,))[0][:3], 4)]  # a top below the rank
    rows = table7_rows(W, deltas, random_seed=11, null_draws=8)
    assert [r.rank for r in rows] == [2, 2, 8, 8, 4]
    for (A, B, s, top), row in zip(deltas, rows, strict=True):
        one = table7_row(W, A, B, scaling=s, top=top, random_seed=11, null_draws=8)
        assert row.as_dict() == pytest.approx(one.as_dict(), rel=1e-12)
    assert rows[0].random == rows[1].random and rows[0].random_sd == rows[1].random_sd  # same k: same draws
    assert rows[0].random != rows[2].random
    assert table7_rows(W, []) == []


def test_table7_rows_with_krylov_values_equal_the_dense_route():
    """The fast path (W's top-k singular values by block Krylov, forced with dense_max=0; one batched GEMM) against
    the dense route (a full SVD of W, one table7_row per ΔW): every Table 7 column within 1e-6 relative."""
    from lora_analysis.metrics.linalg import top_singular_values
    from lora_analysis.metrics.projection import table7_rows

    g = torch.Generator().manual_seed(9)
    W = torch.randn(500, 400, generator=g, dtype=F64) * 0.02  # a random bulk: clustered values at its edge
    W += (torch.randn(500, 6, generator=g, dtype=F64) * torch.linspace(3, 1, 6, dtype=F64)) @ \
        torch.randn(6, 400, generator=g, dtype=F64) / 20
    deltas = _deltas(500, 400, ranks=(8, 64))
    fast = table7_rows(W, deltas, random_seed=2, w_values=top_singular_values(W, 64, dense_max=0, block=16))
    dense = top_singular(W)
    for (A, B, s, top), row in zip(deltas, fast, strict=True):
        ref = table7_row(W, A, B, scaling=s, top=top, random_seed=2, w_svd=dense)
        for col, v in ref.as_dict().items():
            if isinstance(v, float) and not math.isnan(v):
                assert getattr(row, col) == pytest.approx(v, rel=1e-6), col


def test_table7_rows_bad_input():
    from lora_analysis.metrics.projection import table7_rows

    W = _weight()
    (A, B, s, _), = _deltas(40, 32, ranks=(4,), seeds=(0,))
    with pytest.raises(ValueError, match="holding 2"):
        table7_rows(W, [(A, B, s, None)], w_values=torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match="top=6"):
        table7_rows(W, [(A, B, s, 6)])
    with pytest.raises(ValueError, match=r"does not match W \(40, 32\)"):
        table7_rows(W, [(A[:, :30], B, s, None)])

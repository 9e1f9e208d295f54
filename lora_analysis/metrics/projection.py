"""How ΔW relates to W: projections and the amplification factor (Hu et al., 2021, Section 7.3, Table 7).

Project ``W (d_out, d_in)`` onto an ``r``-dimensional pair of subspaces ``U (d_out, r)``, ``V (d_in, r)``::

    ‖Uᵀ W V‖_F

for three choices: the top-``r`` left/right singular vectors of ``ΔW`` (computed from the factors), those of
``W`` itself (which gives ``sqrt(σ_1² + … + σ_r²)`` of W), and a random orthonormal pair. The amplification
factor is ``‖ΔW‖_F / ‖Uᵀ W V‖_F`` with ``U, V`` from ``ΔW``: the paper reads 21.5 at r=4 on GPT-3's layer 48
as "ΔW amplifies directions W already has but does not emphasise".

All functions are pure: tensors in, floats or frozen dataclasses out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from lora_analysis.metrics.linalg import (
    DENSE_SVDVALS_MAX,
    SVD,
    _top_singular_values,
    as_float64_matrix,
    factored_svd,
)

__all__ = [
    "RandomProjection",
    "Table7Row",
    "expected_random_projection",
    "projection_norm",
    "random_orthonormal",
    "sampled_random_projection",
    "table7_row",
    "table7_rows",
]


def projection_norm(W: Tensor, U: Tensor, V: Tensor) -> float:
    """``‖Uᵀ W V‖_F`` for ``W (d_out, d_in)``, ``U (d_out, k)``, ``V (d_in, k')`` (Table 7).

    Example: with ``U, V`` the top-``k`` singular vectors of ``W`` this is ``sqrt(σ_1² + … + σ_k²)``.
    """
    W = as_float64_matrix(W, name="W (d_out, d_in)")
    U = as_float64_matrix(U, name="U (d_out, k)")
    V = as_float64_matrix(V, name="V (d_in, k)")
    if U.shape[0] != W.shape[0] or V.shape[0] != W.shape[1]:
        raise ValueError(f"U {tuple(U.shape)} and V {tuple(V.shape)} do not fit W {tuple(W.shape)}: "
                         "need U (d_out, k) and V (d_in, k)")
    return _projection_norm(W, U, V)


def _projection_norm(W: Tensor, U: Tensor, V: Tensor) -> float:
    # Unchecked core of projection_norm, for callers that validated W once: the finiteness scan of a 4096²
    # W costs more than the projection itself (benchmarks/, section7_7b_shaped).
    return float(torch.linalg.matrix_norm(U.T @ (W @ V)))


def random_orthonormal(n: int, k: int, *, generator: torch.Generator) -> Tensor:
    """A uniformly random ``(n, k)`` orthonormal matrix (QR of a Gaussian, signs fixed so the law is Haar)."""
    if not 0 < k <= n:
        raise ValueError(f"k={k} must be in 1..n={n}")
    Q, R = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
    return Q * torch.where(torch.diagonal(R) < 0, -1.0, 1.0)


def expected_random_projection(w_norm: float, k: int, d_out: int, d_in: int) -> float:
    """The random null of Table 7: ``sqrt(E‖Uᵀ W V‖_F²) = k · ‖W‖_F / sqrt(d_out · d_in)`` for independent uniformly
    random orthonormal ``U (d_out, k)`` and ``V (d_in, k)``.

    Derivation: ``‖UᵀWV‖_F² = tr(P_U W P_V Wᵀ)`` with projectors ``P_U = UUᵀ``, ``P_V = VVᵀ``. For a Haar-random
    k-dimensional subspace ``E[P_U] = (k/d_out) I`` and ``E[P_V] = (k/d_in) I``, and U, V are independent, so
    ``E‖UᵀWV‖_F² = (k/d_out)(k/d_in) tr(W Wᵀ) = k² ‖W‖_F² / (d_out d_in)``. For a square ``d × d`` W this is
    ``(k/d) · ‖W‖_F``: the paper's random column (0.02 at k=4 and 0.33 at k=64 with ‖W_q‖_F = 61.95, d = 12,288).

    By Jensen the mean of the norm itself is slightly below this (about 2 % at k = 4, 20 % at k = 1), so a ratio
    ``delta / expected`` of a random ΔW sits at or just under 1; :func:`sampled_random_projection` gives the
    sampled mean and spread.
    """
    if not (0 < k <= min(d_out, d_in)):
        raise ValueError(f"k={k} must be in 1..min(d_out, d_in)={min(d_out, d_in)}")
    return k * float(w_norm) / math.sqrt(d_out * d_in)


@dataclass(frozen=True)
class RandomProjection:
    """The sampled null of Table 7: ``‖UᵀWV‖_F`` over ``n`` independent random orthonormal pairs.

    Attributes:
        mean, sd: sample mean and standard deviation (ddof=1).
        n: number of draws.
    """

    mean: float
    sd: float
    n: int


def sampled_random_projection(W: Tensor, k: int, *, n: int = 32, seed: int = 0) -> RandomProjection:
    """Mean and spread of ``‖Uᵀ W V‖_F`` for ``n`` seeded random orthonormal pairs ``U (d_out, k)``, ``V (d_in, k)``.

    Its mean tends to :func:`expected_random_projection` (from below, by Jensen); the spread is what a single random
    draw (the paper's one number) hides: about 18 % of the mean at k = 4 on a MiniLM query weight. Draw ``i`` is
    the ``i``-th pair ``(U, V)`` of a generator seeded with ``seed`` (U first); all ``n`` projections of W come
    from one GEMM ``W @ [V_1 … V_n]``.
    """
    W = as_float64_matrix(W, name="W (d_out, d_in)")
    if n < 2:
        raise ValueError(f"n={n}: need at least two draws for a spread")
    us, vs = _random_pairs(W.shape[0], W.shape[1], k, n, seed)
    return _null_from(W @ torch.cat(vs, 1), us)


def _random_pairs(d_out: int, d_in: int, k: int, n: int, seed: int) -> tuple[list[Tensor], list[Tensor]]:
    """``n`` seeded random orthonormal pairs ``(U_i (d_out, k), V_i (d_in, k))``, drawn U, V, U, V, …"""
    g = torch.Generator().manual_seed(int(seed))
    us, vs = [], []
    for _ in range(n):
        us.append(random_orthonormal(d_out, k, generator=g))
        vs.append(random_orthonormal(d_in, k, generator=g))
    return us, vs


def _block_norms(WV: Tensor, us: Sequence[Tensor]) -> list[float]:
    """``‖U_iᵀ (W V)_i‖_F`` for consecutive column blocks ``(W V)_i`` of ``WV``, one per ``U_i``."""
    out, j = [], 0
    for U in us:
        k = U.shape[1]
        out.append(float(torch.linalg.matrix_norm(U.T @ WV[:, j:j + k])))
        j += k
    return out


def _null_from(WV: Tensor, us: Sequence[Tensor]) -> RandomProjection:
    """The sampled null from ``WV = W @ [V_1 … V_n]`` and the draws' ``U_i``."""
    draws = torch.tensor(_block_norms(WV, us), dtype=torch.float64)
    return RandomProjection(mean=float(draws.mean()), sd=float(draws.std()), n=len(us))


@dataclass(frozen=True)
class Table7Row:
    """One column group of Table 7 (one weight, one rank).

    Attributes:
        delta: ``‖Uᵀ W V‖_F`` with ``U, V`` the top-``rank`` singular vectors of ``ΔW`` (paper r=4: 0.32).
        weight: the same with ``W``'s own top-``rank`` singular vectors (paper: 21.67).
        random: the same with a random orthonormal pair (paper: 0.02).
        w_norm: ``‖W‖_F`` (paper: 61.95).
        dw_norm: ``‖ΔW‖_F`` including the scale ``s`` (paper: 6.91).
        amplification: ``dw_norm / delta`` (paper: 21.5); ``inf`` if ``delta == 0 < dw_norm``, ``nan`` if both are 0.
        rank: the subspace dimension used.
        random_expected: the analytic null ``k ‖W‖_F / sqrt(d_out d_in)`` (:func:`expected_random_projection`).
        random_mean, random_sd: the sampled null (:func:`sampled_random_projection`; NaN if not sampled).
        delta_over_random: ``delta / random_expected``, the margin over chance (paper: 16 at r=4, 5.8 at r=64).
        z: ``(delta − random_mean) / random_sd`` (NaN if not sampled).
        amplification_random: ``dw_norm / random_expected``, the factor a ΔW of the same norm in a random
            subspace would show: a large amplification means something only beside a margin above chance.
    """

    delta: float
    weight: float
    random: float
    w_norm: float
    dw_norm: float
    amplification: float
    rank: int
    random_expected: float = math.nan
    random_mean: float = math.nan
    random_sd: float = math.nan
    delta_over_random: float = math.nan
    z: float = math.nan
    amplification_random: float = math.nan

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def table7_row(
    W: Tensor,
    A: Tensor,
    B: Tensor,
    *,
    scaling: float,
    top: int | None = None,
    random_seed: int = 0,
    w_svd: SVD | None = None,
    null_draws: int = 0,
) -> Table7Row:
    """Table 7 for one adapted weight: project ``W`` on the subspaces of ``ΔW``, of ``W`` and of a random pair.

    Args:
        W: ``(d_out, d_in)`` frozen weight ``W0``.
        A: ``(r, d_in)``; B: ``(d_out, r)``; scaling: ``s`` (``‖ΔW‖_F`` includes it).
        top: subspace dimension ``k`` (default ``r``, as in the paper).
        random_seed: seed of the random orthonormal pair.
        w_svd: a precomputed SVD of ``W`` with at least ``k`` triplets (share one across ranks and seeds, e.g.
            ``WeightSVDCache``); only its singular values are used. Without it W's top-k singular values come from
            :func:`~lora_analysis.metrics.linalg.top_singular_values`.
        null_draws: random pairs to sample for the null's mean and spread (0: only the analytic null).

    Example:
        ``ΔW = α·u vᵀ`` with ``(u, σ, v)`` a singular triplet of ``W`` gives ``delta == σ`` and
        ``amplification == α / σ``.

    One row of :func:`table7_rows` (which batches every rank and seed that adapts one W).
    """
    if w_svd is not None and w_svd.U.shape[0] != W.shape[0]:
        raise ValueError(f"w_svd (U {tuple(w_svd.U.shape)}, V {tuple(w_svd.V.shape)}) is not an SVD of W {tuple(W.shape)}")
    return table7_rows(W, [(A, B, scaling, top)], random_seed=random_seed, null_draws=null_draws,
                       w_values=None if w_svd is None else w_svd.S)[0]


def table7_rows(
    W: Tensor,
    deltas: Sequence[tuple[Tensor, Tensor, float, int | None]],
    *,
    random_seed: int = 0,
    null_draws: int = 0,
    w_values: Tensor | None = None,
    rtol: float = 1e-7,
    nulls: Mapping[int, RandomProjection] | None = None,
) -> list[Table7Row]:
    """Table 7 rows for every ΔW that adapts one ``W`` (all ranks and seeds of one module), batched (Section 7.3).

    For each ``(A, B, scaling, top)`` in ``deltas`` (``top`` None: the rank r) the row is exactly
    :func:`table7_row`'s: with ``k = top`` and ``U_i, V_i`` ΔW_i's top-k singular vectors (from the factors),

    * ``delta_i = ‖U_iᵀ (W V_i)‖_F``, all from one GEMM ``W @ [V_1 … V_n, V_rand(k) …, null draws …]``;
    * ``weight = sqrt(σ_1² + … + σ_k²)`` of W, from W's singular *values* only (``w_values``, or
      :func:`~lora_analysis.metrics.linalg.top_singular_values` to ``rtol``: dense for small W, block Krylov above);
    * ``random``: the pair drawn by a generator seeded with ``random_seed`` (one pair per distinct k, shared by
      every row of that k, as separate calls would draw it); the sampled null: ``null_draws`` pairs from a
      generator seeded with ``random_seed + 1`` (:func:`sampled_random_projection`), drawn once per distinct k and
      shared by every row of that k; the analytic null :func:`expected_random_projection`.

    Cost for ``n`` rows on a ``d × d`` W: one ``d² · (Σ k_i + Σ_distinct k (1 + null_draws))`` GEMM, plus W's
    singular values, instead of ``n`` separate projections and ``n`` SVDs of W.

    Args:
        W: ``(d_out, d_in)`` frozen weight.
        deltas: ``(A (r, d_in), B (d_out, r), scaling, top)`` per row.
        random_seed, null_draws: as :func:`table7_row`.
        w_values: W's top singular values (at least ``max k``), e.g. ``WeightSVDCache``'s ``.S``.
        rtol: tolerance of ``top_singular_values`` when ``w_values`` is not given (relative, on
            ``σ_1² + … + σ_k²``; 1e-7 on the sum is 5e-8 on W's column, a factor 20 inside the 1e-6 that Table 7 is
            checked to, and the stopping rule is conservative: 3e-10 measured on ``benchmarks``' bulk-edge W).
        nulls: the sampled null per k where it is already known (``sampled_random_projection(W, k, n=null_draws,
            seed=random_seed + 1)``, e.g. from a cache): those k's draws are not made again (at d = 4096 and
            k = 64 they are a 4096 × 2112 GEMM, most of Table 7's cost).

    Returns:
        One :class:`Table7Row` per entry of ``deltas``, in order.
    """
    W = as_float64_matrix(W, name="W (d_out, d_in)")
    d_out, d_in = W.shape
    dws, ks = [], []
    for A, B, scaling, top in deltas:
        dw = factored_svd(A, B, scaling=scaling)
        if dw.U.shape[0] != d_out or dw.V.shape[0] != d_in:
            raise ValueError(f"ΔW ({dw.U.shape[0]}, {dw.V.shape[0]}) from A {tuple(A.shape)}, B {tuple(B.shape)} "
                             f"does not match W {tuple(W.shape)}")
        k = dw.k if top is None else top
        if not 0 < k <= dw.k:
            raise ValueError(f"top={top} must be in 1..{dw.k} for A {tuple(A.shape)}, B {tuple(B.shape)}")
        dws.append(dw)  # all its triplets: ‖ΔW‖_F = ‖σ(ΔW)‖_2 needs every one
        ks.append(k)
    if not dws:
        return []
    k_max = max(ks)
    if w_values is None:
        w_values = _top_singular_values(W, k_max, rtol=rtol, block=32, seed=0, max_dim=None,
                                        dense_max=DENSE_SVDVALS_MAX)  # W is checked above
    elif w_values.shape[0] < k_max:
        raise ValueError(f"w_values: cannot take the top {k_max} singular values of W {tuple(W.shape)}, "
                         f"holding {w_values.shape[0]}")
    distinct = sorted(set(ks))
    rand = {k: _random_pairs(d_out, d_in, k, 1, random_seed) for k in distinct}
    known = dict(nulls or {}) if null_draws else {}  # given by the caller: not drawn again
    null = {k: _random_pairs(d_out, d_in, k, null_draws, random_seed + 1) for k in distinct
            if k not in known} if null_draws else {}
    # one GEMM: W @ [V_1 … V_n | V_rand(k) … | null V's of k …]
    Vs = [dw.V[:, :k] for dw, k in zip(dws, ks, strict=True)] + [rand[k][1][0] for k in distinct] + [v for k in null for v in null[k][1]]
    WV = W @ torch.cat(Vs, 1)
    deltas_norms = _block_norms(WV, [dw.U[:, :k] for dw, k in zip(dws, ks, strict=True)])
    j = sum(ks)
    randoms = {}
    for k in distinct:
        randoms[k] = _block_norms(WV[:, j:j + k], rand[k][0])[0]
        j += k
    null_of = {k: known[k] for k in distinct if k in known}
    for k in null:
        null_of[k] = _null_from(WV[:, j:j + k * null_draws], null[k][0])
        j += k * null_draws
    w_norm = float(torch.linalg.matrix_norm(W))
    return [_row(delta, float(torch.linalg.vector_norm(dw.S)), w_values, k, w_norm, randoms[k], null_of.get(k),
                 d_out, d_in) for dw, k, delta in zip(dws, ks, deltas_norms, strict=True)]


def _row(delta: float, dw_norm: float, w_values: Tensor, k: int, w_norm: float, random: float,
         null: RandomProjection | None, d_out: int, d_in: int) -> Table7Row:
    """One :class:`Table7Row` from its projections and norms (``dw_norm`` includes the scale s)."""
    if delta > 0:
        amplification = dw_norm / delta
    else:
        amplification = math.inf if dw_norm > 0 else math.nan
    expected = expected_random_projection(w_norm, k, d_out, d_in)
    return Table7Row(
        delta=delta,
        weight=float(torch.linalg.vector_norm(w_values[:k])),  # == ‖U_kᵀ W V_k‖_F with W's own top-k pair
        random=random,
        w_norm=w_norm,
        dw_norm=dw_norm,
        amplification=amplification,
        rank=k,
        random_expected=expected,
        random_mean=null.mean if null else math.nan,
        random_sd=null.sd if null else math.nan,
        delta_over_random=delta / expected if expected > 0 else math.nan,
        z=(delta - null.mean) / null.sd if null and null.sd > 0 else math.nan,
        amplification_random=dw_norm / expected if expected > 0 else math.nan,
    )

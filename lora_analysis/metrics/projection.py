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
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from lora_analysis.metrics.linalg import SVD, as_float64_matrix, top_singular, weight_and_delta_svd

__all__ = ["Table7Row", "projection_norm", "random_orthonormal", "table7_row"]


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
    """

    delta: float
    weight: float
    random: float
    w_norm: float
    dw_norm: float
    amplification: float
    rank: int

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
) -> Table7Row:
    """Table 7 for one adapted weight: project ``W`` on the subspaces of ``ΔW``, of ``W`` and of a random pair.

    Args:
        W: ``(d_out, d_in)`` frozen weight ``W0``.
        A: ``(r, d_in)``; B: ``(d_out, r)``; scaling: ``s`` (``‖ΔW‖_F`` includes it).
        top: subspace dimension ``k`` (default ``r``, as in the paper).
        random_seed: seed of the random orthonormal pair.
        w_svd: a precomputed SVD of ``W`` with at least ``k`` triplets (share one across ranks and seeds, e.g.
            ``WeightSVDCache``); computed here if omitted.

    Example:
        ``ΔW = α·u vᵀ`` with ``(u, σ, v)`` a singular triplet of ``W`` gives ``delta == σ`` and
        ``amplification == α / σ``.
    """
    W, dw = weight_and_delta_svd(W, A, B, scaling=scaling)
    k = dw.k if top is None else top
    if not 0 < k <= dw.k:
        raise ValueError(f"top={top} must be in 1..{dw.k} for A {tuple(A.shape)}, B {tuple(B.shape)}")
    ws = top_singular(W, k=k) if w_svd is None else w_svd.truncate(k)
    if ws.U.shape[0] != W.shape[0] or ws.V.shape[0] != W.shape[1]:
        raise ValueError(f"w_svd (U {tuple(ws.U.shape)}, V {tuple(ws.V.shape)}) is not an SVD of W {tuple(W.shape)}")
    g = torch.Generator().manual_seed(int(random_seed))
    U_rand = random_orthonormal(W.shape[0], k, generator=g)
    V_rand = random_orthonormal(W.shape[1], k, generator=g)

    delta = _projection_norm(W, dw.U[:, :k], dw.V[:, :k])
    dw_norm = float(torch.linalg.vector_norm(dw.S))  # ‖ΔW‖_F = ‖σ(ΔW)‖_2, exact from the factors
    if delta > 0:
        amplification = dw_norm / delta
    else:
        amplification = math.inf if dw_norm > 0 else math.nan
    return Table7Row(
        delta=delta,
        weight=float(torch.linalg.vector_norm(ws.S[:k])),  # == projection_norm(W, ws.U, ws.V)
        random=_projection_norm(W, U_rand, V_rand),
        w_norm=float(torch.linalg.matrix_norm(W)),
        dw_norm=dw_norm,
        amplification=amplification,
        rank=k,
    )

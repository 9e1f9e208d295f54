"""Subspace similarity between LoRA updates (Hu et al., 2021, Section 7.2, Figures 3, 4, 6-8; Appendix G/H).

The paper's normalized subspace similarity between two ``A`` matrices (``A_1 (r_1, d)``, ``A_2 (r_2, d)``)::

    φ(A_1, A_2, i, j) = ‖U_1[:, :i]ᵀ U_2[:, :j]‖_F² / min(i, j)   in [0, 1]

where ``U_k (d, r_k)`` holds the right singular vectors of ``A_k`` ordered by singular value. 1 means one
subspace contains the other, 0 means they are orthogonal. Two independent random subspaces give
``E[φ(i, j)] = max(i, j) / d``. The whole ``i × j`` grid comes from one matrix of squared inner products and a
2-D cumulative sum. Footnote 7: the same works on ``B`` with left singular vectors (``side="B"``).

All functions are pure: tensors in, float64 tensors or frozen dataclasses out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lora_analysis.metrics.linalg import (
    SVD,
    as_float64_matrix,
    factored_svd,
    left_singular_vectors,
    orthonormal_basis,
    right_singular_vectors,
    top_singular,
    weight_and_delta_svd,
)

__all__ = [
    "InitControl",
    "delta_directions",
    "phi_delta",
    "start_null",
    "grassmann_distance",
    "init_control",
    "phi_diagonal",
    "phi_grid",
    "phi_weight_vs_delta",
    "principal_angles",
    "random_phi_expected",
    "random_phi_sampled",
    "shared_dimensions",
    "subspace_similarity",
]

Side = Literal["A", "B"]

# Orthonormality tolerance for φ inputs: catches a raw A passed where singular vectors are expected,
# while accepting bases computed in float32 and upcast.
_ORTHO_TOL = 1e-4


def _check_orthonormal(U: Tensor, name: str) -> Tensor:
    U = as_float64_matrix(U, name=name)
    if U.shape[1] > U.shape[0]:
        raise ValueError(f"{name}: {U.shape[1]} columns cannot be orthonormal in dimension {U.shape[0]} (shape {tuple(U.shape)})")
    err = (U.T @ U - torch.eye(U.shape[1], dtype=torch.float64)).abs().max().item()
    if err > _ORTHO_TOL:
        raise ValueError(
            f"{name} of shape {tuple(U.shape)} does not have orthonormal columns (max |UᵀU - I| = {err:.2e}); "
            "pass singular vectors (e.g. right_singular_vectors(A)), or use subspace_similarity on the factors"
        )
    return U


def phi_grid(U1: Tensor, U2: Tensor) -> Tensor:
    """The normalized subspace similarity grid for every ``i ≤ i_max``, ``j ≤ j_max`` at once.

    ``φ[i-1, j-1] = ‖U1[:, :i]ᵀ U2[:, :j]‖_F² / min(i, j)`` (Section 7.2). With ``G = (U1ᵀ U2)²`` elementwise,
    ``‖U1[:, :i]ᵀ U2[:, :j]‖_F² = Σ_{a<i, b<j} G[a, b]``, a 2-D cumulative sum.

    Args:
        U1: ``(d, i_max)`` orthonormal columns, ordered (most important first).
        U2: ``(d, j_max)`` orthonormal columns, same ``d``.

    Returns:
        ``(i_max, j_max)`` float64 in ``[0, 1]``. Identical bases give 1 everywhere; orthogonal ones give 0;
        ``phi_grid(U2, U1) == phi_grid(U1, U2).T``.
    """
    U1 = _check_orthonormal(U1, "U1")
    U2 = _check_orthonormal(U2, "U2")
    if U1.shape[0] != U2.shape[0]:
        raise ValueError(f"U1 {tuple(U1.shape)} and U2 {tuple(U2.shape)} live in different dimensions")
    G = (U1.T @ U2).square()  # (i_max, j_max)
    cum = G.cumsum(0).cumsum(1)
    i = torch.arange(1, U1.shape[1] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, U2.shape[1] + 1, dtype=torch.float64)[None, :]
    # Rounding can leave 1 + 1e-15; the quantity is in [0, 1] by Cauchy-Schwarz.
    return (cum / torch.minimum(i, j)).clamp_(0.0, 1.0)


def _basis(M: Tensor, side: Side, name: str) -> Tensor:
    if side == "A":
        return right_singular_vectors(as_float64_matrix(M, name=f"{name} (r, d_in)"))
    if side == "B":
        return left_singular_vectors(as_float64_matrix(M, name=f"{name} (d_out, r)"))
    raise ValueError(f"side must be 'A' (right singular vectors of A) or 'B' (left of B), got {side!r}")


def subspace_similarity(M1: Tensor, M2: Tensor, *, side: Side = "A") -> Tensor:
    """φ between two LoRA factors (Section 7.2, Figures 3 and 4).

    Args:
        M1, M2: with ``side="A"`` (the paper's default) two ``A`` matrices ``(r_1, d_in)`` and ``(r_2, d_in)``,
            compared on their right singular vectors; with ``side="B"`` (footnote 7) two ``B`` matrices
            ``(d_out, r_1)`` and ``(d_out, r_2)``, compared on their left singular vectors.

    Returns:
        ``(r_1, r_2)`` φ grid (see :func:`phi_grid`). Figure 3 is ``subspace_similarity(A_8, A_64)``.
    """
    U1, U2 = _basis(M1, side, "M1"), _basis(M2, side, "M2")
    if U1.shape[0] != U2.shape[0]:
        raise ValueError(
            f"M1 {tuple(M1.shape)} and M2 {tuple(M2.shape)} act on different dimensions for side={side!r}"
        )
    return phi_grid(U1, U2)


def phi_diagonal(phi: Tensor) -> Tensor:
    """``φ(i, i)`` for ``i = 1..min(i_max, j_max)`` of a φ grid: the summary curve of Figure 3."""
    if phi.ndim != 2:
        raise ValueError(f"phi must be a 2-D grid, got shape {tuple(phi.shape)}")
    return torch.diagonal(phi).to(torch.float64).clone()


def shared_dimensions(phi: Tensor, *, d: int) -> Tensor:
    """Soft count of shared directions among the top ``i`` of each subspace, above chance, for every ``i``.

    ``i·φ(i, i) = ‖U_1[:, :i]ᵀ U_2[:, :i]‖_F²`` counts the directions the two top-``i`` subspaces share (each
    shared direction adds 1, each orthogonal one 0); random subspaces of dimension ``d`` add ``i²/d`` on average,
    which is subtracted. Two subspaces that share exactly ``K`` directions and are random otherwise give a curve
    that rises as ``i`` up to ``K`` and then stays near ``K``, so ``round(max)`` estimates ``K``.

    Args:
        phi: a φ grid ``(i_max, j_max)``; its diagonal is used.
        d: the ambient dimension (``d_in`` for A-side φ).

    Returns:
        ``(min(i_max, j_max),)`` float64.
    """
    diag = phi_diagonal(phi)
    if not (isinstance(d, int) and d >= diag.numel()):
        raise ValueError(f"d must be an int >= {diag.numel()} (the grid's diagonal length), got {d!r}")
    i = torch.arange(1, diag.numel() + 1, dtype=torch.float64)
    return i * diag - i.square() / d


def principal_angles(U1: Tensor, U2: Tensor) -> Tensor:
    """Principal angles between ``span(U1)`` and ``span(U2)``, ascending, in radians.

    ``U1 (d, k_1)`` and ``U2 (d, k_2)`` need not be orthonormal (they are orthonormalised first, like
    ``scipy.linalg.subspace_angles``). Returns ``min(rank_1, rank_2)`` angles. Cosines come from the singular
    values of ``Q_1ᵀ Q_2``; small angles use the sines (singular values of the residual of one basis projected
    on the other) for accuracy (Knyazev & Argentati, 2002), the same scheme as scipy.
    """
    Q1, Q2 = orthonormal_basis(as_float64_matrix(U1, name="U1")), orthonormal_basis(as_float64_matrix(U2, name="U2"))
    if Q1.shape[0] != Q2.shape[0]:
        raise ValueError(f"U1 {tuple(U1.shape)} and U2 {tuple(U2.shape)} live in different dimensions")
    if Q1.shape[1] < Q2.shape[1]:
        Q1, Q2 = Q2, Q1  # Q1 is the larger subspace, so the residual of Q2 measures the angles
    cross = Q1.T @ Q2
    cos = torch.linalg.svdvals(cross).clamp(-1.0, 1.0)  # descending -> angles ascending
    sin = torch.linalg.svdvals(Q2 - Q1 @ cross).clamp(-1.0, 1.0).flip(0)  # ascending -> angles ascending
    return torch.where(cos.square() >= 0.5, torch.arcsin(sin), torch.arccos(cos))


def grassmann_distance(U1: Tensor, U2: Tensor) -> float:
    """Geodesic distance ``sqrt(Σ θ_k²)`` over the principal angles (0 for equal subspaces, ``π/2·sqrt(k)`` for
    orthogonal ``k``-dimensional ones). For subspaces of different dimension this is the distance of Ye & Lim
    (2016) restricted to the ``min(k_1, k_2)`` angles."""
    return float(principal_angles(U1, U2).square().sum().sqrt())


def random_phi_expected(i_max: int, j_max: int, *, d: int) -> Tensor:
    """Analytic random baseline ``E[φ(i, j)] = max(i, j) / d`` for independent uniformly random subspaces.

    ``E‖U_1[:, :i]ᵀ U_2[:, :j]‖_F² = i·j/d`` (each squared inner product has mean ``1/d``); divided by
    ``min(i, j)`` this is ``max(i, j)/d``. Returns ``(i_max, j_max)`` float64.
    """
    _check_grid(i_max, j_max, d)
    i = torch.arange(1, i_max + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, j_max + 1, dtype=torch.float64)[None, :]
    return torch.maximum(i, j) / d


def _check_grid(i_max: int, j_max: int, d: int) -> None:
    if not (isinstance(d, int) and d > 0):
        raise ValueError(f"dimension d must be a positive int, got {d!r}")
    for name, v in (("i_max", i_max), ("j_max", j_max)):
        if not (isinstance(v, int) and 0 < v <= d):
            raise ValueError(f"{name} must be an int in 1..d={d}, got {v!r}")


def random_phi_sampled(i_max: int, j_max: int, *, d: int, seed: int = 0) -> Tensor:
    """φ between two seeded random Gaussian ``A`` matrices ``(i_max, d)`` and ``(j_max, d)`` (the random panel
    of Figure 4 and Figure 8). Its expectation is :func:`random_phi_expected`."""
    _check_grid(i_max, j_max, d)
    g = torch.Generator().manual_seed(int(seed))
    A1 = torch.randn(i_max, d, generator=g, dtype=torch.float64)
    A2 = torch.randn(j_max, d, generator=g, dtype=torch.float64)
    return subspace_similarity(A1, A2, side="A")


def phi_weight_vs_delta(
    W: Tensor,
    A: Tensor,
    B: Tensor,
    *,
    scaling: float,
    i_max: int,
    j_max: int | None = None,
    side: Literal["right", "left"] = "right",
    w_svd: SVD | None = None,
) -> Tensor:
    """φ between ``W``'s top-``i`` singular directions and ``ΔW = s·B·A``'s top-``j`` (Appendix H.3, Figure 8).

    Args:
        W: ``(d_out, d_in)`` frozen weight.
        A: ``(r, d_in)``; B: ``(d_out, r)``; scaling: ``s``.
        i_max: how many of ``W``'s directions (the paper goes to about 10 % of d).
        j_max: how many of ``ΔW``'s directions (default and maximum ``min(r, d_out, d_in)``).
        side: ``"right"`` (input space, ``V``; default) or ``"left"`` (output space, ``U``).
        w_svd: a precomputed SVD of ``W`` holding at least ``i_max`` triplets (e.g. from ``WeightSVDCache``).

    Returns:
        ``(i_max, j_max)`` φ grid. The paper finds values that "barely exceed 0.2".
    """
    W, dw = weight_and_delta_svd(W, A, B, scaling=scaling)
    j_max = dw.k if j_max is None else j_max
    if not 0 < j_max <= dw.k:
        raise ValueError(f"j_max={j_max} must be in 1..{dw.k} for A {tuple(A.shape)}, B {tuple(B.shape)}")
    if not 0 < i_max <= min(W.shape):
        raise ValueError(f"i_max={i_max} must be in 1..{min(W.shape)} for W {tuple(W.shape)}")
    ws = top_singular(W, k=i_max) if w_svd is None else w_svd.truncate(i_max)
    if ws.U.shape[0] != W.shape[0] or ws.V.shape[0] != W.shape[1]:
        raise ValueError(f"w_svd (U {tuple(ws.U.shape)}, V {tuple(ws.V.shape)}) is not an SVD of W {tuple(W.shape)}")
    if side == "right":
        return phi_grid(ws.V, dw.V[:, :j_max])
    if side == "left":
        return phi_grid(ws.U, dw.U[:, :j_max])
    raise ValueError(f"side must be 'right' or 'left', got {side!r}")


@dataclass(frozen=True, eq=False)  # holds tensors: compare fields explicitly
class InitControl:
    """φ with and without the random start, to separate what training learned from what init shared.

    With nested initialisation (same seed), ``A_8``'s start is the first 8 rows of ``A_64``'s start, so
    ``φ(A_8, A_64)`` is high even before training. ``φ(A − A_init)`` removes that shared start.

    Attributes:
        phi: ``φ(A_1, A_2)`` ``(r_1, r_2)``, the paper's quantity.
        phi_learned: ``φ(A_1 − A_1_init, A_2 − A_2_init)``, the learned change only.
        phi_init: ``φ(A_1_init, A_2_init)``, the similarity of the starting points alone.
    """

    phi: Tensor
    phi_learned: Tensor
    phi_init: Tensor


def init_control(A1: Tensor, A1_init: Tensor, A2: Tensor, A2_init: Tensor, *, side: Side = "A") -> InitControl:
    """φ on ``A``, on ``A − A_init`` and between the two starts, in one call (see :class:`InitControl`).

    Args:
        A1, A1_init: trained and initial factor of run 1, same shape (``(r_1, d_in)`` for ``side="A"``).
        A2, A2_init: the same for run 2.
        side: as :func:`subspace_similarity` (with ``"B"`` pass B factors; note B starts at zero, so
            ``phi_init`` is undefined and raises).
    """
    for name, x, x0 in (("A1", A1, A1_init), ("A2", A2, A2_init)):
        if tuple(x.shape) != tuple(x0.shape):
            raise ValueError(f"{name} {tuple(x.shape)} and {name}_init {tuple(x0.shape)} differ in shape")
    a1, a10 = as_float64_matrix(A1, name="A1"), as_float64_matrix(A1_init, name="A1_init")
    a2, a20 = as_float64_matrix(A2, name="A2"), as_float64_matrix(A2_init, name="A2_init")
    for name, x in (("A1 - A1_init", a1 - a10), ("A2 - A2_init", a2 - a20)):
        if not bool(x.abs().max() > 0):
            raise ValueError(f"{name} is zero (shape {tuple(x.shape)}): nothing was learned to compare")
    return InitControl(
        phi=subspace_similarity(a1, a2, side=side),
        phi_learned=subspace_similarity(a1 - a10, a2 - a20, side=side),
        phi_init=subspace_similarity(a10, a20, side=side),
    )


# --------------------------------------------------------------------------------------------- φ on ΔW itself
def delta_directions(A: Tensor, B: Tensor, *, scaling: float = 1.0) -> Tensor:
    """ΔW = s·B·A's right singular vectors ``(d_in, min(r, d_out, d_in))``, ordered by ΔW's singular values:
    what B·A learned, not A's own order (which a random start can set). From the factored SVD, never a dense one.
    """
    return factored_svd(A, B, scaling=scaling).V


def phi_delta(V1: Tensor, V2: Tensor) -> dict[str, Tensor]:
    """φ between two ΔW's on their own right singular vectors (:func:`delta_directions`), whole and with the top
    direction removed.

    Returns:
        ``{"dW": (r_1, r_2) grid, "dW-top": (r_1 − 1, r_2 − 1) grid}``: ``"dW-top"[i-1, j-1]`` is φ between ΔW_1's
        directions 2..i+1 and ΔW_2's 2..j+1 (claim 2's "the other directions", without direction 1, which every
        cumulative φ(i, j) contains); absent where either ΔW has a single direction.
    """
    out = {"dW": phi_grid(V1, V2)}
    if V1.shape[1] >= 2 and V2.shape[1] >= 2:
        out["dW-top"] = phi_grid(V1[:, 1:], V2[:, 1:])
    return out


def start_null(A1_init: Tensor, A2_init: Tensor, *, d_out: int, draws: int, seed: int) -> dict[str, Tensor]:
    """What the starting points alone give φ on ΔW: the mean over ``draws`` of :func:`phi_delta` for
    ``ΔW_k = G_k · A_k_init`` with ``G_k`` Gaussian ``(d_out, r_k)``, independent per draw and side.

    ΔW's row space is A's, so with nested starts (``A_8``'s start is the first 8 rows of ``A_64``'s) the two
    ΔW's share directions before anything is learned: this is the null a rank comparison is read against. With
    independent starts it is the random-subspace null, max(i, j)/d in expectation.

    Returns:
        ``{"start_null": (r_1, r_2), "start_null-top": (r_1 − 1, r_2 − 1)}`` (the second as in :func:`phi_delta`).
    """
    g = torch.Generator().manual_seed(int(seed))
    a1, a2 = as_float64_matrix(A1_init, name="A1_init"), as_float64_matrix(A2_init, name="A2_init")
    total: dict[str, Tensor] = {}
    for _ in range(draws):
        g1 = torch.randn(d_out, a1.shape[0], generator=g, dtype=torch.float64)
        g2 = torch.randn(d_out, a2.shape[0], generator=g, dtype=torch.float64)
        grids = phi_delta(delta_directions(a1, g1), delta_directions(a2, g2))
        for k, v in grids.items():
            total[k] = total[k] + v if k in total else v.clone()
    return {k.replace("dW", "start_null"): v / draws for k, v in total.items()}

"""Spectra of LoRA updates: effective ranks and intruder dimensions.

Not in Hu et al. (2021) itself, but standard companions to its Section 7 question "what is the intrinsic rank of
ΔW?": the stable rank, the entropy effective rank (Roy & Vetterli, 2007), the energy rank, and the intruder
dimensions of Shuttleworth et al. (2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence").

Spectra of ``ΔW = s·B·A`` come from the factored SVD (:func:`lora_analysis.metrics.linalg.factored_svd`). Intruder
dimensions need the top singular vectors of ``W0 + ΔW`` and their cosines with all of W0's: dense SVDs for small W,
the certified Krylov route of :func:`~lora_analysis.metrics.linalg.top_singular_triplets` and a Gauss-quadrature
bound on what lies outside W0's leading subspace for large W (:func:`intruder_dimensions`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lora_analysis.metrics.linalg import (
    DENSE_SVDVALS_MAX,
    SVD,
    factored_svd,
    top_singular,
    top_singular_triplets,
    weight_and_delta_svd,
)

__all__ = [
    "IntruderResult",
    "SpectrumSummary",
    "energy_rank",
    "entropy_effective_rank",
    "intruder_dimensions",
    "numerical_rank",
    "spectrum_summary",
    "stable_rank",
]


def _check_spectrum(S: Tensor) -> Tensor:
    if not isinstance(S, Tensor) or S.ndim != 1 or S.numel() == 0:
        shape = tuple(S.shape) if isinstance(S, Tensor) else type(S).__name__
        raise ValueError(f"singular values must be a non-empty 1-D tensor, got {shape}")
    S = S.detach().to("cpu", torch.float64)
    if not torch.isfinite(S).all():
        raise ValueError(f"singular values contain NaN or Inf (shape {tuple(S.shape)})")
    if bool((S < 0).any()):
        raise ValueError(f"singular values must be non-negative (shape {tuple(S.shape)}, min {S.min().item():g})")
    return S


def stable_rank(S: Tensor) -> float:
    """Stable rank ``‖M‖_F² / ‖M‖_2² = Σ σ_k² / σ_max²`` in ``[1, rank]`` (0 for the zero matrix).

    Example: ``S = [1, 1, 1, 1]`` gives 4; ``S = [1, 0, 0]`` gives 1.
    """
    S = _check_spectrum(S)
    top = S.max()
    return 0.0 if top == 0 else float(S.square().sum() / top.square())


def entropy_effective_rank(S: Tensor) -> float:
    """Effective rank of Roy & Vetterli (2007): ``exp(H(p))`` with ``p_k = σ_k / Σ σ`` and ``H`` the Shannon
    entropy (natural log; ``0·log 0 = 0``). In ``[1, rank]``; ``r`` equal singular values give ``r``;
    0 for the zero matrix."""
    S = _check_spectrum(S)
    total = S.sum()
    if total == 0:
        return 0.0
    p = S / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def energy_rank(S: Tensor, *, fraction: float = 0.9) -> int:
    """Smallest ``k`` with ``Σ_{i≤k} σ_i² ≥ fraction · Σ σ_i²`` (singular values sorted descending first).

    0 for the zero matrix. Example: ``S = [3, 1]`` holds 90 % of the energy in ``k = 1`` (9/10).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    S = _check_spectrum(S).sort(descending=True).values
    energy = S.square()
    total = energy.sum()
    if total == 0:
        return 0
    cum = energy.cumsum(0) / total
    # A relative slack of 1e-12 keeps an exact 0.9 split from failing on rounding.
    return int((cum < fraction - 1e-12).sum()) + 1


def numerical_rank(S: Tensor, *, rtol: float = 1e-10) -> int:
    """Number of singular values above ``rtol · σ_max`` (0 for the zero matrix)."""
    S = _check_spectrum(S)
    top = S.max()
    return 0 if top == 0 else int((S > rtol * top).sum())


@dataclass(frozen=True, eq=False)  # holds tensors: compare fields explicitly
class SpectrumSummary:
    """Spectrum of one update ``ΔW = s·B·A``.

    Attributes:
        singular_values: ``(min(r, d_out, d_in),)`` float64, descending.
        frobenius: ``‖ΔW‖_F``.
        spectral: ``‖ΔW‖_2 = σ_1``.
        stable_rank: see :func:`stable_rank`.
        effective_rank: see :func:`entropy_effective_rank`.
        energy_rank: see :func:`energy_rank` at ``energy_fraction``.
        energy_fraction: the fraction used.
        numerical_rank: see :func:`numerical_rank`.
    """

    singular_values: Tensor
    frobenius: float
    spectral: float
    stable_rank: float
    effective_rank: float
    energy_rank: int
    energy_fraction: float
    numerical_rank: int


def spectrum_summary(A: Tensor, B: Tensor, *, scaling: float, fraction: float = 0.9) -> SpectrumSummary:
    """Spectrum of ``ΔW = scaling · B A`` (``A (r, d_in)``, ``B (d_out, r)``) from the factored SVD."""
    S = factored_svd(A, B, scaling=scaling).S
    return SpectrumSummary(
        singular_values=S,
        frobenius=float(torch.linalg.vector_norm(S)),
        spectral=float(S[0]),
        stable_rank=stable_rank(S),
        effective_rank=entropy_effective_rank(S),
        energy_rank=energy_rank(S, fraction=fraction),
        energy_fraction=float(fraction),
        numerical_rank=numerical_rank(S),
    )


@dataclass(frozen=True, eq=False)  # holds tensors: compare fields explicitly
class IntruderResult:
    """Intruder dimensions among the top-``k`` singular vectors of ``W0 + ΔW``.

    Attributes:
        singular_values: ``(k,)`` top singular values of ``W0 + ΔW``.
        max_cosine: ``(k,)`` for each, ``max_i |cos(y_j, x_i)|`` over all singular vectors ``x_i`` of ``W0`` where
            ``decided_by`` is ``"dense"``; otherwise the maximum over the top-``m`` directions of W0 held (a lower
            bound, up to the certificate's slack, and ``< threshold`` for an intruder).
        is_intruder: ``(k,)`` bool, ``max_cosine < threshold`` (the dense count, also where it was decided by bounds).
        indices: positions (0-based, in singular-value order) of the intruders.
        threshold: the ``ε`` used.
        side: ``"left"`` (output space, as peft's ``intruders.py`` on a Linear) or ``"right"`` (input space).
        decided_by: ``(k,)`` how each direction was decided: ``"dense"`` (full SVDs), ``"head"`` (a held direction
            of W0 has ``|cos| ≥ ε`` beyond the slack), ``"norm"`` (``‖z‖`` alone bounds the rest), ``"lanczos"``
            (the Gauss-quadrature bound); see :func:`intruder_dimensions`.
        w0_directions: how many of W0's top directions the decisions used (``min(d_out, d_in)`` when dense).
    """

    singular_values: Tensor
    max_cosine: Tensor
    is_intruder: Tensor
    indices: tuple[int, ...]
    threshold: float
    side: str
    decided_by: tuple[str, ...] = ()
    w0_directions: int = 0

    @property
    def count(self) -> int:
        return len(self.indices)


def intruder_dimensions(
    W0: Tensor,
    A: Tensor,
    B: Tensor,
    *,
    scaling: float,
    k: int = 10,
    threshold: float = 0.5,
    side: Literal["left", "right"] = "left",
    w0_svd: SVD | None = None,
    dense_max: int | None = None,
) -> IntruderResult:
    """Intruder dimensions (Shuttleworth et al., 2024): top-``k`` singular vectors ``y_j`` of ``W0 + ΔW`` with
    ``max_i |cos(y_j, x_i)| < threshold`` over all singular vectors ``x_i`` of ``W0``.

    **Dense route** (today's, bit for bit): ``w0_svd`` is W0's full SVD, or ``None`` with ``min(d_out, d_in) <=
    dense_max``: dense SVDs of ``W0`` and ``W0 + ΔW``. Singular vectors are unit vectors, so the cosine is the
    plain inner product.

    **Partial route** (``w0_svd`` holds W0's top ``m`` triplets with a certificate, or ``None`` above
    ``dense_max``: then W0's top ``max(64, 4k)`` by :func:`~lora_analysis.metrics.linalg.top_singular_triplets`).
    The ``y_j`` come from ``top_singular_triplets(W0 + ΔW, k)``; with the certificates' vector sines ``a_j`` (of
    ``ỹ_j``), ``b_i`` (of ``x̃_i``), the subspace sine ``s_m`` of ``X̃_m`` and ``τ ≥ σ_{m+1}(W0)``:

    1. head: ``|x_iᵀ y_j| ≥ |x̃_iᵀ ỹ_j| − √2 (a_j + b_i)`` (``‖x − x̃‖ ≤ √2 sin∠``): if that is ``≥ ε`` for some
       ``i ≤ m``, ``y_j`` is not an intruder.
    2. rest: for ``i > m``, ``x_i ⊥ X_m``, so with ``z = (I − X̃_mX̃_mᵀ) ỹ``:
       ``|x_iᵀ y| ≤ |x_iᵀ z| + s_m + √2 a_j``, and ``|x_iᵀ z| ≤ ‖z‖`` (decided by ``"norm"``) or, sharper,
       ``(x_iᵀ z)² ≤ ‖z‖² · max`` over the Gauss nodes' intervals meeting ``[0, τ²]`` of ``w_l + w_{l+1}`` (``w_1``
       below ``θ_1``, ``w_n`` above ``θ_n``): ``n`` steps of float64 Lanczos (full reorthogonalisation) on
       ``M = W0 W0ᵀ`` (``W0ᵀ W0`` for ``side="right"``) from ``z/‖z‖`` give the Gauss rule ``(θ_l, w_l)`` of its
       spectral measure, and by the Chebyshev–Markov–Stieltjes inequalities (Szegő, *Orthogonal Polynomials*,
       §3.41; Golub & Meurant, *Matrices, Moments and Quadrature*, 2010, Thm 6.3) the measure's distribution
       function lies between the rule's left and right sums at every node, so a single atom in
       ``[θ_l, θ_{l+1}]`` weighs at most ``w_l + w_{l+1}``. If ``max(head upper bound, rest bound) < ε``,
       ``y_j`` is an intruder (``"norm"`` / ``"lanczos"``).
    3. undecided: W0's top ``2m`` (more head, smaller ``τ``), while ``2 (2m + 32) < min(d)``; then the dense route.

    The count is the dense count (up to the Lanczos tail bound's failure probability, 1e-9 per W0, in the
    certificate). ``max_cosine`` is exact only where ``decided_by`` is ``"dense"`` (see :class:`IntruderResult`).

    **Orientation.** ``W0`` is ``(d_out, d_in)`` for every layer type (``nn.Linear``'s; the loader transposes GPT-2's
    ``Conv1D``, stored ``(d_in, d_out)``), so ``side="left"`` is always the output space, as Shuttleworth et al.
    and peft's ``intruders.py`` count on a Linear layer. peft SVDs the *stored* weight, so on a ``Conv1D``
    (``c_proj``, ``c_fc``, ``c_attn``) its count is on the input side: it equals ours with ``side="right"``, not
    our default (tested against peft's own function).

    **GPT-2's fused c_attn** is counted per adapted slice: ``W0`` is ``W_q`` (or ``W_v``), ``(d_out, d_in)``, with
    its own ``ΔW_q``. Section 7 and the rest of this toolkit treat ``W_q`` and ``W_v`` as separate weights; the
    singular vectors of the fused ``[W_q | W_k | W_v]`` mix the three, so a direction new to ``W_q`` could be
    excused by one of ``W_k``, and the fused top-``k`` favours whichever slice is largest. peft counts the fused
    ``(d_in, 3·d_out)`` matrix once; that count is this function on ``W0 = [W_q; W_k; W_v]`` with ``side="right"``.

    Args:
        W0: ``(d_out, d_in)`` pre-trained weight (``nn.Linear`` orientation for every layer type).
        A: ``(r, d_in)``; B: ``(d_out, r)``; scaling: ``s``.
        k: how many top directions of ``W0 + ΔW`` to test (paper and PEFT: 10).
        threshold: ``ε`` (paper and PEFT: 0.5).
        side: compare left (default: output space, as the paper and peft on a Linear) or right singular vectors
            (input space; peft's count on a Conv1D).
        w0_svd: W0's full thin SVD (all ``min(d_out, d_in)`` triplets), or its top ``m`` with a certificate.
        dense_max: the size up to which dense SVDs are used (default ``DENSE_SVDVALS_MAX``).
    """
    W0, dw = weight_and_delta_svd(W0, A, B, scaling=scaling, name="W0")
    full = min(W0.shape)
    if not 0 < k <= full:
        raise ValueError(f"k={k} must be in 1..{full} for W0 {tuple(W0.shape)}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    dense_max = DENSE_SVDVALS_MAX if dense_max is None else int(dense_max)
    if w0_svd is not None and (w0_svd.U.shape[0] != W0.shape[0] or w0_svd.V.shape[0] != W0.shape[1]
                               or (w0_svd.k != full and w0_svd.certificate is None)):
        raise ValueError(f"w0_svd (U {tuple(w0_svd.U.shape)}, V {tuple(w0_svd.V.shape)}) is not the full SVD of W0 "
                         f"{tuple(W0.shape)} nor a certified partial one")
    W = W0 + (dw.U * dw.S) @ dw.V.T
    partial = (w0_svd is None and full > dense_max) or (w0_svd is not None and w0_svd.k != full)
    if partial:
        got = _intruders_partial(W0, W, k, threshold, side, w0_svd, dense_max)
        if got is not None:
            return got
    base = top_singular(W0) if w0_svd is None or w0_svd.k != full else w0_svd
    tuned = top_singular(W, k=k)
    X, Y = (base.U, tuned.U) if side == "left" else (base.V, tuned.V)
    max_cos = (Y.T @ X).abs().amax(dim=1)  # (k,)
    return _intruder_result(tuned.S, max_cos, max_cos < threshold, threshold, side, ("dense",) * k, full)


def _intruder_result(S: Tensor, max_cos: Tensor, is_intruder: Tensor, threshold: float, side: str,
                     decided_by: tuple[str, ...], m: int) -> IntruderResult:
    return IntruderResult(
        singular_values=S,
        max_cosine=max_cos,
        is_intruder=is_intruder,
        indices=tuple(int(i) for i in torch.nonzero(is_intruder).flatten()),
        threshold=float(threshold),
        side=side,
        decided_by=decided_by,
        w0_directions=m,
    )


# Lanczos steps, doubled at each undecided round: a decaying spectrum piles most of a spread z's mass near 0, where
# the lowest Gauss node θ_1 ~ λ_max (π/2n)² carries the mass below it (w_1 ≈ 0.4 at n = 48 on σ_i = i^-0.6)
_QUADRATURE_STEPS = 96
_WEIGHT_ROUNDING = 1e-12  # float64 Lanczos with full reorthogonalisation: weights to ~1e-14 (48 steps x eps x d)


def _intruders_partial(W0: Tensor, W: Tensor, k: int, eps: float, side: str, w0_svd: SVD | None,
                       dense_max: int) -> IntruderResult | None:
    """The partial route of :func:`intruder_dimensions`; ``None`` when it cannot decide every direction (the
    caller then takes the dense route)."""
    full = min(W0.shape)
    tuned = top_singular_triplets(W, k, dense_max=dense_max)
    Y = tuned.U if side == "left" else tuned.V
    a = Y.new_zeros(k) if tuned.certificate is None else tuned.certificate.vector_sine
    if bool((a > 0.05).any()):
        return None  # a near-tie in W0 + ΔW's top k: its vectors are not individually defined to decide on
    base = w0_svd if w0_svd is not None else top_singular_triplets(W0, max(64, 4 * k), dense_max=dense_max)
    m0 = base.k
    decided: list[str | None] = [None] * k
    max_cos = Y.new_zeros(k)
    root2 = math.sqrt(2.0)
    while True:
        cert = base.certificate
        if cert is None:
            return None  # W0's top directions came from the dense fallback: the dense route is as cheap
        X = base.U if side == "left" else base.V
        C = (Y.T @ X).abs()  # (k, m)
        max_cos = C.amax(dim=1)
        lower = C - root2 * (a[:, None] + cert.vector_sine[None, :])
        head_up = (C + root2 * (a[:, None] + cert.vector_sine[None, :])).amax(dim=1)
        Z = Y - X @ (X.T @ Y)
        zn = torch.linalg.vector_norm(Z, dim=0)
        slack = float(cert.subspace_sine[-1]) + root2 * a  # |x_iᵀ X̃X̃ᵀỹ| ≤ s_m, ‖y − ỹ‖ ≤ √2 a
        for j in range(k):
            if decided[j] is None and bool((lower[j] >= eps).any()):
                decided[j] = "head"
            elif decided[j] is None and float(head_up[j]) < eps and float(zn[j] + slack[j]) < eps:
                decided[j] = "norm"
        todo = [j for j in range(k) if decided[j] is None]
        if todo:
            atom = _largest_atom(W0, Z[:, todo] / zn[todo].clamp(min=1e-300), side, cert.tail ** 2,
                                 steps=min(_QUADRATURE_STEPS * base.k // m0, Y.shape[0] // 2))
            for t, j in enumerate(todo):
                bound = float(zn[j]) * math.sqrt(min(float(atom[t]), 1.0)) + float(slack[j])
                if float(head_up[j]) < eps and bound < eps:
                    decided[j] = "lanczos"
        if all(d is not None for d in decided):
            is_intruder = torch.tensor([d != "head" for d in decided])
            return _intruder_result(tuned.S, max_cos, is_intruder, eps, side, tuple(decided), base.k)
        m = 2 * base.k
        if 2 * (m + 32) >= full:
            return None
        base = top_singular_triplets(W0, m, dense_max=dense_max)


def _largest_atom(W0: Tensor, Z: Tensor, side: str, upto: float, *, steps: int) -> Tensor:
    """For each unit column ``z`` of ``Z (d, q)``: a bound on the largest atom ``(x_iᵀ z)²`` of z's spectral measure
    w.r.t. ``M = W0 W0ᵀ`` (``W0ᵀ W0`` on the right) at eigenvalues ``≤ upto``, by the Chebyshev–Markov–Stieltjes
    inequalities on the ``n``-point Gauss rule from ``n`` Lanczos steps (see :func:`intruder_dimensions`).
    Independent Lanczos runs, batched: each step is one product of ``M`` with ``q`` columns."""
    Wl, Wr = (W0, W0.T) if side == "left" else (W0.T, W0)  # M x = Wl (Wr x)
    d, q = Z.shape
    n = steps
    Q = Z.new_zeros(n, d, q)
    alpha = Z.new_zeros(n, q)
    beta = Z.new_zeros(n, q)
    x = Z
    steps = n
    for j in range(n):
        Q[j] = x
        w = Wl @ (Wr @ x)
        alpha[j] = (x * w).sum(0)
        for _ in range(2):  # full reorthogonalisation, twice (per column)
            w = w - torch.einsum("ldq,lq->dq", Q[:j + 1], torch.einsum("ldq,dq->lq", Q[:j + 1], w))
        b = torch.linalg.vector_norm(w, dim=0)
        if j == n - 1 or bool((b <= 1e-13 * alpha[: j + 1].abs().amax(0).clamp(min=1e-300)).any()):
            steps = j + 1  # an invariant subspace: a shorter Gauss rule is still a Gauss rule
            break
        beta[j] = b
        x = w / b
    T = torch.diag_embed(alpha[:steps].T)
    if steps > 1:
        off = beta[: steps - 1].T
        T = T + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    theta, vecs = torch.linalg.eigh(T)  # (q, steps), ascending
    w = vecs[:, 0, :].square()  # Gauss weights
    pair = torch.cat([w[:, :1], w[:, :-1] + w[:, 1:], w[:, -1:]], dim=1)  # (−∞,θ_1], [θ_l,θ_l+1], [θ_n, ∞)
    meets = torch.cat([torch.ones_like(theta[:, :1], dtype=torch.bool), theta <= upto], dim=1)
    return torch.where(meets, pair, torch.zeros_like(pair)).amax(dim=1) + _WEIGHT_ROUNDING

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

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import Tensor

from lora_analysis.metrics.linalg import (
    DENSE_SVDVALS_MAX,
    SVD,
    SpectralCertificate,
    factored_svd,
    gram_rows,
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

    def as_dict(self) -> dict:
        """Plain values (JSON): floats as Python floats, so :meth:`from_dict` gives the same float64 bits back."""
        return {"singular_values": self.singular_values.tolist(), "max_cosine": self.max_cosine.tolist(),
                "is_intruder": self.is_intruder.tolist(), "indices": list(self.indices),
                "threshold": self.threshold, "side": self.side, "decided_by": list(self.decided_by),
                "w0_directions": self.w0_directions}

    @classmethod
    def from_dict(cls, d: dict) -> IntruderResult:
        return cls(singular_values=torch.tensor(d["singular_values"], dtype=torch.float64),
                   max_cosine=torch.tensor(d["max_cosine"], dtype=torch.float64),
                   is_intruder=torch.tensor(d["is_intruder"], dtype=torch.bool),
                   indices=tuple(int(i) for i in d["indices"]), threshold=float(d["threshold"]),
                   side=str(d["side"]), decided_by=tuple(d["decided_by"]), w0_directions=int(d["w0_directions"]))


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
    w0_full: Callable[[], SVD] | None = None,
) -> IntruderResult:
    """Intruder dimensions (Shuttleworth et al., 2024): top-``k`` singular vectors ``y_j`` of ``W0 + ΔW`` with
    ``max_i |cos(y_j, x_i)| < threshold`` over all singular vectors ``x_i`` of ``W0``.

    **Dense route** (today's, bit for bit): ``w0_svd`` is W0's full SVD, or ``None`` with ``min(d_out, d_in) <=
    dense_max``: dense SVDs of ``W0`` and ``W0 + ΔW``. Singular vectors are unit vectors, so the cosine is the
    plain inner product.

    **Partial route** (``w0_svd`` holds W0's top ``m`` triplets with a certificate, or ``None`` above
    ``dense_max``: then W0's top ``max(64, 4k)`` by :func:`~lora_analysis.metrics.linalg.top_singular_triplets`).
    The ``y_j`` come from ``top_singular_triplets(W0 + ΔW, k)``; with the certificates' vector sines ``a_j`` (of
    ``ỹ_j``), ``b_i`` (of ``x̃_i``), the subspace sine ``s_m`` of ``X̃_m`` and ``τ ≥ σ_{m+1}(W0)`` (``m`` is cut to
    the last index whose top-``m`` subspace is certified to ``_PREFIX_SINE``):

    1. head: ``|x_iᵀ y_j| ≥ |x̃_iᵀ ỹ_j| − √2 (a_j + b_i)`` (``‖x − x̃‖ ≤ √2 sin∠``): if that is ``≥ ε`` for some
       ``i ≤ m``, ``y_j`` is not an intruder. The upper bound on the held ``|x_iᵀ y_j|`` also uses clusters of
       near-tied ``x_i`` (:func:`_held_upper`).
    2. rest: for ``i > m``, ``x_i ⊥ X_m``, so with ``z = (I − X̃_mX̃_mᵀ) ỹ``:
       ``|x_iᵀ y| ≤ |x_iᵀ z| + s_m + √2 a_j``, and ``|x_iᵀ z| ≤ ‖z‖`` (decided by ``"norm"``) or, sharper, a bound
       from Gauss rules of z's spectral measure under the deflated ``P M P`` (``M = W0 W0ᵀ``, ``W0ᵀ W0`` for
       ``side="right"``; ``P = I − X̃X̃ᵀ``) with Davis–Kahan windows for the difference to ``M`` and the
       Chebyshev–Markov–Stieltjes inequalities (:func:`_outside_bound`, the proof there; on a side larger than
       ``min(d_out, d_in)``, where ``M`` has a kernel, on the other side's Gram matrix). If ``max(head upper
       bound, rest bound) < ε``, ``y_j`` is an intruder (``"norm"`` / ``"lanczos"``).
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
        w0_full: called (at most once) where the dense route needs W0's full thin SVD and ``w0_svd`` is not it;
            a caller that memoises it (e.g. ``functools.cache(lambda: top_singular(W0))``) pays W0's dense SVD
            once for every adapter of that W0. ``None``: ``top_singular(W0)``.
    """
    W0, dw = weight_and_delta_svd(W0, A, B, scaling=scaling, name="W0", keep_device=True)  # work on W0's device
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
    if w0_svd is not None and w0_svd.k == full:
        base = w0_svd
    elif w0_full is not None:
        base = w0_full()
        if base.k != full or base.U.shape[0] != W0.shape[0] or base.V.shape[0] != W0.shape[1]:
            raise ValueError(f"w0_full() gave U {tuple(base.U.shape)}, V {tuple(base.V.shape)}: not the full SVD of "
                             f"W0 {tuple(W0.shape)}")
    else:
        base = top_singular(W0, keep_device=True)
    base = _on_device(base, W0.device)
    tuned = top_singular(W, k=k, keep_device=True)
    X, Y = (base.U, tuned.U) if side == "left" else (base.V, tuned.V)
    max_cos = (Y.T @ X).abs().amax(dim=1)  # (k,)
    return _intruder_result(tuned.S, max_cos, max_cos < threshold, threshold, side, ("dense",) * k, full)


def _on_device(svd: SVD, device: torch.device) -> SVD:
    """``svd`` (and its certificate's tensors) on ``device``: a W0 SVD cached on the CPU for a W0 on a GPU."""
    if svd.U.device == device:
        return svd
    c = svd.certificate
    if c is not None:
        c = dataclasses.replace(c, residuals=c.residuals.to(device), sigma_error=c.sigma_error.to(device),
                                subspace_sine=c.subspace_sine.to(device), vector_sine=c.vector_sine.to(device))
    return SVD(svd.U.to(device), svd.S.to(device), svd.V.to(device), c)


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


# Lanczos steps at which the outside bound is evaluated (the run stops once every direction is decided); each step
# is 2 products of W0 with the undecided directions, ~30-100 ms at d = 4096
_LANCZOS_CHECKS = (32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)
_WEIGHT_ROUNDING = 1e-12  # float64 Lanczos with full reorthogonalisation: weights to ~1e-14 (256 steps x eps x d)
# the window half-widths δ tried, as multiples of ‖F‖ (each gives a valid bound; the smallest is kept): 10^2 … 10^8
_DELTA_RATIOS = tuple(10.0 ** (e / 2) for e in range(4, 17))


def _intruders_partial(W0: Tensor, W: Tensor, k: int, eps: float, side: str, w0_svd: SVD | None,
                       dense_max: int) -> IntruderResult | None:
    """The partial route of :func:`intruder_dimensions`; ``None`` when it cannot decide every direction (the
    caller then takes the dense route)."""
    full = min(W0.shape)
    # W0 + ΔW's top k decide counts only, through their sines (≤ 0.05 wanted, 1e-7 typical at these targets):
    # residuals to 1e-7·σ₁ (1e-4 for the tail bound's extra pairs) and blocks of 16 cost 2/3 of the defaults'
    # 1e-10 / 1e-5 / 32 (measured at d = 4096: 1.4 s against 2.1 s per adapter)
    tuned = top_singular_triplets(W, k, dense_max=dense_max, rtol=_TUNED_RTOL, extra_rtol=_TUNED_EXTRA_RTOL,
                                  block=_TUNED_BLOCK)
    Y = tuned.U if side == "left" else tuned.V
    a = Y.new_zeros(k) if tuned.certificate is None else tuned.certificate.vector_sine
    if bool((a > 0.05).any()):
        return None  # a near-tie in W0 + ΔW's top k: its vectors are not individually defined to decide on
    base = _on_device(w0_svd, W0.device) if w0_svd is not None else top_singular_triplets(W0, max(64, 4 * k),
                                                                                           dense_max=dense_max)
    decided: list[str | None] = [None] * k
    max_cos = Y.new_zeros(k)
    root2 = math.sqrt(2.0)
    while True:
        if base.certificate is None:
            return None  # W0's top directions came from the dense fallback: the dense route is as cheap
        base = _certified_prefix(base)
        if base is None:
            return None
        cert = base.certificate
        X = base.U if side == "left" else base.V
        C = (Y.T @ X).abs()  # (k, m)
        max_cos = C.amax(dim=1)
        lower = C - root2 * (a[:, None] + cert.vector_sine[None, :])
        head_up = _held_upper(C, a, cert).amax(dim=1)
        Z = Y - X @ (X.T @ Y)
        zn = torch.linalg.vector_norm(Z, dim=0)
        slack = float(cert.subspace_sine[-1]) + root2 * a  # |x_iᵀ X̃X̃ᵀỹ| ≤ s_m, ‖y − ỹ‖ ≤ √2 a
        for j in range(k):
            if decided[j] is None and bool((lower[j] >= eps).any()):
                decided[j] = "head"
            elif decided[j] is None and float(head_up[j]) < eps and float(zn[j] + slack[j]) < eps:
                decided[j] = "norm"
        # the outside bound can only show an intruder: not where a held direction may reach ε
        todo = [j for j in range(k) if decided[j] is None and float(head_up[j]) < eps]
        if todo:
            need = (eps - slack[todo]) / zn[todo].clamp(min=1e-300)  # the bound on |x_iᵀ z|/‖z‖ that decides
            outside = _outside_bound(W0, base, side, Z[:, todo] / zn[todo].clamp(min=1e-300), need,
                                     max_steps=min(_LANCZOS_CHECKS[-1], (full - base.k) // 2))
            for t, j in enumerate(todo):
                if float(outside[t]) < float(need[t]):
                    decided[j] = "lanczos"
        if all(d is not None for d in decided):
            is_intruder = torch.tensor([d != "head" for d in decided], device=Y.device)
            return _intruder_result(tuned.S, max_cos, is_intruder, eps, side, tuple(decided), base.k)
        m = 2 * base.k
        if 2 * (m + 32) >= full:
            return None
        base = top_singular_triplets(W0, m, dense_max=dense_max)


_TUNED_RTOL, _TUNED_EXTRA_RTOL, _TUNED_BLOCK = 1e-7, 1e-4, 16


# a held prefix of W0's directions is used up to the last i whose top-i subspace is certified to this sine (its
# sine adds to every bound; past it, near-ties or the tail bound's slack leave the last few vectors undefined)
_PREFIX_SINE = 1e-4


def _certified_prefix(base: SVD) -> SVD | None:
    """``base`` truncated to its top ``m' ≤ m`` with ``subspace_sine[m' − 1] ≤ _PREFIX_SINE`` (the truncated
    certificate stays valid, :meth:`SpectralCertificate.truncate`); ``None`` if there is no such ``m'``."""
    ok = torch.nonzero(base.certificate.subspace_sine <= _PREFIX_SINE).flatten()
    return None if ok.numel() == 0 else base.truncate(int(ok[-1]) + 1)


def _held_upper(C: Tensor, a: Tensor, cert: SpectralCertificate) -> Tensor:
    """``(k, m)`` upper bounds on ``|x_iᵀ y_j|`` for the held ``i ≤ m``: the smaller of the single-vector bound
    ``|x̃_iᵀỹ_j| + √2 (a_j + b_i)`` and a cluster bound. Inside a near-tie of W0 a single vector is not defined
    (``b_i = 1``) but the cluster's subspace is: for ``i ∈ I = (p, q]`` with certified top-``p`` and top-``q``
    subspaces (sines ``s_p``, ``s_q``; ``s_0 = 0``), ``|x_iᵀy| ≤ ‖X_Iᵀy‖`` and ``‖X_IX_Iᵀ − X̃_IX̃_Iᵀ‖ ≤ s_p + s_q``
    (a difference of two nested projectors each within its sine), so ``|x_iᵀy| ≤ ‖X̃_Iᵀỹ‖ + s_p + s_q + √2 a_j``.
    The cuts are the ``q`` with ``s_q ≤ _PREFIX_SINE``."""
    root2 = math.sqrt(2.0)
    single = C + root2 * (a[:, None] + cert.vector_sine[None, :])
    s = cert.subspace_sine
    cut = s <= _PREFIX_SINE  # a cluster ends at i where the top-i subspace is certified
    cid = torch.cat([cut.new_zeros(1, dtype=torch.long), cut[:-1].long().cumsum(0)])  # cluster of each i
    nc = int(cid[-1]) + 1
    energy = C.new_zeros(C.shape[0], nc).index_add_(1, cid, C.square())  # ‖X̃_Iᵀỹ‖² per cluster
    ends = torch.nonzero(cut).flatten()
    s_end = s.new_ones(nc)  # an unfinished last cluster: no bound from its end
    s_end[:ends.numel()] = s[ends][:nc]
    s_start = torch.cat([s.new_zeros(1), s_end[:-1]])
    cluster = energy.sqrt() + (s_start + s_end)[None, :] + root2 * a[:, None]
    return torch.minimum(single, cluster[:, cid])


def _outside_bound(W0: Tensor, base: SVD, side: str, Z: Tensor, need: Tensor, *, max_steps: int) -> Tensor:
    """For each unit column ``z ⊥ X̃`` of ``Z (d, q)``: an upper bound on ``max_{i>m} |x_iᵀ z|`` over the unit
    eigenvectors ``x_i`` of ``M = W0 W0ᵀ`` (``W0ᵀ W0`` for ``side="right"``) with eigenvalue ``λ_i ≤ τ²``, where
    ``X̃ (d, m)`` are W0's held top-``m`` vectors on that side (``base``, certified) and ``τ = base.certificate.tail
    ≥ σ_{m+1}``: every singular vector of W0 beyond the held ones is such an ``x_i``.

    **The deflated operator.** With ``P = I − X̃X̃ᵀ`` and ``Λ = X̃ᵀ M X̃``, ``M = M' + F`` where ``M' = P M P +
    X̃ Λ X̃ᵀ`` and ``F = P M X̃X̃ᵀ + X̃X̃ᵀ M P``. ``F`` maps ``range X̃`` into ``range P`` by ``A = P M X̃`` and back by
    ``Aᵀ``, so ``‖F v‖² = ‖A X̃ᵀv‖² + ‖Aᵀ P v‖² ≤ ‖A‖² ‖v‖²``: ``‖F‖₂ = ‖P M X̃‖₂`` (the constant is 1). The
    certificate's residual ``S`` (``‖s_i‖ ≤ residuals_i``) gives ``P M X̃ = P W0 S`` or ``P S Σ̃`` (depending on the
    side and on which identity holds by construction, :class:`~lora_analysis.metrics.linalg.SpectralCertificate`),
    so ``‖F‖ ≤ f = σ_{1,up} ‖residuals‖₂`` plus the rounding of the products (``2 d n eps σ_{1,up}²``, Lanczos'
    backward error with full reorthogonalisation included).

    **Davis–Kahan.** For an eigenpair ``M x = λ x`` let ``E`` be the spectral projector of ``M'`` onto its
    eigenvalues outside ``[λ − δ, λ + δ]``: ``E (M' − λ) x = −E F x`` and ``‖E (M' − λ) x‖ ≥ δ ‖E x‖``, so
    ``‖E x‖ ≤ ‖F‖/δ`` and ``|xᵀz| ≤ ‖(I − E) z‖ + ‖F‖/δ = sqrt(μ'([λ − δ, λ + δ])) + f/δ``, with ``μ'`` the spectral
    measure of ``z`` under ``M'``. ``z ∈ range P``, an invariant subspace of ``M'`` on which ``M' = P M P``: ``μ'``
    is z's measure under ``P M P``, whose spectrum on ``range P`` is W0's tail ``[λ_min, ~τ²]`` only (on the whole
    ``M`` the Gauss nodes would spread over ``[λ_min, λ_1]`` and a couple of them carry most of a decaying tail's
    mass).

    **Chebyshev–Markov–Stieltjes.** ``n`` steps of float64 Lanczos (full reorthogonalisation) on ``P M P`` from
    ``z`` give the Gauss rule ``(θ_l, w_l)`` of ``μ'``, and (Szegő, *Orthogonal Polynomials*, §3.41; Golub &
    Meurant, *Matrices, Moments and Quadrature*, 2010, Thm 6.3) ``Σ_{j<l} w_j ≤ F(θ_l − 0) ≤ F(θ_l + 0) ≤
    Σ_{j≤l} w_j`` for its distribution function ``F``. So ``μ'([a, b]) ≤ Σ_{j=l}^{u} w_j`` with ``θ_l`` the
    largest node ``≤ a`` (none: from the first) and ``θ_u`` the smallest ``≥ b`` (none: to the last). For ``a``
    between two nodes ``θ_l ≤ a < θ_{l+1}`` and ``b = a + 2δ`` the sum runs to the first node ``≥ θ_{l+1} + 2δ``:
    the max of these over the node intervals that meet ``λ − δ``, ``λ ∈ [0, τ²]``, bounds every window. Every
    ``δ > 0`` gives a bound; the smallest over ``δ = f·10^{2 … 8}`` is kept.

    The bounds are evaluated at 32, 64, … Lanczos steps (up to ``max_steps``), and the run stops once every
    column's bound is below its ``need``.

    Returns:
        ``(q,)`` float64 bounds (``inf`` where none could be given).
    """
    cert = base.certificate
    X, Xo = (base.U, base.V) if side == "left" else (base.V, base.U)  # this side's held vectors, the other's
    Wa = W0 if side == "left" else W0.T  # M = Wa Waᵀ, Wa (d, n)
    d, n = Wa.shape
    q = Z.shape[1]
    eps64 = torch.finfo(torch.float64).eps
    s_up = float(base.S[0] + cert.sigma_error[0])
    f = s_up * float(torch.linalg.vector_norm(cert.residuals)) + 2 * max(d, n) * max_steps * eps64 * s_up ** 2
    if max_steps < 2 or f <= 0 or not math.isfinite(f):
        return Z.new_full((q,), math.inf)
    upto = cert.tail ** 2
    if d <= n:
        rules = partial(_window_bound, upto=upto, f=f, low=None)
        project, operator = _deflated(Wa.T.contiguous(), X)  # M = Wa Waᵀ = Rᵀ R with R = Waᵀ
        return _lanczos_rules(operator, project(Z.T.contiguous()), need, rules, max_steps=max_steps)
    # d > n: M has a kernel of dimension d − n (e.g. a tall W0's left side) that is no singular vector of W0
    low = _gram_floor(Wa)
    if low <= 0:
        return Z.new_full((q,), math.inf)
    U = Z.T @ Wa  # rows u = Waᵀ z: (v_iᵀu)² = λ_i (x_iᵀz)²
    off = torch.linalg.vector_norm(U @ Xo, dim=1)  # ‖X̂ᵀu‖, ~rounding (Wa X̂ = X̃ Σ̃ and z ⊥ X̃)
    un = torch.linalg.vector_norm(U, dim=1)

    def rules(theta: Tensor, w: Tensor) -> Tensor:
        return un * _window_bound(theta, w, upto=upto, f=f, low=low) + off / math.sqrt(low)

    project, operator = _deflated(Wa.contiguous(), Xo)  # G = Waᵀ Wa; the measure of P u/‖P u‖ (‖P u‖ ≤ ‖u‖)
    return _lanczos_rules(operator, project(U), need, rules, max_steps=max_steps)


def _deflated(R: Tensor, X: Tensor) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """``P`` and ``P Rᵀ R P`` on rows ``(q, d)`` (``R (n, d)`` contiguous, ``P = I − X Xᵀ``, applied twice: X's
    component must stay at rounding, or ``Rᵀ R`` amplifies it). ``x Rᵀ R`` is one pass over R in row blocks
    (:func:`~lora_analysis.metrics.linalg.gram_rows`): at the few rows of a Lanczos block the product is bound
    by memory, and streaming R once instead of twice made each step ≈ 1.7× faster at d = 4096."""
    Xr = X.T.contiguous()

    def project(x: Tensor) -> Tensor:
        for _ in range(2):
            x = x - (x @ X) @ Xr
        return x

    return project, lambda x: project(gram_rows(R, project(x), out=torch.empty_like(x)))


def _gram_floor(Wa: Tensor) -> float:
    """A lower bound on ``σ_min(Wa)² = λ_min(G)``, ``G = WaᵀWa`` (``Wa (d, n)``, ``d > n``), or 0: the largest
    shift ``s`` for which float64 Cholesky of ``Ĝ − s I`` succeeds, minus the rounding. ``Ĝ`` (computed) is
    within ``γ_d ‖Wa‖_F²`` of ``G`` and a completed Cholesky ``L Lᵀ = Ĝ − s I + E`` has ``|E| ≤ γ_{n+1} |L||Lᵀ|``,
    ``‖E‖₂ ≤ γ_{n+1} ‖L‖_F² ≤ γ_{n+1} (tr Ĝ + ‖E‖)`` (Higham, *Accuracy and Stability*, Thm 10.3), so
    ``λ_min(G) ≥ s − (γ_d + 2 γ_{n+1}) ‖Wa‖_F²``. The shifts try fractions of ``1/ρ``, ``ρ`` the Rayleigh quotient
    of ``G⁻¹`` after 30 steps of inverse iteration (``≥ λ_min``, close to it)."""
    d, n = Wa.shape
    G = Wa.T @ Wa
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) != 0:
        return 0.0
    x = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=G.dtype).to(G.device)
    rho = 0.0
    for _ in range(30):  # x ← G⁻¹ x by two triangular solves
        x = x / torch.linalg.vector_norm(x)
        y = torch.cholesky_solve(x, L)
        rho = float((x * y).sum())
        x = y
    eps64 = torch.finfo(torch.float64).eps
    fro = float(torch.diagonal(G).sum())
    rounding = (d + 2 * (n + 1)) * eps64 / (1 - (d + n + 1) * eps64) * fro
    eye = torch.eye(n, dtype=G.dtype, device=G.device)
    for frac in (0.95, 0.7, 0.4, 0.1):
        s = frac / rho
        if int(torch.linalg.cholesky_ex(G - s * eye)[1]) == 0:
            return max(s - rounding, 0.0)
    return 0.0


def _lanczos_rules(operator, Z: Tensor, need: Tensor, bound_of, *, max_steps: int) -> Tensor:
    """Batched float64 Lanczos with full reorthogonalisation on ``operator`` (rows ``(q, d)`` ↦ rows) from the unit
    rows of ``Z (q, d)``, one independent run per row; at each of ``_LANCZOS_CHECKS`` (≤ ``max_steps``) the Gauss
    rules ``(θ, w)`` (each ``(q, n)``, nodes ascending) go to ``bound_of``, and the run stops when every bound is
    below ``need``. Returns the last bounds ``(q,)``."""
    q, d = Z.shape
    Q = Z.new_empty(max_steps, q, d)
    alpha = Z.new_zeros(max_steps, q)
    beta = Z.new_zeros(max_steps, q)
    x = Z / torch.linalg.vector_norm(Z, dim=1, keepdim=True)
    bound = Z.new_full((q,), math.inf)
    frozen = torch.zeros(q, dtype=torch.bool, device=Z.device)  # rows whose Krylov space became invariant
    checks = [c for c in _LANCZOS_CHECKS if c < max_steps] + [max_steps]
    for j in range(max_steps):
        Q[j] = x
        w = operator(x)
        alpha[j] = (x * w).sum(1)
        for _ in range(2):  # full reorthogonalisation, twice (per row)
            w = w - torch.einsum("lq,lqd->qd", torch.einsum("lqd,qd->lq", Q[:j + 1], w), Q[:j + 1])
        b = torch.linalg.vector_norm(w, dim=1)
        n = j + 1
        # an invariant subspace: the shorter Gauss rule is exact (its measure is the rule itself); that row's
        # bound is final, and it goes on as zeros
        invariant = (b <= 1e-13 * alpha[:n].abs().amax(0).clamp(min=1e-300)) & ~frozen
        if n in checks or bool(invariant.any()):
            T = torch.diag_embed(alpha[:n].T)
            if n > 1:
                off = beta[:n - 1].T
                T = T + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
            theta, vecs = torch.linalg.eigh(T)  # (q, n), ascending
            bound = torch.where(frozen, bound, bound_of(theta, vecs[:, 0, :].square()))
            frozen |= invariant
            if bool((frozen | (bound < need)).all()):
                break
        beta[j] = torch.where(frozen, torch.zeros_like(b), b)
        x = torch.where(frozen[:, None], torch.zeros_like(w), w / b.clamp(min=1e-300)[:, None])
    return bound


def _window_bound(theta: Tensor, w: Tensor, *, upto: float, f: float, low: float | None) -> Tensor:
    """``max_{λ ∈ [0, upto]} sqrt(μ([λ − δ, λ + δ])) + f/δ`` bounded from Gauss rules ``(θ, w)`` (each ``(q, n)``,
    nodes ascending) by the Chebyshev–Markov–Stieltjes sums of :func:`_outside_bound`, minimised over ``δ``.

    With ``low`` (``≤ λ_min``, the measure of ``u = Waᵀz`` under ``G``, whose atoms are ``λ_i (x_iᵀz)²``): the
    maximum over ``λ ∈ [low, upto]`` of the same divided by ``sqrt(λ)``, where ``λ ≥ max(low, θ_l + δ)`` on the
    node interval ``[θ_l, θ_{l+1})`` of ``λ − δ``."""
    q, n = theta.shape
    deltas = theta.new_tensor(_DELTA_RATIOS) * f  # (g,)
    g = deltas.shape[0]
    C = torch.cat([w.new_zeros(q, 1), w.cumsum(1)], dim=1)  # Σ_{j<l} w_j
    # piece l (0 … n): a ∈ [θ_{l−1}, θ_l) (θ_{−1} = −∞, θ_n = ∞); from node max(l−1, 0) to the first ≥ θ_l + 2δ
    lo = torch.clamp(torch.arange(n + 1, device=theta.device) - 1, min=0)  # (n + 1,)
    ends = theta[:, None, :] + 2 * deltas[None, :, None]  # (q, g, n)
    hi = torch.searchsorted(theta[:, None, :].expand(q, g, n).contiguous(), ends.contiguous())  # first ≥ end
    hi = torch.cat([hi, hi.new_full((q, g, 1), n - 1)], dim=2).clamp(max=n - 1)  # (q, g, n + 1)
    mass = C.gather(1, (hi + 1).reshape(q, -1)).reshape(q, g, n + 1) - C[:, lo][:, None, :]
    value = (mass + _WEIGHT_ROUNDING).clamp(max=1).sqrt() + (f / deltas)[None, :, None]
    left = torch.cat([theta.new_full((q, 1), -math.inf), theta], dim=1)[:, None, :]  # θ_{l−1}
    # piece l meets a = λ − δ ≤ upto − δ iff θ_{l−1} ≤ upto − δ (and, with low, a ≥ low − δ iff θ_l > low − δ)
    meets = left <= upto - deltas[None, :, None]
    if low is not None:
        right = torch.cat([theta, theta.new_full((q, 1), math.inf)], dim=1)[:, None, :]  # θ_l
        meets = meets & (right > low - deltas[None, :, None])
        value = value / torch.clamp(left + deltas[None, :, None], min=low).sqrt()
    return torch.where(meets, value, torch.zeros_like(value)).amax(dim=2).amin(dim=1)

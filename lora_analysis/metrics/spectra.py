"""Spectra of LoRA updates: effective ranks and intruder dimensions.

Not in Hu et al. (2021) itself, but standard companions to its Section 7 question "what is the intrinsic rank of
ΔW?": the stable rank, the entropy effective rank (Roy & Vetterli, 2007), the energy rank, and the intruder
dimensions of Shuttleworth et al. (2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence").

Spectra of ``ΔW = s·B·A`` come from the factored SVD (:func:`lora_analysis.metrics.linalg.factored_svd`). Intruder
dimensions need the SVD of ``W0 + ΔW``, which is a full-rank dense matrix by nature, so a dense SVD is used there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lora_analysis.metrics.linalg import SVD, factored_svd, top_singular, weight_and_delta_svd

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
        max_cosine: ``(k,)`` for each, ``max_i |cos(y_j, x_i)|`` over all singular vectors ``x_i`` of ``W0``.
        is_intruder: ``(k,)`` bool, ``max_cosine < threshold``.
        indices: positions (0-based, in singular-value order) of the intruders.
        threshold: the ``ε`` used.
        side: ``"left"`` (output space, as peft's ``intruders.py`` on a Linear) or ``"right"`` (input space).
    """

    singular_values: Tensor
    max_cosine: Tensor
    is_intruder: Tensor
    indices: tuple[int, ...]
    threshold: float
    side: str

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
) -> IntruderResult:
    """Intruder dimensions (Shuttleworth et al., 2024): top-``k`` singular vectors ``y_j`` of ``W0 + ΔW`` with
    ``max_i |cos(y_j, x_i)| < threshold`` over all singular vectors ``x_i`` of ``W0``.

    ``W0 + ΔW`` is a dense full-rank matrix, so its SVD is dense (``O(d³)``); ``W0``'s full SVD can be passed as
    ``w0_svd`` to share it. Singular vectors are unit vectors, so the cosine is the plain inner product.

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
        w0_svd: the full thin SVD of ``W0`` (all ``min(d_out, d_in)`` triplets).
    """
    W0, dw = weight_and_delta_svd(W0, A, B, scaling=scaling, name="W0")
    if not 0 < k <= min(W0.shape):
        raise ValueError(f"k={k} must be in 1..{min(W0.shape)} for W0 {tuple(W0.shape)}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    base = top_singular(W0) if w0_svd is None else w0_svd
    if base.k != min(W0.shape) or base.U.shape[0] != W0.shape[0] or base.V.shape[0] != W0.shape[1]:
        raise ValueError(f"w0_svd (U {tuple(base.U.shape)}, V {tuple(base.V.shape)}) is not the full SVD of W0 "
                         f"{tuple(W0.shape)}")
    tuned = top_singular(W0 + (dw.U * dw.S) @ dw.V.T, k=k)
    X, Y = (base.U, tuned.U) if side == "left" else (base.V, tuned.V)
    max_cos = (Y.T @ X).abs().amax(dim=1)  # (k,)
    is_intruder = max_cos < threshold
    return IntruderResult(
        singular_values=tuned.S,
        max_cosine=max_cos,
        is_intruder=is_intruder,
        indices=tuple(int(i) for i in torch.nonzero(is_intruder).flatten()),
        threshold=float(threshold),
        side=side,
    )

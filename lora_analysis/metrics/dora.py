"""What Section 7's metrics mean for a DoRA adapter, and the one number DoRA adds: its magnitude change.

DoRA (Liu et al., 2024, arXiv 2402.09353) adapts ``W0 (d_out, d_in)`` to::

    W' = diag(m / ‖W0 + s·B·A‖_c) · (W0 + s·B·A)        ‖·‖_c: one norm per output row (peft's dim=1)

so the update has two parts, and each metric is defined on one of them:

* **φ (Section 7.2)** compares the row spaces of ``A``: DoRA's ``A`` plays the same role, unchanged.
* **Table 7 (Section 7.3)** is computed on the *directional* update ``ΔW = s·B·A`` against ``W0``, exactly as for
  LoRA (the factored SVD still applies). It says which directions DoRA's direction term amplifies.
* **The magnitude change** (this module): ``m_i / ‖W0_i‖ − 1`` per output row. peft initialises ``m`` to the
  row norms of the weight it adapts plus the initial update, ``‖W0 + s·B₀A₀‖_c``: that is ``‖W0‖_c`` when
  ``B₀ = 0`` and the original weight's norms for PiSSA/OLoRA, so 0 means "magnitude as before training".
* **The effective update** ``W' − W0``, dense: its Frobenius norm always, and for matrices up to
  ``dense_limit`` entries its Table 7 projection ``‖UᵀW0V‖_F`` with ``U, V`` its top-k singular vectors, and the
  amplification ``‖W' − W0‖_F / ‖UᵀW0V‖_F``. ``W' − W0 = diag(f − 1) W0 + diag(f) s·B·A`` (``f`` the DoRA
  factor) is full rank whenever ``f ≠ 1``, so this needs a dense SVD.

Pure functions: tensors in, a frozen dataclass out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from lora.dora import dora_weight
from lora.layers import delta_weight
from lora_analysis.metrics.linalg import as_float64_matrix, top_singular

__all__ = ["DENSE_LIMIT", "DoraSummary", "dora_summary"]

DENSE_LIMIT = 1024 * 1024  # entries: the dense SVD of W' − W0 takes a few seconds at this size on one core


@dataclass(frozen=True)
class DoraSummary:
    """One DoRA-adapted matrix.

    Attributes:
        mag_rel_mean: mean over rows of ``m_i / n_i − 1`` (``n`` the reference norms, ``‖W0‖_c`` by default).
        mag_rel_abs_mean: mean of ``|m_i / n_i − 1|``.
        mag_rel_min, mag_rel_max: the extremes of ``m_i / n_i − 1``.
        mag_rel_norm: ``‖m − n‖₂ / ‖n‖₂``.
        dw_norm: ``‖s·B·A‖_F``, the directional update that Table 7 analyses.
        dw_eff_norm: ``‖W' − W0‖_F``, the effective dense update.
        delta_eff: ``‖UᵀW0V‖_F`` for the top-``top`` singular vectors of ``W' − W0`` (NaN above ``dense_limit``).
        amplification_eff: ``dw_eff_norm / delta_eff`` (NaN above ``dense_limit``).
    """

    mag_rel_mean: float
    mag_rel_abs_mean: float
    mag_rel_min: float
    mag_rel_max: float
    mag_rel_norm: float
    dw_norm: float
    dw_eff_norm: float
    delta_eff: float
    amplification_eff: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def dora_summary(
    W0: Tensor,
    A: Tensor,
    B: Tensor,
    magnitude: Tensor,
    *,
    scaling: float,
    reference_norms: Tensor | None = None,
    top: int | None = None,
    dense_limit: int = DENSE_LIMIT,
) -> DoraSummary:
    """The magnitude change and the effective update of one DoRA-adapted matrix (see the module docstring).

    Args:
        W0: ``(d_out, d_in)``, the weight peft adapts. A: ``(r, d_in)``; B: ``(d_out, r)``; scaling: ``s``.
        magnitude: DoRA's ``m``, ``(d_out,)``.
        reference_norms: the norms ``m`` started from, ``(d_out,)`` (default ``‖W0‖_c``; for PiSSA/OLoRA the
            row norms of the original weight).
        top: the subspace dimension ``k`` for ``delta_eff`` (default ``r``).
        dense_limit: form the dense SVD of ``W' − W0`` only up to this many entries.

    Example:
        ``B = 0`` and ``m = ‖W0‖_c`` (DoRA at initialisation) give zeros everywhere (``delta_eff`` and
        ``amplification_eff`` NaN: there is no update to project).
    """
    W0 = as_float64_matrix(W0, name="W0 (d_out, d_in)")
    A = as_float64_matrix(A, name="A (r, d_in)")
    B = as_float64_matrix(B, name="B (d_out, r)")
    m = magnitude.detach().to(torch.float64)
    if A.shape[1] != W0.shape[1] or B.shape[0] != W0.shape[0] or A.shape[0] != B.shape[1]:
        raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} do not fit W0 {tuple(W0.shape)}")
    if m.shape != (W0.shape[0],):
        raise ValueError(f"magnitude {tuple(m.shape)} must be (d_out,) = ({W0.shape[0]},)")
    n = torch.linalg.vector_norm(W0, dim=1) if reference_norms is None else reference_norms.to(torch.float64)
    if n.shape != m.shape or not bool((n > 0).all()):
        raise ValueError(f"reference_norms {tuple(n.shape)} must be ({m.shape[0]},) and positive")
    rel = m / n - 1
    dW = delta_weight(A, B, scaling)  # the one ΔW and the one W' of the project (merge and export use them too)
    eff = dora_weight(W0, dW, m) - W0  # W' − W0
    dw_eff_norm = float(torch.linalg.matrix_norm(eff))
    k = A.shape[0] if top is None else top
    delta_eff = amplification_eff = math.nan
    if W0.numel() <= dense_limit and dw_eff_norm > 0:
        if not 0 < k <= min(W0.shape):
            raise ValueError(f"top={top} must be in 1..{min(W0.shape)} for W0 {tuple(W0.shape)}")
        svd = top_singular(eff, k=k)
        delta_eff = float(torch.linalg.matrix_norm(svd.U.T @ W0 @ svd.V))
        amplification_eff = dw_eff_norm / delta_eff if delta_eff > 0 else math.inf
    return DoraSummary(
        mag_rel_mean=float(rel.mean()),
        mag_rel_abs_mean=float(rel.abs().mean()),
        mag_rel_min=float(rel.min()),
        mag_rel_max=float(rel.max()),
        mag_rel_norm=float(torch.linalg.vector_norm(m - n) / torch.linalg.vector_norm(n)),
        dw_norm=float(torch.linalg.matrix_norm(dW)),
        dw_eff_norm=dw_eff_norm,
        delta_eff=delta_eff,
        amplification_eff=amplification_eff,
    )

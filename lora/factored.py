"""The factored SVD of a LoRA update, the project's one copy of it: pure torch, no I/O (the analysis's metrics
call it, :mod:`lora.lowrank` truncates with it)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["factored_svd"]


def factored_svd(A: Tensor, B: Tensor, scaling: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``(U (d_out, k), S (k,), V (d_in, k))`` of ``ΔW = scaling · B @ A`` in float64, ``k = min(r, d_out,
    d_in)``, from the QR of ``B`` and ``Aᵀ`` and the SVD of the ``k × k`` core, never forming ``ΔW``.

    ``lora_analysis.metrics.linalg.factored_svd`` checks its input and calls this; ``lora.lowrank`` truncates
    with it.
    A negative ``scaling`` goes into ``U``; ``S ≥ 0``.
    """
    A, B = A.detach().to(torch.float64), B.detach().to(torch.float64)
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"factored_svd: A {tuple(A.shape)} and B {tuple(B.shape)} do not form B @ A")
    Q_B, R_B = torch.linalg.qr(B)  # (d_out, kb), (kb, r)
    Q_A, R_A = torch.linalg.qr(A.T)  # (d_in, ka), (ka, r)
    U_c, S, Vh_c = torch.linalg.svd((R_B @ R_A.T) * float(scaling), full_matrices=False)
    return Q_B @ U_c, S, Q_A @ Vh_c.T

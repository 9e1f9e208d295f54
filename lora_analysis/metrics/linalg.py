"""Exact float64 linear algebra for LoRA updates: factored SVD, cached SVD of W, orthonormal bases.

A LoRA update ``ΔW = s · B A`` (``B (d_out, r)``, ``A (r, d_in)``) has rank at most ``r``. Its singular
triplets follow exactly from the factors, without forming the ``(d_out, d_in)`` matrix::

    B = Q_B R_B,  Aᵀ = Q_A R_A          (reduced QR; Q_B (d_out, r), Q_A (d_in, r))
    ΔW = Q_B (s R_B R_Aᵀ) Q_Aᵀ          (an r × r core)
    s R_B R_Aᵀ = U_c diag(S) V_cᵀ  =>  ΔW = (Q_B U_c) diag(S) (Q_A V_c)ᵀ

This costs ``O((d_out + d_in) r²)`` instead of ``O(d_out d_in min(d_out, d_in))``. Everything here works in
float64: adapters saved in fp16/bf16 are upcast before any decomposition.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "SVD",
    "WeightSVDCache",
    "as_float64_matrix",
    "factored_svd",
    "left_singular_vectors",
    "orthonormal_basis",
    "right_singular_vectors",
    "top_singular",
    "weight_and_delta_svd",
    "weight_fingerprint",
]


@dataclass(frozen=True, eq=False)  # holds tensors: compare fields explicitly
class SVD:
    """A (possibly truncated) SVD ``M ≈ U diag(S) Vᵀ`` in float64, singular values descending.

    Attributes:
        U: ``(m, k)`` left singular vectors (orthonormal columns).
        S: ``(k,)`` singular values, non-negative and non-increasing.
        V: ``(n, k)`` right singular vectors (orthonormal columns; note ``V``, not ``Vᴴ``).
    """

    U: Tensor
    S: Tensor
    V: Tensor

    @property
    def k(self) -> int:
        """Number of singular triplets held."""
        return int(self.S.shape[0])

    def truncate(self, k: int) -> SVD:
        """The top-``k`` triplets (views, no copy). Raises ``ValueError`` if fewer than ``k`` are held."""
        if not 0 < k <= self.k:
            raise ValueError(f"cannot take the top {k} of an SVD holding {self.k} triplets (U {tuple(self.U.shape)})")
        return SVD(self.U[:, :k], self.S[:k], self.V[:, :k])

    def matrix(self) -> Tensor:
        """``U diag(S) Vᵀ`` (dense; for tests and small matrices only)."""
        return (self.U * self.S) @ self.V.T


def as_float64_matrix(M: Tensor, *, name: str = "matrix") -> Tensor:
    """``M`` as a float64 2-D tensor on the CPU; ``ValueError`` naming ``name`` and the shape if it is not a
    non-empty, finite matrix."""
    if not isinstance(M, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(M).__name__}")
    if M.ndim != 2 or M.shape[0] == 0 or M.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty 2-D matrix, got shape {tuple(M.shape)}")
    if M.is_complex():
        raise ValueError(f"{name}: complex tensors are not supported (shape {tuple(M.shape)})")
    M = M.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(M).all():
        raise ValueError(f"{name}: contains NaN or Inf (shape {tuple(M.shape)})")
    return M


def _check_factors(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    A = as_float64_matrix(A, name="lora_A (r, d_in)")
    B = as_float64_matrix(B, name="lora_B (d_out, r)")
    if A.shape[0] != B.shape[1]:
        raise ValueError(
            f"lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not form B @ A: "
            f"A must be (r, d_in) and B (d_out, r) with the same r"
        )
    return A, B


def factored_svd(A: Tensor, B: Tensor, *, scaling: float = 1.0) -> SVD:
    """Exact thin SVD of ``ΔW = scaling · B @ A`` from its factors, never forming ``ΔW``.

    Args:
        A: ``(r, d_in)`` LoRA A.
        B: ``(d_out, r)`` LoRA B.
        scaling: ``s`` (``alpha / r``); may be negative (the sign goes into ``U``; ``S`` stays ``>= 0``).

    Returns:
        :class:`SVD` with ``U (d_out, k)``, ``S (k,)``, ``V (d_in, k)``, ``k = min(r, d_out, d_in)``. A rank-deficient
        update (e.g. ``B = 0`` at step 0) keeps these shapes: the missing singular values are 0 and their
        vectors are an arbitrary orthonormal completion.

    Example:
        ``B = e_1 (d_out, 1)``, ``A = 2 e_2ᵀ (1, d_in)``, ``scaling = 3`` give ``S = [6]``, ``U = ±e_1``, ``V = ±e_2``.
    """
    A, B = _check_factors(A, B)
    s = float(scaling)
    if s != s or s in (float("inf"), float("-inf")):
        raise ValueError(f"scaling must be finite, got {scaling}")
    Q_B, R_B = torch.linalg.qr(B)  # (d_out, kb), (kb, r)
    Q_A, R_A = torch.linalg.qr(A.T)  # (d_in, ka), (ka, r)
    core = (R_B @ R_A.T) * s  # (kb, ka); small
    U_c, S, Vh_c = torch.linalg.svd(core, full_matrices=False)
    return SVD(Q_B @ U_c, S, Q_A @ Vh_c.T)


def weight_and_delta_svd(
    W: Tensor, A: Tensor, B: Tensor, *, scaling: float, name: str = "W"
) -> tuple[Tensor, SVD]:
    """``W`` as a checked float64 matrix and the factored SVD of ``ΔW = s·B·A``, which must have ``W``'s shape.

    Args:
        W: ``(d_out, d_in)``; A: ``(r, d_in)``; B: ``(d_out, r)``; scaling: ``s``.
        name: what the error messages call ``W`` (e.g. ``"W0"``).
    """
    W = as_float64_matrix(W, name=f"{name} (d_out, d_in)")
    dw = factored_svd(A, B, scaling=scaling)
    if dw.U.shape[0] != W.shape[0] or dw.V.shape[0] != W.shape[1]:
        raise ValueError(f"ΔW ({dw.U.shape[0]}, {dw.V.shape[0]}) from A {tuple(A.shape)}, B {tuple(B.shape)} "
                         f"does not match {name} {tuple(W.shape)}")
    return W, dw


def top_singular(W: Tensor, *, k: int | None = None) -> SVD:
    """Exact top-``k`` SVD of a dense ``W (m, n)`` in float64 (full ``torch.linalg.svd``, then sliced).

    Args:
        W: ``(m, n)`` dense weight.
        k: number of triplets; ``None`` keeps all ``min(m, n)``.
    """
    W = as_float64_matrix(W, name="W")
    kmax = min(W.shape)
    if k is not None and not 0 < k <= kmax:
        raise ValueError(f"k={k} must be in 1..{kmax} for W of shape {tuple(W.shape)}")
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    full = SVD(U, S, Vh.T)
    return full if k is None else full.truncate(k)


def weight_fingerprint(W: Tensor) -> str:
    """A content hash of ``W`` (shape, dtype and bytes): equal tensors give equal fingerprints."""
    t = W.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(t.shape)}:{t.dtype}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class WeightSVDCache:
    """Compute each weight's SVD once and reuse it across every rank and seed that adapts that weight.

    Entries are keyed by ``(key, fingerprint(W))``: the same module key with a different base weight (another
    base model) is a different entry, so a stale SVD is never returned. The full thin SVD is stored and any
    ``k`` is a slice of it.

    Example:
        >>> cache = WeightSVDCache()
        >>> top4 = cache.get("encoder.layer.3.attention.self.query", W, k=4)   # computes
        >>> top64 = cache.get("encoder.layer.3.attention.self.query", W, k=64)  # reuses
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], SVD] = {}
        self.computed = 0  # number of SVDs actually computed (for tests and logs)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, W: Tensor, *, k: int | None = None) -> SVD:
        """Top-``k`` SVD of ``W`` (all triplets if ``k`` is None), computed on first use of ``(key, W)``."""
        entry = (key, weight_fingerprint(W))
        if entry not in self._entries:
            self._entries[entry] = top_singular(W)
            self.computed += 1
        full = self._entries[entry]
        return full if k is None else full.truncate(k)

    def clear(self) -> None:
        self._entries.clear()


def orthonormal_basis(M: Tensor, *, rtol: float | None = None) -> Tensor:
    """Orthonormal basis of the column space of ``M (m, n)``: ``(m, rank)``, like ``scipy.linalg.orth``.

    Columns are the left singular vectors whose singular value exceeds ``rtol · σ_max`` (default
    ``max(m, n) · eps``), ordered by singular value. A zero matrix raises ``ValueError`` (no subspace).
    """
    M = as_float64_matrix(M, name="M")
    U, S, _ = torch.linalg.svd(M, full_matrices=False)
    tol = (max(M.shape) * torch.finfo(torch.float64).eps if rtol is None else rtol) * (S[0] if S.numel() else 0)
    rank = int((S > tol).sum())
    if rank == 0:
        raise ValueError(f"M of shape {tuple(M.shape)} is zero: its column space has no basis")
    return U[:, :rank]


def right_singular_vectors(A: Tensor) -> Tensor:
    """Right singular vectors of ``A (r, d_in)`` as columns ``(d_in, min(r, d_in))``, by descending singular
    value: the paper's ``U_A`` (Section 7.2). Costs ``O(r² d_in)``."""
    A = as_float64_matrix(A, name="A (r, d_in)")
    _, _, Vh = torch.linalg.svd(A, full_matrices=False)
    return Vh.T


def left_singular_vectors(B: Tensor) -> Tensor:
    """Left singular vectors of ``B (d_out, r)`` as columns ``(d_out, min(d_out, r))``, by descending singular
    value: ``U_B`` for the B-side analysis of footnote 7."""
    B = as_float64_matrix(B, name="B (d_out, r)")
    U, _, _ = torch.linalg.svd(B, full_matrices=False)
    return U

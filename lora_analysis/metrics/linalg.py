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
import math
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
    "top_singular_values",
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
    # NaN and Inf propagate through a sum (10x cheaper than isfinite on a 4096² W); the full scan only when the sum
    # is not finite, which finite entries can also give by overflow
    if not math.isfinite(float(M.sum())) and not torch.isfinite(M).all():
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


DENSE_SVDVALS_MAX = 1024  # below this min(d_out, d_in) a dense svdvals is cheap and exact; above, block Krylov


def top_singular_values(
    W: Tensor, k: int, *, rtol: float = 1e-9, block: int = 32, seed: int = 0, max_dim: int | None = None,
    dense_max: int = DENSE_SVDVALS_MAX,
) -> Tensor:
    """W's top-``k`` singular values ``σ_1 ≥ … ≥ σ_k`` in float64, without W's singular vectors (Table 7's "W" column
    needs only ``sqrt(σ_1² + … + σ_k²)``, Section 7.3).

    For ``min(d_out, d_in) <= dense_max``: ``torch.linalg.svdvals`` (exact, cheap at that size). Above it, block
    Krylov on ``G = WᵀW`` (on the smaller side of W): ``K = [X, G X, G² X, …]`` with ``block`` columns per step,
    each block orthogonalised against all before it twice (classical Gram–Schmidt, then QR). ``G X`` is one
    pass over W in float32 (``Σ_i W_iᵀ (W_i X)`` over row blocks ``W_i``, each reused from cache: half the memory
    traffic of ``Wᵀ (W X)``, and half the arithmetic of float64; the products only have to find the subspace), the
    projected matrix ``T = Kᵀ G K`` is kept in float64, and the iteration stops when the Ky Fan sum
    ``Σ_{i≤k} θ_i`` of T's top-k eigenvalues (checked at dimensions about 12 % apart) changes by less than
    ``rtol`` (relative) and the geometric tail estimate ``δ·ρ/(1−ρ)`` (``ρ`` the ratio of the last two changes)
    is below it too. Then a float64
    Rayleigh–Ritz step: ``V`` = the top ``k + block`` Ritz vectors, re-orthonormalised in float64, and
    ``σ(W V)`` (exact float64 singular values of a ``d × (k + block)`` matrix).

    Why Krylov and not subspace iteration: the error of a Krylov space of degree ``q`` decays like
    ``exp(−2q·sqrt(gap))`` rather than ``(1 − gap)^q`` (Chebyshev), which is what resolves a cluster such as
    a random bulk edge, where the relative gaps between σ_33 … σ_65 are 1e-3 (``benchmarks/cases_svd.py``).
    By the Ky Fan maximum principle every Ritz sum is a lower bound on ``Σ σ_i²``, and its error is quadratic in
    the subspace's angle to W's top-k singular subspace, so the float32 subspace costs nothing in the result.

    Args:
        W: ``(d_out, d_in)``.
        k: number of values, ``1 <= k <= min(d_out, d_in)``.
        rtol: relative tolerance on ``σ_1² + … + σ_k²`` (the iteration's stopping rule; tested against svdvals).
        block: columns per Krylov step. seed: of the random start block.
        max_dim: largest Krylov dimension (default ``min(d_out, d_in)``: then the space is the whole space, exact).
        dense_max: the size up to which the dense route is used.

    Returns:
        ``(k,)`` float64, descending.
    """
    return _top_singular_values(as_float64_matrix(W, name="W"), k, rtol=rtol, block=block, seed=seed,
                                max_dim=max_dim, dense_max=dense_max)


def _top_singular_values(W: Tensor, k: int, *, rtol: float, block: int, seed: int, max_dim: int | None,
                         dense_max: int) -> Tensor:
    # the unchecked core of top_singular_values, for a W already checked by as_float64_matrix
    kmax = min(W.shape)
    if not 0 < k <= kmax:
        raise ValueError(f"k={k} must be in 1..{kmax} for W of shape {tuple(W.shape)}")
    if kmax <= dense_max or 2 * (k + block) >= kmax:
        return torch.linalg.svdvals(W)[:k]
    if W.shape[0] < W.shape[1]:
        W = W.T  # work with G = WᵀW of size min(d_out, d_in): same singular values
    n = W.shape[1]
    limit = n if max_dim is None else max(min(int(max_dim), n), k + block)
    W32 = W.to(torch.float32).contiguous()  # (m, n) row-major: the Gram pass streams its row blocks
    g = torch.Generator().manual_seed(int(seed))
    # Row layout (one basis vector per row): every product below is a wide GEMM on contiguous rows.
    K = torch.empty(limit, n, dtype=torch.float32)  # orthonormal Krylov basis, filled block by block
    GK = torch.empty(limit, n, dtype=torch.float32)  # (G K)ᵀ
    T = torch.empty(limit, limit, dtype=torch.float64)  # Kᵀ G K
    X = torch.linalg.qr(torch.randn(n, block, generator=g, dtype=torch.float32))[0].T
    sums: list[float] = []
    dim, next_check = 0, 2 * k
    while True:
        b = X.shape[0]
        K[dim:dim + b] = X
        GX = _gram_rows(W32, X, out=GK[dim:dim + b])
        C = GX @ K[:dim + b].T  # (G X)ᵀ K: the new columns of T and the first Gram–Schmidt pass below
        T[dim:dim + b, :dim + b] = C
        T[:dim, dim:dim + b] = C[:, :dim].T
        T[dim:dim + b, dim:dim + b] = (C[:, dim:] + C[:, dim:].T) / 2
        dim += b
        if dim >= next_check:  # the Ky Fan sum at dimensions ~12 % apart: eigvalsh is O(dim³), the checks add ~1/8
            sums.append(float(torch.linalg.eigvalsh(T[:dim, :dim])[-k:].sum()))
            next_check = max(dim + block, int(1.125 * dim))
            if _krylov_converged(sums, rtol):
                break
        b = min(block, limit - dim)
        if b <= 0:
            break
        Kd = K[:dim]
        Y = GX[:b] - C[:b] @ Kd  # CGS2: a second pass, as one pass loses orthogonality in float32
        Y = Y - (Y @ Kd.T) @ Kd
        X = torch.linalg.qr(Y.T)[0].T
    # Rayleigh–Ritz in float64 on the top k + block Ritz vectors
    _, evecs = torch.linalg.eigh(T[:dim, :dim])
    p = min(k + block, dim)
    V, _ = torch.linalg.qr((K[:dim].T @ evecs[:, -p:].to(torch.float32)).to(torch.float64))  # a float32 basis
    return torch.linalg.svdvals(W @ V)[:k]


_GRAM_ROWS = 256  # rows of W per step of the Gram pass: 4 MiB of float32 at d = 4096, still in cache for Wᵢᵀ


def _gram_rows(W: Tensor, X: Tensor, *, out: Tensor) -> Tensor:
    """``out = X Wᵀ W`` (``X (b, n)`` rows, ``W (m, n)``): ``(G Xᵀ)ᵀ`` for ``G = WᵀW`` in one pass over W.

    ``Σ_i (X W_iᵀ) W_i`` over row blocks ``W_i``: each block is read from memory once and reused from cache for
    the second product, where ``(X Wᵀ) W`` would stream all of W twice (at the narrow blocks of a Krylov
    iteration a GEMM is bound by memory, so this is ~1.3–1.5× faster)."""
    out.zero_()
    for i in range(0, W.shape[0], _GRAM_ROWS):
        Wi = W[i:i + _GRAM_ROWS]
        out.addmm_(X @ Wi.T, Wi)
    return out


def _krylov_converged(sums: list[float], rtol: float) -> bool:
    """The stopping rule of :func:`top_singular_values`: the last change of the Ky Fan sum and its geometric tail
    estimate are both below ``rtol`` relative to the sum (Ritz sums of nested spaces are non-decreasing)."""
    if len(sums) < 3:
        return False
    d1, d2 = sums[-2] - sums[-3], sums[-1] - sums[-2]
    tol = rtol * abs(sums[-1])
    if d2 > tol:
        return False
    rho = min(d2 / d1, 0.95) if d1 > 0 else 0.0
    return d2 * rho / (1 - rho) <= tol


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
        import threading

        self._entries: dict[tuple[str, str], SVD] = {}
        self.computed = 0  # number of SVDs actually computed (for tests and logs)
        self._lock = threading.Lock()  # the analysis tables fill one cache from several threads

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, W: Tensor, *, k: int | None = None) -> SVD:
        """Top-``k`` SVD of ``W`` (all triplets if ``k`` is None), computed on first use of ``(key, W)``."""
        entry = (key, weight_fingerprint(W))
        if entry not in self._entries:
            svd = top_singular(W)  # outside the lock: threads decompose different weights at once
            with self._lock:
                if entry not in self._entries:
                    self._entries[entry] = svd
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

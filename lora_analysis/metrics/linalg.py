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
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "SVD",
    "SpectralCertificate",
    "WeightSVDCache",
    "as_float64_matrix",
    "factored_svd",
    "gram_rows",
    "left_singular_vectors",
    "orthonormal_basis",
    "right_singular_vectors",
    "top_singular",
    "top_singular_triplets",
    "top_singular_values",
    "weight_and_delta_svd",
    "weight_fingerprint",
]


@dataclass(frozen=True, eq=False)  # holds tensors: compare fields explicitly
class SpectralCertificate:
    """What :func:`top_singular_triplets`' iterative route guarantees about its ``k`` triplets ``(ũ_i, σ̃_i, ṽ_i)``.

    ``W ṽ_i = σ̃_i ũ_i`` holds by construction (``ũ``, ``σ̃`` are the exact SVD of ``W Ṽ``, up to rounding), so the
    one residual that measures the error is the other one, ``s_i = Wᵀ ũ_i − σ̃_i ṽ_i`` (for ``d_out < d_in`` the
    roles of ``U`` and ``V`` swap: ``Wᵀ ũ_i = σ̃_i ṽ_i`` and ``s_i = W ṽ_i − σ̃_i ũ_i``). ``G = WᵀW`` has the residual
    ``S Σ̃`` on ``Ṽ`` and ``WWᵀ`` has ``W S`` on ``Ũ``. The bounds:

    - **values**: ``σ̃_i ≤ σ_i`` (Cauchy interlacing: ``σ̃`` are the singular values of ``W Ṽ``, ``Ṽ`` orthonormal)
      and ``σ_i² ≤ max(σ̃_i², tail²) + σ̃_i ‖S_{:, i:k}‖_F`` (min–max on ``W (I − Ṽ_{:i−1}Ṽ_{:i−1}ᵀ)`` and Weyl
      on its Gram matrix: see ``_certificate``); ``sigma_error`` is that bound minus ``σ̃_i``.
    - **subspaces** (Davis–Kahan sin θ, on ``G`` and ``WWᵀ``): ``sin∠(span Ṽ_{:i}, span V_{:i})`` and the same for
      ``U`` are ``≤ σ_{1,up} ‖S_{:, :i}‖_F / (σ̃_i² − σ_{i+1,up}²)`` (``σ_{k+1,up} = tail``); each single vector
      pair likewise with its own residual and the gap to both neighbours (``σ_{i−1} ≥ σ̃_{i−1}``).
    - **tail** ``≥ σ_{k+1}``: ``σ_{k+1}(W) ≤ ‖W (I − ṼṼᵀ)‖_2`` (min–max), bounded through ``p = k + block`` Ritz
      triplets and ``q`` steps of float64 Lanczos on ``(I − Ṽ_pṼ_pᵀ) G (I − Ṽ_pṼ_pᵀ)`` from a Gaussian start: by
      Kuczyński & Woźniakowski (1992, SIAM J. Matrix Anal. Appl. 13(4), Thm 4.2) the largest Ritz value ``θ``
      satisfies ``θ < (1 − ε) λ_max`` with probability at most ``1.648 √n e^{−√ε (2q − 1)}``; ``sqrt(θ/(1 − ε))``
      then fails with probability at most ``failure_probability``: the only non-deterministic bound here.

    Where a bound cannot be given (a gap that is not positive) a sine is ``1.0``. Rounding: ``residuals`` include
    ``n·eps·σ̃_1`` (the float64 error of forming ``Wᵀ ũ``).

    Attributes:
        residuals: ``(k,)`` float64, ``‖s_i‖₂`` (+ rounding).
        tail: upper bound on ``σ_{k+1}(W)``.
        sigma_error: ``(k,)`` ``0 ≤ σ_i − σ̃_i ≤ sigma_error_i``.
        subspace_sine: ``(k,)`` bound on the sine of the largest angle between the computed top-``i`` singular
            subspaces (left and right) and the true ones.
        vector_sine: ``(k,)`` the same for each single vector pair ``(ũ_i, ṽ_i)``.
        krylov_dim: dimension of the Krylov space that found them.
        failure_probability: the probability that ``tail`` (hence the bounds that use it) is wrong.
    """

    residuals: Tensor
    tail: float
    sigma_error: Tensor
    subspace_sine: Tensor
    vector_sine: Tensor
    krylov_dim: int
    failure_probability: float

    def truncate(self, k: int, S: Tensor) -> SpectralCertificate:
        """The certificate of the top ``k`` of the triplets with values ``S`` (every bound stays valid: the new
        tail is ``σ_{k+1} ≤ σ̃_{k+1} + sigma_error_{k+1}``)."""
        if k == S.shape[0]:
            return self
        return SpectralCertificate(self.residuals[:k], float(S[k] + self.sigma_error[k]), self.sigma_error[:k],
                                   self.subspace_sine[:k], self.vector_sine[:k], self.krylov_dim,
                                   self.failure_probability)


@dataclass(frozen=True, eq=False)  # holds tensors: compare fields explicitly
class SVD:
    """A (possibly truncated) SVD ``M ≈ U diag(S) Vᵀ`` in float64, singular values descending.

    Attributes:
        U: ``(m, k)`` left singular vectors (orthonormal columns).
        S: ``(k,)`` singular values, non-negative and non-increasing.
        V: ``(n, k)`` right singular vectors (orthonormal columns; note ``V``, not ``Vᴴ``).
        certificate: ``None`` for a dense (exact) SVD; the error bounds of an iterative one
            (:func:`top_singular_triplets`).
    """

    U: Tensor
    S: Tensor
    V: Tensor
    certificate: SpectralCertificate | None = None

    @property
    def k(self) -> int:
        """Number of singular triplets held."""
        return int(self.S.shape[0])

    def truncate(self, k: int) -> SVD:
        """The top-``k`` triplets (views, no copy). Raises ``ValueError`` if fewer than ``k`` are held."""
        if not 0 < k <= self.k:
            raise ValueError(f"cannot take the top {k} of an SVD holding {self.k} triplets (U {tuple(self.U.shape)})")
        cert = None if self.certificate is None else self.certificate.truncate(k, self.S)
        return SVD(self.U[:, :k], self.S[:k], self.V[:, :k], cert)

    def matrix(self) -> Tensor:
        """``U diag(S) Vᵀ`` (dense; for tests and small matrices only)."""
        return (self.U * self.S) @ self.V.T


def as_float64_matrix(M: Tensor, *, name: str = "matrix", keep_device: bool = False) -> Tensor:
    """``M`` as a float64 2-D tensor on the CPU (on its own device with ``keep_device``); ``ValueError`` naming
    ``name`` and the shape if it is not a non-empty, finite matrix."""
    if not isinstance(M, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(M).__name__}")
    if M.ndim != 2 or M.shape[0] == 0 or M.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty 2-D matrix, got shape {tuple(M.shape)}")
    if M.is_complex():
        raise ValueError(f"{name}: complex tensors are not supported (shape {tuple(M.shape)})")
    M = M.detach().to(device=M.device if keep_device else "cpu", dtype=torch.float64)
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
    # the maths is lora.factored's (QR of B and Aᵀ, SVD of the small core), which lora.resize truncates with
    from lora.factored import factored_svd as _factored

    return SVD(*_factored(A, B, s))


def weight_and_delta_svd(
    W: Tensor, A: Tensor, B: Tensor, *, scaling: float, name: str = "W", keep_device: bool = False,
) -> tuple[Tensor, SVD]:
    """``W`` as a checked float64 matrix and the factored SVD of ``ΔW = s·B·A``, which must have ``W``'s shape.

    Args:
        W: ``(d_out, d_in)``; A: ``(r, d_in)``; B: ``(d_out, r)``; scaling: ``s``.
        name: what the error messages call ``W`` (e.g. ``"W0"``).
        keep_device: both on W's device (the factored SVD's small QRs run on the CPU); default the CPU.
    """
    W = as_float64_matrix(W, name=f"{name} (d_out, d_in)", keep_device=keep_device)
    dw = factored_svd(A, B, scaling=scaling)
    if dw.U.device != W.device:
        dw = SVD(dw.U.to(W.device), dw.S.to(W.device), dw.V.to(W.device))
    if dw.U.shape[0] != W.shape[0] or dw.V.shape[0] != W.shape[1]:
        raise ValueError(f"ΔW ({dw.U.shape[0]}, {dw.V.shape[0]}) from A {tuple(A.shape)}, B {tuple(B.shape)} "
                         f"does not match {name} {tuple(W.shape)}")
    return W, dw


def top_singular(W: Tensor, *, k: int | None = None, keep_device: bool = False) -> SVD:
    """Exact top-``k`` SVD of a dense ``W (m, n)`` in float64 (full ``torch.linalg.svd``, then sliced).

    Args:
        W: ``(m, n)`` dense weight.
        k: number of triplets; ``None`` keeps all ``min(m, n)``.
        keep_device: on W's device (default: the CPU).
    """
    W = as_float64_matrix(W, name="W", keep_device=keep_device)
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

    For ``min(d_out, d_in) <= dense_max``: ``torch.linalg.svdvals`` (exact, cheap at that size). Above it, the block
    Krylov of :func:`_block_krylov` on ``G = WᵀW`` (on the smaller side of W) in float32 (the products only have to
    find the subspace: half the memory traffic and arithmetic of float64), and the iteration stops when the Ky Fan
    sum ``Σ_{i≤k} θ_i`` of the projected matrix's top-k eigenvalues (checked at dimensions about 12 % apart)
    changes by less than ``rtol`` (relative) and the geometric tail estimate ``δ·ρ/(1−ρ)`` (``ρ`` the ratio of the
    last two changes) is below it too. Then a float64 Rayleigh–Ritz step: ``V`` = the top ``k + block`` Ritz
    vectors, re-orthonormalised in float64, and ``σ(W V)`` (exact float64 singular values of a ``d × (k + block)``
    matrix).

    Why Krylov and not subspace iteration: the error of a Krylov space of degree ``q`` decays like
    ``exp(−2q·sqrt(gap))`` rather than ``(1 − gap)^q`` (Chebyshev), which is what resolves a cluster such as
    a random bulk edge, where the relative gaps between σ_33 … σ_65 are 1e-3 (``benchmarks/cases_svd.py``).
    By the Ky Fan maximum principle every Ritz sum is a lower bound on ``Σ σ_i²``, and its error is quadratic in
    the subspace's angle to W's top-k singular subspace, so the float32 subspace costs nothing in the result.
    The singular vectors too: :func:`top_singular_triplets` (the same Krylov core, in float64).

    Args:
        W: ``(d_out, d_in)``, on any device (the work stays there).
        k: number of values, ``1 <= k <= min(d_out, d_in)``.
        rtol: relative tolerance on ``σ_1² + … + σ_k²`` (the iteration's stopping rule; tested against svdvals).
        block: columns per Krylov step. seed: of the random start block.
        max_dim: largest Krylov dimension (default ``min(d_out, d_in)``: then the space is the whole space, exact).
        dense_max: the size up to which the dense route is used.

    Returns:
        ``(k,)`` float64, descending, on W's device.
    """
    return _top_singular_values(as_float64_matrix(W, name="W", keep_device=True), k, rtol=rtol, block=block,
                                seed=seed, max_dim=max_dim, dense_max=dense_max)


def _check_k(W: Tensor, k: int) -> None:
    kmax = min(W.shape)
    if not 0 < k <= kmax:
        raise ValueError(f"k={k} must be in 1..{kmax} for W of shape {tuple(W.shape)}")


def _top_singular_values(W: Tensor, k: int, *, rtol: float, block: int, seed: int, max_dim: int | None,
                         dense_max: int) -> Tensor:
    # the unchecked core of top_singular_values, for a W already checked by as_float64_matrix
    _check_k(W, k)
    kmax = min(W.shape)
    if kmax <= dense_max or 2 * (k + block) >= kmax:
        return torch.linalg.svdvals(W)[:k]
    if W.shape[0] < W.shape[1]:
        W = W.T  # work with G = WᵀW of size min(d_out, d_in): same singular values
    n = W.shape[1]
    limit = n if max_dim is None else max(min(int(max_dim), n), k + block)
    sums: list[float] = []

    def ky_fan_converged(T: Tensor, R: Tensor | None) -> bool:
        sums.append(float(torch.linalg.eigvalsh(T)[-k:].sum()))
        return _krylov_converged(sums, rtol)

    # float32 row-major: the Gram pass streams W's row blocks
    K, T, _ = _block_krylov(W.to(torch.float32).contiguous(), k, block=block, seed=seed, limit=limit,
                            converged=ky_fan_converged)
    # Rayleigh–Ritz in float64 on the top k + block Ritz vectors
    _, evecs = torch.linalg.eigh(T)
    p = min(k + block, T.shape[0])
    V, _ = torch.linalg.qr((K.T @ evecs[:, -p:].to(K.dtype)).to(torch.float64))  # a float32 basis
    return torch.linalg.svdvals(W @ V)[:k]


def _block_krylov(W: Tensor, k: int, *, block: int, seed: int, limit: int,
                  converged: Callable[[Tensor, Tensor | None], bool | None],
                  next_check: Callable[[int], int] | None = None) -> tuple[Tensor, Tensor, bool]:
    """Block Krylov basis ``K = orth[X, G X, G² X, …]`` of ``G = WᵀW`` for ``W (m, n)`` (``n`` the smaller side),
    in W's dtype and on W's device, ``block`` columns per step from a seeded Gaussian start (drawn on the CPU).

    Each new block is orthogonalised against all before it twice (classical Gram–Schmidt, then QR); ``G X`` is
    one pass over W (:func:`gram_rows`). The projected ``T = K G Kᵀ`` is kept in float64. At dimensions about
    12 % apart (``eigh`` of T is ``O(dim³)``; the checks add ~1/8) ``converged(T, R)`` decides whether to stop, with
    ``R`` the triangular factor of the next block ``(I − KᵀK) G X_last = Q R`` (``None`` at ``limit``): a Ritz
    vector ``Kᵀ c`` of T has the residual ``‖G Kᵀc − Kᵀ T c‖ = ‖R c_last‖`` (``c_last``: its last block's
    coordinates; the block-Lanczos identity, exact in exact arithmetic). ``converged`` may return ``None``: stop,
    not converged (a predicted failure). ``next_check(dim)``, if given, replaces the 12 % schedule after a check.

    Returns:
        ``K (dim, n)`` (orthonormal rows), ``T (dim, dim)`` float64, and whether ``converged`` stopped the
        iteration (``False``: it reached ``limit``).
    """
    n, dev, dt = W.shape[1], W.device, W.dtype
    g = torch.Generator().manual_seed(int(seed))
    # Row layout (one basis vector per row): every product below is a wide GEMM on contiguous rows.
    K = torch.empty(limit, n, dtype=dt, device=dev)  # orthonormal Krylov basis, filled block by block
    GK = torch.empty(limit, n, dtype=dt, device=dev)  # (G K)ᵀ
    T = torch.empty(limit, limit, dtype=torch.float64, device=dev)  # Kᵀ G K
    X = torch.linalg.qr(torch.randn(n, block, generator=g, dtype=dt).to(dev))[0].T
    dim, next_at, done = 0, 2 * k, False
    while True:
        b = X.shape[0]
        K[dim:dim + b] = X
        GX = gram_rows(W, X, out=GK[dim:dim + b])
        C = GX @ K[:dim + b].T  # (G X)ᵀ K: the new columns of T and the first Gram–Schmidt pass below
        T[dim:dim + b, :dim + b] = C
        T[:dim, dim:dim + b] = C[:, :dim].T
        T[dim:dim + b, dim:dim + b] = (C[:, dim:] + C[:, dim:].T) / 2
        dim += b
        nb = min(block, limit - dim)
        R = None
        if nb > 0:
            Kd = K[:dim]
            Y = GX - C @ Kd  # CGS2: a second pass, as one pass loses orthogonality in float32
            Y = Y - (Y @ Kd.T) @ Kd
            Q, R = torch.linalg.qr(Y.T)
        if dim >= next_at:
            verdict = converged(T[:dim, :dim], R)
            if verdict is None or verdict:
                done = bool(verdict)
                break
            next_at = max(dim + block, int(1.125 * dim) if next_check is None else next_check(dim))
        if nb <= 0:
            break
        X = Q.T[:nb]
    return K[:dim], T[:dim, :dim], done


def top_singular_triplets(
    W: Tensor, k: int, *, rtol: float = 1e-10, block: int = 32, seed: int = 0, dense_max: int = DENSE_SVDVALS_MAX,
    extra_rtol: float | None = None,
) -> SVD:
    """W's top-``k`` singular triplets in float64, by block Krylov with a :class:`SpectralCertificate`, or dense.

    **Dense route** (``certificate=None``, exactly :func:`top_singular`'s numbers) when ``min(d_out, d_in) <=
    dense_max``, or when ``2 (k + block) >= min(d_out, d_in)``, or when the Krylov space would exceed half of
    ``min(d_out, d_in)`` before converging: a flat bulk (e.g. a random matrix's, relative gaps ~1e-3 between the
    wanted values) needs a Krylov space comparable to ``d``, and then the dense SVD is the cheaper exact answer.

    **Iterative route**: the block Krylov of :func:`_block_krylov` on ``G = WᵀW`` (smaller side), in float64 (the
    vectors are first-order in the subspace's error, so float32 noise would show in them), until every top-``k``
    Ritz pair's residual estimate is ``≤ rtol·σ̃_1·σ̃_i`` (i.e. ``‖Wᵀũ_i − σ̃_i ṽ_i‖ ≲ rtol·σ̃_1``). Then float64
    Rayleigh–Ritz: ``Ṽ`` = the top-``k`` Ritz vectors (re-orthonormalised), ``W Ṽ = Ũ Σ̃ Zᵀ`` (thin SVD),
    ``Ṽ ← Ṽ Z``; the certificate's residuals are recomputed from W, not estimated.

    Why ``rtol = 1e-10``: a top-``i`` subspace moves by ``≲ residual·σ_1 / (σ_i² − σ_{i+1}²)``; Figure 8 needs it to
    1e-6 at relative gaps down to ~1e-3 at ``σ_i ~ σ_1/20`` (a power-law spectrum at ``i = 410``), i.e. a
    residual ``≲ 1e-6 · 2e-3 / 400 · σ_1 ≈ 5e-12·σ_1`` in the worst case; the Davis–Kahan bound is pessimistic
    by the ratio of a residual's norm to its component along the neighbour, and ``1e-10`` meets 1e-6 against the
    dense answer in the tests at a fraction of the cost of ``1e-12``.

    Args:
        W: ``(d_out, d_in)`` on any device (the work stays there; random starts are drawn on the CPU).
        k: ``1 <= k <= min(d_out, d_in)``.
        rtol: residual target relative to ``σ_1``. block: columns per Krylov step. seed: of the random starts.
        dense_max: the size up to which the dense route is used.
        extra_rtol: the same for the ``block`` extra Ritz pairs that tighten the tail bound (default 1e-5).

    Returns:
        :class:`SVD` with ``U (d_out, k)``, ``S (k,)``, ``V (d_in, k)`` float64 and the certificate.
    """
    W = as_float64_matrix(W, name="W", keep_device=True)
    _check_k(W, k)
    kmax = min(W.shape)
    if kmax <= dense_max or 2 * (k + block) >= kmax:
        return _dense_svd(W, k)
    flip = W.shape[0] < W.shape[1]
    Wn = W.T.contiguous() if flip else W  # (m, n), n = min(d_out, d_in)
    n = Wn.shape[1]

    limit = n // 2
    extra = _EXTRA_RTOL if extra_rtol is None else float(extra_rtol)
    seen: list[tuple[int, float]] = []  # (dim, log of the worst residual estimate over its target)
    last: dict[int, Tensor] = {}  # the last check's eigenvectors of T, by dim: reused for the Ritz vectors

    def residuals_converged(T: Tensor, R: Tensor | None) -> bool | None:
        if R is None:
            return False
        theta, C = torch.linalg.eigh(T)
        last.clear()
        last[T.shape[0]] = C
        p = min(k + block, T.shape[0])
        est = torch.linalg.vector_norm(R @ C[-R.shape[0]:, -p:], dim=0)  # ‖G Kᵀc − Kᵀc θ‖ per Ritz pair
        top = theta[-p:].clamp(min=0)
        # the top k to rtol; the p − k extra pairs of the tail bound (see _certificate) to extra_rtol, or their
        # residuals loosen the tail bound on σ_{k+1}
        target = (top[-1] * top).sqrt() * torch.cat([top.new_full((p - k,), extra), top.new_full((k,), rtol)])
        worst = float((est / target.clamp(min=1e-300)).max())
        if worst <= 1:
            return True
        seen.append((T.shape[0], math.log(worst)))
        hopeless = T.shape[0] >= _GIVE_UP_FROM * limit and _predicted_dim(seen) > _GIVE_UP * limit
        return None if hopeless else False

    def schedule(dim: int) -> int:
        # at the predicted dimension (5 % over), 12 % … 50 % further, and where the residual estimate still
        # exists (R is None at the limit)
        at = min(max(1.05 * _predicted_dim(seen), 1.125 * dim), 1.5 * dim, limit - block)
        return max(int(at), dim + block)

    K, T, done = _block_krylov(Wn, k, block=block, seed=seed, limit=limit, converged=residuals_converged,
                               next_check=schedule)
    if not done:
        return _dense_svd(W, k)
    C = last[T.shape[0]] if T.shape[0] in last else torch.linalg.eigh(T)[1]
    p = min(k + block, K.shape[0])  # the extra p − k tighten the tail bound (see _certificate)
    V, _ = torch.linalg.qr(K.T @ C[:, -p:].flip(1))
    Uw, S, Zh = torch.linalg.svd(Wn @ V, full_matrices=False)
    V = V @ Zh.T
    cert = _certificate(Wn, Uw, S, V, k, krylov_dim=K.shape[0], seed=seed)
    U, S, V = Uw[:, :k], S[:k], V[:, :k]
    return SVD(V, S, U, cert) if flip else SVD(U, S, V, cert)


# the Krylov route gives up (for the dense SVD) once the residuals' trend predicts convergence beyond this many times
# its limit of d/2 (measured: a power law's top 410 at d = 4096 falls by e^0.7 from dimension 832 to 960, then by
# e^16 to 1440; a flat bulk's keeps falling slowly)
_GIVE_UP = 1.5
_EXTRA_RTOL = 1e-5
_GIVE_UP_FROM = 0.6  # … and not before this fraction of it: early on the residuals fall slowly, then by decades


def _predicted_dim(seen: list[tuple[int, float]]) -> float:
    """The Krylov dimension where the log residual ratio of the last two checks, extrapolated linearly (Krylov
    errors fall about geometrically in the dimension), reaches 0; ``inf`` without progress, ``0`` with one
    check (no prediction: the default schedule)."""
    if len(seen) < 2:
        return 0.0
    (d1, r1), (d2, r2) = seen[-2], seen[-1]
    slope = (r2 - r1) / (d2 - d1)
    return d2 - r2 / slope if slope < 0 else math.inf


def _dense_svd(W: Tensor, k: int) -> SVD:
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return SVD(U[:, :k], S[:k], Vh[:k].T)


_TAIL_STEPS = 48  # Lanczos steps of the tail bound: (1 − ε)^(-1/2) = 1.03 at n = 4096 and failure 1e-9
_TAIL_FAILURE = 1e-9


def _certificate(W: Tensor, U: Tensor, S: Tensor, V: Tensor, k: int, *, krylov_dim: int,
                 seed: int) -> SpectralCertificate:
    """The bounds of :class:`SpectralCertificate` for the top ``k`` of ``p ≥ k`` Rayleigh–Ritz triplets with
    ``W V = U diag(S)`` (``W (m, n)``, ``n ≤ m``; ``U (m, p)``, ``V (n, p)``).

    Upper bounds: with ``P_j = I − Ṽ_{:j}Ṽ_{:j}ᵀ``, ``σ_i ≤ ‖W P_{i−1}‖`` (min–max), and ``W P_{i−1} = [W Ṽ_{i:j},
    W P_j]`` has the Gram matrix ``[[Σ̃²_{i:j}, Σ̃ S_{i:j}ᵀ P_j], [·, P_j G P_j]]`` (``Ũᵀ W P_j = (ṼΣ̃ + S)ᵀ P_j``),
    so by Weyl ``σ_i² ≤ max(σ̃_i², ‖W P_j‖²) + σ̃_i ‖S_{:, i:j}‖_F``. With ``j = p`` and the Lanczos tail bound this
    bounds ``‖W P_k‖ ≥ σ_{k+1}`` (the extra ``p − k`` triplets keep the tail's looseness ``(1 − ε)^{-1/2}`` off
    ``σ_{k+1}``), then with ``j = k`` each ``σ_i``, ``i ≤ k``, from the converged residuals only."""
    n = W.shape[1]
    eps = torch.finfo(torch.float64).eps
    res = torch.linalg.vector_norm(W.T @ U - V * S, dim=0) + n * eps * float(S[0])  # + γ_n rounding of Wᵀu
    tail_p = _tail_bound(W, V, steps=_TAIL_STEPS, failure=_TAIL_FAILURE, seed=seed + 1)

    def upper_sq(i: slice, beyond: float, r: Tensor) -> Tensor:  # σ_i² bounds from W P_{i−1} = [W Ṽ_{i:j}, W P_j]
        tail_res = r.flip(0).square().cumsum(0).flip(0).sqrt()  # ‖S_{:, i:j}‖_F for each i
        return torch.clamp(S[i].square(), min=beyond ** 2) + S[i] * tail_res

    tail_k = math.sqrt(float(upper_sq(slice(k, None), tail_p, res[k:])[0])) if S.shape[0] > k else tail_p
    up = upper_sq(slice(0, k), tail_k, res[:k]).sqrt()  # σ_i ≤ up_i, i ≤ k
    S, res = S[:k], res[:k]
    up_next_sq = torch.cat([up[1:], up.new_tensor([tail_k])]).square()  # σ_{i+1}² ≤ this
    s2 = S.square()
    gap_below = s2 - up_next_sq  # θ_i minus a bound on every eigenvalue of G below λ_i
    gap_above = torch.cat([S.new_tensor([math.inf]), s2[:-1] - s2[1:]])  # λ_{i−1} ≥ σ̃_{i−1}² (interlacing)
    scale = float(up[0])  # ≥ σ_1 = ‖W‖₂: W S on the left, S Σ̃ on the right
    gap = torch.minimum(gap_below, gap_above)
    return SpectralCertificate(res, tail_k, up - S, _sine(scale * res.square().cumsum(0).sqrt() / gap_below,
                                                          gap_below),
                               _sine(scale * res / gap, gap), krylov_dim, _TAIL_FAILURE)


def _sine(bound: Tensor, gap: Tensor) -> Tensor:
    """A sine bound clipped to 1, and 1 (no bound) where the gap it divided by is not positive."""
    return torch.where(gap > 0, bound, torch.ones_like(bound)).clamp(max=1.0)


def _tail_bound(W: Tensor, V: Tensor, *, steps: int, failure: float, seed: int) -> float:
    """An upper bound on ``‖W (I − V Vᵀ)‖₂ ≥ σ_{k+1}(W)`` (``V (n, k)`` orthonormal) that fails with probability
    ``≤ failure``: float64 Lanczos with full reorthogonalisation on ``P G P`` (``P = I − V Vᵀ``, ``G = WᵀW``) from
    ``P g``, ``g`` Gaussian (a Gaussian in the complement), then Kuczyński & Woźniakowski (1992, Thm 4.2):
    ``P(θ_q < (1 − ε) λ_max) ≤ 1.648 √n e^{−√ε (2q − 1)}``; ``ε`` solves that for ``failure``."""
    n = W.shape[1]
    g = torch.Generator().manual_seed(int(seed))

    def proj(x: Tensor) -> Tensor:
        for _ in range(2):  # twice: V's component must stay at rounding level, or G amplifies it
            x = x - V @ (V.T @ x)
        return x

    Q = torch.empty(n, steps, dtype=W.dtype, device=W.device)
    x = proj(torch.randn(n, 1, generator=g, dtype=W.dtype).to(W.device))
    x = x / torch.linalg.vector_norm(x)
    alpha, beta = [], []
    for j in range(steps):
        Q[:, j:j + 1] = x
        w = proj(W.T @ (W @ x))
        alpha.append(float(x.T @ w))
        for _ in range(2):
            w = w - Q[:, :j + 1] @ (Q[:, :j + 1].T @ w)
        b = float(torch.linalg.vector_norm(w))
        if j == steps - 1 or b <= 1e-14 * max(abs(a) for a in alpha):
            break  # an invariant subspace: its Ritz values are exact eigenvalues of P G P
        beta.append(b)
        x = w / b
    q = len(alpha)
    Tq = torch.diag(torch.tensor(alpha, dtype=torch.float64))
    if beta:
        off = torch.tensor(beta, dtype=torch.float64)
        Tq += torch.diag(off, 1) + torch.diag(off, -1)
    theta = float(torch.linalg.eigvalsh(Tq)[-1])
    eps_kw = (math.log(1.648 * math.sqrt(n) / failure) / (2 * q - 1)) ** 2
    return math.sqrt(max(theta, 0.0) / (1 - eps_kw)) if eps_kw < 1 else math.inf


_GRAM_ROWS = 256  # rows of W per step of the Gram pass: 4 MiB of float32 at d = 4096, still in cache for Wᵢᵀ


def gram_rows(W: Tensor, X: Tensor, *, out: Tensor) -> Tensor:
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

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

from lora_analysis.linalg import (
    SVD,
    as_float64_matrix,
    left_singular_vectors,
    orthonormal_basis,
    right_singular_vectors,
    top_singular,
    weight_and_delta_svd,
)

__all__ = [
    "InitControl",
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


# ---------------------------------------------------------------------------------------------- command line
# `python -m lora_analysis.subspace` (console script `lora-subspace`). File reading goes through
# lora_analysis.runs; this section only parses options, calls the metrics above and prints / writes results.

CLI_DESCRIPTION = """\
Normalized subspace similarity between two LoRA adapters (Hu et al., 2021, Section 7.2, Figures 3 and 4):

    phi(A1, A2, i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j)    in [0, 1]

where U1, U2 are the right singular vectors of the two A matrices (--side B: left singular vectors of B,
footnote 7), ordered by singular value. 1 means one top-subspace contains the other, 0 means orthogonal; two
random subspaces of dimension d give max(i, j) / d on average (the baseline printed beside each module).
Figure 3 compares r=8 with r=64 at one seed; Figure 4 compares two seeds at r=64.

Compare two adapters of a run directory by rank and seed (--r1/--r2, --seed1/--seed2), or any two adapter
directories (--a1/--a2: ours or written by peft; a loralib .pt checkpoint with --alpha). With no --runs and no
--a1/--a2 the default run directory is used ($LORA_RUNS_DIR or ./runs/default); adapters it lacks are trained
first on the embedded default (real all-MiniLM-L6-v2 on chatterbot-corpus text, offline), so
`python -m lora_analysis.subspace --r1 8 --r2 64` works on a fresh install.

When both adapters carry init.safetensors (A at step 0, written by lora.train), phi is also computed on the
learned change A - A_init and between the two starting points A_init: with nested initialisation, A_8 starts
as the first 8 rows of A_64, which alone makes phi high."""

_DIAG_SHOWN = (1, 2, 4, 8, 16, 32, 64)


def build_parser():
    """The ``python -m lora_analysis.subspace`` options (argparse errors: one line, exit 2)."""
    import argparse

    from lora.errors import ArgumentParser

    p = ArgumentParser(prog="python -m lora_analysis.subspace", description=CLI_DESCRIPTION,
                       formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=30))
    g = p.add_argument_group("adapters from a run directory (lora.train)")
    g.add_argument("--runs", metavar="DIR",
                   help="run directory written by `python -m lora.train` (default: $LORA_RUNS_DIR or ./runs/default, "
                        "trained on demand if adapters are missing)")
    g.add_argument("--r1", type=int, metavar="R", help="rank of the first adapter (rows i; paper: 8)")
    g.add_argument("--r2", type=int, metavar="R", help="rank of the second adapter (columns j; paper: 64)")
    g.add_argument("--seed1", type=int, default=0, metavar="S", help="seed of the first adapter (default 0)")
    g.add_argument("--seed2", type=int, default=None, metavar="S",
                   help="seed of the second adapter (default: --seed1, i.e. a rank comparison as Figure 3; "
                        "give another seed with --r1 = --r2 for Figure 4)")
    g.add_argument("--weight-set", metavar="SET",
                   help="weight set of the run to use, e.g. q,v (default: q,v if present, as the paper)")
    g = p.add_argument_group("any two adapter directories")
    g.add_argument("--a1", metavar="DIR", help="first adapter directory (PEFT layout), or a loralib .pt with --alpha")
    g.add_argument("--a2", metavar="DIR", help="second adapter directory")
    g.add_argument("--alpha", type=float, metavar="A",
                   help="LoRA alpha of loralib checkpoint files (loralib does not store it; unused for adapter dirs)")
    g = p.add_argument_group("what to compute and write")
    g.add_argument("--modules", metavar="REGEX",
                   help="only module keys matching this regular expression (re.search), e.g. 'layer\\.3\\.' or "
                        "'query' (default: every module both adapters share)")
    g.add_argument("--side", choices=("A", "B"), default="A",
                   help="A: right singular vectors of A (the paper's default); B: left singular vectors of B "
                        "(footnote 7)")
    g.add_argument("--json", metavar="FILE",
                   help="write every grid as JSON (written atomically: a failed run leaves an existing file as it was)")
    g.add_argument("--plot", metavar="FILE", help="write heat maps of phi, one panel per module (.png, .pdf or .svg)")
    g.add_argument("--quiet", action="store_true", help="no progress bar or summary table")
    return p


def _cli_load(args):
    """The two adapters the options name, as (LoadedAdapter, LoadedAdapter)."""
    from lora.errors import UserError
    from lora_analysis import runs

    direct = args.a1 is not None or args.a2 is not None
    by_rank = args.r1 is not None or args.r2 is not None
    if direct and by_rank:
        raise UserError("--a1/--a2 compare two adapter directories; do not combine them with --r1/--r2")
    if direct:
        if args.a1 is None or args.a2 is None:
            raise UserError(f"{'--a2' if args.a2 is None else '--a1'}: missing; --a1 and --a2 go together")
        if args.runs is not None:
            raise UserError("--runs: not used with --a1/--a2 (give adapter directories directly)")
        return runs.load_any(args.a1, alpha=args.alpha), runs.load_any(args.a2, alpha=args.alpha)
    if args.r1 is None or args.r2 is None:
        raise UserError(f"{'--r1' if args.r1 is None else '--r2'}: missing; give --r1 R --r2 R (e.g. --r1 8 --r2 64) "
                        "or --a1 DIR --a2 DIR")
    for name in ("r1", "r2"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name}: rank must be >= 1, got {getattr(args, name)}")
    seed2 = args.seed1 if args.seed2 is None else args.seed2
    if args.runs is None:
        root = runs.ensure_default_run((args.r1, args.r2), (args.seed1, seed2), progress=not args.quiet)
    else:
        root = args.runs
    index = runs.index_run(root)
    return (runs.load_run_adapter(index, rank=args.r1, seed=args.seed1, weight_set=args.weight_set),
            runs.load_run_adapter(index, rank=args.r2, seed=seed2, weight_set=args.weight_set))


def _cli_keys(a1, a2, pattern: str | None) -> list[str]:
    import re

    from lora.errors import UserError

    shared = [k for k in a1.factors if k in a2.factors]
    if not shared:
        raise UserError(f"{a2.path}: shares no module with {a1.path} (first has {a1.module_keys[:2]}, "
                        f"second {a2.module_keys[:2]})")
    if pattern is None:
        return shared
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise UserError(f"--modules: invalid regular expression {pattern!r}: {exc}") from None
    keys = [k for k in shared if rx.search(k)]
    if not keys:
        raise UserError(f"--modules: {pattern!r} matches none of the {len(shared)} shared modules, e.g. {shared[0]}")
    return keys


def _cli_module(a1, a2, key: str, side: Side) -> dict:
    """φ grids and summary numbers for one module."""
    from lora.errors import UserError

    f1, f2 = a1.factors[key], a2.factors[key]
    if f1.A.shape[1] != f2.A.shape[1] or f1.B.shape[0] != f2.B.shape[0]:
        raise UserError(f"{a2.path}: module {key}: ΔW is ({f2.B.shape[0]}, {f2.A.shape[1]}) but "
                        f"({f1.B.shape[0]}, {f1.A.shape[1]}) in {a1.path}")
    learned = init = None
    if side == "A":
        phi = subspace_similarity(f1.A, f2.A, side="A")
        if a1.init_A and a2.init_A and key in a1.init_A and key in a2.init_A:
            try:
                ctl = init_control(f1.A, a1.init_A[key], f2.A, a2.init_A[key], side="A")
                learned, init = ctl.phi_learned, ctl.phi_init
            except ValueError:  # an untrained adapter (A == A_init): no learned subspace to compare
                pass
        d = int(f1.A.shape[1])
    else:
        for a, f in ((a1, f1), (a2, f2)):
            if not bool(f.B.abs().max() > 0):
                raise UserError(f"{a.path}: module {key}: lora_B is zero (untrained), so --side B has no subspace")
        phi = subspace_similarity(f1.B, f2.B, side="B")
        d = int(f1.B.shape[0])
    diag = phi_diagonal(phi)
    n = diag.numel()
    return {
        "phi": phi, "phi_learned": learned, "phi_init": init, "d": d, "r1": f1.rank, "r2": f2.rank,
        "phi_11": float(phi[0, 0]), "mean_diagonal": float(diag.mean()),
        "diagonal": {i: float(diag[i - 1]) for i in _DIAG_SHOWN if i <= n},
        "random_11": 1.0 / d, "random_mean_diagonal": float(torch.arange(1, n + 1, dtype=torch.float64).mean() / d),
        "learned_11": None if learned is None else float(learned[0, 0]),
    }


def _cli_summary(results: dict[str, dict], a1, a2, side: str) -> str:
    import pandas as pd

    from lora_analysis.runs import module_layer, weight_type

    rows = []
    for key, r in results.items():
        row = {"module": key, "type": weight_type(key), "layer": module_layer(key), "φ(1,1)": r["phi_11"]}
        if r["learned_11"] is not None:
            row["φ(1,1) A-A_init"] = r["learned_11"]
        row["mean φ(i,i)"] = r["mean_diagonal"]
        for i, v in r["diagonal"].items():
            if i > 1:
                row[f"φ({i},{i})"] = v
        row["random φ(1,1)"] = r["random_11"]
        row["random mean φ(i,i)"] = r["random_mean_diagonal"]
        rows.append(row)
    table = pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.3f}")
    head = (f"φ on {'A (right singular vectors)' if side == 'A' else 'B (left singular vectors)'}: "
            f"{a1.path} (r={a1.rank}, seed {a1.seed}) vs {a2.path} (r={a2.rank}, seed {a2.seed}); "
            f"random baseline E[φ(i,j)] = max(i,j)/d")
    return head + "\n" + table


def _grid_list(t: Tensor | None):
    return None if t is None else t.tolist()


def _cli_plot(results: dict[str, dict], path, *, title: str) -> None:
    """A minimal heat-map grid (one panel per module, at most 12), colour scale 0–1, saved atomically."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    from lora.fsio import atomic_path

    keys = list(results)[:12]
    ncols = min(4, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols + 1, 2.8 * nrows), squeeze=False,
                             layout="constrained")
    for ax, key in zip(axes.ravel(), keys, strict=False):
        phi = results[key]["phi"].numpy()
        grid = pd.DataFrame(phi, index=range(1, phi.shape[0] + 1), columns=range(1, phi.shape[1] + 1))  # 1-based i, j
        sns.heatmap(grid, ax=ax, vmin=0.0, vmax=1.0, cmap="viridis", cbar=False,
                    xticklabels=max(1, grid.shape[1] // 8), yticklabels=max(1, grid.shape[0] // 8))
        ax.set_title(key if len(key) < 40 else "…" + key[-39:], fontsize=8)
        ax.set_xlabel("j")
        ax.set_ylabel("i")
        ax.tick_params(axis="both", labelrotation=0)
    for ax in axes.ravel()[len(keys):]:
        ax.set_visible(False)
    fig.colorbar(plt.cm.ScalarMappable(norm=plt.Normalize(0, 1), cmap="viridis"), ax=axes.ravel().tolist(),
                 label="φ(i, j)")
    fig.suptitle(title, fontsize=9)
    fmt = str(path).rsplit(".", 1)[-1].lower()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=150)
    plt.close(fig)


def _check_out_path(option: str, path: str, suffixes: tuple[str, ...] | None = None) -> None:
    from pathlib import Path

    from lora.errors import UserError

    p = Path(path)
    if p.is_dir():
        raise UserError(f"{option} {path}: is a directory; expected a file name")
    if p.parent != Path("") and p.parent.exists() and not p.parent.is_dir():
        raise UserError(f"{option} {path}: parent {p.parent} is a file")
    if suffixes is not None and p.suffix.lower() not in suffixes:
        raise UserError(f"{option} {path}: unsupported format {p.suffix or '(none)'}; use one of {', '.join(suffixes)}")


def _main(argv=None) -> int:
    from lora.fsio import write_json
    from lora_analysis.tables import torch_threads

    args = build_parser().parse_args(argv)
    if args.json is not None:
        _check_out_path("--json", args.json)
    if args.plot is not None:
        _check_out_path("--plot", args.plot, (".png", ".pdf", ".svg"))
    a1, a2 = _cli_load(args)
    keys = _cli_keys(a1, a2, args.modules)
    with torch_threads(1):  # small matrices: one thread is fastest (see lora_analysis.tables.analyse_run)
        results = {k: _cli_module(a1, a2, k, args.side) for k in keys}
    if not args.quiet:
        print(_cli_summary(results, a1, a2, args.side))
    if args.json is not None:
        doc = {
            "metric": "phi(i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j); rows i = 1..r1, columns j = 1..r2",
            "side": args.side,
            "a1": str(a1.path), "a2": str(a2.path), "r1": a1.rank, "r2": a2.rank, "seed1": a1.seed, "seed2": a2.seed,
            "modules": {
                k: {"phi": _grid_list(r["phi"]), "phi_learned": _grid_list(r["phi_learned"]),
                    "phi_init": _grid_list(r["phi_init"]), "r1": r["r1"], "r2": r["r2"], "d": r["d"],
                    "phi_11": r["phi_11"], "mean_diagonal": r["mean_diagonal"],
                    "random_expected_11": r["random_11"], "random_expected_mean_diagonal": r["random_mean_diagonal"]}
                for k, r in results.items()
            },
        }
        write_json(args.json, doc)
    if args.plot is not None:
        _cli_plot(results, args.plot, title=f"φ on {args.side}: {a1.path} (r={a1.rank}) vs {a2.path} (r={a2.rank})")
    return 0


def main(argv=None) -> int:
    """Entry point of ``python -m lora_analysis.subspace``; bad input exits 2 with one line on stderr."""
    from lora.errors import run_cli

    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())

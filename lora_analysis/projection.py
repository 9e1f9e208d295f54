"""How ΔW relates to W: projections and the amplification factor (Hu et al., 2021, Section 7.3, Table 7).

Project ``W (d_out, d_in)`` onto an ``r``-dimensional pair of subspaces ``U (d_out, r)``, ``V (d_in, r)``::

    ‖Uᵀ W V‖_F

for three choices: the top-``r`` left/right singular vectors of ``ΔW`` (computed from the factors), those of
``W`` itself (which gives ``sqrt(σ_1² + … + σ_r²)`` of W), and a random orthonormal pair. The amplification
factor is ``‖ΔW‖_F / ‖Uᵀ W V‖_F`` with ``U, V`` from ``ΔW``: the paper reads 21.5 at r=4 on GPT-3's layer 48
as "ΔW amplifies directions W already has but does not emphasise".

All functions are pure: tensors in, floats or frozen dataclasses out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from lora_analysis.linalg import SVD, as_float64_matrix, top_singular, weight_and_delta_svd

__all__ = ["Table7Row", "projection_norm", "random_orthonormal", "table7_row"]


def projection_norm(W: Tensor, U: Tensor, V: Tensor) -> float:
    """``‖Uᵀ W V‖_F`` for ``W (d_out, d_in)``, ``U (d_out, k)``, ``V (d_in, k')`` (Table 7).

    Example: with ``U, V`` the top-``k`` singular vectors of ``W`` this is ``sqrt(σ_1² + … + σ_k²)``.
    """
    W = as_float64_matrix(W, name="W (d_out, d_in)")
    U = as_float64_matrix(U, name="U (d_out, k)")
    V = as_float64_matrix(V, name="V (d_in, k)")
    if U.shape[0] != W.shape[0] or V.shape[0] != W.shape[1]:
        raise ValueError(f"U {tuple(U.shape)} and V {tuple(V.shape)} do not fit W {tuple(W.shape)}: "
                         "need U (d_out, k) and V (d_in, k)")
    return _projection_norm(W, U, V)


def _projection_norm(W: Tensor, U: Tensor, V: Tensor) -> float:
    # Unchecked core of projection_norm, for callers that validated W once: the finiteness scan of a 4096²
    # W costs more than the projection itself (benchmarks/, section7_7b_shaped).
    return float(torch.linalg.matrix_norm(U.T @ (W @ V)))


def random_orthonormal(n: int, k: int, *, generator: torch.Generator) -> Tensor:
    """A uniformly random ``(n, k)`` orthonormal matrix (QR of a Gaussian, signs fixed so the law is Haar)."""
    if not 0 < k <= n:
        raise ValueError(f"k={k} must be in 1..n={n}")
    Q, R = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
    return Q * torch.where(torch.diagonal(R) < 0, -1.0, 1.0)


@dataclass(frozen=True)
class Table7Row:
    """One column group of Table 7 (one weight, one rank).

    Attributes:
        delta: ``‖Uᵀ W V‖_F`` with ``U, V`` the top-``rank`` singular vectors of ``ΔW`` (paper r=4: 0.32).
        weight: the same with ``W``'s own top-``rank`` singular vectors (paper: 21.67).
        random: the same with a random orthonormal pair (paper: 0.02).
        w_norm: ``‖W‖_F`` (paper: 61.95).
        dw_norm: ``‖ΔW‖_F`` including the scale ``s`` (paper: 6.91).
        amplification: ``dw_norm / delta`` (paper: 21.5); ``inf`` if ``delta == 0 < dw_norm``, ``nan`` if both are 0.
        rank: the subspace dimension used.
    """

    delta: float
    weight: float
    random: float
    w_norm: float
    dw_norm: float
    amplification: float
    rank: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def table7_row(
    W: Tensor,
    A: Tensor,
    B: Tensor,
    *,
    scaling: float,
    top: int | None = None,
    random_seed: int = 0,
    w_svd: SVD | None = None,
) -> Table7Row:
    """Table 7 for one adapted weight: project ``W`` on the subspaces of ``ΔW``, of ``W`` and of a random pair.

    Args:
        W: ``(d_out, d_in)`` frozen weight ``W0``.
        A: ``(r, d_in)``; B: ``(d_out, r)``; scaling: ``s`` (``‖ΔW‖_F`` includes it).
        top: subspace dimension ``k`` (default ``r``, as in the paper).
        random_seed: seed of the random orthonormal pair.
        w_svd: a precomputed SVD of ``W`` with at least ``k`` triplets (share one across ranks and seeds, e.g.
            ``WeightSVDCache``); computed here if omitted.

    Example:
        ``ΔW = α·u vᵀ`` with ``(u, σ, v)`` a singular triplet of ``W`` gives ``delta == σ`` and
        ``amplification == α / σ``.
    """
    W, dw = weight_and_delta_svd(W, A, B, scaling=scaling)
    k = dw.k if top is None else top
    if not 0 < k <= dw.k:
        raise ValueError(f"top={top} must be in 1..{dw.k} for A {tuple(A.shape)}, B {tuple(B.shape)}")
    ws = top_singular(W, k=k) if w_svd is None else w_svd.truncate(k)
    if ws.U.shape[0] != W.shape[0] or ws.V.shape[0] != W.shape[1]:
        raise ValueError(f"w_svd (U {tuple(ws.U.shape)}, V {tuple(ws.V.shape)}) is not an SVD of W {tuple(W.shape)}")
    g = torch.Generator().manual_seed(int(random_seed))
    U_rand = random_orthonormal(W.shape[0], k, generator=g)
    V_rand = random_orthonormal(W.shape[1], k, generator=g)

    delta = _projection_norm(W, dw.U[:, :k], dw.V[:, :k])
    dw_norm = float(torch.linalg.vector_norm(dw.S))  # ‖ΔW‖_F = ‖σ(ΔW)‖_2, exact from the factors
    if delta > 0:
        amplification = dw_norm / delta
    else:
        amplification = math.inf if dw_norm > 0 else math.nan
    return Table7Row(
        delta=delta,
        weight=float(torch.linalg.vector_norm(ws.S[:k])),  # == projection_norm(W, ws.U, ws.V)
        random=_projection_norm(W, U_rand, V_rand),
        w_norm=float(torch.linalg.matrix_norm(W)),
        dw_norm=dw_norm,
        amplification=amplification,
        rank=k,
    )


# ---------------------------------------------------------------------------------------------- command line
# `python -m lora_analysis.projection` (console script `lora-projection`). File reading goes through
# lora_analysis.runs; this section only parses options, calls table7_row (via lora_analysis.tables) and prints.

CLI_DESCRIPTION = """\
How the LoRA update dW relates to the frozen weight W (Hu et al., 2021, Section 7.3, Table 7), per module:

    delta  = ||U^T W V||_F with U, V the top-k left/right singular vectors of dW = s * B A   (paper r=4: 0.32)
    weight = the same with W's own top-k singular vectors                                     (paper: 21.67)
    random = the same with a random orthonormal k-dimensional pair                             (paper: 0.02)
    w_norm = ||W||_F, dw_norm = ||dW||_F including the scale s = alpha/r                       (paper: 61.95, 6.91)
    amplification = dw_norm / delta                                                           (paper: 21.5)

k is the adapter's rank unless --top is given. delta >> random but << weight: dW amplifies directions W
already has but does not emphasise. dW's singular vectors come from the factors (exact, never the dense dW).

The adapter is one directory (--adapter: ours or written by peft; a loralib .pt with --alpha and --base), or a
grid point of a run (--runs DIR --rank R [--seed S]). --rank without --runs uses the default run directory
($LORA_RUNS_DIR or ./runs/default), training the adapter first on the embedded default if it is missing. W comes
from the adapter's base_model_name_or_path (the embedded default id loads offline; a hub id needs a hub) or --base."""


def build_parser():
    """The ``python -m lora_analysis.projection`` options (argparse errors: one line, exit 2)."""
    import argparse

    from lora.errors import ArgumentParser

    p = ArgumentParser(prog="python -m lora_analysis.projection", description=CLI_DESCRIPTION,
                       formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=30))
    p.add_argument("--adapter", metavar="DIR", help="adapter directory (PEFT layout), or a loralib .pt with --alpha")
    p.add_argument("--runs", metavar="DIR", help="run directory written by `python -m lora.train` (with --rank)")
    p.add_argument("--rank", type=int, metavar="R", help="rank of the run's adapter to analyse (paper: 4 and 64)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the run's adapter (default 0)")
    p.add_argument("--weight-set", metavar="SET", help="weight set of the run, e.g. q,v (default: q,v if present)")
    p.add_argument("--base", metavar="PATH",
                   help="base model directory (or hub id) to read W from, instead of the adapter's "
                        "base_model_name_or_path (needed for loralib checkpoints, or a moved base)")
    p.add_argument("--alpha", type=float, metavar="A", help="LoRA alpha of a loralib checkpoint (loralib does not store it)")
    p.add_argument("--top", type=int, metavar="K",
                   help="subspace dimension k (default: the adapter's rank, as the paper)")
    p.add_argument("--modules", metavar="REGEX",
                   help="only module keys matching this regular expression (re.search) (default: all)")
    p.add_argument("--json", metavar="FILE",
                   help="write the table as JSON (atomically: a failed run leaves an existing file as it was); "
                        "an amplification that is undefined (delta = 0) is written as null")
    p.add_argument("--quiet", action="store_true", help="no progress bar or printed table")
    return p


def _cli_adapter(args):
    from lora.errors import UserError
    from lora_analysis import runs

    if args.adapter is not None:
        for opt, val in (("--runs", args.runs), ("--rank", args.rank), ("--weight-set", args.weight_set)):
            if val is not None:
                raise UserError(f"{opt}: not used with --adapter (give either --adapter DIR or --runs DIR --rank R)")
        return runs.load_any(args.adapter, alpha=args.alpha, base_model=args.base)
    if args.rank is None:
        raise UserError("--rank: missing; give --adapter DIR, or --rank R (with --runs DIR, or the default run)")
    if args.rank < 1:
        raise UserError(f"--rank: must be >= 1, got {args.rank}")
    if args.runs is None:
        root = runs.ensure_default_run((args.rank,), (args.seed,), progress=not args.quiet)
    else:
        root = args.runs
    return runs.load_run_adapter(root, rank=args.rank, seed=args.seed, weight_set=args.weight_set)


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _main(argv=None) -> int:
    import re
    from pathlib import Path

    from lora.errors import UserError
    from lora.fsio import write_json
    from lora_analysis.runs import BaseWeights
    from lora_analysis.tables import table7_table, torch_threads

    args = build_parser().parse_args(argv)
    if args.json is not None and Path(args.json).is_dir():
        raise UserError(f"--json {args.json}: is a directory; expected a file name")
    if args.top is not None and args.top < 1:
        raise UserError(f"--top: must be >= 1, got {args.top}")
    adapter = _cli_adapter(args)
    keys = adapter.module_keys
    if args.modules is not None:
        try:
            keys = adapter.select(args.modules)
        except re.error as exc:
            raise UserError(f"--modules: invalid regular expression {args.modules!r}: {exc}") from None
        if not keys:
            raise UserError(f"--modules: {args.modules!r} matches none of the {len(adapter.factors)} modules of "
                            f"{adapter.path}, e.g. {adapter.module_keys[0]}")
    with torch_threads(1):  # small matrices: one thread is fastest (see lora_analysis.tables.analyse_run)
        table = table7_table(adapter, BaseWeights(args.base), keys=keys, top=args.top)
    if not args.quiet:
        shown = table.drop(columns=["seed"]).rename(columns={"weight_type": "type"})
        print(f"Table 7 for {adapter.path} (r={adapter.rank}, seed {adapter.seed}): ||U^T W V||_F for the top-k "
              f"subspaces of dW (delta), of W (weight) and random; amplification = dw_norm / delta")
        print(shown.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    if args.json is not None:
        doc = {
            "metric": "||U^T W V||_F for the top-k singular subspaces of dW (delta), W (weight) and a random pair",
            "adapter": str(adapter.path), "rank": adapter.rank, "seed": adapter.seed,
            "base": str(args.base) if args.base is not None else adapter.base_model,
            "modules": {
                row.module: {"delta": row.delta, "weight": row.weight, "random": row.random, "w_norm": row.w_norm,
                             "dw_norm": row.dw_norm, "amplification": _finite_or_none(row.amplification),
                             "top": int(row.top), "rank": int(row.rank), "weight_type": row.weight_type,
                             "layer": int(row.layer)}
                for row in table.itertuples(index=False)
            },
        }
        write_json(args.json, doc)
    return 0


def main(argv=None) -> int:
    """Entry point of ``python -m lora_analysis.projection``; bad input exits 2 with one line on stderr."""
    from lora.errors import run_cli

    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m lora_analysis.subspace``: φ between two LoRA adapters (Section 7.2, Figures 3 and 4).

A thin command: it parses options, makes sure the adapters exist (training missing ones of the default run with
:func:`lora.train.ensure_adapters`), loads them (:mod:`lora_analysis.load`), computes the grids
(:func:`lora_analysis.tables.build.module_phi_grids`) and prints / writes them. The maths is in
:mod:`lora_analysis.metrics.subspace`.
"""

from __future__ import annotations

import sys

import torch

from lora import rundir
from lora.adapter_io import ENABLE_LORA_HELP
from lora.errors import UserError
from lora.fsio import write_json
from lora.threads import torch_threads
from lora_analysis.cli import check_output_file, entry_point, new_parser, select_modules
from lora_analysis.load import adapters
from lora_analysis.load.adapters import module_layer, weight_type
from lora_analysis.metrics.subspace import phi_diagonal
from lora_analysis.tables.build import module_phi_grids

__all__ = ["build_parser", "main"]

PLOT_PANELS = 48  # heat maps in one --plot figure; beyond that a figure stops being readable
_DIAG_SHOWN = (1, 2, 4, 8, 16, 32, 64)

CLI_DESCRIPTION = f"""\
Normalized subspace similarity between two LoRA adapters (Hu et al., 2021, Section 7.2, Figures 3 and 4):

    phi(A1, A2, i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j)    in [0, 1]

where U1, U2 are the right singular vectors of the two A matrices (--side B: left singular vectors of B,
footnote 7), ordered by singular value. 1 means one top-subspace contains the other, 0 means orthogonal; two
random subspaces of dimension d give max(i, j) / d on average (the baseline printed beside each module).
Figure 3 compares r=8 with r=64 at one seed; Figure 4 compares two seeds at r=64.

Compare two adapters of a run directory by rank and seed (--r1/--r2, --seed1/--seed2), or any two adapter
directories (--a1/--a2: ours or written by peft, PARENT/NAME for one of peft's named adapters; or a loralib .pt
checkpoint, with --enable-lora where its shapes do not tell the c_attn slices). A folder of named adapters is
also a run: --runs PARENT. With no --runs and no
--a1/--a2 the default run directory is used (${rundir.RUNS_ENV} or ./{rundir.DEFAULT_RUN_DIR}); adapters it lacks are trained
first (lora.train.ensure_adapters) on the embedded default (real all-MiniLM-L6-v2 on chatterbot-corpus text, offline), so
`python -m lora_analysis.subspace --r1 8 --r2 64` works on a fresh install.

When both adapters carry init.safetensors (A at step 0, written by lora.train), phi is also computed on the
learned change A - A_init and between the two starting points A_init: with nested initialisation, A_8 starts
as the first 8 rows of A_64, which alone makes phi high."""


def build_parser():
    """The ``python -m lora_analysis.subspace`` options (argparse errors: one line, exit 2)."""
    p = new_parser("python -m lora_analysis.subspace", CLI_DESCRIPTION)
    g = p.add_argument_group("adapters from a run directory (lora.train)")
    g.add_argument("--runs", metavar="DIR",
                   help=f"run directory written by `python -m lora.train` (default: ${rundir.RUNS_ENV} or "
                        f"./{rundir.DEFAULT_RUN_DIR}, trained on demand if adapters are missing)")
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
                   help="LoRA alpha of loralib checkpoint files (loralib does not store it; φ does not depend on it, so "
                        "it may be omitted)")
    g.add_argument("--enable-lora", metavar="SLICES", help=ENABLE_LORA_HELP)
    g = p.add_argument_group("what to compute and write")
    g.add_argument("--modules", metavar="REGEX",
                   help="only module keys matching this regular expression (re.search), e.g. 'layer\\.3\\.' or "
                        "'query' (default: every module both adapters share)")
    g.add_argument("--side", choices=("A", "B"), default="A",
                   help="A: right singular vectors of A (the paper's default); B: left singular vectors of B "
                        "(footnote 7)")
    g.add_argument("--json", metavar="FILE",
                   help="write every grid as JSON (written atomically: a failed run leaves an existing file as it was)")
    g.add_argument("--plot", metavar="FILE", help=f"write heat maps of phi, one panel per module, up to {PLOT_PANELS} (the rest are named on "
                        "stderr; narrow with --modules) (.png, .pdf or .svg)")
    g.add_argument("--quiet", action="store_true", help="no progress bar or summary table")
    return p


def _load(args):
    """The two adapters the options name, as (LoadedAdapter, LoadedAdapter)."""
    direct = args.a1 is not None or args.a2 is not None
    by_rank = args.r1 is not None or args.r2 is not None
    if direct and by_rank:
        raise UserError("--a1/--a2 compare two adapter directories; do not combine them with --r1/--r2")
    if direct:
        if args.a1 is None or args.a2 is None:
            raise UserError(f"{'--a2' if args.a2 is None else '--a1'}: missing; --a1 and --a2 go together")
        if args.runs is not None:
            raise UserError("--runs: not used with --a1/--a2 (give adapter directories directly)")
        alpha = 1.0 if args.alpha is None else args.alpha  # φ (on A or on B) does not depend on alpha
        return tuple(adapters.load_any(a, alpha=alpha, enable_lora=args.enable_lora) for a in (args.a1, args.a2))
    if args.enable_lora is not None:
        raise UserError("--enable-lora: only for loralib .pt checkpoints given with --a1/--a2")
    if args.r1 is None or args.r2 is None:
        raise UserError(f"{'--r1' if args.r1 is None else '--r2'}: missing; give --r1 R --r2 R (e.g. --r1 8 --r2 64) "
                        "or --a1 DIR --a2 DIR")
    for name in ("r1", "r2"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name}: rank must be >= 1, got {getattr(args, name)}")
    seed2 = args.seed1 if args.seed2 is None else args.seed2
    if args.runs is None:
        from lora.train import ensure_adapters

        root = ensure_adapters(rundir.default_run_dir(), (args.r1, args.r2), (args.seed1, seed2),
                               progress=not args.quiet)
    else:
        root = args.runs
    index = adapters.index_run(root)
    return (adapters.load_run_adapter(index, rank=args.r1, seed=args.seed1, weight_set=args.weight_set),
            adapters.load_run_adapter(index, rank=args.r2, seed=seed2, weight_set=args.weight_set))


def _module(a1, a2, key: str, side: str) -> dict:
    """φ grids and summary numbers for one module."""
    if side == "A":
        grids = module_phi_grids(a1, a2, key, quantities=("A", "A-A_init", "A_init"))
        phi, d = grids["A"], int(a1.factors[key].A.shape[1])
    else:
        for a in (a1, a2):
            if not bool(a.factors[key].B.abs().max() > 0):
                raise UserError(f"{a.path}: module {key}: lora_B is zero (untrained), so --side B has no subspace")
        grids = module_phi_grids(a1, a2, key, quantities=("B",))
        phi, d = grids["B"], int(a1.factors[key].B.shape[0])
    learned, init = grids.get("A-A_init"), grids.get("A_init")
    diag = phi_diagonal(phi)
    n = diag.numel()
    return {
        "phi": phi, "phi_learned": learned, "phi_init": init, "d": d, "r1": a1.factors[key].rank,
        "r2": a2.factors[key].rank, "phi_11": float(phi[0, 0]), "mean_diagonal": float(diag.mean()),
        "diagonal": {i: float(diag[i - 1]) for i in _DIAG_SHOWN if i <= n},
        "random_11": 1.0 / d, "random_mean_diagonal": float(torch.arange(1, n + 1, dtype=torch.float64).mean() / d),
        "learned_11": None if learned is None else float(learned[0, 0]),
    }


def _summary(results: dict[str, dict], a1, a2, side: str) -> str:
    import pandas as pd

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


def _grid_list(t):
    return None if t is None else t.tolist()


def _run(argv=None) -> int:
    """φ between two adapters"""
    args = build_parser().parse_args(argv)
    if args.json is not None:
        check_output_file("--json", args.json)
    if args.plot is not None:
        check_output_file("--plot", args.plot, (".png", ".pdf", ".svg"))
    a1, a2 = _load(args)
    shared = [k for k in a1.factors if k in a2.factors]
    if not shared:
        raise UserError(f"{a2.path}: shares no module with {a1.path} (first has {a1.module_keys[:2]}, "
                        f"second {a2.module_keys[:2]})")
    keys = select_modules(shared, args.modules, where=f"both adapters ({a1.path}, {a2.path})")
    with torch_threads(1):  # small matrices: one thread is fastest
        results = {k: _module(a1, a2, k, args.side) for k in keys}
    if not args.quiet:
        print(_summary(results, a1, a2, args.side))
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
        from lora_analysis.render.figures import phi_panels, save_figure_as

        shown = list(results)[:PLOT_PANELS]
        left = list(results)[PLOT_PANELS:]
        if left:
            print(f"--plot: drew the first {PLOT_PANELS} of {len(results)} modules; left out: {', '.join(left)} "
                  "(choose with --modules)", file=sys.stderr)
        fig = phi_panels({k: results[k]["phi"] for k in shown},
                         title=f"φ on {args.side}: {a1.path} (r={a1.rank}) vs {a2.path} (r={a2.rank})")
        save_figure_as(fig, args.plot)
    return 0


main = entry_point(_run)

if __name__ == "__main__":
    raise SystemExit(main())

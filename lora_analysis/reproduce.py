"""The main job: train (or resume) the Section 7 grid, analyse it, draw every figure, write REPORT.md.

``python -m lora_analysis.reproduce`` (console script ``lora-reproduce``) runs four stages:

1. **Train or resume** with :func:`lora.train.run_sweep` (finished grid points are skipped):
   - ``<runs>``: ranks 1 2 4 8 64 × seeds 0 1 2 on {W_q, W_v} (Table 6, Figures 3, 4, 6–8, Table 7), each adapter
     with snapshots at steps 0 25 50 100 200, and one full fine-tuning of {W_q, W_v} per seed (``qv_full_s<seed>``);
   - ``<runs>/table5``: the Table 5 weight sets {q} {k} {v} {o} {q,k} {q,v} {q,k,v,o} at one budget of LoRA
     parameters, the {W_q} r = 8 budget (so r = 8, 4, 2 for one, two, four weight types, as the paper).
2. **Validate** the metrics against a planted ground truth: the quick planted-rank validation
   (:mod:`lora_analysis.groundtruth.planted`).
3. **Which rank?** Each seed's largest-rank adapter resized to every smaller rank of the sweep (all modules, and
   one weight type at a time), and LoRA extracted at every rank from each seed's full fine-tuning, evaluated on
   the task's validation set (:func:`lora_analysis.tables.which_rank.evaluate`; cached in
   ``<runs>/analysis/which_rank.csv``, so a rerun evaluates nothing new). Only this command has the task and the
   model for it; ``python -m lora_analysis.figures`` reads the cache, or says the section was not measured.
4. **Analyse, judge, render** through the pipeline (:func:`lora_analysis.pipeline.analyse_and_render`): every
   table, every verdict, every figure into ``<out>``, the tidy tables into ``<out>/tables``, ``<out>/REPORT.md``
   and ``<out>/report.json``.

``--quick`` is a smoke test of the same pipeline on a tiny grid (ranks 2 4, seeds 0 1, a few steps with
snapshots at 0 1 3, full fine-tuning per seed, no validation) into ``runs/quick`` and ``figures/quick`` unless
``--runs`` / ``--out`` say otherwise, so it never
mixes with the real run.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lora import rundir
from lora.errors import UserError
from lora.threads import THREADS_PER_PROCESS, default_workers, torch_threads
from lora_analysis.cli import check_output_dir, entry_point, new_parser

__all__ = ["GridPlan", "default_plan", "main", "quick_plan", "reproduce", "train_grid"]

TABLE5_RANK_ONE_TYPE = 8  # Table 5: one weight type at r = 8 sets the budget (two at r = 4, four at r = 2)


@dataclass(frozen=True)
class GridPlan:
    """What to train.

    Attributes:
        sweep: :class:`lora.config.TrainConfig` fields of the rank sweep (weight set q,v).
        table5: fields of the Table 5 budget run (``budget`` is filled in from the model), or ``None`` to skip.
        table5_rank: the rank of a one-weight-type set at the budget (paper: 8).
        validation: run the quick planted-rank validation.
    """

    sweep: dict
    table5: dict | None
    table5_rank: int = TABLE5_RANK_ONE_TYPE
    validation: bool = True


def default_plan() -> GridPlan:
    """The paper's Section 7 grid on the embedded default (trainer defaults: MiniLM, chatterbot, 200 steps)."""
    from lora.config import TABLE5_SETS

    return GridPlan(sweep={"targets": ("q,v",), "ranks": (1, 2, 4, 8, 64), "seeds": (0, 1, 2),
                           "snapshot_steps": DEFAULT_SNAPSHOTS, "method": ("lora", "full")},
                    table5={"targets": TABLE5_SETS, "seeds": (0, 1, 2)})


# Training snapshots of the rank sweep: the start, early, mid and the last of the default 200 steps (disk, not time)
DEFAULT_SNAPSHOTS = (0, 25, 50, 100, 200)
QUICK_SETTINGS = {"steps": 3, "batch_size": 8, "max_length": 16, "linear_probe": False}


def quick_plan() -> GridPlan:
    """A tiny grid for tests and CI: every stage runs, nothing is meant to be accurate (seconds per point)."""
    return GridPlan(
        sweep={"targets": ("q,v",), "ranks": (2, 4), "seeds": (0, 1), **QUICK_SETTINGS, "snapshot_steps": (0, 1, 3),
               "method": ("lora", "full")},
        table5={"targets": ("q", "v", "q,v"), "seeds": (0,), **QUICK_SETTINGS},
        table5_rank=4,
        validation=False,
    )


def _budget(cfg, rank_one_type: int) -> int:
    """LoRA parameters of {W_q} at ``rank_one_type``: the Table 5 budget (``lora.train`` picks the other ranks)."""
    from lora import train

    template = train.prepare(cfg).template
    return rank_one_type * train.lora_params_per_rank(template, "q", layers=cfg.layers)


def train_grid(plan: GridPlan, runs: Path, *, progress: bool = True, workers: int | None = None,
               threads: int = THREADS_PER_PROCESS) -> list[Path]:
    """Train (or resume) the sweep into ``runs`` and the Table 5 run into ``runs/table5``; returns the run dirs.

    ``workers`` processes (default: the cores available) train independent grid points in parallel, ``threads``
    torch threads each (default 1: the layout the committed adapters are bitwise reproducible for).
    """
    with torch_threads(threads):
        return _train_grid(plan, runs, progress=progress, workers=workers or default_workers())


def _train_grid(plan: GridPlan, runs: Path, *, progress: bool, workers: int) -> list[Path]:
    from lora import train
    from lora.config import TrainConfig

    sweep = TrainConfig.from_dict(plan.sweep, source="reproduce sweep")
    train.run_sweep(sweep, runs, progress=progress, workers=workers)  # first: its run dir must exist before table5/
    dirs = [runs]
    if plan.table5 is not None:
        budget = _budget(sweep, plan.table5_rank)
        t5 = TrainConfig.from_dict({**plan.table5, "budget": budget}, source="reproduce table5")
        # reuse: Table 5's {q, v} point is the sweep's qv_r4 training (same rank, alpha, seeds): copied, not retrained
        train.run_sweep(t5, runs / rundir.TABLE5_SUBDIR, progress=progress, workers=workers, reuse=[runs])
        dirs.append(runs / rundir.TABLE5_SUBDIR)
    return dirs


def _validation(out: Path, *, quiet: bool) -> str:
    """Quick planted-rank validation: its text summary (also written to ``<out>/planted_rank.txt``)."""
    from lora.fsio import write_json, write_text
    from lora_analysis.groundtruth import planted

    cfg = dataclasses.replace(planted.LayerConfig(), **planted.QUICK_LAYER)
    res = planted.validate_layer(cfg, quiet=quiet)
    text = planted.format_layer(res)
    write_text(out / "planted_rank.txt", text + "\n")
    write_json(out / "planted_rank.json", planted.jsonable(res))
    return text


def reproduce(plan: GridPlan, runs: str | os.PathLike, out: str | os.PathLike, *, quiet: bool = False,
              train: bool = True, workers: int | None = None, threads: int = THREADS_PER_PROCESS,
              timings: dict[str, float] | None = None) -> list[Path]:
    """Train or resume ``plan`` into ``runs``, analyse, render into ``out`` and write ``out/REPORT.md``.

    Args:
        timings: if given, filled with the wall seconds of each stage (``train_s``, ``validation_s``,
            ``which_rank_s``, ``analysis_s``), the which-rank evaluations done (``which_rank_evaluated``; the
            others came from the cache) and the layout (``workers``, ``threads``), as ``benchmarks`` records the
            main job.

    Returns:
        The files written into ``out``.
    """
    import time

    from tqdm import tqdm  # plain text bars: tqdm.auto warns without ipywidgets in a notebook

    from lora_analysis.load.run import check_run_dir
    from lora_analysis.pipeline import analyse_and_render
    from lora_analysis.tables import which_rank

    runs, out = Path(runs), Path(out)
    if runs.exists() and not runs.is_dir():
        raise UserError(f"--runs {runs}: is a file, expected a run directory")
    check_output_dir("--out", out)
    clock = {} if timings is None else timings
    clock.update(workers=workers or default_workers(), threads=threads)
    stages = tqdm(total=4, desc="reproduce", disable=quiet, unit="stage", position=0)
    t0 = time.perf_counter()
    if train:
        stages.set_postfix_str("train")
        train_grid(plan, runs, progress=not quiet, workers=workers, threads=threads)
    check_run_dir(runs, option="--runs")
    stages.update(1)
    t1 = time.perf_counter()
    validation = None
    if plan.validation:
        stages.set_postfix_str("planted-rank validation")
        out.mkdir(parents=True, exist_ok=True)
        validation = _validation(out, quiet=quiet)
    stages.update(1)
    t2 = time.perf_counter()
    stages.set_postfix_str("which rank: resize, extract, evaluate")
    _, cost = which_rank.evaluate(runs, progress=not quiet)
    stages.update(1)
    t3 = time.perf_counter()
    stages.set_postfix_str("analyse, render, report")
    written = analyse_and_render(runs, out, quiet=quiet, validation=validation)
    stages.update(1)
    stages.close()
    clock.update(train_s=t1 - t0, validation_s=t2 - t1, which_rank_s=t3 - t2, which_rank_evaluated=cost["evaluated"],
                 analysis_s=time.perf_counter() - t3)
    return written


def _run(argv: Sequence[str] | None = None) -> int:
    """the main job"""
    parser = new_parser(
        "python -m lora_analysis.reproduce",
        "Reproduce Section 7 of the LoRA paper end to end: train or resume the default grid (ranks "
                    "1 2 4 8 64 x seeds 0 1 2 on q,v with snapshots at steps 0 25 50 100 200, one full fine-tuning "
                    "of q,v per seed, plus the Table 5 weight sets at one parameter budget), "
                    "analyse every adapter, render every figure and write REPORT.md. Rerunning resumes: finished "
                    "adapters are skipped.",
    )
    parser.add_argument("--runs", default=None, metavar="DIR",
                        help=f"run directory (default: ${rundir.RUNS_ENV} or {rundir.DEFAULT_RUN_DIR}; with --quick "
                             f"{rundir.QUICK_RUN_DIR}, so a smoke test never mixes with the real run); the Table 5 "
                             f"run goes to DIR/{rundir.TABLE5_SUBDIR}")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="figures, tables and REPORT.md (default: figures, the folder the README links to; "
                             "with --quick figures/quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny grid (ranks 2 4, seeds 0 1, 3 steps, snapshots 0 1 3, full fine-tuning; Table 5 "
                             "with q, v, q,v; no validation): "
                             "a smoke test of every stage in minutes, not a result")
    parser.add_argument("--no-train", action="store_true",
                        help="do not train; analyse whatever the run directory already holds")
    parser.add_argument("--no-validation", action="store_true",
                        help="skip the planted-rank validation (about a minute on 2 cores)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="processes training grid points in parallel (default: the cores this process may use)")
    parser.add_argument("--threads", type=int, default=THREADS_PER_PROCESS, metavar="N",
                        help="torch threads per process (default: %(default)s; the committed adapters are bitwise "
                             "reproducible for this, whatever --workers)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for opt in ("workers", "threads"):
        if getattr(args, opt) is not None and getattr(args, opt) < 1:
            raise UserError(f"--{opt}: must be >= 1, got {getattr(args, opt)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the default run is fully offline
    plan = quick_plan() if args.quick else default_plan()
    if args.no_validation:
        plan = dataclasses.replace(plan, validation=False)
    runs = Path(args.runs) if args.runs else (rundir.QUICK_RUN_DIR if args.quick else rundir.default_run_dir())
    out = Path(args.out or ("figures/quick" if args.quick else "figures"))
    written = reproduce(plan, runs, out, quiet=args.quiet, train=not args.no_train, workers=args.workers,
                        threads=args.threads)
    if not args.quiet:
        print(f"wrote {len(written)} files; report: {out / 'REPORT.md'}")
    return 0


main = entry_point(_run)

if __name__ == "__main__":
    raise SystemExit(main())

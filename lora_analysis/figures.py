"""``python -m lora_analysis.figures``: re-render every Section 7 figure, table, REPORT.md and report.json from an
existing run, without training.

A thin command: parse, open the run once (:class:`lora_analysis.load.run.Run`), call the pipeline
(:func:`lora_analysis.pipeline.analyse_and_render`: analyse -> judge -> render), print. Any folder of PEFT
adapters works; claims that need training metrics say "not measured".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lora import rundir
from lora_analysis.cli import check_output_dir, entry_point, new_parser
from lora_analysis.load.run import Run, check_run_dir
from lora_analysis.pipeline import analyse_and_render

__all__ = ["analyse_and_render", "build_parser", "main"]


def build_parser():
    p = new_parser(
        "python -m lora_analysis.figures",
        "Re-render every Section 7 figure, the tables, REPORT.md and report.json from an existing run, without\n"
        "training: analyse the run's adapters (tables CSV), draw the figures, judge each claim, write the report.\n"
        "Works on any folder of PEFT adapter directories too.",
    )
    p.add_argument("--runs", default=None, metavar="DIR",
                   help=f"run directory written by lora.train, or any folder of adapter directories (default: "
                        f"${rundir.RUNS_ENV} or {rundir.DEFAULT_RUN_DIR}, the reproduce run)")
    p.add_argument("--out", default="figures", metavar="DIR",
                   help="output folder for figures, tables, REPORT.md and report.json (default: %(default)s, the "
                        "folder the README links to)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _run(argv: Sequence[str] | None = None) -> int:
    """re-render figures and the report"""
    import matplotlib.pyplot as plt

    args = build_parser().parse_args(argv)
    plt.switch_backend("Agg")  # the command only writes files
    run_dir = Path(args.runs) if args.runs is not None else rundir.default_run_dir()
    check_run_dir(run_dir, option="--runs")
    out = check_output_dir("--out", args.out)
    run = Run.open(run_dir, option="--runs")
    if not args.quiet and run.manifest is None:  # adapters from elsewhere: say which were found
        entries = run.index.entries
        print(f"{run_dir}: {len(entries)} adapter(s): "
              + ", ".join(f"{e.path.relative_to(run_dir) if e.path != run_dir else '.'} ({e.weight_set}, r={e.rank})"
                          for e in entries))
    written = analyse_and_render(run, out, quiet=args.quiet)
    if not args.quiet:
        print(f"wrote {len(written)} files into {args.out}")
    return 0


main = entry_point(_run)

if __name__ == "__main__":
    raise SystemExit(main())

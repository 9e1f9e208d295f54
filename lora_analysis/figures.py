"""``python -m lora_analysis.figures``: re-render every Section 7 figure, table, REPORT.md and report.json from an
existing run, without training.

The pipeline, one way: run directory -> :func:`lora_analysis.tables.cache.load_tables` (load + metrics -> tidy
tables) -> ``<out>/tables/*.csv`` -> :func:`lora_analysis.render.figures.render_all` -> the claims
(:mod:`lora_analysis.verdicts`) -> ``<out>/REPORT.md`` (:mod:`lora_analysis.render.report_md`) and
``<out>/report.json``. Any folder of PEFT adapters works; claims that need training metrics say "not measured".
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from lora import rundir
from lora.fsio import remove_stale_temps
from lora_analysis.cli import check_output_dir, entry_point, new_parser
from lora_analysis.tables.beyond import load_beyond
from lora_analysis.tables.build import write_tables
from lora_analysis.tables.cache import check_run_dir, load_tables, write_cache

__all__ = ["analyse_and_render", "build_parser", "main"]


def analyse_and_render(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, quiet: bool = True,
                       validation: str | None = None) -> list[Path]:
    """Run dir -> tables (``<out>/tables/*.csv``) -> figures and tables (``<out>/``) -> REPORT.md, report.json.

    The run's analysis cache (for notebooks) is refreshed where the run directory is writable; a read-only run
    is only read.
    """
    from lora_analysis.render.figures import render_all
    from lora_analysis.render.report_md import setup_from_run, write_report

    rundir.verify_run(run_dir).raise_or_note()  # a damaged run is refused, a partial one said so (lora.rundir)
    out = check_output_dir("--out", out_dir)
    for folder in (out, out / "tables"):  # what a killed render left (a live writer's temporaries are locked, kept)
        if folder.is_dir():
            remove_stale_temps(folder)
    tables = load_tables(run_dir, progress=not quiet)
    if rundir.read_manifest(run_dir) is not None:
        write_cache(Path(run_dir), tables)  # notebooks on this run then load instantly
    beyond = load_beyond(run_dir, progress=not quiet)  # snapshots and full fine-tuning, where the run has them
    tables = {**tables, **beyond.tables()}
    written = write_tables(tables, out / "tables")
    written += render_all(tables, out, quiet=quiet)
    written += write_report(tables, out, setup=setup_from_run(run_dir), validation=validation, beyond=beyond)
    return written


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
    check_output_dir("--out", args.out)
    if not args.quiet and rundir.read_manifest(run_dir) is None:  # adapters from elsewhere: say which were found
        from lora_analysis.load.adapters import index_run

        entries = index_run(run_dir).entries
        print(f"{run_dir}: {len(entries)} adapter(s): "
              + ", ".join(f"{e.path.relative_to(run_dir) if e.path != run_dir else '.'} ({e.weight_set}, r={e.rank})"
                          for e in entries))
    written = analyse_and_render(run_dir, Path(args.out), quiet=args.quiet)
    if not args.quiet:
        print(f"wrote {len(written)} files into {args.out}")
    return 0


main = entry_point(_run)

if __name__ == "__main__":
    raise SystemExit(main())

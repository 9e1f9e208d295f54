"""The spine of the analysis: one run in, every table, verdict, figure and report out, in three steps.

::

    run = Run.open(run_dir)                      # load: manifest, adapter configs, one base-weight source
    analysis = analyse(run)                      # tables: Section 7, then the snapshots and full fine-tuning
    judgement = judge(analysis)                  # verdicts: every registered claim, section by section
    render(analysis, judgement, out)             # figures, tables/*.csv, REPORT.md, report.json

:func:`analyse_and_render` is those four lines (and refreshes the notebooks' cache). Each step reads only what the previous one returned:
:func:`analyse` is the last to touch the run directory or the base model, :func:`judge` is pure, and
:func:`render` writes into ``out`` only. The commands (``figures``, ``reproduce``) parse their options, call
these and print; snapshots and full fine-tuning are sections the steps add where the run has them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from lora.fsio import remove_stale_temps
from lora.threads import process_group, torch_threads
from lora_analysis.load.run import Run
from lora_analysis.tables.analysis import Analysis
from lora_analysis.tables.build import analyse_run, write_tables
from lora_analysis.tables.cache import read_cache, write_cache
from lora_analysis.tables.dynamics import dynamics_table, snapshot_tables
from lora_analysis.tables.full_finetune import full_finetune_tables
from lora_analysis.tables.which_rank import which_rank_tables
from lora_analysis.verdicts.judgement import Judgement, judge_analysis
from lora_analysis.verdicts.rank_advice import rank_advice, write_rank_advice

COMMITTED_GZIPPED = ("phi", "fig8")  # tens of MB as CSV: committed gzipped, so every verdict can be recomputed

__all__ = ["Analysis", "Judgement", "analyse", "analyse_and_render", "judge", "render"]


def analyse(run: Run, *, progress: bool = False, cache: bool = False, threads: int | None = 1,
            fig8_layers: str | Sequence[int] = "auto") -> Analysis:
    """Every table of ``run``: Section 7 (:func:`~lora_analysis.tables.build.analyse_run`), then, where the run
    has them, the tables of each training snapshot and the tidy ``dynamics`` table, and the full fine-tuning
    tables. W0 and its SVD come from the run's one base-weight source, so each W is read and decomposed once for
    every table that needs it.

    Args:
        cache: read the run's analysis cache (``<run>/analysis``) when it matches the run, else compute and store
            it there (notebooks); a read-only run is only read.
        threads: torch threads while computing (default 1, see :func:`~lora_analysis.tables.build.analyse_run`;
            ``None`` keeps torch's setting).
        fig8_layers: the layers that get Figure 8 (:func:`~lora_analysis.tables.build.fig8_layers_for`).
    """
    if cache:
        cached = read_cache(run)
        if cached is not None:
            return cached
    with torch_threads(threads):  # one setting for every table: the numbers do not depend on the machine's cores
        tables = analyse_run(run, progress=progress, threads=None, fig8_layers=fig8_layers)
        per_step = snapshot_tables(run, progress=progress)
        full = full_finetune_tables(run, progress=progress)
    dynamics = dynamics_table(per_step)
    if len(dynamics):
        tables["dynamics"] = dynamics
    tables.update({name: t for name, t in full.items() if len(t)})
    # "Which rank?": the evaluations reproduce cached in the run (read here, never computed), the seeds' overlap
    # and the spectral answers
    tables.update(which_rank_tables(run.root))
    analysis = Analysis(tables, per_step, run.setup())
    if cache:
        write_cache(run, analysis)
    return analysis


def judge(analysis: Analysis) -> Judgement:
    """Every verdict on ``analysis``: the Section 7 claims, their trajectory over the training snapshots and
    LoRA against full fine-tuning (:mod:`lora_analysis.verdicts.registry` declares them)."""
    return judge_analysis(analysis)


def render(analysis: Analysis, judgement: Judgement, out_dir: str | os.PathLike, *, validation: str | None = None,
           quiet: bool = True, gzipped: tuple[str, ...] = COMMITTED_GZIPPED) -> list[Path]:
    """Write ``<out>/tables/*.csv`` (and gzipped copies of ``gzipped``), every figure and table (``<out>/``), then
    REPORT.md and report.json, which link the figures written before them. Returns the files written."""
    from lora_analysis.render.figures import render_all
    from lora_analysis.render.report_md import write_report
    from lora_analysis.render.which_rank import write_which_rank

    out = Path(out_dir)
    for folder in (out, out / "tables"):  # what a killed render left (a live writer's temporaries are locked, kept)
        if folder.is_dir():
            remove_stale_temps(folder)
    written = write_tables(analysis.tables, out / "tables", gzipped=gzipped)
    written += render_all(analysis.tables, out, quiet=quiet)
    spectra = analysis.tables.get("spectra")
    written += write_which_rank(judgement.which_rank, out) + write_rank_advice(spectra, out)
    written += write_report(judgement, out, setup=analysis.setup, validation=validation,
                            which_rank=judgement.which_rank, rank_advice=rank_advice(spectra))
    return written


def analyse_and_render(run_dir: str | os.PathLike | Run, out_dir: str | os.PathLike, *, quiet: bool = True,
                       validation: str | None = None, fig8_layers: str | Sequence[int] = "auto") -> list[Path]:
    """Run directory -> tables -> verdicts -> figures, tables, REPORT.md, report.json in ``out_dir``.

    The run's analysis cache (for notebooks) is refreshed where the run directory is writable and holds a
    training manifest; a read-only run is only read. Under ``torchrun --nproc_per_node N`` every rank analyses
    (the weight matrices split over the ranks, :func:`~lora_analysis.tables.build.weight_tables`) and rank 0
    alone writes. The gzipped copies of the φ and Figure 8 tables are written for a run trained here (a
    manifest: the committed default run is one), not for a folder of adapters from elsewhere, whose plain CSV
    holds the same table (at 7B the copies cost a second write of hundreds of MB).
    """
    run = run_dir if isinstance(run_dir, Run) else Run.open(run_dir)
    analysis = analyse(run, progress=not quiet, fig8_layers=fig8_layers)
    if process_group()[0] != 0:
        return []  # under torchrun: this rank computed its share of the weight matrices; rank 0 writes everything
    if run.manifest is not None:
        write_cache(run, analysis)  # notebooks on this run then load instantly
    return render(analysis, judge(analysis), out_dir, validation=validation, quiet=quiet,
                  gzipped=COMMITTED_GZIPPED if run.manifest is not None else ())

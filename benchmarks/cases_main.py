"""The README's main job, timed from scratch: ``python -m lora_analysis.reproduce`` into an empty directory.

* ``main_job[...]``: :func:`lora_analysis.reproduce.reproduce` of the default plan (the grid the README's first
  command trains: ranks 1 2 4 8 64 x seeds 0 1 2 on q,v with snapshots, one full fine-tuning per seed, Table 5's
  weight sets, the planted-rank validation, every figure, table, notebook input and REPORT.md) into a temporary
  run and output directory, in the default layout (one worker process per available core, one torch thread
  each). The peer is the goal itself, 12 minutes on 2 idle cores: ``ratio = wall / 720 s``.

The notes split the wall time by stage and give the training floor of this machine: the worker-seconds the
training runs took (their ``metrics.json`` ``wall_time_s``, the linear probe's included) divided by the workers.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import CaseResult, result_from_runs

GOAL_S = 720.0  # the goal: the main job from scratch in <= 12 minutes on 2 idle cores


def _training_seconds(runs: Path) -> tuple[float, int]:
    """Worker-seconds of training: every trained point's ``wall_time_s`` (Table 5's copies of the sweep's points,
    byte-identical files, excluded) plus the linear probe's, and how many of those there were."""
    total, n = 0.0, 0
    for metrics in sorted(runs.rglob("metrics.json")):
        twin = runs / metrics.parent.name / "metrics.json"  # a Table 5 point copied from the sweep
        if twin != metrics and twin.is_file() and twin.read_bytes() == metrics.read_bytes():
            continue
        t = json.loads(metrics.read_text(encoding="utf-8")).get("wall_time_s")
        if isinstance(t, int | float):
            total, n = total + float(t), n + 1
    probe = json.loads((runs / "manifest.json").read_text(encoding="utf-8")).get("linear_probe") or {}
    if isinstance(probe.get("wall_time_s"), int | float):
        total, n = total + float(probe["wall_time_s"]), n + 1
    return total, n


def main_job_case(*, quick: bool = False) -> CaseResult:
    """Time :func:`~lora_analysis.reproduce.reproduce` from scratch (``quick``: the ``--quick`` plan, no goal)."""
    from lora_analysis.reproduce import default_plan, quick_plan, reproduce

    plan = quick_plan() if quick else default_plan()
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-main-") as tmp:
        runs, out = Path(tmp) / "runs", Path(tmp) / "figures"
        t0 = time.perf_counter()
        reproduce(plan, runs, out, quiet=True, timings=timings)
        wall = time.perf_counter() - t0
        train_worker_s, points = _training_seconds(runs)
    workers = int(timings["workers"])
    floor = train_worker_s / workers
    extra = {**timings, "wall_s": wall, "trained_points": points, "train_worker_s": train_worker_s,
             "train_floor_s": floor}
    notes = (f"python -m lora_analysis.reproduce{' --quick' if quick else ''} into an empty directory, "
             f"{workers} worker process(es) x {int(timings['threads'])} torch thread(s): train {timings['train_s']:.0f} s "
             f"({points} trained runs incl. the linear probe, {train_worker_s:.0f} worker-seconds of fitting and "
             f"evaluating: {floor:.0f} s on {workers} workers even with no start-up, no idle worker and no writing), "
             f"planted-rank validation {timings['validation_s']:.0f} s, analysis + figures + REPORT.md "
             f"{timings['analysis_s']:.0f} s; torch {torch.__version__}")
    name = "main_job[reproduce --quick]" if quick else "main_job[reproduce, default grid]"
    return result_from_runs(name, [wall], [GOAL_S], peer_name="goal budget 12 min on 2 idle cores",
                            goal_max=None if quick else 1.0, notes=notes, extra=extra)

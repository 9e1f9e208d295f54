"""``train_step_under_load``: the default training step while one other CPU-bound process competes (issue 14, §1).

A user's machine is rarely idle. On a busy 2-core machine a 2-thread trainer ran at 5–6 s per step against
0.2 s idle: two OpenMP threads spend their time waiting for each other once one of them shares a core. The
trainer's default layout is therefore one torch thread per process (:mod:`lora.threads`).

* ``train_step_under_load[threads=1]``: the default step (forward, backward, AdamW; all-MiniLM-L6-v2, q+v, r=8,
  the workload of :mod:`benchmarks.workload`) with one competing process, against the same step idle.
  Goal ``ratio <= 2``: a competitor may take a core, not make the trainer thrash.
* ``train_step_under_load[threads=2]``: the same with two torch threads (no goal): why the default is one.
  Its ``vs_1thread_loaded`` extra is the loaded 2-thread step over the loaded 1-thread step.

The competitor is a Python busy loop in a child process (one core's worth of work, the "other CPU-bound
process"). It is paused (SIGSTOP) for the idle repetitions and resumed (SIGCONT) for the loaded ones, and the
four variants are interleaved repetition by repetition, so idle and loaded are measured in the same run under
the same background noise. The load average at the start and end of the case is recorded beside it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

from benchmarks import workload as W
from benchmarks.harness import CaseResult, result_from_runs

BUSY_LOOP = "while True:\n    pass\n"


@contextlib.contextmanager
def competitor() -> Iterator[subprocess.Popen]:
    """A paused CPU-bound child process (a Python busy loop); killed on exit, by its own pid."""
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.send_signal(signal.SIGSTOP)
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _timed(fn: Callable[[], object], threads: int, proc: subprocess.Popen | None) -> float:
    """Seconds of one call of ``fn`` with ``threads`` torch threads, the competitor running iff ``proc``."""
    from lora.threads import torch_threads

    with torch_threads(threads):
        if proc is not None:
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.05)  # let the scheduler place the competitor before the clock starts
        try:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGSTOP)


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return float("nan")


def load_cases(*, r: int = 8, reps: int = 7, warmup: int = 1) -> list[CaseResult]:
    """``train_step_under_load[threads=1]`` (goal ratio <= 2) and ``train_step_under_load[threads=2]``."""
    batch = W.make_batch()
    step = W.step_fn(*W.build("ours", r=r), W.make_head(), batch)
    load_start = _load()
    runs: dict[tuple[int, bool], list[float]] = {(t, loaded): [] for t in (1, 2) for loaded in (False, True)}
    order = list(runs)
    with competitor() as proc:
        for key in order * warmup:
            _timed(step, key[0], proc if key[1] else None)
        for i in range(reps):  # the order rotates each repetition: no variant is always first or last
            for key in order[i % len(order):] + order[: i % len(order)]:
                runs[key].append(_timed(step, key[0], proc if key[1] else None))
    load_end = _load()
    what = (f"one training step (forward+backward+AdamW), all-MiniLM-L6-v2, q+v, r={r}, batch {W.BATCH}x{W.SEQ_LEN}"
            f", with one competing CPU-bound process (a Python busy loop) against the same step idle, interleaved; "
            f"{os.cpu_count()} cores; 1-min load average {load_start:.2f} at start, {load_end:.2f} at end")
    one = result_from_runs("train_step_under_load[threads=1]", runs[(1, True)], runs[(1, False)],
                           peer_name="the same step idle (1 thread, the default layout)", goal_max=2.0,
                           notes=what, extra={"load_avg_start": load_start, "load_avg_end": load_end})
    two = result_from_runs("train_step_under_load[threads=2]", runs[(2, True)], runs[(2, False)],
                           peer_name="the same step idle (2 threads)", notes=what,
                           extra={"vs_1thread_loaded": statistics.median(runs[(2, True)]) / one.ours, "load_avg_start": load_start,
                                  "load_avg_end": load_end})
    return [one, two]

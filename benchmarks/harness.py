"""Interleaved timing and the result record shared by every benchmark case.

Each case times *ours* against a *peer* (peft, the frozen base model, a dense SVD, ...) in the same process,
alternating the two over several repetitions after a warm-up, so that noise from other processes on a shared
machine hits both sides alike. The order inside a repetition alternates too (ours first on even repetitions,
peer first on odd ones), which cancels any systematic "second call is warmer" effect.

The headline number is ``ratio = ours_s / peer_s`` (medians of the two sides; lower is better). The paired
ratios ``ours_i / peer_i`` of each repetition give its spread (``ratio_min`` .. ``ratio_max``).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class CaseResult:
    """One benchmark case: ours against one peer.

    Attributes:
        name: case name, e.g. ``train_step_vs_peft[r=8]``.
        ours: median of our measurements (``unit``).
        peer: median of the peer's measurements (``unit``).
        peer_name: what the peer is, with its version (``peft 0.21.2``).
        unit: ``"s"`` (wall time) or ``"MiB"`` (memory).
        ours_runs, peer_runs: every measurement, in repetition order.
        goal: the goal as text (``ratio <= 1.0``), or ``""``.
        met: whether the goal is met (``None`` when there is no goal).
        notes: anything a reader needs to interpret the numbers (error of an approximation, method, ...).
        extra: further measured figures (floats) reported beside the case.
    """

    name: str
    ours: float
    peer: float
    peer_name: str
    unit: str = "s"
    ours_runs: tuple[float, ...] = ()
    peer_runs: tuple[float, ...] = ()
    goal: str = ""
    met: bool | None = None
    notes: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """``ours / peer`` (medians): lower is better."""
        return self.ours / self.peer

    @property
    def paired_ratios(self) -> list[float]:
        return [o / p for o, p in zip(self.ours_runs, self.peer_runs, strict=False) if p > 0]

    def to_json(self) -> dict:
        """The JSON record: ``ours_s``/``peer_s`` for timings (``ours_mib``/``peer_mib`` for memory), ``ratio``,
        ``peer``, plus min/median/max of each side and of the paired ratios."""
        suffix = "s" if self.unit == "s" else self.unit.lower()
        paired = self.paired_ratios or [self.ratio]
        out: dict = {
            f"ours_{suffix}": self.ours,
            f"peer_{suffix}": self.peer,
            "ratio": self.ratio,
            "peer": self.peer_name,
            "unit": self.unit,
            "ours_min": min(self.ours_runs, default=self.ours),
            "ours_max": max(self.ours_runs, default=self.ours),
            "peer_min": min(self.peer_runs, default=self.peer),
            "peer_max": max(self.peer_runs, default=self.peer),
            "paired_ratio_median": statistics.median(paired),
            "paired_ratio_min": min(paired),
            "paired_ratio_max": max(paired),
            "repetitions": len(self.ours_runs),
            "goal": self.goal,
            "met": self.met,
            "notes": self.notes,
        }
        # numbers as floats; a nested record (e.g. section7's ``accuracy``) or a label as it is
        out.update({k: v if isinstance(v, (dict, str)) else float(v) for k, v in self.extra.items()})
        return out


@dataclass(frozen=True)
class Timings:
    """Raw interleaved timings of two callables (seconds per call)."""

    ours: tuple[float, ...]
    peer: tuple[float, ...]

    @property
    def ours_median(self) -> float:
        return statistics.median(self.ours)

    @property
    def peer_median(self) -> float:
        return statistics.median(self.peer)


def _time_once(fn: Callable[[], object], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def interleave(
    ours: Callable[[], object],
    peer: Callable[[], object],
    *,
    reps: int,
    warmup: int = 1,
    inner: int = 1,
) -> Timings:
    """Time ``ours`` and ``peer`` alternately.

    Args:
        ours, peer: zero-argument callables doing one unit of work each.
        reps: number of timed repetitions of each.
        warmup: untimed calls of each before timing (allocator, thread pool and autograd caches warm up).
        inner: calls per timed repetition (for sub-millisecond work); the time reported is per call.

    Returns:
        :class:`Timings` with ``reps`` seconds-per-call values for each side.
    """
    if reps < 1 or warmup < 0 or inner < 1:
        raise ValueError(f"reps ({reps}) and inner ({inner}) must be >= 1 and warmup ({warmup}) >= 0")
    for _ in range(warmup):
        ours()
        peer()
    o, p = [], []
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()  # a collection landing inside one side's timing would be charged to that side alone
    try:
        for i in range(reps):
            if i % 2 == 0:
                o.append(_time_once(ours, inner))
                p.append(_time_once(peer, inner))
            else:
                p.append(_time_once(peer, inner))
                o.append(_time_once(ours, inner))
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timings(tuple(o), tuple(p))


def compare(
    name: str,
    ours: Callable[[], object],
    peer: Callable[[], object],
    *,
    peer_name: str,
    reps: int,
    warmup: int = 1,
    inner: int = 1,
    goal_max: float | None = None,
    goal_min_speedup: float | None = None,
    notes: str = "",
    extra: dict[str, float] | None = None,
) -> CaseResult:
    """Interleave ``ours`` and ``peer`` and return a :class:`CaseResult`.

    ``goal_max``: the goal ``ratio <= goal_max``. ``goal_min_speedup``: the goal ``peer / ours >= goal_min_speedup``
    (i.e. ``ratio <= 1 / goal_min_speedup``), written as a speed-up in the report.
    """
    t = interleave(ours, peer, reps=reps, warmup=warmup, inner=inner)
    return result_from_runs(
        name, t.ours, t.peer, peer_name=peer_name, goal_max=goal_max, goal_min_speedup=goal_min_speedup,
        notes=notes, extra=extra,
    )


def result_from_runs(
    name: str,
    ours_runs: tuple[float, ...] | list[float],
    peer_runs: tuple[float, ...] | list[float],
    *,
    peer_name: str,
    unit: str = "s",
    goal_max: float | None = None,
    goal_min_speedup: float | None = None,
    notes: str = "",
    extra: dict[str, float] | None = None,
) -> CaseResult:
    """A :class:`CaseResult` from measurements taken elsewhere (medians of each side; goal checked on the ratio)."""
    if not ours_runs or not peer_runs:
        raise ValueError(f"{name}: no measurements")
    ours, peer = statistics.median(ours_runs), statistics.median(peer_runs)
    ratio = ours / peer
    goal, met = "", None
    if goal_max is not None:
        goal, met = f"ratio <= {goal_max:g}", ratio <= goal_max
    elif goal_min_speedup is not None:
        goal, met = f"speed-up >= {goal_min_speedup:g}x", 1.0 / ratio >= goal_min_speedup
    return CaseResult(
        name=name, ours=ours, peer=peer, peer_name=peer_name, unit=unit, ours_runs=tuple(ours_runs),
        peer_runs=tuple(peer_runs), goal=goal, met=met, notes=notes, extra=dict(extra or {}),
    )


def as_dict(result: CaseResult) -> dict:
    """Plain-dict view (for debugging and tests)."""
    return asdict(result)

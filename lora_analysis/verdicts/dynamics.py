"""When does the structure form? Each Section 7 claim judged at every training snapshot, and the step where its
verdict settles; the trend of the top-direction overlap with training.

The per-step verdicts are those of :func:`lora_analysis.verdicts.claims.evaluate_claims` on the tables of the
adapters as they were at that step (:mod:`lora_analysis.tables.dynamics`), so each uses the null, interval and
rule of the finished claim. Claims 6–8 need Figure 8 rows or validation metrics, which a snapshot has not:
they are followed only at the end.

Rules:

* **settles at step s**: the verdict at every snapshot from s to the last equals the last one, and at least two
  snapshots agree (s before the last). A verdict that differs at the last snapshot from the one before it
  **never settles** within the run: training that stopped there may not be the end of the story.
* **top-direction trend**: per (module, seed), φ(1, 1) between the rank pair at the last snapshot minus at the
  first snapshot where ΔW ≠ 0 (on ΔW's own directions, else on A). ``grows`` if the 95 % interval of the mean
  change (t-interval over seeds, its coverage simulated) lies above 0, ``shrinks`` if below 0, ``flat`` if it
  lies within ±``FLAT_PHI``, else ``inconclusive``. Null: no change, 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from lora_analysis.tables.select import phi_rank_pair
from lora_analysis.verdicts.claims import (
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    LEVEL,
    NOT_MEASURED,
    evaluate_claims,
    json_safe,
    seed_stat,
    three_way,
    within,
)
from lora_analysis.verdicts.registry import SECTION7

__all__ = ["FLAT_PHI", "Trajectory", "Trend", "claim_trajectories", "dynamics_json",
           "settled_at", "top_overlap_trend", "trajectories_table"]

FLAT_PHI = 0.05  # "flat": the mean change of φ(1, 1) over training stays within ±0.05 (φ lies in [0, 1])
GROWS, SHRINKS, FLAT = "grows", "shrinks", "flat"


@dataclass(frozen=True)
class Trajectory:
    """One claim's verdict at every snapshot.

    Attributes:
        id, title: the claim (declared in :data:`lora_analysis.verdicts.registry.SECTION7` with
            ``snapshot=True``).
        steps, verdicts, ours: per snapshot, in step order.
        settled_at: the step from which the verdict stays the final one, or ``None`` (never settles).
        final: the verdict at the last snapshot.
    """

    id: str
    title: str
    steps: tuple[int, ...]
    verdicts: tuple[str, ...]
    ours: tuple[str, ...]
    settled_at: int | None
    final: str

    def text(self) -> str:
        if self.settled_at is None:
            return f"never settles within the run: {self.verdicts[-2] if len(self.verdicts) > 1 else '?'} at step " \
                   f"{self.steps[-2] if len(self.steps) > 1 else '?'}, {self.final} at the last snapshot " \
                   f"(step {self.steps[-1]})"
        return f"settles at step {self.settled_at}: **{self.final}** from then to step {self.steps[-1]}"


def settled_at(steps: Sequence[int], verdicts: Sequence[str]) -> int | None:
    """The first step from which every verdict equals the last one, or ``None`` if only the last snapshot has it.

    Example: ``settled_at([0, 25, 50], ["not measured", "holds", "holds"]) == 25``; ``[.., "holds", "fails"]``
    gives ``None``.
    """
    if len(steps) != len(verdicts) or not steps:
        raise ValueError(f"steps and verdicts must be non-empty and of equal length, got {len(steps)}, {len(verdicts)}")
    i = len(verdicts) - 1
    while i > 0 and verdicts[i - 1] == verdicts[-1]:
        i -= 1
    return None if i == len(verdicts) - 1 else int(steps[i])


def claim_trajectories(per_step: Mapping[int, Mapping[str, pd.DataFrame]]) -> list[Trajectory]:
    """Every snapshot claim's verdict at each step of ``per_step`` (``{step: tables}``) and where it settles."""
    steps = sorted(per_step)
    specs = [s for s in SECTION7.specs if s.snapshot]  # the claims a snapshot can be judged on (φ and Table 7)
    by_id: dict[str, list[tuple[str, str]]] = {s.id: [] for s in specs}
    for step in steps:
        claims, _ = evaluate_claims(per_step[step])
        for c in claims:
            if c.id in by_id:
                by_id[c.id].append((c.verdict, c.ours))
    out = []
    for spec in specs:
        seq = by_id[spec.id]
        verdicts = tuple(v for v, _ in seq)
        out.append(Trajectory(spec.id, spec.title, tuple(steps), verdicts, tuple(o for _, o in seq),
                              settled_at(steps, verdicts) if steps else None, verdicts[-1] if verdicts else NOT_MEASURED))
    return out


def trajectories_table(per_step: Mapping[int, Mapping[str, pd.DataFrame]]) -> pd.DataFrame:
    """The claims' verdicts per snapshot as a DataFrame: claim, one column per step, settles (for notebooks)."""
    rows = []
    for t in claim_trajectories(per_step):
        rows.append({"claim": t.title, **{f"step {s}": v for s, v in zip(t.steps, t.verdicts, strict=True)},
                     "settles": "never (within the run)" if t.settled_at is None else f"step {t.settled_at}"})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Trend:
    """How φ(1, 1) between the rank pair changes from the first trained snapshot to the last."""

    verdict: str
    quantity: str
    first_step: int | None
    last_step: int | None
    change: Any  # Interval or None
    mean_first: float | None
    mean_last: float | None
    units: int
    rule: str
    null: str

    def text(self) -> str:
        if self.change is None:
            return f"not measured: {self.null}"
        return (f"φ_{self.quantity}(1,1) between ranks: {self.mean_first:.3f} at step {self.first_step} → "
                f"{self.mean_last:.3f} at step {self.last_step}; change {self.change.text('+.3f')}: **{self.verdict}**")


TREND_RULE = (f"per (module, seed), φ(1,1) at the last snapshot minus at the first where ΔW ≠ 0: grows if the "
              f"mean change's {LEVEL:.0%} interval lies above 0, shrinks if below 0, flat if within ±{FLAT_PHI:g}, "
              "else inconclusive")


def top_overlap_trend(dynamics: pd.DataFrame | None) -> Trend:
    """The top-direction trend (see the module docstring) from the tidy ``dynamics`` table."""
    null = "no change over training (0)"
    if dynamics is None or len(dynamics) == 0:
        return Trend(NOT_MEASURED, "", None, None, None, None, None, 0, TREND_RULE, "no snapshots")
    rank = dynamics[dynamics["comparison"] == "rank"]
    quantity = "dW" if (rank["quantity"] == "phi11_dW").any() else "A"
    rows = rank[rank["quantity"] == f"phi11_{quantity}"]
    if len(rows) == 0 or rows["step"].nunique() < 2:
        return Trend(NOT_MEASURED, quantity, None, None, None, None, None, 0, TREND_RULE,
                     "needs a rank comparison at two or more trained snapshots")
    r1, r2 = phi_rank_pair(rows)  # the pair Figure 3 shows: nearest 8 and 64 among the pairs present
    rows = rows[(rows["r1"] == r1) & (rows["r2"] == r2)]
    first, last = int(rows["step"].min()), int(rows["step"].max())
    keys = ["module", "seed1", "layer", "weight_type"]
    a = rows[rows["step"] == first].set_index(keys)["value"]
    b = rows[rows["step"] == last].set_index(keys)["value"]
    change = (b - a).dropna().rename("change").reset_index().rename(columns={"seed1": "seed"})
    ci = seed_stat(change, "change").interval  # t over seeds, coverage simulated for the design
    verdict = {HOLDS: GROWS, FAILS: SHRINKS}.get(three_way(ci, 0.0), INCONCLUSIVE)
    if verdict == INCONCLUSIVE and within(ci, FLAT_PHI) == HOLDS:
        verdict = FLAT
    return Trend(verdict, quantity, first, last, ci, float(a.mean()), float(b.mean()), len(change), TREND_RULE, null)


def dynamics_json(trajectories: Sequence[Trajectory], trend: Trend, dynamics: pd.DataFrame) -> dict[str, Any]:
    """``report.json``'s ``"dynamics"`` object: the steps, each claim's verdict per step and where it settles, the
    top-direction trend, and the mean (over seeds and modules) of every quantity per step, layer and weight type
    with its null."""
    means = []
    if len(dynamics):
        g = dynamics.groupby(["quantity", "comparison", "weight_type", "layer", "step"], sort=True)
        for (q, comp, wt, layer, step), sub in g:
            means.append({"quantity": q, "comparison": comp, "weight_type": wt, "layer": int(layer), "step": int(step),
                          "mean": float(sub["value"].mean()), "null": float(sub["null"].mean()), "n": len(sub)})
    return json_safe({
        "steps": sorted({int(s) for s in dynamics["step"]}) if len(dynamics) else [],
        "claims": [{"id": t.id, "title": t.title, "steps": list(t.steps), "verdicts": list(t.verdicts),
                    "ours": list(t.ours), "settled_at": t.settled_at, "final": t.final} for t in trajectories],
        "top_direction_trend": {"verdict": trend.verdict, "quantity": trend.quantity, "first_step": trend.first_step,
                                "last_step": trend.last_step,
                                "change": None if trend.change is None else trend.change.as_dict(),
                                "mean_first": trend.mean_first, "mean_last": trend.mean_last, "units": trend.units,
                                "rule": trend.rule, "null": trend.null},
        "quantities": means,
    })

"""Aggregates over seeds, and the intervals every verdict carries.

Two kinds of function, both pure (tidy frames or arrays in, frames or numbers out):

* the seed-aggregated paper tables: :func:`table5`, :func:`table6`, :func:`table7` (mean ± std over seeds);
* intervals: :func:`bootstrap_ci` (percentile bootstrap of a statistic, resampling whole *units* such as seeds,
  so that layers measured on the same seed stay together) and :func:`binomial_ci` (the exact Clopper–Pearson
  interval for a proportion "k of n").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from lora_analysis.tables.select import PAPER_TABLE7_RANKS, MissingRows, nearest_rank, require

__all__ = [
    "Interval",
    "TABLE7_COLUMNS",
    "binomial_ci",
    "bootstrap_ci",
    "pooled_std",
    "seed_mean",
    "table5",
    "table5_rows",
    "table6",
    "table6_rows",
    "table7",
]

TABLE7_COLUMNS = ["delta", "weight", "random", "w_norm", "dw_norm", "amplification"]
QUALITY_COLUMNS = ["weight_set", "rank", "seed", "val_metric", "metric_name", "trainable_params"]


# --------------------------------------------------------------------------------------------- intervals
@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval.

    Attributes:
        estimate: the statistic on the data as observed.
        lo, hi: the interval's ends (``lo <= hi``); equal to ``estimate`` when there is nothing to resample.
        level: coverage, e.g. 0.95.
        method: ``"bootstrap over N units"``, ``"exact (Clopper-Pearson)"``, ...
    """

    estimate: float
    lo: float
    hi: float
    level: float
    method: str

    def excludes(self, value: float) -> bool:
        """True when ``value`` lies outside ``[lo, hi]``."""
        return value < self.lo or value > self.hi

    def text(self, fmt: str = ".3g") -> str:
        return f"{self.estimate:{fmt}} [{self.lo:{fmt}}, {self.hi:{fmt}}]"

    def as_dict(self) -> dict:
        return {"estimate": self.estimate, "lo": self.lo, "hi": self.hi, "level": self.level, "method": self.method}


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    units: Sequence | np.ndarray | None = None,
    statistic: Callable[[np.ndarray], float] = np.mean,
    level: float = 0.95,
    n_boot: int = 4000,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of ``statistic(values)``, resampling whole units with replacement.

    Args:
        values: one number per observation (e.g. one per (module, seed)).
        units: the resampling unit of each observation (e.g. its seed): observations of one unit are drawn
            together, because they share a training run and are not independent. ``None``: each observation is
            its own unit.
        statistic: maps the resampled values to a number (default: the mean).
        level: coverage of the two-sided interval.
        n_boot: bootstrap replicates (seeded: the same data give the same interval).

    Returns:
        :class:`Interval`. With one unit there is nothing to resample: ``lo == hi == estimate`` and the method says
        so, so a verdict can treat it as no evidence of spread.

    Example:
        For values drawn i.i.d. from N(μ, 1), the 95 % interval of the mean covers μ in about 95 % of draws
        (tests/tables/test_aggregate.py checks this).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {x.shape}")
    u = np.arange(len(x)) if units is None else np.asarray(units)
    if len(u) != len(x):
        raise ValueError(f"units ({len(u)}) and values ({len(x)}) differ in length")
    estimate = float(statistic(x))
    labels, inverse = np.unique(u, return_inverse=True)
    groups = [np.flatnonzero(inverse == g) for g in range(len(labels))]
    if len(groups) < 2:
        return Interval(estimate, estimate, estimate, level, "one unit: no resampling possible")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(groups), size=(n_boot, len(groups)))
    if statistic is np.mean:  # the common case, vectorised: a resample's mean is its units' sums over their counts
        sums = np.array([x[g].sum() for g in groups])
        counts = np.array([len(g) for g in groups], dtype=np.float64)
        stats_ = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    else:
        stats_ = np.empty(n_boot)
        for b in range(n_boot):
            stats_[b] = statistic(x[np.concatenate([groups[g] for g in draws[b]])])
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(stats_, [alpha, 1.0 - alpha])
    what = "observations" if units is None else "units"
    return Interval(estimate, float(lo), float(hi), level, f"bootstrap over {len(groups)} {what}, {n_boot} draws")


def binomial_ci(k: int, n: int, *, level: float = 0.95) -> Interval:
    """Exact (Clopper–Pearson) interval for a proportion ``k / n``: the beta quantiles
    ``B(α/2; k, n−k+1)`` and ``B(1−α/2; k+1, n−k)``, with 0 and 1 at the ends."""
    if not (0 <= k <= n and n > 0):
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    alpha = 1.0 - level
    lo = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return Interval(k / n, lo, hi, level, "exact (Clopper-Pearson)")


# --------------------------------------------------------------------------------------------- seed aggregates
def seed_mean(rows: pd.DataFrame, by: list[str], value: str = "val_metric") -> pd.DataFrame:
    """Mean ± std of ``value`` over seeds (std with ddof=1, NaN for one seed) and the number of seeds, per ``by``."""
    agg = {"mean": (value, "mean"), "std": (value, "std"), "n_seeds": (value, "size")}
    if "trainable_params" in rows.columns:
        agg["trainable_params"] = ("trainable_params", "first")
    return rows.groupby(by, sort=True).agg(**agg).reset_index()


def pooled_std(agg: pd.DataFrame) -> float:
    """Root mean of the per-group seed variances of a :func:`seed_mean` frame (NaN if no group has two seeds)."""
    var = agg["std"].dropna() ** 2
    return float(np.sqrt(var.mean())) if len(var) else float("nan")


def _quality(quality: pd.DataFrame | None) -> pd.DataFrame:
    """The LoRA rows of the quality table (no linear probe, no full fine-tuning). A table without the ``method``
    column (a hand-made one) is all LoRA but for its linear probe."""
    q = require(quality, "quality", QUALITY_COLUMNS)
    if "method" in q.columns:
        return q[q["method"] == "lora"]
    return q[q["weight_set"] != "linear probe"]


def _by_method(rows: pd.DataFrame) -> list[str]:
    """Grouping keys of the quality aggregates: the weight set, then the method where the table has it."""
    return ["weight_set", "method", "rank"] if "method" in rows.columns else ["weight_set", "rank"]


def table6_rows(quality: pd.DataFrame | None) -> pd.DataFrame:
    """The Table 6 grid: weight sets trained at two or more ranks (the rank sweep), linear probe excluded."""
    q = _quality(quality)
    n_ranks = q.groupby("weight_set")["rank"].nunique()
    return q[q["weight_set"].isin(n_ranks[n_ranks >= 2].index)]


def table5_rows(quality: pd.DataFrame | None) -> pd.DataFrame:
    """The Table 5 grid: the weight sets trained at one common budget of trainable parameters.

    Table 5 spreads one budget over {W_q}, {W_k}, {W_v}, {W_o} (r=8), {W_q, W_k}, {W_q, W_v} (r=4) and all four
    (r=2); those points share ``trainable_params``. We take the parameter count reached by the most weight sets
    (ties: the larger count); the ``q,v`` rank sweep of Table 6 contributes at most one point to it.
    """
    q = _quality(quality)
    if len(q) == 0:
        raise MissingRows("quality: no adapter rows")
    n_sets = q.groupby("trainable_params")["weight_set"].nunique()
    if n_sets.max() < 2:
        raise MissingRows("quality: no two weight sets share a parameter budget (no Table 5 grid)")
    return q[q["trainable_params"] == n_sets[n_sets == n_sets.max()].index.max()]


def table6(quality: pd.DataFrame | None) -> pd.DataFrame:
    """Table 6: validation metric (mean ± std over seeds) for each weight set and rank; one row per (set, rank).
    Full fine-tuning of a swept weight set is a row of its own: ``method`` ``full``, rank 0."""
    rows = table6_rows(quality)
    if len(rows) == 0:
        raise MissingRows("quality: no weight set trained at two or more ranks (no Table 6 grid)")
    full = quality.iloc[0:0]
    if "method" in quality.columns:
        full = quality[(quality["method"] == "full") & quality["weight_set"].isin(set(rows["weight_set"]))]
    by = _by_method(rows)
    out = seed_mean(pd.concat([rows, full]) if len(full) else rows, by)
    out.insert(len(by), "metric_name", rows["metric_name"].iloc[0])
    return out


def table5(quality: pd.DataFrame | None) -> pd.DataFrame:
    """Table 5: validation metric (mean ± std over seeds) for each weight set at the common budget, best first."""
    rows = table5_rows(quality)
    by = _by_method(rows)
    out = seed_mean(rows, by).sort_values("mean", ascending=False, kind="stable")
    out.insert(len(by), "metric_name", rows["metric_name"].iloc[0])
    return out.reset_index(drop=True)


def table7(table: pd.DataFrame | None, *, ranks: Sequence[int] = PAPER_TABLE7_RANKS) -> pd.DataFrame:
    """Table 7: ‖UᵀWV‖_F for ΔW's, W's own and a random top-k subspace, ‖W‖_F, ‖ΔW‖_F and the amplification.

    One row per (module, rank) for the present ranks nearest ``ranks`` (paper: r = 4 and 64), every layer,
    averaged over seeds (``n_seeds`` says over how many). Where the table carries the random null
    (``random_expected``) and the margin ``delta / random_expected``, those are averaged too.
    """
    cols = ["module", "weight_type", "layer", "rank", "seed", "top", *TABLE7_COLUMNS]
    t = require(table, "table7", cols)
    shown = sorted({nearest_rank(t["rank"].tolist(), r) for r in ranks})
    t = t[t["rank"].isin(shown)]
    extra = [c for c in ("random_expected", "delta_over_random", "amplification_random") if c in t.columns]
    out = t.groupby(["layer", "weight_type", "module", "rank"], sort=True).agg(
        top=("top", "first"), **{c: (c, "mean") for c in [*TABLE7_COLUMNS, *extra]}, n_seeds=("seed", "nunique"))
    return out.reset_index()

"""Which rank? A recommended rank per weight type from accuracy against rank, with the verdicts' honesty.

The rule (``preregistration.toml``, ``[which_rank]``), per accuracy curve (trained, resized, extracted; see
:mod:`lora_analysis.tables.which_rank`): the **best** rank is the one with the highest mean accuracy over seeds;
for every rank ``r`` the per-seed difference ``acc(r) − acc(best)`` (paired by seed) gets the claims' 95 %
t-interval on seed means, with its coverage simulated (:func:`lora_analysis.verdicts.claims._stat`). Then

- **recommended**: the smallest rank whose interval lies above ``−margin`` (within the margin of the best);
- **indistinguishable** from the best: the ranks whose interval contains 0 (said so: "ranks 2–64 are
  indistinguishable at 3 seeds");
- **worse**: the ranks whose interval lies below ``−margin``.

The margin (0.01) is larger than one validation example of the default task (1/180): three seeds that each lose
one example give a zero-width interval at −0.0056, which is within the margin, not "worse". The interval is over
seeds (training randomness) on this validation set; the validation set's own sampling noise is not in it.

Choosing the best after seeing the data favours the best, so the test is conservative for the smaller ranks. With
no smaller rank shown non-inferior the best is recommended, and the report says that no smaller rank was shown
within the margin. Each weight type's rank comes from the resized route that truncates that type alone (the
others kept at the largest rank): the only route whose accuracy separates the weight types.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from lora_analysis.tables.aggregate import Interval
from lora_analysis.verdicts.claims import NOISE_RATIO, PRE, _jackknife_pairs, _seed_column, _stat, json_safe

__all__ = ["MARGIN", "RankDecision", "WhichRank", "decide", "judge_which_rank", "rank_span"]

MARGIN = PRE["which_rank"]["margin"]
RULE = PRE["which_rank"]["rule"]
CURVES = (("trained", "q,v", "trained at r"), ("resized", "q,v", "largest-rank adapter resized to r"),
          ("extracted", "q,v", "extracted at r from full fine-tuning"))


def rank_span(ranks: Sequence[int], ladder: Sequence[int]) -> str:
    """``ranks`` as runs of consecutive ladder entries: ``[2, 4, 8, 64]`` of ``[1, 2, 4, 8, 64]`` -> ``2–64``;
    ``[1, 4]`` -> ``1, 4``."""
    pos = sorted(ladder.index(r) for r in ranks)
    runs: list[list[int]] = []
    for p in pos:
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return ", ".join(str(ladder[r[0]]) if len(r) == 1 else f"{ladder[r[0]]}–{ladder[r[-1]]}" for r in runs)


@dataclass(frozen=True)
class RankDecision:
    """One accuracy curve judged by the rule.

    Attributes:
        curve, types, label: the route, the weight types it truncates, in words.
        metric: the validation metric. seeds: seeds measured. ladder: the ranks, ascending.
        accuracy: rank -> interval of the mean over seeds. difference: rank -> interval of ``acc(r) − acc(best)``.
        best, recommended: ranks (``recommended`` ``None`` when nothing can be recommended: one seed).
        indistinguishable, worse: ranks (the best excluded). answer: the one-line reading.
    """

    curve: str
    types: str
    label: str
    metric: str
    seeds: int
    ladder: tuple[int, ...]
    accuracy: Mapping[int, Interval]
    difference: Mapping[int, Interval]
    best: int
    recommended: int | None
    indistinguishable: tuple[int, ...]
    worse: tuple[int, ...]
    answer: str

    def as_json(self) -> dict[str, Any]:
        return json_safe({
            "curve": self.curve, "types": self.types, "label": self.label, "metric": self.metric,
            "seeds": self.seeds, "ranks": list(self.ladder), "best": self.best, "recommended": self.recommended,
            "indistinguishable_from_best": list(self.indistinguishable), "worse_than_best": list(self.worse),
            "accuracy": {str(r): iv.as_dict() for r, iv in self.accuracy.items()},
            "difference_to_best": {str(r): iv.as_dict() for r, iv in self.difference.items()},
            "answer": self.answer})


def decide(values: pd.DataFrame, *, curve: str, types: str = "q,v", label: str = "", metric: str = "accuracy",
           margin: float = MARGIN) -> RankDecision | None:
    """The rule on one curve: ``values`` has columns ``rank, seed, value`` (one row per adapter). ``None`` without
    two ranks."""
    v = values.groupby(["rank", "seed"])["value"].mean().unstack("seed")
    ladder = tuple(int(r) for r in sorted(v.index))
    if len(ladder) < 2:
        return None
    accuracy = {r: _stat(_seed_column(v.loc[r].dropna())).interval for r in ladder}
    best = max(ladder, key=lambda r: (v.loc[r].mean(), -r))  # a tie goes to the smaller rank
    difference: dict[int, Interval] = {}
    for r in ladder:
        d = (v.loc[r] - v.loc[best]).dropna()
        difference[r] = _stat(_seed_column(d)).interval if len(d) else Interval(math.nan, -math.inf, math.inf,
                                                                               0.95, "one unit: no paired seed")
    seeds = int(v.notna().any(axis=0).sum())
    one = any(iv.method.startswith("one unit") for r, iv in difference.items() if r != best)
    others = [r for r in ladder if r != best]
    worse = () if one else tuple(r for r in others if difference[r].hi < -margin)
    tied = () if one else tuple(r for r in others if difference[r].lo <= 0 <= difference[r].hi)
    within = [] if one else [r for r in others if difference[r].lo > -margin]
    recommended = None if one else min([best, *within])
    span = list(ladder)
    parts = [f"best r={best} ({metric} {accuracy[best].estimate:.4f})"]
    if one:
        parts.append(f"one seed: no interval, no recommendation (ranks {rank_span(span, span)} cannot be separated)")
    else:
        if tied:
            parts.append(f"ranks {rank_span(sorted([*tied, best]), span)} are indistinguishable at {seeds} seeds "
                         "(each difference's interval contains 0)")
        if within:
            parts.append(f"within {margin:g} of the best: ranks {rank_span(sorted([*within, best]), span)}")
        if worse:
            parts.append(f"worse by more than {margin:g}: {rank_span(list(worse), span)}")
        if recommended != best:
            d = difference[recommended]
            parts.append(f"recommended r={recommended}, the smallest within {margin:g} of the best (difference "
                         f"{d.text('+.4f')})")
        elif best == ladder[0]:
            parts.append(f"recommended r={best}, the smallest rank measured")
        else:
            parts.append(f"no smaller rank shown within {margin:g} of the best: recommended r={best}")
    return RankDecision(curve, types, label or curve, metric, seeds, ladder, accuracy, difference, best,
                        recommended, tuple(sorted(tied)), worse, "; ".join(parts))


SPECTRAL = ("energy_rank_90", "entropy_rank", "stable_rank")


def seed_overlap(phi: pd.DataFrame | None, *, threshold: float | None = None) -> pd.DataFrame:
    """Per weight type and ``k``: ``φ_ΔW(k, k)`` between two seeds' top-``k`` subspaces at the largest rank over
    its random null ``k/d`` (the ``expected_random`` rows), mean over layers and seed pairs, with claim 3's
    delete-one-seed jackknife interval (seed pairs share seeds), and whether it is **above the null by claim 2's
    rule** (the interval's lower end above ``threshold``, default claim 2's 2×: "within 2× the null looks like
    noise"), and ``shared``: claim 3's directions shared above chance ``k·φ(k, k) − k²/d``. φ(k, k) is cumulative:
    a few shared top directions keep the ratio above 2× up to ``k ≈ √(shared·d/2)``, which ``shared`` tells apart.
    Columns ``weight_type, rank, k, ratio, lo, hi, above, shared``; empty without seed comparisons."""
    thr = NOISE_RATIO if threshold is None else threshold
    cols = ["weight_type", "rank", "k", "ratio", "lo", "hi", "above", "shared"]
    if phi is None or len(phi) == 0 or "comparison" not in phi.columns:
        return pd.DataFrame(columns=cols)
    seed = phi[(phi["comparison"] == "seed") & (phi["i"] == phi["j"])]
    if not len(seed):
        return pd.DataFrame(columns=cols)
    r = int(seed["r1"].max())
    seed = seed[(seed["r1"] == r) & (seed["r2"] == r)]
    keys = ["weight_type", "layer", "seed1", "seed2", "i"]
    obs = seed[seed["quantity"] == "dW"].set_index(keys)["phi"]
    null = seed[seed["quantity"] == "expected_random"].set_index(keys)["phi"]
    ratio = (obs / null).dropna().rename("diff").reset_index()
    # claim 3's directions shared above chance, k·φ(k, k) − k²/d = k·(φ − null), as null = k/d
    excess = (obs - null).dropna()
    shared = (excess * excess.index.get_level_values("i")).groupby(["weight_type", "i"]).mean()
    out = []
    for (wt, k), g in ratio.groupby(["weight_type", "i"], sort=True):
        iv, _, _ = _jackknife_pairs(g)
        above = bool(iv.lo > thr) and not iv.method.startswith("one unit")
        out.append({"weight_type": wt, "rank": r, "k": int(k), "ratio": iv.estimate, "lo": iv.lo, "hi": iv.hi,
                    "above": above, "shared": float(shared.get((wt, k), np.nan))})
    return pd.DataFrame(out, columns=cols)


def shared_k(overlap: pd.DataFrame, weight_type: str) -> int | None:
    """The largest ``k`` such that the top-``k`` subspaces overlap above the null at every ``k' ≤ k`` (0: not
    even ``k = 1``; ``None``: no rows)."""
    rows = overlap[overlap["weight_type"] == weight_type].sort_values("k")
    if not len(rows):
        return None
    k = 0
    for row in rows.itertuples(index=False):
        if not row.above or int(row.k) != k + 1:
            break
        k = int(row.k)
    return k


def spectral_answers(spectra: pd.DataFrame | None, overlap: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per weight type of the largest-rank adapters: the mean (over layers and seeds), min and max of the 90 %
    energy rank, entropy effective rank and stable rank of ``ΔW``, the seed-overlap ``k`` (:func:`shared_k`) and
    the directions shared above chance there. Columns ``weight_type, rank, seeds, layers, <measure>_mean/_min/_max,
    shared_k, shared_directions``."""
    if spectra is None or len(spectra) == 0:
        return pd.DataFrame()
    r = int(spectra["rank"].max())
    top = spectra[spectra["rank"] == r]
    out = []
    for wt, g in top.groupby("weight_type", sort=True):
        row = {"weight_type": wt, "rank": r, "seeds": int(g["seed"].nunique()), "layers": int(g["layer"].nunique())}
        for m in SPECTRAL:
            row |= {f"{m}_mean": float(g[m].mean()), f"{m}_min": float(g[m].min()), f"{m}_max": float(g[m].max())}
        k = shared_k(overlap, wt) if overlap is not None and len(overlap) else None
        row["shared_k"] = np.nan if k is None else k
        at = overlap[(overlap["weight_type"] == wt) & (overlap["k"] == k)] if k else None
        row["shared_directions"] = float(at["shared"].iloc[0]) if at is not None and len(at) else np.nan
        out.append(row)
    return pd.DataFrame(out)



@dataclass(frozen=True)
class WhichRank:
    """The section: the all-types curves, the per-weight-type decisions, the spectral answers, what was not
    measured and why, and what the evaluations cost."""

    curves: list[RankDecision] = field(default_factory=list)
    per_type: dict[str, RankDecision] = field(default_factory=dict)
    spectral: pd.DataFrame = field(default_factory=pd.DataFrame)
    full: Mapping[str, float] | None = None
    why_not: str | None = None
    cost: Mapping[str, float] = field(default_factory=dict)
    margin: float = MARGIN
    overlap: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def measured(self) -> bool:
        return bool(self.per_type)

    def recommendation(self, weight_type: str) -> str:
        d = self.per_type.get(weight_type)
        if d is None:
            return "not measured"
        return "none (one seed)" if d.recommended is None else f"r={d.recommended}"

    def as_json(self) -> dict[str, Any]:
        spectral = self.spectral.to_dict("records") if len(self.spectral) else []
        return json_safe({
            "rule": RULE, "margin": self.margin, "measured": self.measured, "why_not_measured": self.why_not,
            "recommended": {t: d.recommended for t, d in self.per_type.items()},
            "per_weight_type": {t: d.as_json() for t, d in self.per_type.items()},
            "curves": [d.as_json() for d in self.curves], "full_finetune": self.full,
            "spectral": spectral, "evaluations": dict(self.cost)})


NOT_MEASURED_WHY = ("accuracy of resized and extracted adapters needs the task and the model: "
                    "`python -m lora_analysis.reproduce` evaluates them, with or without training (cached in "
                    "<run>/analysis/which_rank.csv; later renders read the cache)")


def _trained(quality: pd.DataFrame | None) -> tuple[pd.DataFrame, str, str]:
    """The trained curve's ``rank, seed, value`` rows (the weight set with the most ranks, q,v on a tie)."""
    if quality is None or len(quality) == 0:
        return pd.DataFrame(columns=["rank", "seed", "value"]), "", "accuracy"
    lora = quality[quality["method"] == "lora"]
    if not len(lora):
        return pd.DataFrame(columns=["rank", "seed", "value"]), "", "accuracy"
    counts = lora.groupby("weight_set")["rank"].nunique()
    ws = max(sorted(counts.index), key=lambda s: (counts[s], s == "q,v"))
    rows = lora[lora["weight_set"] == ws]
    metric = str(rows["metric_name"].iloc[0])
    return rows.rename(columns={"val_metric": "value"})[["rank", "seed", "value"]], ws, metric


def judge_which_rank(tables: Mapping[str, pd.DataFrame]) -> WhichRank:
    """The section from a run's tables: ``quality``, ``which_rank_evals`` (the cached evaluations), and ``phi`` and
    ``spectra`` for the spectral answers beside them (:func:`seed_overlap`, :func:`spectral_answers`)."""
    trained, ws, metric = _trained(tables.get("quality"))
    overlap = seed_overlap(tables.get("phi"))
    spectral = spectral_answers(tables.get("spectra"), overlap)
    quality = tables.get("quality")
    full = None
    if quality is not None and len(quality):
        f = quality[(quality["method"] == "full") & quality["weight_set"].isin([ws, f"full:{ws}"])]
        if len(f):
            full = {"mean": float(f["val_metric"].mean()), "seeds": int(f["seed"].nunique())}
    curves: list[RankDecision] = []
    d = decide(trained, curve="trained", types=ws or "q,v", label=CURVES[0][2], metric=metric)
    if d is not None:
        curves.append(d)
    evals = tables.get("which_rank_evals")
    if evals is None or len(evals) == 0:
        return WhichRank(curves, {}, spectral, full, NOT_MEASURED_WHY, overlap=overlap)
    evals = evals.rename(columns={"val_metric": "value"})
    metric = str(evals["metric_name"].iloc[0])
    top = int(evals[evals["curve"] == "resized"]["rank"].max()) if (evals["curve"] == "resized").any() else None
    for curve, _, label in CURVES[1:]:
        rows = evals[(evals["curve"] == curve) & (evals["types"] == "q,v")]
        d = decide(rows, curve=curve, types=ws, label=label, metric=metric)
        if d is not None:
            curves.append(d)
    per_type: dict[str, RankDecision] = {}
    resized = evals[evals["curve"] == "resized"]
    for t in sorted(set(resized["types"]) - {"q,v"}):
        # the largest rank is the original adapter: the same evaluation for every weight type
        rows = resized[(resized["types"] == t) | ((resized["types"] == "q,v") & (resized["rank"] == top))]
        d = decide(rows, curve="resized", types=t, label=f"only ΔW_{t} resized to r (the others at r={top})",
                   metric=metric)
        if d is not None:
            per_type[t] = d
    cost = {"evaluations": int(len(evals)), "seconds": float(evals["eval_s"].sum())}
    why = None if per_type else "the run has one weight type or one rank: no per-weight-type evaluation"
    return WhichRank(curves, per_type, spectral, full, why, cost, overlap=overlap)

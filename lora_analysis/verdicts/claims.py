"""Each claim of Section 7 (Hu et al., 2021), judged from the tidy tables against a null that can fail.

A verdict is one of ``holds``, ``partly``, ``does not hold``, ``inconclusive`` (the interval cannot separate the
outcomes: the rule says which way it leans and why) or ``not measured`` (the run lacks the rows, e.g. one seed or
no training metrics). Every claim records:

* **measures**: the statistic, its interval and the counts behind it, pooled over *all* layers × seeds × weight
  types the run has (the middle layer alone is a detail, not the evidence);
* **null**: the random baseline the statistic must beat, analytic and, where one exists, empirical;
* **rule**: thresholds applied to the interval, never to a point estimate;
* **quantity**: which φ it used. φ is computed on ΔW = s·B·A's own right singular vectors (``dW``), ordered by
  what was learned: A's own singular order can be set by its random start. φ on A (the paper's), on A − A_init
  and between the starts A_init are reported beside it.

Intervals (:mod:`lora_analysis.tables.aggregate`): an exact Clopper–Pearson interval for a proportion "k of n",
otherwise a percentile bootstrap that resamples whole seeds (layers of one seed share a training run), or layers
where a run has one seed.

The rules (thresholds are module constants, printed in the report beside each claim):

1. ``top_direction_shared`` (Figure 3): the fraction of (module, seed) pairs with φ_dW(A_{r_small}, A_{r_large},
   1, 1) > 0.5. holds: its 95 % interval lies above 1/2 (most pairs share it); does not hold: below 1/2.
   Null: E φ(1, 1) = 1/d for random directions; empirically, pairs of independent seeds.
2. ``other_directions_noise`` (Figure 3): mean φ_dW(i, j) over 2 ≤ i, j ≤ r_small divided by the random baseline
   max(i, j)/d, per pair. holds: the interval lies within ``NOISE_RATIO`` (2) × chance; does not hold: above it.
3. ``q_higher_rank_than_v`` (Figure 4): per layer and seed pair at r_large, the directions ΔW_q shares across
   seeds above chance (k·φ(k, k) − k²/d, k = ``SHARED_K``) minus ΔW_v's. holds: interval above 0; does not hold:
   below 0. Null: 0, no difference.
4. ``amplification`` (Table 7): at r_small (nearest the paper's 4), the margin ‖UᵀWV‖_F / E_random and the
   amplification ‖ΔW‖_F / ‖UᵀWV‖_F. holds: margin interval above ``MARGIN`` (2) and amplification above 1;
   does not hold: margin interval below ``MARGIN``: ΔW is not aligned with W well above chance, so the factor
   says nothing W-specific (a same-norm ΔW in a random subspace has a *larger* one). That the factor falls with
   r is geometry for any ΔW: reported, not judged.
5. ``projection_above_random`` (Table 7): random < ΔW < W, with "above random" meaning a margin interval above
   ``MARGIN`` at r_small and at r_large. holds: both; partly: one, the other below; does not hold: both below.
6. ``w_top_not_amplified`` (Figure 8): mean φ(W's top-i, ΔW's top-j) over the grid divided by the same for a
   random A of the same rank. holds: interval within ``FIG8_RATIO`` (2) × random; does not hold: above. This is
   a negative claim: a ΔW unrelated to W passes it, and ΔW planted on W's top directions fails it.
7. ``quality_flat_in_rank`` (Table 6): the slope of the validation metric per doubling of r (least squares over
   every rank and seed). holds: its interval lies within ±``FLAT_SLOPE``; does not hold: outside it.
8. ``budget_best_sets`` (Table 5): how often {W_q, W_v} or all four is the best set when the seeds are
   resampled. holds: ≥ 95 %; does not hold: ≤ 5 %. Null: 2 of the n sets by chance.

Claims 1, 2, 4 and 5 are also judged at the ranks nearest the paper's r/d (4, 8, 64 of d = 12,288), reported
under ``measures["at_scaled_ranks"]``: on a d = 384 model r = 64 spans 1/6 of the space and has no counterpart
in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from lora_analysis.tables.aggregate import Interval, binomial_ci, bootstrap_ci, table5_rows, table6_rows
from lora_analysis.tables.select import (
    PAPER_D,
    PAPER_RANK_LARGE,
    PAPER_RANK_SMALL,
    PAPER_TABLE7_RANKS,
    MissingRows,
    middle_layer,
    nearest_rank,
    rows_where,
)
from lora_analysis.verdicts.registry import (
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    NOT_MEASURED,
    PARTLY,
    SECTION7,
    VERDICTS,
    Claim,
    Evidence,
    Finding,
)

__all__ = [
    "CLAIM_IDS",
    "FAILS",
    "HOLDS",
    "INCONCLUSIVE",
    "NOT_MEASURED",
    "PARTLY",
    "Claim",
    "Context",
    "claims_table",
    "evaluate_claims",
    "report_json",
]


LEVEL = 0.95  # every interval is two-sided 95 %
TOP_SHARED = 0.5  # Figure 3: "the top singular vector overlap significantly ... φ > 0.5"
NOISE_RATIO = 2.0  # "looks like noise": within 2× the random baseline
SHARED_K = 8  # Figure 4: the leading directions "more common directions" refers to
MARGIN = 2.0  # "well above random": ΔW's projection at least 2× a random subspace's (paper: 16× and 5.8×)
FIG8_RATIO = 2.0  # "barely overlap": within 2× a random A's overlap with W's top directions
FLAT_SLOPE = 0.005  # "flat": under half a point of accuracy per doubling of r (paper: 73.4 -> 73.5 over 6 doublings)
BEST_PROB = 0.95  # Table 5: the best set is {q,v} or {q,k,v,o} in >= 95 % of seed resamples
TABLE5_BEST = ("q,v", "q,k,v,o")

@dataclass(frozen=True)
class Context:
    """What the claims were measured on."""

    layer: int | None = None
    layers: tuple[int, ...] = ()
    r_small: int | None = None
    r_large: int | None = None
    d: int | None = None
    scaled_ranks: tuple[int, int] | None = None
    seeds: tuple[int, ...] = ()
    extra: Mapping[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- helpers
def fmt_number(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(float(x), fmt)


def no_rows(table: pd.DataFrame | None) -> bool:
    return table is None or len(table) == 0


def _no_spread(interval: Interval) -> bool:
    return interval.method.startswith("one unit")


def three_way(interval: Interval, threshold: float, *, holds_above: bool = True) -> str:
    """``holds`` when the whole interval lies on the claim's side of ``threshold``, ``does not hold`` when it lies
    wholly on the other side, ``inconclusive`` when it straddles the threshold or has no spread to judge (a
    bootstrap over one unit)."""
    if _no_spread(interval):
        return INCONCLUSIVE
    above, below = interval.lo > threshold, interval.hi < threshold
    if above:
        return HOLDS if holds_above else FAILS
    if below:
        return FAILS if holds_above else HOLDS
    return INCONCLUSIVE


def within(interval: Interval, bound: float) -> str:
    """``holds`` when the interval lies within ``[−bound, bound]``, ``does not hold`` when wholly outside it,
    ``inconclusive`` otherwise or without a spread to judge."""
    if _no_spread(interval):
        return INCONCLUSIVE
    if -bound <= interval.lo and interval.hi <= bound:
        return HOLDS
    if interval.lo > bound or interval.hi < -bound:
        return FAILS
    return INCONCLUSIVE


def _units(frame: pd.DataFrame, seed_col: str = "seed", fallback: str = "module") -> tuple[np.ndarray, str]:
    """Resampling units: seeds when there are two or more, else ``fallback`` (modules or layers)."""
    seeds = frame[seed_col].to_numpy()
    if len(set(seeds.tolist())) >= 2:
        return seeds, "seeds"
    return frame[fallback].to_numpy(), f"{fallback}s (one seed)"


def seed_bootstrap_ci(values, frame: pd.DataFrame, *, statistic: Callable = np.mean, seed_col: str = "seed",
        fallback: str = "module") -> Interval:
    units, what = _units(frame, seed_col, fallback)
    iv = bootstrap_ci(np.asarray(values, dtype=np.float64), units=units, statistic=statistic, level=LEVEL)
    return Interval(iv.estimate, iv.lo, iv.hi, iv.level, f"{iv.method} (resampling {what})")


def _geo_mean(x: np.ndarray) -> float:
    return float(np.exp(np.mean(np.log(x))))


def _not_measured(rule: str, why: str) -> Finding:
    return Finding.not_measured(rule, why)


def _claim(ours: str, verdict: str, rule: str, null: str, quantity: str, measures: dict,
           details: Sequence[str] = ()) -> Finding:
    return Finding(ours, verdict, rule, null, quantity, measures, tuple(details))


def _phi_quantity(rows: pd.DataFrame) -> str:
    """``dW`` (ΔW's own singular vectors) where the table has it, else the paper's ``A``."""
    return "dW" if len(rows_where(rows, quantity="dW")) else "A"


def _rank_rows(phi: pd.DataFrame, r1: int, r2: int) -> pd.DataFrame:
    return rows_where(rows_where(phi, comparison="rank"), r1=r1, r2=r2)


def _d_of(phi: pd.DataFrame | None, t7: pd.DataFrame | None) -> int | None:
    """The input dimension d_in, from Table 7 rows or from the analytic φ baseline (E φ(1, 1) = 1/d)."""
    if not no_rows(t7) and "d_in" in t7.columns:
        return int(t7["d_in"].iloc[0])
    if not no_rows(phi):
        base = phi[(phi["quantity"] == "expected_random") & (phi["i"] == 1) & (phi["j"] == 1)]["phi"]
        if len(base):
            return int(round(1.0 / float(base.iloc[0])))
    return None


# --------------------------------------------------------------------------------------------- φ claims
@SECTION7.claim(
    "top_direction_shared", title="The top singular direction is shared between a small and a large rank",
    paper="φ(A_8, A_64, 1, 1) > 0.5 for ΔW_q and ΔW_v (layer 48 of 96, GPT-3 175B)",
    figures=("figure3", "figure6", "init_control"), snapshot=True, ranks="phi")
def _top(ev: Evidence) -> Finding:
    phi, (r1, r2) = ev.get("phi"), ev.phi_pair
    rule = (f"fraction of (module, seed) pairs with φ(1, 1) > {TOP_SHARED}: holds if its {LEVEL:.0%} exact interval "
            f"lies above {TOP_SHARED}, does not hold if below, else inconclusive")
    rows = _rank_rows(phi, r1, r2) if not no_rows(phi) else None
    if no_rows(rows):
        return _not_measured(rule, f"no rank comparison r={r1} vs r={r2} (needs two ranks at one seed)")
    quantity = _phi_quantity(rows)
    first = rows[(rows["i"] == 1) & (rows["j"] == 1)]
    per = rows_where(first, quantity=quantity)
    k, n = int((per["phi"] > TOP_SHARED).sum()), len(per)
    ci = binomial_ci(k, n, level=LEVEL)
    verdict = three_way(ci, TOP_SHARED)
    d = int(round(1 / float(rows_where(first, quantity="expected_random")["phi"].iloc[0]))) if len(
        rows_where(first, quantity="expected_random")) else None
    measures: dict[str, Any] = {"ranks": [r1, r2], "quantity": quantity, "pairs": n, "shared": k,
                                "fraction": ci.as_dict(), "mean_phi11": float(per["phi"].mean()),
                                "random_expected_phi11": None if d is None else 1 / d}
    details = []
    for wt in sorted(set(per["weight_type"])):
        sub = rows_where(per, weight_type=wt)
        kk = int((sub["phi"] > TOP_SHARED).sum())
        iv = binomial_ci(kk, len(sub), level=LEVEL)
        measures[f"fraction_{wt}"] = iv.as_dict()
        details.append(f"ΔW_{wt}: φ(1,1) > {TOP_SHARED} in {kk} of {len(sub)} pairs [{fmt_number(iv.lo, '.2f')}, "
                       f"{fmt_number(iv.hi, '.2f')}]; mean φ(1,1) {fmt_number(float(sub['phi'].mean()))}")
    for q in ("A", "A-A_init", "A_init"):
        other = rows_where(first, quantity=q)
        if len(other) and q != quantity:
            kk = int((other["phi"] > TOP_SHARED).sum())
            measures[f"shared_on_{q}"] = [kk, len(other)]
            details.append(f"on {q}: > {TOP_SHARED} in {kk} of {len(other)} pairs, mean φ(1,1) "
                           f"{fmt_number(float(other['phi'].mean()))}" + (" (the starting points alone)" if q == "A_init" else ""))
    seeds = rows_where(phi, comparison="seed", quantity=quantity)
    seeds = seeds[(seeds["i"] == 1) & (seeds["j"] == 1)]
    if len(seeds):
        ks = int((seeds["phi"] > TOP_SHARED).sum())
        measures["independent_seeds"] = [ks, len(seeds)]
        details.append(f"empirical null, independent seeds at r={int(seeds['r1'].max())} (they share only the task): "
                       f"> {TOP_SHARED} in {ks} of {len(seeds)} pairs")
    null = (f"two random directions in dimension d give E φ(1,1) = 1/d = {fmt_number(None if d is None else 1 / d, '.4f')}; "
            "independent seeds (sharing only the task) give the empirical null")
    ours = (f"φ_{quantity}(1,1) > {TOP_SHARED} in {k} of {n} (module, seed) pairs at r={r1} vs r={r2} "
            f"[{LEVEL:.0%} CI {fmt_number(ci.lo, '.2f')}–{fmt_number(ci.hi, '.2f')}]")
    return _claim(ours, verdict, rule, null, quantity, measures, details)


@SECTION7.claim(
    "other_directions_noise", title="Directions other than the top one look like random noise",
    paper="the other directions look like noise (Figure 3)", figures=("figure3",), snapshot=True, ranks="phi")
def _noise(ev: Evidence) -> Finding:
    phi, (r1, r2) = ev.get("phi"), ev.phi_pair
    rule = (f"mean φ(i, j) over 2 ≤ i, j ≤ r_small divided by the random baseline max(i, j)/d, per (module, seed): "
            f"holds if the mean's {LEVEL:.0%} interval lies within {NOISE_RATIO:g}× chance, does not hold if above")
    rows = _rank_rows(phi, r1, r2) if not no_rows(phi) else None
    if no_rows(rows):
        return _not_measured(rule, f"no rank comparison r={r1} vs r={r2}")
    if r1 < 2:
        return _not_measured(rule, f"r_small = {r1} has no direction after the first")
    quantity = _phi_quantity(rows)
    block = rows[(rows["i"] >= 2) & (rows["i"] <= r1) & (rows["j"] >= 2) & (rows["j"] <= r1)]
    obs = rows_where(block, quantity=quantity).groupby(["module", "seed1"])["phi"].mean()
    base = rows_where(block, quantity="expected_random").groupby(["module", "seed1"])["phi"].mean()
    ratio = (obs / base).dropna().rename("ratio").reset_index().rename(columns={"seed1": "seed"})
    if len(ratio) == 0:
        return _not_measured(rule, "no random baseline rows")
    ci = seed_bootstrap_ci(ratio["ratio"], ratio)
    verdict = three_way(ci, NOISE_RATIO, holds_above=False)
    wt_of = dict(zip(rows["module"], rows["weight_type"], strict=False))
    details = []
    measures: dict[str, Any] = {"ranks": [r1, r2], "quantity": quantity, "ratio_to_random": ci.as_dict(),
                                "pairs": len(ratio)}
    for wt in sorted({wt_of[m] for m in ratio["module"]}):
        sub = ratio[ratio["module"].map(wt_of) == wt]
        iv = seed_bootstrap_ci(sub["ratio"], sub)
        measures[f"ratio_{wt}"] = iv.as_dict()
        details.append(f"ΔW_{wt}: {iv.text('.2f')}× the random baseline")
    learned = rows_where(block, quantity="A").groupby(["module", "seed1"])["phi"].mean()
    if quantity != "A" and len(learned):
        details.append(f"on A (the paper's): {fmt_number(float((learned / base).mean()), '.2f')}× random")
    null = "two random subspaces give E φ(i, j) = max(i, j)/d (analytic); the ratio is 1 for noise"
    ours = f"φ_{quantity} over 2..{r1} at r={r1} vs r={r2}: {ci.text('.2f')}× the random baseline"
    return _claim(ours, verdict, rule, null, quantity, measures, details)


@SECTION7.claim(
    "q_higher_rank_than_v", title="ΔW_q has a higher intrinsic rank than ΔW_v",
    paper="ΔW_q shares more directions across seeds than ΔW_v: a higher intrinsic rank (Fig. 4)",
    figures=("figure4", "figure7"), snapshot=True)
def _intrinsic(ev: Evidence) -> Finding:
    phi = ev.get("phi")
    rule = (f"per layer and seed pair at r_large, shared directions above chance k·φ(k, k) − k²/d (k = {SHARED_K}) "
            f"of ΔW_q minus ΔW_v: holds if the mean's {LEVEL:.0%} interval lies above 0, does not hold if below")
    seed = rows_where(phi, comparison="seed") if not no_rows(phi) else None
    if no_rows(seed):
        return _not_measured(rule, "no seed comparison (needs two seeds at the largest rank)")
    r = int(seed["r1"].max())
    seed = rows_where(seed, r1=r, r2=r)
    quantity = _phi_quantity(seed)
    k = min(SHARED_K, r)
    at_k = seed[(seed["i"] == k) & (seed["j"] == k)]
    obs, base = rows_where(at_k, quantity=quantity), rows_where(at_k, quantity="expected_random")
    keys = ["layer", "weight_type", "seed1", "seed2"]
    shared = k * (obs.set_index(keys)["phi"] - base.set_index(keys)["phi"])  # k φ(k,k) − k²/d, as φ_random(k,k) = k/d
    wide = shared.rename("shared").reset_index().pivot_table(index=["layer", "seed1", "seed2"],
                                                             columns="weight_type", values="shared")
    if not {"q", "v"} <= set(wide.columns):
        return _not_measured(rule, "needs both ΔW_q and ΔW_v")
    wide = wide.dropna(subset=["q", "v"]).reset_index()
    diff = (wide["q"] - wide["v"]).to_numpy()
    iv = bootstrap_ci(diff, units=wide["layer"].to_numpy(), level=LEVEL)
    ci = Interval(iv.estimate, iv.lo, iv.hi, iv.level, f"{iv.method} (resampling layers)")
    verdict = three_way(ci, 0.0)
    per_layer = wide.groupby("layer")[["q", "v"]].mean()
    details = [f"layer {int(lay)}: ΔW_q {fmt_number(row.q, '.2f')} vs ΔW_v {fmt_number(row.v, '.2f')} shared directions above chance"
               for lay, row in per_layer.iterrows()]
    measures = {"rank": r, "k": k, "quantity": quantity, "q_minus_v": ci.as_dict(),
                "shared_q": float(wide["q"].mean()), "shared_v": float(wide["v"].mean()),
                "q_ahead_layers": [int((per_layer["q"] > per_layer["v"]).sum()), len(per_layer)]}
    null = (f"no difference (0); two random {k}-dimensional subspaces share k²/d directions by chance, "
            "subtracted from each")
    ours = (f"r={r}, top {k}: ΔW_q shares {fmt_number(float(wide['q'].mean()), '.2f')}, ΔW_v {fmt_number(float(wide['v'].mean()), '.2f')} "
            f"directions across seeds above chance; q − v {ci.text('.2f')}")
    return _claim(ours, verdict, rule, null, quantity, measures, details)


# --------------------------------------------------------------------------------------------- Table 7 claims
def _t7_at(t7: pd.DataFrame, rank: int) -> pd.DataFrame:
    return rows_where(t7, rank=rank)


def _margin(t7: pd.DataFrame, rank: int) -> tuple[Interval, pd.DataFrame]:
    rows = _t7_at(t7, rank)
    return seed_bootstrap_ci(np.log(rows["delta_over_random"].to_numpy()), rows, statistic=np.mean), rows


def geometric_interval(iv: Interval) -> Interval:
    """An interval on log scale, back on the ratio scale (geometric mean)."""
    return Interval(math.exp(iv.estimate), math.exp(iv.lo), math.exp(iv.hi), iv.level, iv.method + ", geometric")


def _t7_ready(t7: pd.DataFrame | None) -> bool:
    return not no_rows(t7) and "delta_over_random" in t7.columns and t7["delta_over_random"].notna().any()


@SECTION7.claim(
    "amplification", title="ΔW amplifies directions W has but does not emphasise",
    paper="amplification 21.5 (= 6.91 / 0.32) at r=4, about 1.9 (= 3.57 / 1.90) at r=64",
    figures=("table7_amplification",), snapshot=True, ranks="table7")
def _amplification(ev: Evidence) -> Finding:
    return amplification_finding(ev.get("table7"), *ev.table7_pair)


def amplification_finding(t7: pd.DataFrame | None, r_small: int, r_large: int) -> Finding:
    """The amplification claim on Table 7 rows at ``r_small`` (judged) and ``r_large`` (reported); full
    fine-tuning's F3 uses it on its own Table 7."""
    rule = (f"at r_small: holds if the margin ‖UᵀWV‖_F / E_random has its {LEVEL:.0%} interval above {MARGIN:g} and the "
            f"amplification above 1; does not hold if the margin's interval lies below {MARGIN:g} (ΔW not aligned with W "
            "well above chance); else inconclusive. The fall of the factor with r is geometry, reported only")
    if not _t7_ready(t7):
        return _not_measured(rule, "no Table 7 rows with the random null")
    margin_log, rows = _margin(t7, r_small)
    margin = geometric_interval(margin_log)
    amp = geometric_interval(seed_bootstrap_ci(np.log(rows["amplification"].to_numpy()), rows))
    if margin.lo > MARGIN:
        verdict = HOLDS if amp.lo > 1 else INCONCLUSIVE if amp.hi >= 1 else FAILS
    else:
        verdict = FAILS if margin.hi < MARGIN else INCONCLUSIVE
    rand_amp = float(np.exp(np.log(rows["amplification_random"]).mean()))
    large = _t7_at(t7, r_large)
    amp_l = float(np.exp(np.log(large["amplification"]).mean())) if len(large) else math.nan
    rand_l = float(np.exp(np.log(large["amplification_random"]).mean())) if len(large) else math.nan
    details = []
    measures: dict[str, Any] = {"rank": r_small, "margin": margin.as_dict(), "amplification": amp.as_dict(),
                                "amplification_random": rand_amp, "rank_large": r_large,
                                "amplification_large": amp_l, "amplification_random_large": rand_l}
    for wt in sorted(set(rows["weight_type"])):
        sub = rows_where(rows, weight_type=wt)
        m = geometric_interval(seed_bootstrap_ci(np.log(sub["delta_over_random"].to_numpy()), sub))
        a = float(np.exp(np.log(sub["amplification"]).mean()))
        measures[f"margin_{wt}"] = m.as_dict()
        details.append(f"ΔW_{wt} at r={r_small}: projection / random {m.text('.2f')}; amplification {fmt_number(a, '.2f')} "
                       f"(a same-norm ΔW in a random subspace: {fmt_number(float(np.exp(np.log(sub['amplification_random']).mean())), '.2f')})")
    details.append(f"at r={r_large}: amplification {fmt_number(amp_l, '.2f')} (random subspace: {fmt_number(rand_l, '.2f')}); "
                   "smaller at high rank for any ΔW, by geometry")
    null = (f"a random k-dimensional pair gives E‖UᵀWV‖_F = k‖W‖_F/√(d_out d_in) (derived; sampled mean ± sd in "
            f"table7.csv), so a same-norm ΔW in a random subspace has amplification {fmt_number(rand_amp, '.1f')} at r={r_small}")
    ours = (f"r={r_small}: amplification {amp.text('.2f')} (random subspace {fmt_number(rand_amp, '.2f')}), projection / random "
            f"{margin.text('.2f')}; r={r_large}: {fmt_number(amp_l, '.2f')}")
    return _claim(ours, verdict, rule, null, "table7", measures, details)


@SECTION7.claim(
    "projection_above_random",
    title="W projected on ΔW's subspace lies between a random and W's own top subspace",
    paper="‖UᵀW_qV‖_F: random 0.02 < ΔW_q 0.32 < W_q 21.67 at r=4; 0.33 < 1.90 < 37.71 at r=64 (ΔW 16× and "
          "5.8× random)",
    figures=("table7",), snapshot=True, ranks="table7")
def _projection(ev: Evidence) -> Finding:
    t7, (r_small, r_large) = ev.get("table7"), ev.table7_pair
    rule = (f"random < ΔW < W, 'above random' meaning a margin ‖UᵀWV‖_F / E_random whose {LEVEL:.0%} interval lies "
            f"above {MARGIN:g}: holds at both r_small and r_large, partly at one (the other below), does not hold at "
            "neither (both below), else inconclusive")
    if not _t7_ready(t7):
        return _not_measured(rule, "no Table 7 rows with the random null")
    outcomes, parts, details = [], [], []
    measures: dict[str, Any] = {}
    for r in sorted({r_small, r_large}):
        m_log, rows = _margin(t7, r)
        m = geometric_interval(m_log)
        below_w = bool((rows["delta"] < rows["weight"]).all())
        outcome = three_way(m, MARGIN) if below_w else FAILS
        outcomes.append(outcome)
        measures[f"margin_r{r}"] = m.as_dict()
        measures[f"delta_below_weight_r{r}"] = below_w
        parts.append(f"r={r}: {m.text('.2f')}× random")
        for wt in sorted(set(rows["weight_type"])):
            sub = rows_where(rows, weight_type=wt)
            mw = geometric_interval(seed_bootstrap_ci(np.log(sub["delta_over_random"].to_numpy()), sub))
            details.append(f"ΔW_{wt} projection / random: {mw.text('.2f')} at k={r} (mean ‖UᵀWV‖_F: random "
                           f"{fmt_number(float(sub['random_expected'].mean()), '.3f')}, ΔW {fmt_number(float(sub['delta'].mean()), '.3f')}, "
                           f"W {fmt_number(float(sub['weight'].mean()), '.2f')}; z {fmt_number(float(sub['z'].mean()), '.1f')})")
    if all(o == HOLDS for o in outcomes):
        verdict = HOLDS
    elif all(o == FAILS for o in outcomes):
        verdict = FAILS
    elif HOLDS in outcomes and FAILS in outcomes:
        verdict = PARTLY
    else:
        verdict = INCONCLUSIVE
    null = "E‖UᵀWV‖_F = k‖W‖_F/√(d_out d_in) for a random pair (derived; its sampled mean ± sd and z in table7.csv)"
    return _claim("ΔW's projection / random: " + "; ".join(parts), verdict, rule, null, "table7", measures,
                  details)


# --------------------------------------------------------------------------------------------- Figure 8
@SECTION7.claim(
    "w_top_not_amplified", title="W's top singular directions barely overlap ΔW's",
    paper="φ(W_q, ΔW_q, i, j) 'barely exceeds 0.2' (Appendix H.3)", figures=("figure8",))
def _fig8(ev: Evidence) -> Finding:
    fig8 = ev.get("fig8")
    rule = (f"mean φ(W's top-i, ΔW's top-j) over the Figure 8 grid divided by the same for a random A of that rank, per "
            f"(module, rank, seed): holds if the {LEVEL:.0%} interval lies within {FIG8_RATIO:g}× random, does not hold "
            "if above")
    if no_rows(fig8) or len(rows_where(fig8, source="random")) == 0:
        return _not_measured(rule, "no Figure 8 rows with a random A")
    keys = ["module", "rank", "seed"]
    delta = rows_where(fig8, source="delta").groupby(keys)["phi"].mean()
    rnd = rows_where(fig8, source="random").groupby(keys)["phi"].mean()
    ratio = (delta / rnd).dropna().rename("ratio").reset_index()
    if len(ratio) == 0:
        return _not_measured(rule, "no Figure 8 rows with both ΔW and random A")
    ci = seed_bootstrap_ci(ratio["ratio"], ratio)
    verdict = three_way(ci, FIG8_RATIO, holds_above=False)
    peak, peak_r = float(rows_where(fig8, source="delta")["phi"].max()), float(rows_where(fig8, source="random")["phi"].max())
    measures = {"ratio_to_random": ci.as_dict(), "max_phi": peak, "max_phi_random": peak_r, "cells": len(ratio)}
    null = "a random A of the same rank against the same top directions of W (the random panel of Figure 8)"
    ours = f"overlap with W's top directions {ci.text('.2f')}× a random A's; max φ {fmt_number(peak)} (random A: {fmt_number(peak_r)})"
    details = ["a negative claim: ΔW unrelated to W passes it; ΔW on W's top directions fails it"]
    return _claim(ours, verdict, rule, null, "fig8", measures, details)


# --------------------------------------------------------------------------------------------- quality
def _slope(x: np.ndarray, y: np.ndarray) -> float:
    if len(set(x.tolist())) < 2:
        return math.nan
    return float(np.polyfit(x, y, 1)[0])


@SECTION7.claim(
    "quality_flat_in_rank", title="Validation quality is flat in the rank (r = 1 already suffices)",
    paper="Table 6: WikiSQL 73.4/73.3/73.7/73.8/73.5, MultiNLI 91.3/91.4/91.3/91.6/91.4 at r=1/2/4/8/64",
    figures=("table6",))
def _flat(ev: Evidence) -> Finding:
    quality = ev.get("quality")
    rule = (f"least-squares slope of the validation metric per doubling of r over every rank and seed: holds if its "
            f"{LEVEL:.0%} interval lies within ±{FLAT_SLOPE:g}, does not hold if wholly outside, else inconclusive")
    try:
        rows = table6_rows(quality)
    except MissingRows as exc:
        return _not_measured(rule, str(exc))
    if len(rows) == 0:
        return _not_measured(rule, "no weight set trained at two or more ranks")
    ws = "q,v" if "q,v" in set(rows["weight_set"]) else sorted(set(rows["weight_set"]))[0]
    rows = rows_where(rows, weight_set=ws).reset_index(drop=True)
    x, y = np.log2(rows["rank"].to_numpy(dtype=float)), rows["val_metric"].to_numpy(dtype=float)
    idx = np.arange(len(rows))
    several = rows["seed"].nunique() >= 2  # else resample the points themselves, and say so
    iv = bootstrap_ci(idx, units=rows["seed"].to_numpy() if several else None, statistic=lambda i: _slope(x[i.astype(int)], y[i.astype(int)]),
                      level=LEVEL)
    ci = Interval(iv.estimate, iv.lo, iv.hi, iv.level,
                  f"{iv.method} (resampling {'seeds' if several else 'points: one seed'})")
    verdict = within(ci, FLAT_SLOPE) if not math.isnan(ci.estimate) else INCONCLUSIVE
    means = rows.groupby("rank")["val_metric"].mean()
    metric = str(rows["metric_name"].iloc[0])
    by_rank = ", ".join(f"r={int(r)}: {fmt_number(m, '.4f')}" for r, m in means.items())
    measures = {"weight_set": ws, "metric": metric, "slope_per_doubling": ci.as_dict(),
                "means": {int(r): float(m) for r, m in means.items()}, "seeds": int(rows["seed"].nunique())}
    details = [f"{{{ws}}} {metric}: {by_rank}; range {fmt_number(float(means.max() - means.min()), '.4f')}"]
    probe = rows_where(quality, weight_set="linear probe")
    if len(probe):
        details.append(f"frozen linear probe: {fmt_number(float(probe['val_metric'].mean()), '.4f')}")
    null = "no effect of r: slope 0; 'flat' is an equivalence claim, so it holds only when the interval is narrow"
    ours = f"{{{ws}}} {metric} per doubling of r: {ci.text('+.4f')}"
    return _claim(ours, verdict, rule, null, "quality", measures, details)


@SECTION7.claim(
    "budget_best_sets", title="At a fixed parameter budget, adapting {W_q, W_v} or all four is best",
    paper="{W_q, W_v} and all four best at 18M parameters: WikiSQL 73.7, MultiNLI 91.3 / 91.7",
    figures=("table5",))
def _best_sets(ev: Evidence) -> Finding:
    quality = ev.get("quality")
    rule = (f"share of seed resamples (bootstrap) in which the best set is {{W_q, W_v}} or all four: holds if ≥ "
            f"{BEST_PROB:.0%}, does not hold if ≤ {1 - BEST_PROB:.0%}, else inconclusive")
    try:
        rows = table5_rows(quality)
    except MissingRows as exc:
        return _not_measured(rule, str(exc))
    canon = rows["weight_set"].map(lambda s: ",".join(sorted(str(s).split(","), key="qkvo".find)))
    wide = rows.assign(canon=canon).pivot_table(index="seed", columns="canon", values="val_metric", aggfunc="mean")
    wide = wide.dropna(axis=0)  # the seeds that trained every set: a resample compares like with like
    if len(wide) == 0:
        return _not_measured(rule, "no seed trained every weight set of the budget")
    sets = list(wide.columns)
    means = wide.mean()
    best = str(means.idxmax())
    seeds = wide.index.to_numpy()
    if len(seeds) >= 2:
        draws = np.random.default_rng(0).integers(0, len(seeds), size=(4000, len(seeds)))
        best_of_draw = wide.to_numpy(dtype=np.float64)[draws].mean(axis=1).argmax(axis=1)  # (draws,) best set
        p = float(np.isin(np.asarray(sets, dtype=object)[best_of_draw], TABLE5_BEST).mean())
        verdict = HOLDS if p >= BEST_PROB else FAILS if p <= 1 - BEST_PROB else INCONCLUSIVE
    else:  # one seed: nothing to resample, no spread to judge against
        p = float(best in TABLE5_BEST)
        verdict = INCONCLUSIVE
    ranking = "; ".join(f"{{{s}}}: {fmt_number(m, '.4f')}" for s, m in means.sort_values(ascending=False).items())
    good = [s for s in TABLE5_BEST if s in sets]
    measures = {"best": best, "p_best_in_paper_sets": p, "seeds": len(seeds),
                "means": {s: float(m) for s, m in means.items()}, "chance": len(good) / len(sets)}
    null = f"with no real difference each of the {len(sets)} sets is best by chance: {len(good)}/{len(sets)}"
    ours = (f"best {{{best}}} ({fmt_number(float(means.max()), '.4f')}); {{W_q, W_v}} or all four best in {p:.0%} of seed "
            "resamples")
    return _claim(ours, verdict, rule, null, "quality", measures, [f"ranking: {ranking}"])


# --------------------------------------------------------------------------------------------- all claims
def _rank_pair_of(phi: pd.DataFrame, small: float, large: float) -> tuple[int, int] | None:
    rank_rows = rows_where(phi, comparison="rank")
    pairs = sorted({(int(a), int(b)) for a, b in zip(rank_rows["r1"], rank_rows["r2"], strict=True)})
    if not pairs:
        return None
    r2 = nearest_rank([b for _, b in pairs], large)
    return nearest_rank([a for a, b in pairs if b == r2], small), r2


CLAIM_IDS = SECTION7.ids  # the built-in claims, in report order (a claim added later joins SECTION7.specs)


def evaluate_claims(tables: Mapping[str, pd.DataFrame], *, layer: int | None = None) -> tuple[list[Claim], Context]:
    """Every claim declared in :data:`~lora_analysis.verdicts.registry.SECTION7`, measured on ``tables`` (the
    Section 7 tables of :func:`lora_analysis.pipeline.analyse`).

    A claim declared with ``ranks="phi"`` or ``"table7"`` is judged again at the rank pair nearest the paper's r/d
    (8 and 64, or Table 7's 4 and 64, of d = 12,288), where that pair differs, and the result recorded beside it.

    Args:
        tables: ``phi``, ``fig8``, ``table7``, ``spectra``, ``singular_values``, ``quality`` (any may be missing).
        layer: the layer the figures show (default: the middle adapted layer), recorded in the context; every
            verdict pools all layers.

    Returns:
        The claims in declaration order and the context (layer, ranks, d) they were measured on.
    """
    phi, t7 = tables.get("phi"), tables.get("table7")
    layers: set[int] = set()
    for name in ("phi", "fig8", "table7"):
        t = tables.get(name)
        if not no_rows(t):
            layers |= {int(x) for x in t["layer"]}
    try:
        chosen = middle_layer(sorted(layers), layer) if layers else None
    except MissingRows:
        chosen = None
    d = _d_of(phi, t7)
    pair = _rank_pair_of(phi, PAPER_RANK_SMALL, PAPER_RANK_LARGE) if not no_rows(phi) else None
    r1, r2 = pair if pair else (0, 0)
    t7_ranks = sorted({int(r) for r in t7["rank"]}) if _t7_ready(t7) else []
    # One rank only (e.g. a folder of same-rank peft adapters): both claims are measured at that rank.
    ts, tl = (nearest_rank(t7_ranks, PAPER_TABLE7_RANKS[0]), t7_ranks[-1]) if t7_ranks else (0, 0)
    evidence = Evidence(tables, (r1, r2), (ts, tl), d)
    scaled: dict[str, tuple[int, int]] = {}  # the rank pairs nearest the paper's r/d, where they differ
    if d and not no_rows(phi):
        sp = _rank_pair_of(phi, PAPER_RANK_SMALL * d / PAPER_D, PAPER_RANK_LARGE * d / PAPER_D)
        if sp and sp != (r1, r2) and sp[0] != sp[1]:
            scaled["phi"] = sp
    if d and len(t7_ranks) >= 2:  # Table 7's pair nearest the paper's r/d (4 and 64 of d = 12,288)
        st = (nearest_rank(t7_ranks, PAPER_TABLE7_RANKS[0] * d / PAPER_D),
              nearest_rank(t7_ranks, PAPER_TABLE7_RANKS[1] * d / PAPER_D))
        if st != (ts, tl) and st[0] != st[1]:
            scaled["table7"] = st
    claims = []
    for spec in SECTION7.specs:
        claim = spec.judge(evidence)
        if spec.ranks in scaled:
            at = scaled[spec.ranks]
            moved = replace(evidence, **{f"{spec.ranks}_pair": at})
            claim = spec.with_scaled(claim, spec.judge(moved), at, d)
        claims.append(claim)
    seeds = tuple(sorted({int(s) for s in t7["seed"]})) if not no_rows(t7) else ()
    context = Context(layer=chosen, layers=tuple(sorted(layers)), r_small=r1 or None, r_large=r2 or None, d=d,
                      scaled_ranks=scaled.get("phi"), seeds=seeds)
    return claims, context


def claims_table(tables: Mapping[str, pd.DataFrame], *, keys: Sequence[str] | None = None) -> pd.DataFrame:
    """The claims (optionally only ``keys``, claim ids) as a DataFrame: claim, paper, ours, verdict, rule."""
    claims, _ = evaluate_claims(tables)
    rows = [{"claim": c.title, "paper": c.paper, "ours": c.ours, "verdict": c.verdict, "rule": c.rule}
            for c in claims if keys is None or c.id in keys]
    return pd.DataFrame(rows)


def json_safe(x: Any) -> Any:
    """JSON-safe: NaN/Inf -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(x, Mapping):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def report_json(claims: Sequence[Claim], context: Context) -> dict[str, Any]:
    """The machine-readable report: ``{"claims": [{"id", "verdict", "measures", "rule", ...}], "context", ...}``."""
    return json_safe({
        "format": "lora-structure-report/1",
        "verdicts": list(VERDICTS),
        "context": asdict(context),
        "counts": {v: sum(c.verdict == v for c in claims) for v in VERDICTS},
        "claims": [{"id": c.id, "title": c.title, "verdict": c.verdict, "measures": dict(c.measures), "rule": c.rule,
                    "null": c.null, "quantity": c.quantity, "paper": c.paper, "ours": c.ours,
                    "details": list(c.details)} for c in claims],
    })

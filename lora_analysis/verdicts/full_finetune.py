"""LoRA against full fine-tuning: verdicts on the full ΔW and on what LoRA shares with it, each against a null.

From the tables of :mod:`lora_analysis.tables.full_finetune` (pooled over layers × seeds × weight types; 95 %
intervals as in :mod:`lora_analysis.verdicts.claims`: a bootstrap resampling seeds, or modules with one seed):

1. ``full_low_rank`` (Section 4.1's hypothesis): the entropy effective rank of the full ΔW divided by that of a
   Gaussian matrix of the same shape (a ΔW with no low-rank structure). holds: the interval lies below
   ``LOW_RANK_RATIO`` (0.5); does not hold: above it.
2. ``lora_captures_full_subspace``: φ(full ΔW's top-r right singular vectors, LoRA r's, r, r) at the rank nearest
   8, divided by the random null r/d (geometric mean). holds: the interval lies above ``MARGIN`` (2× chance);
   does not hold: below it.
3. ``full_amplification``: Table 7's amplification rule (claim 4 of Section 7) applied to the full ΔW's top-k
   subspace at the k of LoRA's Table 7.
4. ``lora_more_intruders`` (Shuttleworth et al., 2024): intruder dimensions among the top 10 of W0 + ΔW, LoRA at
   the rank nearest 8 minus full fine-tuning, per (module, seed). holds: interval above 0; does not hold: below 0.
   Null: no difference.

Full fine-tuning's validation metric sits beside LoRA's (``quality``), reported without a verdict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from lora_analysis.tables.select import PAPER_RANK_SMALL, PAPER_TABLE7_RANKS, nearest_rank
from lora_analysis.verdicts.claims import (
    INCONCLUSIVE,
    LEVEL,
    MARGIN,
    Claim,
    amplification_finding,
    finding,
    fmt_number,
    geometric_interval,
    json_safe,
    no_rows,
    seed_stat,
    three_way,
)
from lora_analysis.verdicts.registry import FULL_FINETUNE, Evidence, Finding

__all__ = ["FULL_CLAIM_IDS", "LOW_RANK_RATIO", "evaluate_full_claims", "full_claims_table", "full_json",
           "full_quality"]

LOW_RANK_RATIO = 0.5  # "low intrinsic rank": under half the effective rank of an unstructured (Gaussian) ΔW


@FULL_FINETUNE.claim(
    "full_low_rank", title="Full fine-tuning's ΔW has a low intrinsic rank (Section 4.1's hypothesis)",
    paper="'the change in weights during model adaptation also has a low intrinsic rank' (hypothesis, Section 4.1; "
          "not measured in the paper)",
    figures=("full_spectrum",))
def _low_rank(ev: Evidence) -> Finding:
    spectra = ev.get("full_spectra")
    rule = (f"entropy effective rank of the full ΔW / that of a same-shape Gaussian, per (module, seed): holds if the "
            f"mean's {LEVEL:.0%} interval lies below {LOW_RANK_RATIO:g}, does not hold if above, else inconclusive")
    if no_rows(spectra):
        return Finding.not_measured(rule, "no full fine-tuning ΔW")
    ratio = spectra.assign(ratio=spectra["entropy_rank"] / spectra["random_entropy_rank"])
    stat = seed_stat(ratio, "ratio")
    ci = stat.interval
    verdict = three_way(ci, LOW_RANK_RATIO, holds_above=False)
    details, measures = [], {"ratio_to_random": ci.as_dict(), "modules": len(ratio)}
    per_layer = ratio.groupby(["weight_type", "layer"])[["entropy_rank", "energy_rank_90", "random_entropy_rank",
                                                         "stable_rank"]].mean()
    measures["per_layer"] = [{"weight_type": wt, "layer": int(lay), **{c: float(v) for c, v in row.items()}}
                             for (wt, lay), row in per_layer.iterrows()]
    for (wt, lay), row in per_layer.iterrows():
        details.append(f"ΔW_{wt} layer {int(lay)}: entropy rank {fmt_number(row.entropy_rank, '.1f')}, 90 %-energy rank "
                       f"{fmt_number(row.energy_rank_90, '.1f')}, stable rank {fmt_number(row.stable_rank, '.2f')} (Gaussian: entropy "
                       f"rank {fmt_number(row.random_entropy_rank, '.1f')})")
    d = int(spectra["d_in"].iloc[0])
    null = (f"a Gaussian matrix of the same shape (no low-rank structure): entropy effective rank "
            f"{fmt_number(float(spectra['random_entropy_rank'].mean()), '.1f')} of at most {min(d, int(spectra['d_out'].iloc[0]))}")
    ours = (f"full ΔW entropy effective rank {fmt_number(float(spectra['entropy_rank'].mean()), '.1f')} (90 %-energy rank "
            f"{fmt_number(float(spectra['energy_rank_90'].mean()), '.1f')}): {ci.text('.3f')} of a Gaussian's")
    power = stat.power(lambda iv: iv.hi < LOW_RANK_RATIO, LOW_RANK_RATIO / 2,
                       f"P(holds) at a true ratio of {LOW_RANK_RATIO / 2:g}")
    return finding(ours, verdict, rule, null, "full_spectra", measures, details, stat=stat, power=power)


@FULL_FINETUNE.claim("lora_captures_full_subspace", title="LoRA finds the directions full fine-tuning uses",
                     paper="not measured in the paper")
def _captures(ev: Evidence) -> Finding:
    vs = ev.get("full_vs_lora")
    rule = (f"φ(full ΔW's top-r, LoRA r's ΔW, r, r) at the rank nearest {PAPER_RANK_SMALL} divided by the random null "
            f"r/d, per (module, seed), geometric mean: holds if its {LEVEL:.0%} interval lies above {MARGIN:g}, does "
            f"not hold if below, else inconclusive")
    if no_rows(vs):
        return Finding.not_measured(rule, "no LoRA adapter of a full fine-tuning run's seed")
    r = nearest_rank(sorted({int(x) for x in vs["rank"]}), PAPER_RANK_SMALL)
    rows = vs[vs["rank"] == r]
    logs = rows.assign(log_ratio=np.log(np.maximum(rows["phi"].to_numpy(), 1e-300) / rows["null"].to_numpy()))
    stat = seed_stat(logs, "log_ratio")
    ci = geometric_interval(stat.interval)
    verdict = three_way(ci, MARGIN)
    details = []
    measures: dict[str, Any] = {"rank": r, "ratio_to_random": ci.as_dict(), "mean_phi": float(rows["phi"].mean()),
                                "null": float(rows["null"].mean()), "pairs": len(rows)}
    for rr, sub in vs.groupby("rank"):
        for wt, s2 in sub.groupby("weight_type"):
            details.append(f"r={int(rr)}, ΔW_{wt}: φ(r, r) {fmt_number(float(s2['phi'].mean()))} (random {fmt_number(float(s2['null'].mean()), '.4f')})")
    ours = (f"LoRA r={r} captures φ = {fmt_number(float(rows['phi'].mean()))} of full fine-tuning's top-{r} subspace, "
            f"{ci.text('.2f')}× the random {fmt_number(float(rows['null'].mean()), '.4f')}")
    null = "two random r-dimensional subspaces of dimension d: E φ(r, r) = r/d"
    power = stat.power(lambda iv: iv.lo > np.log(MARGIN), np.log(2 * MARGIN),
                       f"P(holds) at a true ratio of {2 * MARGIN:g}× chance")
    return finding(ours, verdict, rule, null, "full_vs_lora", measures, details, stat=stat, power=power)


@FULL_FINETUNE.claim(
    "full_amplification",
    title="Full fine-tuning amplifies directions W has but does not emphasise, as LoRA does",
    paper="not measured in the paper (Table 7 is for LoRA's ΔW)")
def _full_amp(ev: Evidence) -> Finding:
    t7, lora_t7 = ev.get("full_table7"), ev.get("table7")
    if no_rows(t7):
        return Finding.not_measured("Table 7's amplification rule on the full ΔW", "no full fine-tuning ΔW")
    ks = sorted({int(k) for k in t7["rank"]})
    ts = nearest_rank(ks, PAPER_TABLE7_RANKS[0])
    base = amplification_finding(t7, ts, ks[-1])
    details = list(base.details)
    if not no_rows(lora_t7) and ts in set(int(x) for x in lora_t7["rank"]):
        lr = lora_t7[lora_t7["rank"] == ts]
        details.append(f"LoRA r={ts} for comparison: amplification {fmt_number(float(np.exp(np.log(lr['amplification']).mean())), '.2f')}, "
                       f"projection / random {fmt_number(float(np.exp(np.log(lr['delta_over_random']).mean())), '.2f')}")
    return replace(base, details=tuple(details), ours=base.ours.replace("r=", "k="))


@FULL_FINETUNE.claim(
    "lora_more_intruders", title="LoRA introduces more intruder dimensions than full fine-tuning",
    paper="Shuttleworth et al. (2024): LoRA's tuned weights have intruder dimensions, full fine-tuning's hardly any")
def _intruders(ev: Evidence) -> Finding:
    vs = ev.get("full_vs_lora")
    rule = (f"intruder dimensions among the top 10 of W0 + ΔW, LoRA at the rank nearest {PAPER_RANK_SMALL} minus full "
            f"fine-tuning, per (module, seed): holds if the mean's {LEVEL:.0%} interval lies above 0, does not hold if "
            "below, else inconclusive")
    if no_rows(vs):
        return Finding.not_measured(rule, "no LoRA adapter of a full fine-tuning run's seed")
    r = nearest_rank(sorted({int(x) for x in vs["rank"]}), PAPER_RANK_SMALL)
    rows = vs[vs["rank"] == r]
    diff = rows.assign(diff=rows["lora_intruders"] - rows["full_intruders"])
    stat = seed_stat(diff, "diff")
    ci = stat.interval
    verdict = three_way(ci, 0.0)
    if verdict == INCONCLUSIVE and ci.lo == ci.hi == 0.0:
        verdict = INCONCLUSIVE  # no intruder on either side: nothing to tell apart
    measures = {"rank": r, "difference": ci.as_dict(), "lora_mean": float(rows["lora_intruders"].mean()),
                "full_mean": float(rows["full_intruders"].mean())}
    ours = (f"LoRA r={r}: {fmt_number(float(rows['lora_intruders'].mean()), '.2f')} intruders per matrix, full fine-tuning "
            f"{fmt_number(float(rows['full_intruders'].mean()), '.2f')}; difference {ci.text('.2f')}")
    power = stat.power(lambda iv: iv.lo > 0, 1.0, "P(holds) at one intruder more per matrix for LoRA")
    return finding(ours, verdict, rule, "no difference (0)", "full_vs_lora", measures, stat=stat, power=power)


def full_quality(quality: pd.DataFrame | None) -> dict[str, Any]:
    """Validation metric of full fine-tuning beside LoRA's per rank (mean and sd over seeds); ``{}`` without rows."""
    if no_rows(quality):
        return {}
    if "method" not in quality.columns:
        return {}
    full = quality[quality["method"] == "full"]
    if len(full) == 0:
        return {}
    ws = str(full["weight_set"].iloc[0])
    lora = quality[(quality["weight_set"] == ws) & (quality["method"] == "lora")]
    return {"weight_set": ws, "metric": str(full["metric_name"].iloc[0]),
            "full": {"mean": float(full["val_metric"].mean()), "sd": float(full["val_metric"].std()),
                     "seeds": int(full["seed"].nunique())},
            "lora": {int(r): {"mean": float(g["val_metric"].mean()), "sd": float(g["val_metric"].std())}
                     for r, g in lora.groupby("rank")}}


FULL_CLAIM_IDS = FULL_FINETUNE.ids  # the built-in claims, in report order


def evaluate_full_claims(full: Mapping[str, pd.DataFrame], *, lora_table7: pd.DataFrame | None = None) -> list[Claim]:
    """Every claim declared in :data:`~lora_analysis.verdicts.registry.FULL_FINETUNE`, on the full fine-tuning
    tables (and LoRA's Table 7, which F3 quotes beside its own)."""
    return FULL_FINETUNE.judge(Evidence({**full, "table7": lora_table7}))


def full_claims_table(full: Mapping[str, pd.DataFrame], tables: Mapping[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """The LoRA-vs-full claims as a DataFrame: claim, ours, verdict, rule (for notebooks)."""
    claims = evaluate_full_claims(full, lora_table7=(tables or {}).get("table7"))
    return pd.DataFrame([{"claim": c.title, "ours": c.ours, "verdict": c.verdict, "rule": c.rule} for c in claims])


def full_json(claims: list[Claim], quality: Mapping[str, Any]) -> dict[str, Any]:
    """``report.json``'s ``"full_finetune"`` object."""
    return json_safe({"claims": [{"id": c.id, "title": c.title, "verdict": c.verdict, "measures": dict(c.measures),
                               "rule": c.rule, "null": c.null, "ours": c.ours, "details": list(c.details)}
                              for c in claims],
                   "quality": dict(quality)})



"""``figures/REPORT.md``: each claim of Section 7 (Hu et al., 2021) beside our measured number and a verdict.

Every verdict is computed from the tidy tables of :mod:`lora_analysis.tables` by an explicit rule with fixed
thresholds (below, and printed in the report beside each claim). The rules compare *what the paper claims*, not
its exact numbers: the paper measured GPT-3 175B on unnamed data and seeds, we measure whatever the run trained.

Verdicts: ``holds``, ``partly``, ``does not hold``, or ``not measured`` (the run lacks the rows: e.g. one seed).
"Layer" below is the layer the figures show: the middle adapted layer (the paper's 48th of 96).

Rules (``L`` = that layer; means over seeds unless said otherwise):

1. **Top direction shared** (Figure 3): φ(A_{r_small}, A_{r_large}, 1, 1) on A at L for ΔW_q and ΔW_v.
   holds: both > ``TOP_SHARED`` (0.5, the paper's own figure); partly: one; does not hold: neither.
2. **Other directions look like noise** (Figure 3): mean φ(i, j) over 2 ≤ i, j ≤ r_small on A at L, divided by
   the mean analytic random baseline max(i, j)/d over the same cells. holds: ratio ≤ ``NOISE_HOLDS`` (2) for both
   weight types; partly: every ratio ≤ ``NOISE_PARTLY`` (5); does not hold: otherwise.
3. **ΔW_q has a higher intrinsic rank than ΔW_v** (Figure 4): the seed-vs-seed overlap of the leading
   directions, ``shared = mean φ(i, j) − mean max(i, j)/d`` over i, j ≤ ``SHARED_K`` (8) at r_large.
   holds: shared_q > shared_v at L *and* in ≥ 2/3 of the layers; partly: at L or in ≥ 2/3 of layers;
   does not hold: neither.
4. **Amplification smaller at high rank** (Table 7): the amplification ‖ΔW_q‖_F / ‖UᵀW_qV‖_F at r_small (nearest
   4) against r_large. holds: smaller at r_large at L *and* in ≥ 2/3 of layers; partly: one of the two;
   does not hold: neither. The magnitude (paper 21.5 → 1.9) is reported beside it, not judged.
5. **ΔW's projection of W lies between random and W's own top directions** (Table 7): random < ΔW < W for
   ‖UᵀW_qV‖_F at L. holds: at both ranks; partly: at one; does not hold: at neither.
6. **W's top directions barely overlap ΔW's** (Figure 8, "barely exceeds 0.2"): the largest φ(W_q, ΔW_q, i, j) at
   L over the ranks shown. holds: ≤ ``FIG8_HOLDS`` (0.3); partly: ≤ ``FIG8_PARTLY`` (0.5); does not hold: above.
7. **Quality is flat in rank** (Table 6): range of the per-rank mean metric of {W_q, W_v}. holds: range ≤
   max(2 × pooled seed std, 1 % of the best mean); partly: ≤ max(4 × std, 3 %); does not hold: above.
8. **{W_q, W_v} and all four are best at a fixed budget** (Table 5): holds: the best set is one of them;
   partly: one of them is within one pooled seed std of the best; does not hold: otherwise.

Beside every φ on A the report shows φ on A − A_init (what learning changed) and on A_init (the starting points):
with nested initialisation A_8's start is A_64's first rows, so φ on A can be inflated by the start alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from lora.errors import UserError
from lora_analysis.tables.aggregate import pooled_std, table5, table6
from lora_analysis.tables.select import MissingRows, middle_layer, nearest_rank, phi_rank_pair, rows_where

__all__ = [
    "FAILS",
    "HOLDS",
    "NOT_MEASURED",
    "PARTLY",
    "Claim",
    "Context",
    "claims_table",
    "evaluate_claims",
]

HOLDS, PARTLY, FAILS, NOT_MEASURED = "holds", "partly", "does not hold", "not measured"

TOP_SHARED = 0.5  # Figure 3: "the top singular vector overlap significantly ... φ > 0.5"
NOISE_HOLDS, NOISE_PARTLY = 2.0, 5.0  # ratio of mean φ to the random baseline over i, j >= 2
SHARED_K = 8  # Figure 4: the leading directions the paper's "more common directions" refers to
LAYER_MAJORITY = 2 / 3  # "across layers": at least two thirds of the layers
FIG8_HOLDS, FIG8_PARTLY = 0.3, 0.5  # "barely exceeds 0.2"
FLAT_STD, FLAT_REL = 2.0, 0.01  # Table 6 flat: range <= max(2 std, 1 % of best)
FLAT_STD_PARTLY, FLAT_REL_PARTLY = 4.0, 0.03
TABLE5_BEST = ("q,v", "q,k,v,o")

PAPER = {
    "top": "φ(A_8, A_64, 1, 1) > 0.5 for ΔW_q and ΔW_v (layer 48 of 96, GPT-3 175B)",
    "noise": "the other directions look like noise (Figure 3)",
    "intrinsic": "ΔW_q shares more directions across seeds than ΔW_v: a higher intrinsic rank (Figure 4)",
    "amplification": "amplification 21.5 (= 6.91 / 0.32) at r=4, about 1.9 (= 3.57 / 1.90) at r=64",
    "projection": "‖UᵀW_qV‖_F: random 0.02 < ΔW_q 0.32 < W_q 21.67 at r=4; 0.33 < 1.90 < 37.71 at r=64",
    "fig8": "φ(W_q, ΔW_q, i, j) 'barely exceeds 0.2' (Appendix H.3)",
    "flat": "Table 6: WikiSQL 73.4/73.3/73.7/73.8/73.5, MultiNLI 91.3/91.4/91.3/91.6/91.4 at r=1/2/4/8/64",
    "table5": "{W_q, W_v} and all four best at 18M parameters: WikiSQL 73.7, MultiNLI 91.3 / 91.7",
}


@dataclass(frozen=True)
class Claim:
    """One Section 7 claim with our measurement.

    Attributes:
        key: short id (``"top"``, ``"noise"``, ...).
        title: the claim in a few words.
        paper: what the paper reports.
        ours: our number(s), one line.
        verdict: ``holds`` / ``partly`` / ``does not hold`` / ``not measured``.
        rule: the rule that gave the verdict.
        details: further lines (per layer, the init control, ...).
        figures: names of the figures that show it.
    """

    key: str
    title: str
    paper: str
    ours: str
    verdict: str
    rule: str
    details: tuple[str, ...] = ()
    figures: tuple[str, ...] = ()


@dataclass(frozen=True)
class Context:
    """Which slice the claims were measured on."""

    layer: int | None = None
    layers: tuple[int, ...] = ()
    r_small: int | None = None
    r_large: int | None = None
    extra: Mapping[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- helpers


def _f(x: float, fmt: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(float(x), fmt)


def _empty(table: pd.DataFrame | None) -> bool:
    return table is None or len(table) == 0


def _by_layer_verdict(at_layer: bool, fraction: float) -> str:
    majority = fraction >= LAYER_MAJORITY
    if at_layer and majority:
        return HOLDS
    return PARTLY if (at_layer or majority) else FAILS


def _not_measured(key: str, title: str, rule: str, why: str, figures=()) -> Claim:
    return Claim(key, title, PAPER[key], f"not measured: {why}", NOT_MEASURED, rule, (), tuple(figures))


def _rank_phi(phi: pd.DataFrame) -> tuple[pd.DataFrame, int, int]:
    """Rank-comparison rows and their (r_small, r_large): r_large the largest, r_small the present rank nearest 8."""
    rows = rows_where(phi, comparison="rank")
    r1, r2 = phi_rank_pair(rows)
    return rows_where(rows, r1=r1, r2=r2), r1, r2


def _cell(rows: pd.DataFrame, i: int, j: int) -> float:
    sel = rows[(rows["i"] == i) & (rows["j"] == j)]["phi"]
    return float(sel.mean()) if len(sel) else float("nan")


def _block(rows: pd.DataFrame, lo: int, hi: int) -> float:
    sel = rows[(rows["i"] >= lo) & (rows["i"] <= hi) & (rows["j"] >= lo) & (rows["j"] <= hi)]["phi"]
    return float(sel.mean()) if len(sel) else float("nan")


# --------------------------------------------------------------------------------------------- claims


def _claim_top(phi: pd.DataFrame | None, layer: int) -> Claim:
    rule = f"φ(1, 1) on A at layer {layer} > {TOP_SHARED} for ΔW_q and ΔW_v: holds both, partly one, else does not hold"
    title = "The top singular direction is shared between a small and a large rank"
    if _empty(phi) or len(rows_where(phi, comparison="rank", quantity="A")) == 0:
        return _not_measured("top", title, rule, "no rank comparison (needs two ranks at the same seed)", ["figure3"])
    rows, r1, r2 = _rank_phi(phi)
    parts, passed, details = [], 0, []
    wts = [wt for wt in ("q", "v") if len(rows_where(rows, weight_type=wt, layer=layer, quantity="A"))]
    for wt in wts:
        at = rows_where(rows, weight_type=wt, layer=layer)
        a, learned, init = (_cell(rows_where(at, quantity=q), 1, 1) for q in ("A", "A-A_init", "A_init"))
        passed += a > TOP_SHARED
        parts.append(f"ΔW_{wt}: {_f(a)}")
        details.append(f"ΔW_{wt}, layer {layer}: φ(1,1) on A {_f(a)}; on A − A_init {_f(learned)}; "
                       f"between the starts A_init {_f(init)}")
    all_a = rows_where(rows, quantity="A")
    per = all_a[(all_a["i"] == 1) & (all_a["j"] == 1)]
    frac = float((per["phi"] > TOP_SHARED).mean()) if len(per) else float("nan")
    details.append(f"all layers and seeds: φ(1,1) > {TOP_SHARED} in {_f(100 * frac, '.0f')} % of "
                   f"{len(per)} (module, seed) pairs")
    learned_all = rows_where(rows, quantity="A-A_init")
    per_l = learned_all[(learned_all["i"] == 1) & (learned_all["j"] == 1)]
    if len(per_l):
        details.append(f"on the learned change A − A_init: > {TOP_SHARED} in "
                       f"{_f(100 * float((per_l['phi'] > TOP_SHARED).mean()), '.0f')} % of {len(per_l)} pairs")
    verdict = HOLDS if passed == len(wts) and wts else PARTLY if passed else FAILS
    ours = f"φ(A_{r1}, A_{r2}, 1, 1) at layer {layer}: " + ", ".join(parts)
    return Claim("top", title, PAPER["top"], ours, verdict, rule, tuple(details), ("figure3", "figure6", "init_control"))


def _claim_noise(phi: pd.DataFrame | None, layer: int) -> Claim:
    rule = (f"mean φ(i, j) over 2 ≤ i, j ≤ r_small on A at layer {layer}, divided by the mean random baseline "
            f"max(i, j)/d: holds ≤ {NOISE_HOLDS} for both, partly ≤ {NOISE_PARTLY}, else does not hold")
    title = "Directions other than the top one look like random noise"
    if _empty(phi) or len(rows_where(phi, comparison="rank", quantity="A")) == 0:
        return _not_measured("noise", title, rule, "no rank comparison", ["figure3"])
    rows, r1, r2 = _rank_phi(phi)
    if r1 < 2:
        return _not_measured("noise", title, rule, f"r_small = {r1} has no direction after the first", ["figure3"])
    ratios, parts, details = [], [], []
    for wt in ("q", "v"):
        at = rows_where(rows, weight_type=wt, layer=layer)
        if len(at) == 0:
            continue
        a = _block(rows_where(at, quantity="A"), 2, r1)
        base = _block(rows_where(at, quantity="expected_random"), 2, r1)
        learned = _block(rows_where(at, quantity="A-A_init"), 2, r1)
        ratio = a / base if base > 0 else float("nan")
        ratios.append(ratio)
        parts.append(f"ΔW_{wt}: {_f(a)} vs random {_f(base)} (× {_f(ratio, '.1f')})")
        details.append(f"ΔW_{wt}: mean φ over 2..{r1} on A {_f(a)}, on A − A_init {_f(learned)}, "
                       f"random baseline {_f(base)}")
    if not ratios or any(math.isnan(r) for r in ratios):
        return _not_measured("noise", title, rule, "no random baseline rows", ["figure3"])
    verdict = HOLDS if max(ratios) <= NOISE_HOLDS else PARTLY if max(ratios) <= NOISE_PARTLY else FAILS
    ours = f"layer {layer}, r={r1} vs r={r2}: " + "; ".join(parts)
    return Claim("noise", title, PAPER["noise"], ours, verdict, rule, tuple(details), ("figure3", "init_control"))


def _shared(rows: pd.DataFrame, k: int) -> float:
    return _block(rows_where(rows, quantity="A"), 1, k) - _block(rows_where(rows, quantity="expected_random"), 1, k)


def _claim_intrinsic(phi: pd.DataFrame | None, layer: int) -> Claim:
    rule = (f"shared = mean φ − mean random baseline over i, j ≤ {SHARED_K} between two seeds at r_large: holds if "
            f"shared_q > shared_v at layer {layer} and in ≥ 2/3 of layers, partly one of the two")
    title = "ΔW_q has a higher intrinsic rank than ΔW_v"
    seed = rows_where(phi, comparison="seed") if not _empty(phi) else None
    if _empty(seed):
        return _not_measured("intrinsic", title, rule, "no seed comparison (needs two seeds at the largest rank)",
                             ["figure4"])
    r = int(seed["r1"].max())
    seed = rows_where(seed, r1=r, r2=r)
    k = min(SHARED_K, r)
    wins, at_layer, details, ours = [], False, [], ""
    for lay in sorted(set(seed["layer"])):
        sq = _shared(rows_where(seed, layer=lay, weight_type="q"), k)
        sv = _shared(rows_where(seed, layer=lay, weight_type="v"), k)
        if math.isnan(sq) or math.isnan(sv):
            continue
        wins.append(sq > sv)
        init_q = _block(rows_where(seed, layer=lay, weight_type="q", quantity="A_init"), 1, k)
        details.append(f"layer {lay}: shared ΔW_q {_f(sq)}, ΔW_v {_f(sv)}"
                       + (f" (starting points' overlap {_f(init_q)})" if not math.isnan(init_q) else ""))
        if lay == layer:
            at_layer = sq > sv
            ours = f"r={r}, i, j ≤ {k}, layer {layer}: ΔW_q {_f(sq)} vs ΔW_v {_f(sv)} above random"
    if not wins:
        return _not_measured("intrinsic", title, rule, "no layer has both ΔW_q and ΔW_v", ["figure4"])
    frac = sum(wins) / len(wins)
    ours += f"; ΔW_q ahead in {sum(wins)} of {len(wins)} layers"
    return Claim("intrinsic", title, PAPER["intrinsic"], ours, _by_layer_verdict(at_layer, frac), rule,
                 tuple(details), ("figure4", "figure7"))


def _t7_ranks(t7: pd.DataFrame) -> tuple[int, int]:
    ranks = sorted(set(t7["rank"]))
    return nearest_rank(ranks[:-1] or ranks, 4), ranks[-1]


def _claim_amplification(t7: pd.DataFrame | None, layer: int) -> Claim:
    rule = (f"amplification of ΔW_q at r_small (nearest 4) > at r_large: holds at layer {layer} and in ≥ 2/3 of "
            "layers, partly one of the two; the magnitude is reported, not judged")
    title = "ΔW amplifies W's directions, much more at low rank"
    if _empty(t7) or t7["rank"].nunique() < 2:
        return _not_measured("amplification", title, rule, "needs Table 7 rows at two ranks", ["table7_amplification"])
    rs, rl = _t7_ranks(t7)
    q = rows_where(t7, weight_type="q")
    q = q if len(q) else t7
    mean = q.groupby(["layer", "rank"])["amplification"].mean()
    wins, details = [], []
    for lay in sorted(set(q["layer"])):
        a_s, a_l = mean.get((lay, rs), float("nan")), mean.get((lay, rl), float("nan"))
        wins.append(a_s > a_l)
        details.append(f"layer {lay}: {_f(a_s, '.2f')} at r={rs}, {_f(a_l, '.2f')} at r={rl}")
    a_s, a_l = mean.get((layer, rs), float("nan")), mean.get((layer, rl), float("nan"))
    frac = sum(wins) / len(wins)
    ours = (f"layer {layer}: {_f(a_s, '.2f')} at r={rs}, {_f(a_l, '.2f')} at r={rl}; smaller at r={rl} in "
            f"{sum(wins)} of {len(wins)} layers")
    return Claim("amplification", title, PAPER["amplification"], ours, _by_layer_verdict(a_s > a_l, frac), rule,
                 tuple(details), ("table7_amplification",))


def _claim_projection(t7: pd.DataFrame | None, layer: int) -> Claim:
    rule = f"random < ΔW_q < W_q for ‖UᵀW_qV‖_F at layer {layer}: holds at both ranks, partly at one"
    title = "W projected on ΔW's subspace lies between a random and W's own top subspace"
    if _empty(t7):
        return _not_measured("projection", title, rule, "no Table 7 rows", ["table7"])
    rs, rl = _t7_ranks(t7)
    q = rows_where(rows_where(t7, weight_type="q"), layer=layer)
    mean = q.groupby("rank")[["random", "delta", "weight", "w_norm", "dw_norm"]].mean()
    ok, parts = 0, []
    ranks = sorted({rs, rl})
    for r in ranks:
        if r not in mean.index:
            continue
        m = mean.loc[r]
        ok += bool(m["random"] < m["delta"] < m["weight"])
        parts.append(f"r={r}: random {_f(m['random'], '.2f')}, ΔW_q {_f(m['delta'], '.2f')}, "
                     f"W_q {_f(m['weight'], '.2f')} (‖W_q‖_F {_f(m['w_norm'], '.2f')}, ‖ΔW_q‖_F {_f(m['dw_norm'], '.2f')})")
    if not parts:
        return _not_measured("projection", title, rule, f"no ΔW_q rows at layer {layer}", ["table7"])
    verdict = HOLDS if ok == len(parts) else PARTLY if ok else FAILS
    return Claim("projection", title, PAPER["projection"], "; ".join(parts), verdict, rule, (), ("table7",))


def _claim_fig8(fig8: pd.DataFrame | None, layer: int) -> Claim:
    rule = f"largest φ(W_q, ΔW_q, i, j) at layer {layer}: holds ≤ {FIG8_HOLDS}, partly ≤ {FIG8_PARTLY}, else not"
    title = "W's top singular directions barely overlap ΔW's"
    if _empty(fig8):
        return _not_measured("fig8", title, rule, "no Figure 8 rows", ["figure8"])
    rows = rows_where(rows_where(fig8, weight_type="q"), layer=layer)
    delta, rnd = rows_where(rows, source="delta"), rows_where(rows, source="random")
    if len(delta) == 0:
        return _not_measured("fig8", title, rule, f"no ΔW_q rows at layer {layer}", ["figure8"])
    peak = float(delta["phi"].max())
    details = []
    for r, sub in delta.groupby("rank"):
        details.append(f"r={r}: max φ {_f(float(sub['phi'].max()))} over i ≤ {int(sub['i'].max())}, j ≤ {int(sub['j'].max())}")
    ours = f"max φ at layer {layer}: {_f(peak)}"
    if len(rnd):
        ours += f" (random A: {_f(float(rnd['phi'].max()))})"
    verdict = HOLDS if peak <= FIG8_HOLDS else PARTLY if peak <= FIG8_PARTLY else FAILS
    return Claim("fig8", title, PAPER["fig8"], ours, verdict, rule, tuple(details), ("figure8",))


def _claim_flat(quality: pd.DataFrame | None) -> Claim:
    rule = (f"range of mean metric over ranks for {{W_q, W_v}}: holds ≤ max({FLAT_STD:g} × pooled seed std, "
            f"{FLAT_REL:.0%} of best), partly ≤ max({FLAT_STD_PARTLY:g} × std, {FLAT_REL_PARTLY:.0%}), else not")
    title = "Validation quality is flat in the rank (r = 1 already suffices)"
    try:
        agg = table6(quality)
    except (MissingRows, UserError) as exc:
        return _not_measured("flat", title, rule, str(exc), ["table6"])
    sets = sorted(set(agg["weight_set"]))
    ws = "q,v" if "q,v" in sets else sets[0]
    sub = rows_where(agg, weight_set=ws)
    best, worst = float(sub["mean"].max()), float(sub["mean"].min())
    spread, std = best - worst, pooled_std(sub)
    std_term = 0.0 if math.isnan(std) else std
    metric = str(sub["metric_name"].iloc[0])
    by_rank = ", ".join(f"r={int(r)}: {_f(m, '.4f')}" for r, m in zip(sub["rank"], sub["mean"], strict=True))
    verdict = (HOLDS if spread <= max(FLAT_STD * std_term, FLAT_REL * abs(best))
               else PARTLY if spread <= max(FLAT_STD_PARTLY * std_term, FLAT_REL_PARTLY * abs(best)) else FAILS)
    ours = f"{{{ws}}} {metric}: {by_rank}; range {_f(spread, '.4f')}, pooled seed std {_f(std, '.4f')}"
    details = []
    probe = rows_where(quality, weight_set="linear probe") if not _empty(quality) else None
    if probe is not None and len(probe):
        details.append(f"frozen linear probe: {_f(float(probe['val_metric'].mean()), '.4f')}")
    if "q" in sets:
        q_mean, qv_mean = float(rows_where(agg, weight_set="q")["mean"].mean()), float(sub["mean"].mean())
        details.append(f"{{W_q}} alone: mean {_f(q_mean, '.4f')} vs {{W_q, W_v}} {_f(qv_mean, '.4f')} "
                       f"(paper: W_q alone is lower) — {'lower' if q_mean < qv_mean else 'not lower'}")
    return Claim("flat", title, PAPER["flat"], ours, verdict, rule, tuple(details), ("table6",))


def _claim_table5(quality: pd.DataFrame | None) -> Claim:
    rule = ("holds if the best weight set at the common budget is {W_q, W_v} or all four; partly if one of them is "
            "within one pooled seed std of the best; else does not hold")
    title = "At a fixed parameter budget, adapting {W_q, W_v} or all four is best"
    try:
        agg = table5(quality)
    except (MissingRows, UserError) as exc:
        return _not_measured("table5", title, rule, str(exc), ["table5"])
    canon = {ws: ",".join(sorted(ws.split(","), key="qkvo".find)) for ws in agg["weight_set"]}
    agg = agg.assign(canon=agg["weight_set"].map(canon))
    best = agg.iloc[int(np.argmax(agg["mean"].to_numpy()))]
    std = pooled_std(agg)
    good = agg[agg["canon"].isin(TABLE5_BEST)]
    ranking = "; ".join(f"{{{ws}}} r={int(r)}: {_f(m, '.4f')}" for ws, r, m in
                        zip(agg["weight_set"], agg["rank"], agg["mean"], strict=True))
    if best["canon"] in TABLE5_BEST:
        verdict = HOLDS
    elif len(good) and not math.isnan(std) and float(best["mean"] - good["mean"].max()) <= std:
        verdict = PARTLY
    else:
        verdict = FAILS
    ours = f"best {{{best['weight_set']}}} ({_f(float(best['mean']), '.4f')}); pooled seed std {_f(std, '.4f')}"
    return Claim("table5", title, PAPER["table5"], ours, verdict, rule, (f"ranking: {ranking}",), ("table5",))


def evaluate_claims(tables: Mapping[str, pd.DataFrame], *, layer: int | None = None) -> tuple[list[Claim], Context]:
    """Every Section 7 claim, measured on ``tables`` (the dict of :func:`lora_analysis.tables.analyse_run`).

    Args:
        tables: ``phi``, ``fig8``, ``table7``, ``spectra``, ``singular_values``, ``quality`` (any may be missing).
        layer: the layer the layer-specific claims use (default: the middle adapted layer, as the figures).

    Returns:
        The claims in the paper's order and the context (layer, ranks) they were measured on.
    """
    layers: set[int] = set()
    for name in ("phi", "fig8", "table7"):
        t = tables.get(name)
        if not _empty(t):
            layers |= {int(x) for x in t["layer"]}
    try:
        chosen = middle_layer(sorted(layers), layer) if layers else None
    except MissingRows:
        chosen = None
    phi, t7 = tables.get("phi"), tables.get("table7")
    r_small = r_large = None
    if not _empty(phi) and len(rows_where(phi, comparison="rank")):
        _, r_small, r_large = _rank_phi(phi)
    lay = -1 if chosen is None else chosen
    claims = [
        _claim_top(phi, lay),
        _claim_noise(phi, lay),
        _claim_intrinsic(phi, lay),
        _claim_amplification(t7, lay),
        _claim_projection(t7, lay),
        _claim_fig8(tables.get("fig8"), lay),
        _claim_flat(tables.get("quality")),
        _claim_table5(tables.get("quality")),
    ]
    return claims, Context(layer=chosen, layers=tuple(sorted(layers)), r_small=r_small, r_large=r_large)


def claims_table(tables: Mapping[str, pd.DataFrame], *, keys: Sequence[str] | None = None) -> pd.DataFrame:
    """The claims (optionally only ``keys``) as a DataFrame: claim, paper, ours, verdict, rule (for notebooks)."""
    claims, _ = evaluate_claims(tables)
    rows = [{"claim": c.title, "paper": c.paper, "ours": c.ours, "verdict": c.verdict, "rule": c.rule}
            for c in claims if keys is None or c.key in keys]
    return pd.DataFrame(rows)

"""The "Which rank?" section: its figure, its REPORT.md lines and its tables; and the per-layer rank advice's
REPORT.md subsection. Text in, text out: the decisions come from :mod:`lora_analysis.verdicts.which_rank`, the
advice from :mod:`lora_analysis.verdicts.rank_advice`.

- ``which_rank`` figure: validation accuracy against rank (log₂ axis), mean over seeds with the 95 % t-interval
  as bars: left, the three routes (trained at r, the largest-rank adapter resized to r, extracted at r from full
  fine-tuning) and full fine-tuning as a line; right, one weight type resized at a time, with each type's 90 %
  energy rank of ΔW (dotted) and the recommended rank (a star).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from lora_analysis.render.markdown import md_escape
from lora_analysis.verdicts.which_rank import RULE, RankDecision, WhichRank

__all__ = ["FIGURE", "rank_advice_lines", "which_rank_figure", "which_rank_lines", "write_which_rank"]

FIGURE = "which_rank"
_STYLE = {"trained": ("C0", "o"), "resized": ("C1", "s"), "extracted": ("C2", "^")}
_TYPE_COLOURS = {"q": "C0", "v": "C3"}


def _curve(ax, d: RankDecision, *, colour: str, marker: str, label: str, offset: float = 0.0) -> None:
    ranks = list(d.ladder)
    x = [r * 2**offset for r in ranks]  # a small shift on the log axis so the bars do not hide each other
    mean = [d.accuracy[r].estimate for r in ranks]
    lo = [m - d.accuracy[r].lo if math.isfinite(d.accuracy[r].lo) else 0.0 for r, m in zip(ranks, mean, strict=True)]
    hi = [d.accuracy[r].hi - m if math.isfinite(d.accuracy[r].hi) else 0.0 for r, m in zip(ranks, mean, strict=True)]
    ax.errorbar(x, mean, yerr=[lo, hi], color=colour, marker=marker, capsize=3, lw=1.3, ms=5, label=label)


def _axis(ax, ranks: list[int], metric: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.minorticks_off()
    ax.set_xlabel("rank r")
    ax.set_ylabel(f"validation {metric}")


def which_rank_figure(wr: WhichRank) -> Figure | None:
    """Accuracy against rank for the three routes and per weight type; ``None`` when nothing was measured."""
    from lora_analysis.render.figures import THEME

    if not wr.curves:
        return None
    sns.set_theme(**THEME)
    ncols = 2 if wr.per_type else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 3.6), squeeze=False, layout="constrained",
                             sharey=True)
    ax = axes[0, 0]
    ranks = sorted({r for d in wr.curves for r in d.ladder})
    for n, d in enumerate(wr.curves):
        colour, marker = _STYLE.get(d.curve, ("C4", "D"))
        _curve(ax, d, colour=colour, marker=marker, label=d.label, offset=0.06 * (n - 1))
    if wr.full:
        ax.axhline(wr.full["mean"], color="0.35", ls=":", lw=1.2, label="full fine-tuning (mean)")
    _axis(ax, ranks, wr.curves[0].metric)
    ax.set_title(f"all adapted modules at rank r ({wr.curves[0].seeds} seeds, 95 % t-intervals)", fontsize=9)
    ax.legend(frameon=False, fontsize="small", loc="lower right")
    if wr.per_type:
        ax = axes[0, 1]
        for n, (t, d) in enumerate(sorted(wr.per_type.items())):
            colour = _TYPE_COLOURS.get(t, f"C{n + 4}")
            _curve(ax, d, colour=colour, marker="o", label=f"only ΔW_{t} resized", offset=0.06 * (n - 0.5))
            if d.recommended is not None:
                ax.plot([d.recommended], [d.accuracy[d.recommended].estimate], marker="*", ms=14, color=colour,
                        mec="k", mew=0.6, ls="none", label=f"recommended r for ΔW_{t}")
            spec = wr.spectral[wr.spectral["weight_type"] == t] if len(wr.spectral) else wr.spectral
            if len(spec):
                ax.axvline(float(spec["energy_rank_90_mean"].iloc[0]), color=colour, ls=":", lw=1.1,
                           label=f"ΔW_{t}: 90 % energy rank (mean)")
        _axis(ax, sorted({r for d in wr.per_type.values() for r in d.ladder}), wr.curves[0].metric)
        ax.set_title("one weight type resized, the others at the largest rank", fontsize=9)
        ax.legend(frameon=False, fontsize="small", loc="lower right")
    fig.suptitle("Which rank? Validation accuracy against rank")
    sns.despine(fig)
    return fig


def _accuracy_table(wr: WhichRank) -> list[str]:
    decisions = [*wr.curves, *(wr.per_type[t] for t in sorted(wr.per_type))]
    ranks = sorted({r for d in decisions for r in d.ladder})
    names = [d.label if d.types == "q,v" or d.curve == "trained" else f"only ΔW_{d.types} resized"
             for d in decisions]
    lines = ["| r | " + " | ".join(md_escape(n) for n in names) + " |", "|---|" + "---|" * len(decisions)]
    for r in ranks:
        cells = []
        for d in decisions:
            if r not in d.accuracy:
                cells.append("")
                continue
            iv = d.accuracy[r]
            mark = "**" if r == d.recommended else ""
            cells.append(f"{mark}{iv.estimate:.4f}{mark} [{iv.lo:.4f}, {iv.hi:.4f}]" if math.isfinite(iv.hi)
                         else f"{mark}{iv.estimate:.4f}{mark}")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return lines


def _spectral_table(spectral: pd.DataFrame) -> list[str]:
    if not len(spectral):
        return []
    lines = ["| weight type | r | 90 % energy rank | entropy effective rank | stable rank | seeds' top-k overlap "
             "above the null up to k | directions shared above chance there |", "|---|---|---|---|---|---|---|"]
    for row in spectral.itertuples(index=False):
        k = "n/a (one seed)" if pd.isna(row.shared_k) else str(int(row.shared_k))
        shared = "" if pd.isna(row.shared_directions) else f"{row.shared_directions:.1f}"
        lines.append(
            f"| ΔW_{row.weight_type} | {int(row.rank)} | {row.energy_rank_90_mean:.1f} ({row.energy_rank_90_min:.0f}–"
            f"{row.energy_rank_90_max:.0f}) | {row.entropy_rank_mean:.1f} ({row.entropy_rank_min:.1f}–"
            f"{row.entropy_rank_max:.1f}) | {row.stable_rank_mean:.2f} ({row.stable_rank_min:.2f}–"
            f"{row.stable_rank_max:.2f}) | {k} | {shared} |")
    return lines


def which_rank_lines(wr: WhichRank | None, *, files: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """The "Which rank?" section (none without a decision of any kind)."""
    if wr is None or (not wr.curves and not len(wr.spectral)):
        return []
    lines = ["## Which rank?", ""]
    if wr.per_type:
        rec = ", ".join(f"**ΔW_{t}: {wr.recommendation(t)}**" for t in sorted(wr.per_type))
        lines += [f"Recommended rank per weight type: {rec}.", ""]
        for t in sorted(wr.per_type):
            lines.append(f"- ΔW_{t} (only ΔW_{t} resized): {wr.per_type[t].answer}")
        lines.append("")
    else:
        lines += [f"Recommended rank per weight type: **not measured** ({wr.why_not}).", ""]
    lines += [f"- **Rule** (pre-registered, `preregistration.toml` [which_rank], margin {wr.margin:g}): {RULE}.",
              "- **Interval:** the claims' 95 % t-interval on seed means (paired by seed for a difference), its "
              "coverage simulated at this design. The best rank is chosen after seeing the data, which favours it: "
              "the test is conservative for the smaller ranks.",
              "- **Routes:** *trained* = adapters trained at r (Table 6); *resized* = each seed's largest-rank "
              "adapter truncated to its best rank-r approximation (`python -m lora.resize`); *extracted* = the best "
              "rank-r LoRA of each seed's full fine-tuning ΔW (`python -m lora.extract`), with its task head. "
              "Resized and extracted adapters are evaluated as `lora.resize` evaluates (their task, their head, the run's "
              "max_length); at the largest rank the resized route evaluates the original adapter.", ""]
    for d in wr.curves:
        lines.append(f"- {d.label}: {d.answer}")
    if wr.curves:
        lines.append("")
        lines += _accuracy_table(wr)
        lines.append("")
        if wr.full:
            lines += [f"Full fine-tuning: {wr.full['mean']:.4f} (mean over {wr.full['seeds']} seeds). Cells: mean "
                      "[95 % interval] over seeds; bold: the recommended rank.", ""]
    if f"{FIGURE}.png" in files:
        lines += [f"![which rank]({FIGURE}.png)", ""]
    spectral = _spectral_table(wr.spectral)
    if spectral:
        lines += ["**Spectral answers** (no forward pass; ΔW of the largest-rank adapters, mean over layers and "
                  "seeds, range in brackets): the 90 % energy rank, the entropy effective rank exp(H(σ²/Σσ²)), the "
                  "stable rank ‖ΔW‖_F²/σ₁², and the largest k at which two seeds' top-k subspaces still overlap "
                  "above their random null (φ_ΔW(k', k') over k'/d with its delete-one-seed jackknife interval above "
                  "claim 2's 2× at every k' ≤ k), with claim 3's count of directions shared above chance at that k, "
                  "k·φ(k, k) − k²/d: φ(k, k) is cumulative, so a few shared top directions keep the top-k overlap above "
                  "the null well past their number.", "", *spectral, ""]
    if wr.cost:
        lines += [f"Cost: {wr.cost['evaluations']} evaluations, {wr.cost['seconds']:.0f} s of resizing, extracting "
                  "and evaluating (1 torch thread; cached in `<run>/analysis/which_rank.csv`, so re-rendering "
                  "evaluates nothing).", ""]
    lines += ["Tables: [tables/which_rank_evals.csv](tables/which_rank_evals.csv), "
              "[tables/which_rank_spectral.csv](tables/which_rank_spectral.csv), "
              "[tables/which_rank_overlap.csv](tables/which_rank_overlap.csv).", ""]
    return lines


def rank_advice_lines(advice: pd.DataFrame | None) -> list[str]:
    """The per-layer rank advice subsection (none without the table)."""
    if advice is None or len(advice) == 0:
        return []
    from lora_analysis.verdicts.rank_advice import RULE as ADVICE_RULE

    per = advice.groupby("weight_type")["suggested_rank"].agg(["min", "max"])
    summary = ", ".join(f"ΔW_{t} {int(r['min'])}–{int(r['max'])}" if r["min"] != r["max"] else f"ΔW_{t} {int(r['min'])}"
                        for t, r in per.iterrows())
    source = int(advice["rank"].max())
    return ["### Per-layer rank advice", "",
            f"Per module, from the spectra alone (no task, no forward pass): {ADVICE_RULE}. Suggested ranks for the "
            f"r={source} adapters: {summary}. [rank_pattern.json](rank_pattern.json) holds them as the rank "
            f"pattern `python -m lora.resize` takes (a smaller adapter in one command); "
            "[tables/rank_advice.csv](tables/rank_advice.csv) has each module's energy, entropy and stable ranks "
            "per seed.", ""]


def write_which_rank(wr: WhichRank | None, out_dir: str | os.PathLike) -> list[Path]:
    """Draw the figure into ``out_dir`` (png, pdf) and write ``tables/which_rank_spectral.csv`` and
    ``tables/which_rank_overlap.csv``; returns the files written."""
    from lora_analysis.render.figures import save_figure
    from lora_analysis.tables.build import write_tables

    if wr is None:
        return []
    # the spectral answers and the seeds' overlap are judged (not analysis tables): written here, beside them
    judged = {name: t for name, t in (("which_rank_spectral", wr.spectral), ("which_rank_overlap", wr.overlap))
              if len(t)}
    written = write_tables(judged, Path(out_dir) / "tables") if judged else []
    fig = which_rank_figure(wr)
    return written + ([] if fig is None else save_figure(fig, out_dir, FIGURE))

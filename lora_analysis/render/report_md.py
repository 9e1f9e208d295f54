"""``REPORT.md``: the claims of Section 7 (Hu et al., 2021) beside our measurement and a verdict, as markdown.

Text in, text out: the claims come evaluated from :mod:`lora_analysis.verdicts`; this module only lays them out
and links the figures that :mod:`lora_analysis.render.figures` wrote beside it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from lora.fsio import write_json, write_text
from lora_analysis.render.markdown import claim_lines, md_escape
from lora_analysis.render.report_beyond import dynamics_lines, full_lines
from lora_analysis.render.which_rank import rank_advice_lines, which_rank_lines
from lora_analysis.verdicts.claims import (
    F_MAX,
    FAILS,
    FIG8_RATIO,
    FLAT_SLOPE,
    INCONCLUSIVE,
    PRE,
    VERDICTS,
    Claim,
    Context,
)
from lora_analysis.verdicts.judgement import Judgement
from lora_analysis.verdicts.which_rank import WhichRank

LOW_POWER = PRE["low_power"]

__all__ = ["render_report", "write_report"]


def _lower_first(title: str) -> str:
    """Lower-case a sentence's first word for use mid-sentence, but keep symbols such as ΔW_q intact."""
    return title[0].lower() + title[1:] if title[:1].isascii() and title[1:2].islower() else title


HOW_TO_READ = [
    "## How to read these verdicts", "",
    "- **The unit is the training run.** Cells of one run (its layers and weight types) share its randomness, so "
    "every interval is a t-interval on the per-seed means, and its **coverage is simulated for this run's design** "
    "(seeds × layers × weight types, variance components estimated from the data) and printed beside it. Claim 3 "
    "compares seeds in pairs; pairs share seeds, so its interval is a delete-one-seed jackknife. With one seed there "
    "is no interval, and the verdict is inconclusive.",
    "- **Power, stated.** Each claim says how often its rule would return its verdict at this design when the "
    "effect is the paper's (positive claims) or a stated departure (negative and equivalence claims). A claim whose "
    "power is below 0.8 says so: a design that cannot detect the paper's effect cannot refute it either.",
    "- **Two questions for a positive claim.** Table 7's projection is put on a scale free of d: f, the fraction of "
    "the way from a random subspace (f = 0) to W's own top subspace (f = 1); the paper's ΔW is f = 0.014 at r = 4 "
    "and 0.042 at r = 64. *Above the null?* and *as large as the paper?* are asked separately: noise does not hold, "
    "an effect above the null but smaller than the paper's is **weaker than the paper**, a paper-sized one holds. f "
    f"above {F_MAX:g} is ΔW on W's *own* top directions, the opposite of the claim, and does not hold.",
    "- **The starting point is a named confound.** With nested starts A_8's start is the first 8 rows of A_64's, "
    "and ΔW's row space is A's: the two ΔW's share directions before anything is learned. Claims 1 and 2 are "
    "read against what the recorded starts alone give (random B on A_init), not only against random subspaces. "
    "At ΔW = 0 (step 0) every ΔW-based claim is not measured; φ on A is shown, never judged in its place.",
    "- **Claim 2 measures the other directions.** φ(i, j) is cumulative, so φ over directions 2..r contains "
    "direction 1; the rule removes ΔW's top direction from both subspaces and compares what is left with its null.",
    f"- **Figure 8's overlap against a random A**, on every seed: a ratio within {FIG8_RATIO:g} is 'barely', as "
    "the paper says; ΔW placed on W's top directions fails it.",
    f"- **Quality: an equivalence test.** 'Flat in r' holds only when the interval of the slope per doubling of r "
    f"lies within ±{FLAT_SLOPE:g}, and only for adapters that beat the frozen linear probe. Table 5's best sets are "
    "compared in pairs over seeds; ties are ties.",
    "- **Pre-registered, and honest about when.** `lora_analysis/verdicts/preregistration.toml` fixes each claim's "
    "primary rank pair, statistic and threshold; it was written after the first rounds of results and before this "
    "run was judged. Everything else (the paper's r/d, per-weight-type lines) is exploratory. The primary claims' "
    "p-values are Holm-adjusted together in `report.json`.", "",
]


Lines = list[str]


def _header() -> Lines:
    return ["# Section 7 of the LoRA paper, measured", "",
            "Each claim of *LoRA: Low-Rank Adaptation of Large Language Models* (Hu et al., 2021, arXiv 2106.09685), "
            "Section 7 and Appendix H, beside our measured number and a verdict. Each verdict compares a statistic "
            "pooled over every layer, seed and weight type with a null that can fail, through a 95 % interval over "
            "training runs (its coverage simulated for this run's design) and a rule fixed in advance "
            "(`lora_analysis/verdicts/preregistration.toml`, given under each claim), and states its power; it "
            "judges the paper's *qualitative* claim on our model and task, not its GPT-3 175B numbers. `report.json` "
            "beside this file holds the same verdicts and measures, machine-readable.", ""]


def _setup(context: Context, setup: Mapping[str, str] | None) -> Lines:
    lines = ["## Setup", ""]
    if setup:
        lines += [f"- **{k}**: {v}" for k, v in setup.items()]
    else:
        lines.append("- (no training manifest: adapters analysed as found)")
    if context.layer is not None:
        lines.append(f"- **layer shown**: {context.layer} (the middle of adapted layers {list(context.layers)}; "
                     "the paper shows layer 48 of 96)")
    if context.r_small is not None:
        rd = f"; r/d = {context.r_small / context.d:.2%} and {context.r_large / context.d:.2%} of d = {context.d}" \
            if context.d else ""
        lines.append(f"- **rank pair**: r={context.r_small} vs r={context.r_large} (paper: 8 vs 64, r/d = 0.07 % and "
                     f"0.52 % of d = 12,288{rd})")
    if context.scaled_ranks is not None and context.d:
        a, b = context.scaled_ranks
        lines.append(f"- **ranks nearest the paper's r/d**: r={a} vs r={b} ({a / context.d:.2%} and {b / context.d:.2%} "
                     "of d); claims 1, 2, 4, 5 are judged there too (under each claim)")
    return lines + [""]


def _coverage(c: Claim) -> str:
    """The simulated coverage of the claim's interval, or a dash (not measured, one seed)."""
    cov = (c.measures.get("interval") or {}).get("coverage")
    return "–" if cov is None else f"{cov:.3f}"


def _power(c: Claim) -> str:
    """The claim's simulated power, flagged when low."""
    v = (c.measures.get("power") or {}).get("value")
    if v is None:
        return "–"
    return f"{v:.2f}" + (" (low)" if v < LOW_POWER else "")


def _summary(claims: Sequence[Claim]) -> Lines:
    lines = ["## Summary", "", "| # | claim | paper | ours | verdict | coverage | power |",
             "|---|---|---|---|---|---|---|"]
    for n, c in enumerate(claims, start=1):
        lines.append(f"| {n} | {md_escape(c.title)} | {md_escape(c.paper)} | {md_escape(c.ours)} | **{c.verdict}** | "
                     f"{_coverage(c)} | {_power(c)} |")
    counts = {v: sum(c.verdict == v for c in claims) for v in VERDICTS}
    lines += ["", "Verdict counts: " + ", ".join(f"{k}: {v}" for k, v in counts.items()), ""]
    failing = [c for c in claims if c.verdict == FAILS]
    if failing:
        lines += ["**Does not hold here:** " + "; ".join(f"{_lower_first(c.title)} ({c.ours})" for c in failing) + ".", ""]
    unclear = [c for c in claims if c.verdict == INCONCLUSIVE]
    if unclear:
        lines += ["**Inconclusive here** (the interval straddles the rule's threshold): "
                  + "; ".join(_lower_first(c.title) for c in unclear) + ".", ""]
    return lines


def _claims(claims: Sequence[Claim], files: set[str]) -> Lines:
    lines: Lines = []
    for n, c in enumerate(claims, start=1):
        lines += claim_lines(f"## {n}. {c.title}", c, files=files)
    return lines


def _init_control(files: set[str]) -> Lines:
    lines = ["## Initialisation control", "",
             "φ on A (the paper's measure) is shown beside φ on A − A_init (the learned change only) and φ between "
             "the starting points A_init. With nested initialisation, the start of A_8 is the first 8 rows of the "
             "start of A_64, so φ on A between ranks can be high before any training; where φ on A − A_init is much "
             "lower than φ on A, the overlap comes from the start, not from learning.", ""]
    if "init_control.png" in files:
        lines += ["![initialisation control](init_control.png)", ""]
    return lines


def _validation(validation: str | None) -> Lines:
    if not validation:
        return []
    return ["## Planted-rank validation (ground truth)", "", "```", validation.rstrip(), "```", ""]


def _file_lists(files: set[str]) -> Lines:
    lines: Lines = []
    pngs = sorted(f for f in files if f.endswith(".png"))
    if pngs:
        lines += ["## Figures", ""] + [f"- [{p}]({p}) ([pdf]({p[:-4]}.pdf))" for p in pngs] + [""]
    tables = sorted(f for f in files if f.endswith(".md") and f != "REPORT.md")
    if tables:
        lines += ["## Tables", ""] + [f"- [{t}]({t}) ([csv]({t[:-3]}.csv))" for t in tables] + [""]
        lines += ["Raw tidy tables (every φ grid, projection and spectrum): [tables/](tables/)", ""]
    return lines


def render_report(judgement: Judgement, *, setup: Mapping[str, str] | None = None,
                  figure_files: Sequence[str | Path] = (), validation: str | None = None,
                  which_rank: WhichRank | None = None, rank_advice=None) -> str:
    """REPORT.md text, section after section: the setup, a summary table (claim, paper, ours, verdict), how to
    read the verdicts, a section per claim, the initialisation control, the training snapshots and full
    fine-tuning where the run has them, "Which rank?" (``which_rank``, with the per-layer ``rank_advice`` table),
    the planted-rank validation, and the lists of figures and tables."""
    files = {Path(f).name for f in figure_files}
    claims = judgement.claims
    sections: list[Lines] = [
        _header(), _setup(judgement.context, setup), _summary(claims), HOW_TO_READ, _claims(claims, files),
        _init_control(files), dynamics_lines(judgement), full_lines(judgement),
        which_rank_lines(which_rank, files=files), rank_advice_lines(rank_advice), _validation(validation),
        _file_lists(files),
    ]
    return "\n".join(line for section in sections for line in section)


def write_report(judgement: Judgement, out_dir: str | os.PathLike, *, setup: Mapping[str, str] | None = None,
                 validation: str | None = None, which_rank: WhichRank | None = None,
                 rank_advice=None) -> list[Path]:
    """Write ``<out_dir>/REPORT.md`` and ``<out_dir>/report.json`` atomically; returns both paths.

    Figures already in ``out_dir`` (from :func:`lora_analysis.render.figures.render_all`) are linked from the report.
    ``which_rank`` adds the "Which rank?" section and ``report.json``'s ``"which_rank"``; ``rank_advice`` (the
    :func:`lora_analysis.verdicts.rank_advice.rank_advice` table) its per-layer subsection.
    """
    out = Path(out_dir)
    files = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    text = render_report(judgement, setup=setup, figure_files=files, validation=validation, which_rank=which_rank,
                         rank_advice=rank_advice)
    doc = judgement.as_json(setup or {})
    if which_rank is not None:
        doc["which_rank"] = which_rank.as_json()
    return [write_text(out / "REPORT.md", text), write_json(out / "report.json", doc)]

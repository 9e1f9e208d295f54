"""``REPORT.md``: the claims of Section 7 (Hu et al., 2021) beside our measurement and a verdict, as markdown.

Text in, text out: the claims come evaluated from :mod:`lora_analysis.verdicts`; this module only lays them out
and links the figures that :mod:`lora_analysis.render.figures` wrote beside it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from lora import rundir
from lora.fsio import write_text
from lora_analysis.verdicts.claims import FAILS, HOLDS, NOT_MEASURED, PARTLY, Claim, Context, evaluate_claims

__all__ = ["render_report", "setup_from_run", "write_report"]


def _lower_first(title: str) -> str:
    """Lower-case a sentence's first word for use mid-sentence, but keep symbols such as ΔW_q intact."""
    return title[0].lower() + title[1:] if title[:1].isascii() and title[1:2].islower() else title


def setup_from_run(run_dir: str | os.PathLike) -> dict[str, str]:
    """Model, task and training config of a :mod:`lora.train` run, from its ``manifest.json`` (empty if none)."""
    m = rundir.read_manifest(run_dir)
    if m is None:
        return {}
    cfg = m.get("config") or {}
    task = m.get("task") or {}
    keys = ("targets", "ranks", "seeds", "budget", "steps", "lr", "batch_size", "max_length", "alpha", "init",
            "dropout", "weight_decay")
    out = {
        "run directory": str(run_dir),
        "base model": f"{m.get('base_model', cfg.get('model', '?'))} (fingerprint {str(m.get('base_fingerprint', '?'))[:12]})",
        "task": f"{task.get('name', cfg.get('task', '?'))} ({task.get('kind', '?')}, {len(task.get('labels', []))} "
                f"labels, {task.get('n_train', '?')} train / {task.get('n_val', '?')} validation examples)",
        "initialisation": "nested (A_r's start is the first r rows of the larger ranks' start)" if m.get("nested_init")
        else "independent per rank",
        "config": ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg),
    }
    versions = m.get("versions") or {}
    if versions:
        out["versions"] = ", ".join(f"{k} {v}" for k, v in versions.items())
    return out


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_report(claims: Sequence[Claim], context: Context, *, setup: Mapping[str, str] | None = None,
                  figure_files: Sequence[str | Path] = (), validation: str | None = None) -> str:
    """REPORT.md text: setup, a summary table (claim, paper, ours, verdict), a section per claim, figures."""
    lines = ["# Section 7 of the LoRA paper, measured", "",
             "Each claim of *LoRA: Low-Rank Adaptation of Large Language Models* (Hu et al., 2021, arXiv 2106.09685), "
             "Section 7 and Appendix H, beside our measured number and a verdict. Verdicts follow fixed rules "
             "(given under each claim and in `lora_analysis/report.py`); they judge the paper's *qualitative* claim "
             "on our model and task, not its GPT-3 175B numbers.", ""]
    lines += ["## Setup", ""]
    if setup:
        lines += [f"- **{k}**: {v}" for k, v in setup.items()]
    else:
        lines.append("- (no training manifest: adapters analysed as found)")
    if context.layer is not None:
        lines.append(f"- **layer shown**: {context.layer} (the middle of adapted layers {list(context.layers)}; "
                     "the paper shows layer 48 of 96)")
    if context.r_small is not None:
        lines.append(f"- **rank pair**: r={context.r_small} vs r={context.r_large} (paper: 8 vs 64)")
    lines += ["", "## Summary", "", "| # | claim | paper | ours | verdict |", "|---|---|---|---|---|"]
    for n, c in enumerate(claims, start=1):
        lines.append(f"| {n} | {_md_escape(c.title)} | {_md_escape(c.paper)} | {_md_escape(c.ours)} | **{c.verdict}** |")
    counts = {v: sum(c.verdict == v for c in claims) for v in (HOLDS, PARTLY, FAILS, NOT_MEASURED)}
    lines += ["", "Verdict counts: " + ", ".join(f"{k}: {v}" for k, v in counts.items()), ""]
    failing = [c for c in claims if c.verdict == FAILS]
    if failing:
        lines += ["**Does not hold here:** " + "; ".join(f"{_lower_first(c.title)} ({c.ours})" for c in failing) + ".", ""]
    files = {Path(f).name for f in figure_files}
    for n, c in enumerate(claims, start=1):
        lines += [f"## {n}. {c.title}", "", f"- **Paper:** {c.paper}", f"- **Ours:** {c.ours}",
                  f"- **Verdict:** **{c.verdict}**", f"- **Rule:** {c.rule}"]
        lines += [f"  - {d}" for d in c.details]
        shown = [f"[{name}]({name}.png)" for name in c.figures if f"{name}.png" in files]
        if shown:
            lines.append("- **Figures:** " + ", ".join(shown))
        lines.append("")
    lines += ["## Initialisation control", "",
              "φ on A (the paper's measure) is shown beside φ on A − A_init (the learned change only) and φ between "
              "the starting points A_init. With nested initialisation, the start of A_8 is the first 8 rows of the "
              "start of A_64, so φ on A between ranks can be high before any training; where φ on A − A_init is much "
              "lower than φ on A, the overlap comes from the start, not from learning.", ""]
    if "init_control.png" in files:
        lines += ["![initialisation control](init_control.png)", ""]
    if validation:
        lines += ["## Planted-rank validation (ground truth)", "", "```", validation.rstrip(), "```", ""]
    pngs = sorted(f for f in files if f.endswith(".png"))
    if pngs:
        lines += ["## Figures", ""] + [f"- [{p}]({p}) ([pdf]({p[:-4]}.pdf))" for p in pngs] + [""]
    tables = sorted(f for f in files if f.endswith(".md") and f != "REPORT.md")
    if tables:
        lines += ["## Tables", ""] + [f"- [{t}]({t}) ([csv]({t[:-3]}.csv))" for t in tables] + [""]
        lines += ["Raw tidy tables (every φ grid, projection and spectrum): [tables/](tables/)", ""]
    return "\n".join(lines)


def write_report(tables: Mapping[str, pd.DataFrame], out_dir: str | os.PathLike, *,
                 setup: Mapping[str, str] | None = None, validation: str | None = None,
                 layer: int | None = None) -> Path:
    """Evaluate every claim on ``tables`` and write ``<out_dir>/REPORT.md`` atomically; returns its path.

    Figures already in ``out_dir`` (from :func:`lora_analysis.render.figures.render_all`) are linked from the report.
    """
    out = Path(out_dir)
    claims, context = evaluate_claims(tables, layer=layer)
    files = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    text = render_report(claims, context, setup=setup, figure_files=files, validation=validation)
    return write_text(out / "REPORT.md", text)

"""REPORT.md sections beyond Section 7, and their ``report.json`` objects: "When does the structure form?" (the
training snapshots) and "LoRA against full fine-tuning". Text in, text out: the verdicts come from
:mod:`lora_analysis.verdicts.dynamics` and :mod:`lora_analysis.verdicts.full_finetune`.
"""

from __future__ import annotations

from lora_analysis.render.markdown import claim_lines, md_escape
from lora_analysis.verdicts.dynamics import FLAT_PHI
from lora_analysis.verdicts.judgement import Judgement

__all__ = ["dynamics_lines", "full_lines"]


def dynamics_lines(judgement: Judgement) -> list[str]:
    """"When does the structure form?": each snapshot claim's verdict per step (none without snapshots)."""
    trajectories, trend = judgement.trajectories, judgement.trend
    if not trajectories:
        return []
    steps = list(trajectories[0].steps)
    lines = ["## When does the structure form?", "",
             f"Every LoRA adapter was saved at steps {', '.join(map(str, steps))} (`snapshots/` in each adapter "
             "directory). At each step the adapters as they were then go through the same tables and the same rules "
             "as the finished ones (null, interval and rule of each claim above). A verdict **settles** at the first "
             "step from which it no longer changes up to the last snapshot; one that changes at the last snapshot "
             "never settles within this run. Claims 6–8 need Figure 8 or validation metrics, which a snapshot lacks.",
             "", "| claim | " + " | ".join(f"step {s}" for s in steps) + " | settles |",
             "|---|" + "---|" * len(steps) + "---|"]
    for t in trajectories:
        settle = "never (within the run)" if t.settled_at is None else f"step {t.settled_at}"
        lines.append(f"| {md_escape(t.title)} | " + " | ".join(t.verdicts) + f" | {settle} |")
    lines += ["", "**Does the top-direction overlap grow, shrink, or stay flat with training?** " + trend.text(), "",
              f"- **Rule:** {trend.rule}", f"- **Null:** {trend.null}; 'flat' is an equivalence claim (±{FLAT_PHI:g})",
              ""]
    for t in trajectories:
        lines.append(f"- {t.title}: {t.text()}; at the last snapshot: {t.ours[-1] if t.ours else ''}")
    lines += ["", "![dynamics](dynamics.png)", "",
              "Raw per-step values with their nulls: [tables/dynamics.csv](tables/dynamics.csv).", ""]
    return lines


def full_lines(judgement: Judgement) -> list[str]:
    """"LoRA against full fine-tuning" (none without full fine-tuning)."""
    claims, quality = judgement.full_claims, judgement.full_quality
    if not claims:
        return []
    lines = ["## LoRA against full fine-tuning", "",
             "The same weight matrices trained in full (`<set>_full_s<seed>`: same data, steps, seeds, lr schedule "
             "and task head; the matrices at `full_lr` without weight decay), and their dense ΔW = W_ft − W0 "
             "analysed beside the LoRA adapters of the same seed. Each verdict follows the rules of the claims above: "
             "a statistic pooled over layers, seeds and weight types, its 95 % interval, a null that can fail.", ""]
    if quality:
        by_rank = ", ".join(f"r={r}: {v['mean']:.4f}" for r, v in quality["lora"].items())
        lines += [f"**Validation {quality['metric']}** ({{{quality['weight_set']}}}, mean over {quality['full']['seeds']} "
                  f"seeds): full fine-tuning {quality['full']['mean']:.4f} (sd {quality['full']['sd']:.4f}); LoRA "
                  f"{by_rank}. Read the verdicts below against it: a full fine-tuning that trained less well than "
                  "LoRA is a weaker reference.", ""]
    lines += ["| # | claim | ours | verdict |", "|---|---|---|---|"]
    for n, c in enumerate(claims, start=1):
        lines.append(f"| F{n} | {md_escape(c.title)} | {md_escape(c.ours)} | **{c.verdict}** |")
    lines.append("")
    for n, c in enumerate(claims, start=1):
        lines += claim_lines(f"### F{n}. {c.title}", c)  # no figure links: the figure follows the section
    lines += ["![full fine-tuning spectrum](full_spectrum.png)", "",
              "Raw tables: [tables/full_spectra.csv](tables/full_spectra.csv), "
              "[tables/full_vs_lora.csv](tables/full_vs_lora.csv), [tables/full_table7.csv](tables/full_table7.csv).",
              ""]
    return lines

"""Markdown pieces every report section shares: an escaped table cell and one claim's block."""

from __future__ import annotations

from collections.abc import Set

from lora_analysis.verdicts.registry import Claim

__all__ = ["claim_lines", "md_escape"]


def md_escape(text: object) -> str:
    """``text`` as one markdown table cell: pipes escaped, newlines folded."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def claim_lines(heading: str, c: Claim, *, files: Set[str] = frozenset()) -> list[str]:
    """One claim's section: paper, ours, verdict, null, rule, details and the figures that show it."""
    lines = [heading, "", f"- **Paper:** {c.paper}", f"- **Ours:** {c.ours}",
             f"- **Verdict:** **{c.verdict}**", f"- **Null:** {c.null}", f"- **Rule:** {c.rule}"]
    lines += [f"  - {d}" for d in c.details]
    shown = [f"[{name}]({name}.png)" for name in c.figures if f"{name}.png" in files]
    if shown:
        lines.append("- **Figures:** " + ", ".join(shown))
    return lines + [""]

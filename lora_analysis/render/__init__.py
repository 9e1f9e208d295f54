"""Layer 5 of the analysis: rendering. Tidy tables in, matplotlib Figures, markdown and files out; no maths.

- :mod:`~lora_analysis.render.figures`: one renderer per Section 7 figure and table (PNG + PDF, CSV + markdown).
- :mod:`~lora_analysis.render.report_md`: ``REPORT.md`` from the evaluated claims.

May import :mod:`lora_analysis.verdicts`, :mod:`lora_analysis.tables` and :mod:`lora` (atomic writes); never the
commands.
"""

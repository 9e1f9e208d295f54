"""Layer 5 of the analysis: rendering. Tidy tables in, matplotlib Figures, markdown and files out; no maths.

- :mod:`~lora_analysis.render.figures`: one renderer per Section 7 figure and table (PNG + PDF, CSV + markdown).
- :mod:`~lora_analysis.render.report_md`: ``REPORT.md`` from the evaluated claims.
- :mod:`~lora_analysis.render.beyond_figures`, :mod:`~lora_analysis.render.report_beyond`: the dynamics and
  full fine-tuning figures and REPORT.md sections.

May import :mod:`lora_analysis.verdicts`, :mod:`lora_analysis.tables` and :mod:`lora` (atomic writes); never the
commands.
"""

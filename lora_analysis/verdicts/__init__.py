"""Layer 4 of the analysis: verdicts. Each Section 7 claim judged from the tidy tables against a null that can
fail, with an interval and the rule that decided it.

- :mod:`~lora_analysis.verdicts.registry`: one declaration per claim (id, title, the paper's words, figures, its
  function), in the report section it belongs to; the report lists what is declared.
- :mod:`~lora_analysis.verdicts.claims`: the Section 7 claims, their rules and nulls -> :class:`Claim` objects
  and ``report.json``.
- :mod:`~lora_analysis.verdicts.dynamics`: each claim at every training snapshot, where it settles, the trend.
- :mod:`~lora_analysis.verdicts.full_finetune`: LoRA against full fine-tuning, same verdict style.
- :mod:`~lora_analysis.verdicts.judgement`: every verdict of one run, section by section (what renderers read).

May import :mod:`lora_analysis.tables` (and through its frames, nothing else); never a run directory
(:mod:`lora.rundir`, :mod:`lora_analysis.load`), render or the commands.
"""

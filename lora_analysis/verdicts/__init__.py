"""Layer 4 of the analysis: verdicts. Each Section 7 claim judged from the tidy tables against a null that can
fail, with an interval and the rule that decided it.

- :mod:`~lora_analysis.verdicts.claims`: the claims, their rules and nulls -> :class:`Claim` objects and
  ``report.json``.
- :mod:`~lora_analysis.verdicts.dynamics`: each claim at every training snapshot, where it settles, the trend.
- :mod:`~lora_analysis.verdicts.full_finetune`: LoRA against full fine-tuning, same verdict style.

May import :mod:`lora_analysis.tables` (and through its frames, nothing else); never render or the commands.
"""

"""Layer 3 of the analysis: tidy tables. Loaded adapters × metrics -> long-format pandas frames, and the rules
that slice and aggregate them.

- :mod:`~lora_analysis.tables.build`: one table per paper artefact (φ, Figure 8, Table 7, spectra, quality);
  :func:`~lora_analysis.tables.build.analyse_run` for a run's Section 7 tables.
- :mod:`~lora_analysis.tables.select`: the one rule for "the nearest rank", the rank pair and "the middle layer".
- :mod:`~lora_analysis.tables.aggregate`: means over seeds (Tables 5, 6, 7), bootstrap and exact intervals.
- :mod:`~lora_analysis.tables.dynamics`, :mod:`~lora_analysis.tables.full_finetune`: the tables of the training
  snapshots and of full fine-tuning.
- :mod:`~lora_analysis.tables.analysis`: :class:`~lora_analysis.tables.analysis.Analysis`, every table of a run
  (what :func:`lora_analysis.pipeline.analyse` returns); :mod:`~lora_analysis.tables.cache` keeps it for
  notebooks.

May import :mod:`lora_analysis.load`, :mod:`lora_analysis.metrics` and :mod:`lora`; never verdicts, render or the
commands.
"""

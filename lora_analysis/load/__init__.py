"""Layer 2 of the analysis: loading. Adapters (ours, peft's, loralib's) and base weights, in float64.

- :mod:`~lora_analysis.load.run`: :class:`~lora_analysis.load.run.Run`, a run opened once (manifest, adapter
  configs, full fine-tuning directories, one base-weight source); every later stage takes it, never a path.
- :mod:`~lora_analysis.load.adapters`: find and load adapter directories and run directories
  (:class:`~lora_analysis.load.adapters.LoadedAdapter`, :func:`~lora_analysis.load.adapters.index_run`).
- :mod:`~lora_analysis.load.base`: the frozen weights W0 per module and their shared SVD cache.
- :mod:`~lora_analysis.load.snapshots`: an adapter as it was at a training snapshot (``snapshots/``).
- :mod:`~lora_analysis.load.full_finetune`: full fine-tuning directories (dense ΔW per module).

May import :mod:`lora` (file formats) and :mod:`lora_analysis.metrics`; never tables, verdicts, render or the
commands. Nothing here trains: a command that needs missing adapters calls :func:`lora.train.ensure_adapters`
first.
"""

"""Ground truth for the metrics: plant a known low-rank update in real weights, train LoRA students, and check
that the analysis recovers it (:mod:`~lora_analysis.groundtruth.planted`).

May import :mod:`lora_analysis.metrics` and :mod:`lora`; the command is ``python -m lora_analysis.validate``.
"""

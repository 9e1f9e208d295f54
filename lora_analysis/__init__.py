"""Exact, pure metrics for the structure of LoRA updates (Hu et al., 2021, Section 7 and Appendix H).

The spine (:mod:`lora_analysis.pipeline`), one way::

    run = Run.open(run_dir)              # load/: manifest, adapter configs, one base-weight source, read once
    analysis = analyse(run)              # metrics/ -> tables/: every tidy table, snapshots and full fine-tuning too
    judgement = judge(analysis)          # verdicts/: every claim declared in verdicts/registry.py
    render(analysis, judgement, out)     # render/: figures, tables/*.csv, REPORT.md, report.json

Layers import only downwards (metrics 1, load and groundtruth 2, tables 3, verdicts 4, render 5, then the
commands); ``tests/test_layering.py`` checks it.
"""

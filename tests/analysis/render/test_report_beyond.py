"""REPORT.md and report.json beyond Section 7, end to end on a tiny trained run: the sections and objects
"dynamics" and "full_finetune" appear with snapshots and full fine-tuning, and are omitted without them."""

from __future__ import annotations

import json

import pytest
from tiny_models import tiny_train_setup

from lora.config import TrainConfig
from lora.train import run_sweep
from lora_analysis.pipeline import analyse_and_render


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("beyond_report")
    base = {**tiny_train_setup(root), "seeds": [0, 1], "steps": 4}
    run_sweep(TrainConfig.from_dict({**base, "snapshot_steps": [0, 2, 4], "method": ["lora", "full"]}),
              root / "with", progress=False)
    run_sweep(TrainConfig.from_dict(base), root / "without", progress=False)
    return root


def test_sections_and_objects_with_snapshots_and_full(runs):
    out = runs / "out_with"
    written = {p.name for p in analyse_and_render(runs / "with", out)}
    assert {"dynamics.png", "full_spectrum.png", "dynamics.csv", "full_spectra.csv", "full_vs_lora.csv"} <= written
    doc = json.loads((out / "report.json").read_text())
    assert doc["dynamics"]["steps"] == [0, 2, 4]
    assert {c["id"] for c in doc["dynamics"]["claims"]} >= {"top_direction_shared", "amplification"}
    assert doc["dynamics"]["top_direction_trend"]["verdict"]
    ids = [c["id"] for c in doc["full_finetune"]["claims"]]
    assert ids == ["full_low_rank", "lora_captures_full_subspace", "full_amplification", "lora_more_intruders"]
    assert doc["full_finetune"]["quality"]["full"]["seeds"] == 2
    text = (out / "REPORT.md").read_text()
    assert "## When does the structure form?" in text and "## LoRA against full fine-tuning" in text
    assert "Does the top-direction overlap grow, shrink, or stay flat" in text
    table6 = (out / "table6.md").read_text()
    assert "| q,v | full | 0 |" in table6  # Table 6 carries full fine-tuning's validation metric, as its method


def test_omitted_without_them(runs):
    out = runs / "out_without"
    written = {p.name for p in analyse_and_render(runs / "without", out)}
    assert "dynamics.png" not in written and "full_spectrum.png" not in written
    doc = json.loads((out / "report.json").read_text())
    assert "dynamics" not in doc and "full_finetune" not in doc
    text = (out / "REPORT.md").read_text()
    assert "When does the structure form?" not in text and "LoRA against full fine-tuning" not in text

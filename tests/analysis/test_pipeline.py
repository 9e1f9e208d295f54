"""lora_analysis.pipeline, the spine: a run opened once (manifest read once, base model loaded once) gives every
table, verdict, figure and report; a claim added through the registry alone reaches REPORT.md and report.json."""

from __future__ import annotations

import json
import sys

import pytest
from tiny_models import tiny_train_setup

from lora.config import TrainConfig
from lora.train import run_sweep
from lora_analysis import pipeline
from lora_analysis.load.run import Run
from lora_analysis.verdicts.registry import HOLDS, SECTION7, ClaimSpec, Finding


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Two ranks × two seeds with snapshots and one full fine-tuning per seed: every section of the report."""
    root = tmp_path_factory.mktemp("spine")
    cfg = {**tiny_train_setup(root), "seeds": [0, 1], "steps": 4, "snapshot_steps": [0, 2, 4],
           "method": ["lora", "full"]}
    run_sweep(TrainConfig.from_dict(cfg), root / "run", progress=False)
    return root / "run"


_OPENED: list[str] = []
_COUNTING = False


def _audit(event: str, args: tuple) -> None:
    if _COUNTING and event == "open" and isinstance(args[0], str | bytes):
        _OPENED.append(str(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed: it records only while _COUNTING is set


def test_figures_open_the_manifest_once_and_load_the_base_once(run_dir, tmp_path, monkeypatch):
    global _COUNTING
    import lora.adapter_io as io

    loads = []
    real = io.base_model_for
    monkeypatch.setattr(io, "base_model_for", lambda *a, **k: loads.append(a) or real(*a, **k))
    _OPENED.clear()
    _COUNTING = True
    try:
        written = pipeline.analyse_and_render(run_dir, tmp_path / "out")
    finally:
        _COUNTING = False
    manifests = [p for p in _OPENED if p.endswith("manifest.json") and str(run_dir) in p]
    assert len(manifests) == 1, manifests
    assert len(loads) == 1  # W0 for Section 7, every snapshot and full fine-tuning from one loaded base
    names = {p.name for p in written}
    assert {"REPORT.md", "report.json", "dynamics.csv", "full_spectra.csv", "figure3.png"} <= names
    text = (tmp_path / "out" / "REPORT.md").read_text()
    assert "## When does the structure form?" in text and "## LoRA against full fine-tuning" in text


def test_the_three_steps_read_top_to_bottom(run_dir, tmp_path):
    run = Run.open(run_dir)
    analysis = pipeline.analyse(run)
    assert {"phi", "table7", "quality", "dynamics", "full_spectra"} <= set(analysis.tables)
    assert sorted(analysis.per_step) == [0, 2, 4] and analysis.setup["run directory"] == str(run_dir)
    q = analysis.tables["quality"]
    assert set(q["method"]) == {"lora", "full"} and not q["weight_set"].str.contains(":").any()
    judgement = pipeline.judge(analysis)
    assert [c.id for c in judgement.claims] == list(SECTION7.ids)
    assert [t.id for t in judgement.trajectories] == [s.id for s in SECTION7.specs if s.snapshot]
    assert len(judgement.full_claims) == 4
    written = pipeline.render(analysis, judgement, tmp_path)
    assert (tmp_path / "REPORT.md") in written


def test_a_claim_added_through_the_registry_alone_reaches_the_report(run_dir, tmp_path):
    seen = []

    def toy(ev):
        seen.append(sorted(ev.tables))
        return Finding("toy statistic 1.23 [1.1, 1.4]", HOLDS, "toy rule: the interval lies above 1", "toy null: 1",
                       "table7", {"toy": 1.23})

    spec = ClaimSpec("toy_claim", "A toy claim declared in a test", "the toy paper says 1.5", toy,
                     figures=("figure3",))
    with SECTION7.extended(spec):
        pipeline.analyse_and_render(run_dir, tmp_path)
    assert "toy_claim" not in SECTION7.ids  # declared for the block only
    assert seen and "table7" in seen[0]
    text = (tmp_path / "REPORT.md").read_text()
    n = len(SECTION7.specs) + 1
    assert f"| {n} | A toy claim declared in a test | the toy paper says 1.5 | toy statistic 1.23 [1.1, 1.4] | " \
           f"**holds** |" in text
    assert f"## {n}. A toy claim declared in a test" in text and "- **Rule:** toy rule" in text
    assert "- **Figures:** [figure3](figure3.png)" in text.split(f"## {n}. A toy claim")[1]
    doc = json.loads((tmp_path / "report.json").read_text())
    toy_doc = doc["claims"][-1]
    assert toy_doc["id"] == "toy_claim" and toy_doc["verdict"] == HOLDS and toy_doc["measures"] == {"toy": 1.23}


def test_a_claim_declared_twice_is_refused():
    with pytest.raises(ValueError, match="declared twice"):
        SECTION7.add(SECTION7.specs[0])

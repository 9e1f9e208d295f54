"""lora_analysis.reproduce: the quick pipeline end to end (train -> resume -> analyse -> figures -> report)."""

from __future__ import annotations

import json

import pytest
from tiny_run import tiny_run

from lora.config import TrainConfig
from lora_analysis import reproduce


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    return tiny_run(tmp_path_factory)


def test_plans_are_valid_train_configs():
    for plan in (reproduce.default_plan(), reproduce.quick_plan()):
        cfg = TrainConfig.from_dict(plan.sweep)
        assert cfg.targets == ("q,v",)
        TrainConfig.from_dict({**plan.table5, "budget": 1000})
    assert reproduce.default_plan().sweep["ranks"] == (1, 2, 4, 8, 64)
    assert reproduce.default_plan().sweep["seeds"] == (0, 1, 2)
    for plan in (reproduce.default_plan(), reproduce.quick_plan()):  # snapshots and full fine-tuning are exercised
        cfg = TrainConfig.from_dict(plan.sweep)
        assert cfg.method == ("lora", "full") and cfg.snapshot_steps[0] == 0
        assert cfg.snapshot_steps[-1] == cfg.total_steps(10**6)  # the last step is snapshotted


@pytest.mark.slow
def test_quick_end_to_end_resumes(runs, tmp_path):
    adapters = sorted(runs.glob("*/adapter_model.safetensors")) + sorted(runs.glob("table5/*/adapter_model.safetensors"))
    assert sorted(str(p.parent.relative_to(runs)) for p in adapters) == [
        "qv_r2_s0", "qv_r2_s1", "qv_r4_s0", "qv_r4_s1", "table5/q_r4_s0", "table5/qv_r2_s0", "table5/v_r4_s0"]
    before = {p: p.stat().st_mtime_ns for p in adapters}
    out = tmp_path / "figures"
    assert reproduce.main(["--quick", "--runs", str(runs), "--out", str(out), "--quiet"]) == 0
    assert {p: p.stat().st_mtime_ns for p in adapters} == before  # resumed: nothing retrained
    for name in ("REPORT.md", "figure3.png", "figure4.pdf", "figure8.png", "table5.md", "table6.csv", "table7.md",
                 "tables/phi.csv", "tables/quality.csv"):
        assert (out / name).stat().st_size > 0, name
    text = (out / "REPORT.md").read_text()
    assert "chatterbot" in text and "**Verdict:**" in text and "[figure3](figure3.png)" in text
    assert (runs / "analysis" / "fingerprint.json").is_file()  # the notebooks' cache
    assert (runs / "qv_full_s0" / "delta_weights.safetensors").is_file() and (runs / "qv_r2_s0" / "snapshots").is_dir()
    doc = json.loads((out / "report.json").read_text())
    assert doc["dynamics"]["steps"] == [0, 1, 3] and len(doc["full_finetune"]["claims"]) == 4
    assert "## When does the structure form?" in text and "## LoRA against full fine-tuning" in text
    assert (out / "dynamics.png").is_file() and (out / "full_spectrum.png").is_file()


def test_bad_inputs_exit_2(tmp_path, capsys):
    afile = tmp_path / "file"
    afile.write_text("x")
    assert reproduce.main(["--quick", "--runs", str(afile), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "--runs" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert reproduce.main(["--no-train", "--runs", str(empty), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "empty" in err
    with pytest.raises(SystemExit) as exc:
        reproduce.main(["--ranks", "3"])
    assert exc.value.code == 2

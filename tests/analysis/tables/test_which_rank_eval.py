"""The "Which rank?" evaluations on a tiny trained run (resize / extract, then evaluate, cached), and the rank
advice's ``rank_pattern.json`` taken by ``python -m lora.resize --rank-pattern`` end to end."""

from __future__ import annotations

import csv
import json
import os

import pytest
from tiny_run import tiny_run

from lora import resize as resize_cli
from lora_analysis.tables import which_rank
from lora_analysis.verdicts.rank_advice import write_rank_advice


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def evaluated(runs):
    return which_rank.evaluate(runs)


def _summary(runs) -> dict[str, dict]:
    with open(runs / "summary.csv", newline="", encoding="utf-8") as fh:
        return {row["name"]: row for row in csv.DictReader(fh)}


@pytest.mark.slow
def test_every_route_is_evaluated_and_the_original_reproduces_the_trainer(runs, evaluated):
    frame, cost = evaluated
    jobs = which_rank.plan(runs)
    # the quick grid: ranks 2, 4 x seeds 0, 1; per seed r=2 (all, q only, v only), the r=4 original; extracted at 2, 4
    assert len(jobs) == len(frame) == 12 and cost["evaluated"] + cost["cached"] == 12
    assert sorted(set(zip(frame["curve"], frame["types"], strict=True))) == [
        ("extracted", "q,v"), ("resized", "q"), ("resized", "q,v"), ("resized", "v")]
    summary = _summary(runs)
    originals = frame[(frame["curve"] == "resized") & (frame["rank"] == 4)]
    assert len(originals) == 2
    for row in originals.itertuples(index=False):  # the route reproduces the trainer's own validation metric
        assert row.val_metric == float(summary[row.source]["val_metric"])
        assert row.val_loss == pytest.approx(float(summary[row.source]["val_loss"]), rel=1e-6)
        assert row.kept == 1.0
    truncated = frame[frame["rank"] == 2]
    assert (truncated["kept"] < 1.0).all() and (truncated["kept"] > 0.0).all()
    assert (frame["eval_s"] > 0).all()
    assert (runs / "analysis" / which_rank.EVAL_FILE).is_file()


@pytest.mark.slow
def test_the_cache_is_read_back_and_stale_rows_dropped(runs, evaluated):
    frame, _ = evaluated
    again, cost = which_rank.evaluate(runs)
    assert cost["evaluated"] == 0 and len(again) == len(frame)  # re-rendering evaluates nothing
    weights = runs / "qv_r4_s0" / "adapter_model.safetensors"
    st = weights.stat()
    try:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # "retrained": seed 0's resized rows are stale
        kept = which_rank.read_evaluations(runs)
        assert len(kept) == len(frame) - 4 and not ((kept["curve"] == "resized") & (kept["seed"] == 0)).any()
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert len(which_rank.read_evaluations(runs)) == len(frame)


@pytest.mark.slow
def test_resize_then_eval_is_what_lora_resize_eval_gives(runs, evaluated, tmp_path):
    frame, _ = evaluated
    out = tmp_path / "r2"
    code = resize_cli.main(["--adapter", str(runs / "qv_r4_s0"), "--rank", "2", "--out", str(out), "--eval",
                            "--max-length", "16", "--quiet"])  # the quick grid's max_length
    assert code == 0
    cli = json.loads((out / resize_cli.REPORT_NAME).read_text())["eval"]["resized"]
    ours = frame[(frame["curve"] == "resized") & (frame["types"] == "q,v") & (frame["rank"] == 2)
                 & (frame["seed"] == 0)].iloc[0]
    assert ours["val_metric"] == cli["accuracy"] and ours["val_loss"] == pytest.approx(cli["loss"], rel=1e-9)


@pytest.mark.slow
def test_rank_pattern_is_taken_by_lora_resize_end_to_end(runs, tmp_path):
    from lora_analysis.load.run import Run
    from lora_analysis.pipeline import analyse

    spectra = analyse(Run.open(runs)).tables["spectra"]
    written = write_rank_advice(spectra, tmp_path / "figs")
    assert {p.name for p in written} == {"rank_advice.csv", "rank_pattern.json"}
    pattern = json.loads((tmp_path / "figs" / "rank_pattern.json").read_text())
    assert pattern and all(k in (1, 2, 4) for k in pattern.values())
    out = tmp_path / "advised"
    assert resize_cli.main(["--adapter", str(runs / "qv_r4_s0"), "--rank-pattern",
                            str(tmp_path / "figs" / "rank_pattern.json"), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / resize_cli.REPORT_NAME).read_text())
    assert {m["module"]: m["rank"] for m in report["modules"]} == pattern
    # the rule's promise: every module keeps at least 90 % of its ‖ΔW‖_F² (float32 factors: 1e-6 slack)
    assert min(m["kept"] for m in report["modules"]) >= 0.9 - 1e-6

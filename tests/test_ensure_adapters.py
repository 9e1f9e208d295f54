"""lora.rundir (the default run directory, one env var) and lora.train.ensure_adapters (train what an analysis
needs before it loads), on a tiny BERT trained for a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import tiny_train_setup

from lora import rundir
from lora.errors import UserError
from lora.train import ensure_adapters
from lora_analysis.load.adapters import index_run, load_run_adapter


def test_default_run_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(rundir.RUNS_ENV, raising=False)
    assert rundir.default_run_dir() == Path("runs") / "default"
    monkeypatch.setenv(rundir.RUNS_ENV, str(tmp_path / "elsewhere"))
    assert rundir.default_run_dir() == tmp_path / "elsewhere"


def test_ensure_adapters_trains_only_missing(tmp_path, capsys):
    config = tiny_train_setup(tmp_path)
    run = tmp_path / "run"
    out = ensure_adapters(run, (2, 4), (0,), progress=False, config=config)
    assert out == run
    assert "training 2 missing adapter(s)" in capsys.readouterr().err
    idx = index_run(run)
    assert {(e.rank, e.seed) for e in idx.entries} == {(2, 0), (4, 0)}
    assert json.loads((run / "manifest.json").read_text())["config"]["ranks"] == [2, 4]
    stamp = (run / "qv_r2_s0" / "adapter_model.safetensors").stat().st_mtime_ns
    ensure_adapters(run, (2, 4), (0,), progress=False)  # nothing missing: nothing trained
    assert capsys.readouterr().err == ""
    assert (run / "qv_r2_s0" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match=r"\(rank, seed\) \(16, 0\) is not part of it"):
        ensure_adapters(run, (16,), (0,), progress=False)
    a = load_run_adapter(run, rank=4, seed=0)
    assert a.init_A is not None and a.weight_set == "q,v"

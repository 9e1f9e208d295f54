"""lora_analysis.tables.cache: an analysis cache that round-trips every table, goes stale with the run, and never
needs write access to the run."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lora.errors import UserError
from lora_analysis.load.adapters import RunIndex
from lora_analysis.load.base import BaseWeights
from lora_analysis.load.run import Run, check_run_dir
from lora_analysis.tables.analysis import Analysis
from lora_analysis.tables.build import COLUMNS
from lora_analysis.tables.cache import CACHE_SUBDIR, read_cache, write_cache


def _run(root: Path) -> Run:
    return Run(root, RunIndex(root=root, entries=()), None, BaseWeights())


def _analysis() -> Analysis:
    tables = {name: pd.DataFrame(columns=cols) for name, cols in COLUMNS.items()}
    tables["table7"] = pd.DataFrame({c: [1.0, 2.0] for c in COLUMNS["table7"]})
    tables["table7"]["delta"] = [np.pi, np.e]  # float64 written at full precision
    tables["dynamics"] = pd.DataFrame({"step": [0, 25], "value": [0.125, 1 / 3]})
    per_step = {25: {"phi": pd.DataFrame({"i": [1], "j": [1], "phi": [0.7071067811865476]})}}
    return Analysis(tables, per_step, {})


def test_check_run_dir(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        check_run_dir(tmp_path / "nope")
    with pytest.raises(UserError, match="empty"):
        check_run_dir(tmp_path)


def test_cache_round_trips_every_table_and_goes_stale_with_the_run(tmp_path):
    (tmp_path / "summary.csv").write_text("name\nx\n")
    run, analysis = _run(tmp_path), _analysis()
    assert read_cache(run) is None  # nothing cached yet
    assert write_cache(run, analysis)
    got = read_cache(run)
    assert got is not None and list(got.tables) == list(analysis.tables)
    pd.testing.assert_frame_equal(got.tables["table7"], analysis.tables["table7"])  # bitwise floats
    pd.testing.assert_frame_equal(got.per_step[25]["phi"], analysis.per_step[25]["phi"])
    (tmp_path / "summary.csv").write_text("name\nx\ny\n")  # the run changed: the cache no longer describes it
    assert read_cache(run) is None


def test_cache_is_skipped_with_a_notice_on_a_read_only_run(tmp_path, capsys, monkeypatch):
    analysis = _analysis()
    assert write_cache(_run(tmp_path), analysis)
    assert (tmp_path / CACHE_SUBDIR / "fingerprint.json").is_file()
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    # a read-only mount, simulated: chmod does not stop root, which CI may run as
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro and mode & os.W_OK else real_access(p, mode))
    assert not write_cache(_run(ro), analysis)
    assert "read-only" in capsys.readouterr().err and not (ro / CACHE_SUBDIR).exists()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lora_analysis.tables.cache.write_tables", full_disk)
    other = tmp_path / "other"
    other.mkdir()
    assert not write_cache(_run(other), analysis)
    assert "No space left" in capsys.readouterr().err

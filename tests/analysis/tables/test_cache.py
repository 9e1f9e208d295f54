"""lora_analysis.tables.cache: the run check, and an analysis cache that never needs write access to the run."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pandas as pd
import pytest

from lora.errors import UserError
from lora_analysis.tables.build import COLUMNS
from lora_analysis.tables.cache import CACHE_SUBDIR, check_run_dir, write_cache


def test_check_run_dir(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        check_run_dir(tmp_path / "nope")
    with pytest.raises(UserError, match="empty"):
        check_run_dir(tmp_path)


def test_cache_is_skipped_with_a_notice_on_a_read_only_run(tmp_path, capsys, monkeypatch):
    tables = {name: pd.DataFrame(columns=cols) for name, cols in COLUMNS.items()}
    assert write_cache(tmp_path, tables)
    assert (tmp_path / CACHE_SUBDIR / "fingerprint.json").is_file()
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    # a read-only mount, simulated: chmod does not stop root, which CI may run as
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro and mode & os.W_OK else real_access(p, mode))
    assert not write_cache(ro, tables)
    assert "read-only" in capsys.readouterr().err and not (ro / CACHE_SUBDIR).exists()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lora_analysis.tables.cache.write_tables", full_disk)
    other = tmp_path / "other"
    other.mkdir()
    assert not write_cache(other, tables)
    assert "No space left" in capsys.readouterr().err

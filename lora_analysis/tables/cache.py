"""All tables of a run in one call (:func:`load_tables`), with an optional on-disk cache for notebooks.

The cache lives in ``<run>/analysis/`` and is keyed by the run's fingerprint (every adapter file's size and mtime,
the summaries, the table schema), so several notebooks on one run analyse it once. Reading a run never needs
write access to it: where the run directory is read-only, the cache is skipped with a notice on stderr.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from lora import rundir
from lora.errors import UserError
from lora.fsio import write_json
from lora_analysis.tables.build import COLUMNS, analyse_run, quality_table, write_tables

__all__ = ["CACHE_SUBDIR", "check_run_dir", "load_tables", "write_cache"]

CACHE_SUBDIR = "analysis"  # <run dir>/analysis: tables cached for notebooks, keyed by the run's fingerprint


def check_run_dir(run_dir: Path, *, option: str = "--runs") -> None:
    """Raise :class:`UserError` (one line) unless ``run_dir`` is a readable, non-empty directory."""
    if not run_dir.exists():
        raise UserError(f"{option} {run_dir}: no such directory")
    if not run_dir.is_dir():
        raise UserError(f"{option} {run_dir}: is a file, expected a run directory")
    try:
        empty = not any(run_dir.iterdir())
    except PermissionError:
        raise UserError(f"{option} {run_dir}: cannot read (permission denied)") from None
    if empty:
        raise UserError(f"{option} {run_dir}: run directory is empty (train it with python -m lora.train "
                        f"--out {run_dir}, or python -m lora_analysis.reproduce)")


def _run_fingerprint(root: Path) -> dict:
    """What the tables depend on: every adapter file (name, size, mtime), the run summaries and the table schema."""
    files = []
    for d in (root, root / rundir.TABLE5_SUBDIR):
        if not d.is_dir():
            continue
        for p in sorted(d.glob("*/adapter_model.safetensors")) + sorted(d.glob("*.csv")) + sorted(d.glob("*.json")):
            st = p.stat()
            files.append([str(p.relative_to(root)), st.st_size, st.st_mtime_ns])
    return {"files": files, "columns": COLUMNS}


def _read_cache(root: Path) -> dict[str, pd.DataFrame] | None:
    cache = root / CACHE_SUBDIR
    try:
        stored = json.loads((cache / "fingerprint.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if stored != json.loads(json.dumps(_run_fingerprint(root))):
        return None
    try:
        return {name: pd.read_csv(cache / f"{name}.csv") for name in COLUMNS}
    except (OSError, ValueError):
        return None


def write_cache(root: Path, tables: Mapping[str, pd.DataFrame]) -> bool:
    """Store ``tables`` in ``<root>/analysis``; where it cannot be written (a read-only run directory, a full disk),
    say so in one ``note:`` line on stderr and return False: the cache is optional."""
    if not os.access(root, os.W_OK):
        print(f"note: {root} is read-only; the analysis cache is not written (nothing else changes)", file=sys.stderr)
        return False
    try:
        write_tables(tables, root / CACHE_SUBDIR)
        write_json(root / CACHE_SUBDIR / "fingerprint.json", _run_fingerprint(root))  # last: marks it complete
    except (OSError, UserError) as exc:  # a full or read-only disk (fsio names the file): the cache is optional
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"note: {root / CACHE_SUBDIR}: analysis cache not written ({reason})", file=sys.stderr)
        return False
    return True


def load_tables(run_dir: str | os.PathLike, *, progress: bool = False, cache: bool = False) -> dict[str, pd.DataFrame]:
    """All tables of a run: :func:`lora_analysis.tables.build.analyse_run`, plus the Table 5 budget run's quality
    rows (from ``<run_dir>/table5`` if present) appended to ``quality``.

    With ``cache=True`` the tables are read from ``<run_dir>/analysis/`` when its fingerprint matches the run,
    else computed and stored there (skipped with a notice where the run directory is read-only).
    """
    root = Path(run_dir)
    check_run_dir(root, option="run directory")
    if cache:
        cached = _read_cache(root)
        if cached is not None:
            return cached
    tables = analyse_run(root, progress=progress)
    t5 = root / rundir.TABLE5_SUBDIR
    if t5.is_dir() and any(t5.iterdir()):
        extra = quality_table(t5)
        extra = extra[extra["weight_set"] != "linear probe"]
        # the q,v point of the budget run may duplicate a rank-sweep point: keep one row per (set, rank, seed)
        both = pd.concat([tables["quality"], extra], ignore_index=True)
        tables["quality"] = both.drop_duplicates(subset=["weight_set", "rank", "seed"], keep="first")
    if cache:
        write_cache(root, tables)
    return tables

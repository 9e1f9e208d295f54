"""An on-disk cache of a run's analysis, for notebooks: several notebooks on one run analyse it once.

The cache lives in ``<run>/analysis/``: every table of :class:`~lora_analysis.tables.analysis.Analysis` as CSV
(the snapshots' tables under ``step_<n>/``), keyed by the run's fingerprint (every adapter, snapshot and full
fine-tuning file's size and mtime, the summaries, the table schema). It is optional: where the run directory is
read-only, or a write fails (a full disk), the cache is skipped with one ``note:`` line on stderr and the analysis
goes on.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd

from lora import rundir
from lora.errors import UserError
from lora.fsio import write_json
from lora_analysis.load.run import Run
from lora_analysis.tables.analysis import Analysis
from lora_analysis.tables.build import COLUMNS, write_tables

__all__ = ["CACHE_SUBDIR", "read_cache", "write_cache"]

CACHE_SUBDIR = "analysis"  # <run dir>/analysis: tables cached for notebooks, keyed by the run's fingerprint
FORMAT = 2  # 2: every table of the analysis (1 held the Section 7 tables only)
_PATTERNS = ("*/adapter_model.safetensors", "*/snapshots/*.safetensors", "*/delta_weights.safetensors", "*.csv",
             "*.json")


def _run_fingerprint(root: Path) -> dict:
    """What the tables depend on: every adapter, snapshot and full fine-tuning file (name, size, mtime), the run
    summaries and the table schema."""
    files = []
    for d in (root, root / rundir.TABLE5_SUBDIR):
        if not d.is_dir():
            continue
        for pattern in _PATTERNS:
            for p in sorted(d.glob(pattern)):
                st = p.stat()
                files.append([str(p.relative_to(root)), st.st_size, st.st_mtime_ns])
    return {"format": FORMAT, "files": files, "columns": COLUMNS}


def read_cache(run: Run) -> Analysis | None:
    """The cached analysis of ``run``, or ``None`` when there is none or it does not match the run."""
    cache = run.root / CACHE_SUBDIR
    try:
        stored = json.loads((cache / "fingerprint.json").read_text(encoding="utf-8"))
        if stored.get("fingerprint") != json.loads(json.dumps(_run_fingerprint(run.root))):
            return None
        tables = {name: pd.read_csv(cache / f"{name}.csv") for name in stored["tables"]}
        per_step = {int(step): {name: pd.read_csv(cache / f"step_{step}" / f"{name}.csv") for name in names}
                    for step, names in stored["per_step"].items()}
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return None
    return Analysis(tables, per_step, run.setup())


def write_cache(run: Run, analysis: Analysis) -> bool:
    """Store ``analysis`` in ``<run>/analysis``; on a read-only run directory or a failed write, say so in one
    ``note:`` line on stderr and return False."""
    root = run.root
    if not os.access(root, os.W_OK):
        print(f"note: {root} is read-only; the analysis cache is not written (nothing else changes)", file=sys.stderr)
        return False
    cache = root / CACHE_SUBDIR
    try:
        write_tables(analysis.tables, cache)
        for step, tables in analysis.per_step.items():
            write_tables(tables, cache / f"step_{step}")
        write_json(cache / "fingerprint.json", {  # last: marks the cache complete
            "fingerprint": _run_fingerprint(root), "tables": list(analysis.tables),
            "per_step": {str(step): list(t) for step, t in analysis.per_step.items()}})
    except (OSError, UserError) as exc:  # a full or read-only disk: the cache is optional, the analysis goes on
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"note: {cache}: analysis cache not written ({reason})", file=sys.stderr)
        return False
    return True

"""The run-directory format: the one module that knows where runs live and how their files are read and written.

A run directory (written by :mod:`lora.train`, read by :mod:`lora_analysis`)::

    <run>/manifest.json           config, grid, base and data fingerprints, versions, linear-probe baseline
    <run>/summary.csv             one row per finished grid point (SUMMARY_COLUMNS)
    <run>/<set>_r<r>_s<seed>/     one PEFT-layout adapter directory per grid point, with metrics.json
    <run>/<set>_full_s<seed>/     full fine-tuning of the same matrices (lora.full_ft): delta_weights.safetensors,
                                  full_finetune.json, metrics.json
    <run>/table5/                 the Table 5 budget run (a run directory of its own), written by reproduce

The default run directory is ``runs/default`` under the current directory, or ``$LORA_RUNS_DIR`` when set: the
only place either is spelled. Every reader raises :class:`lora.errors.UserError` with one line naming the file.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lora.errors import UserError, os_error_reason
from lora.fsio import write_text

__all__ = [
    "MANIFEST",
    "METRICS",
    "FULL_PREFIX",
    "QUICK_RUN_DIR",
    "RUNS_ENV",
    "SUMMARY",
    "SUMMARY_COLUMNS",
    "TABLE5_SUBDIR",
    "check_manifest_matches",
    "default_run_dir",
    "quality_rows",
    "quality_weight_set",
    "read_json_object",
    "read_manifest",
    "split_quality_weight_set",
    "write_summary",
]

RUNS_ENV = "LORA_RUNS_DIR"  # the one environment variable: overrides the default run directory
DEFAULT_RUN_DIR = Path("runs") / "default"  # relative to the current directory, where lora.train writes by default
QUICK_RUN_DIR = Path("runs") / "quick"  # `reproduce --quick`: a smoke run never mixes with the real one
TABLE5_SUBDIR = "table5"  # the Table 5 budget run lives in <run>/table5 (its own config, its own manifest)
MANIFEST, SUMMARY, METRICS = "manifest.json", "summary.csv", "metrics.json"
SUMMARY_COLUMNS = (
    "name", "weight_set", "targets", "rank", "seed", "alpha", "metric", "val_metric", "val_loss",
    "linear_probe_metric", "lora_params", "trainable_params", "total_params", "steps", "wall_time_s",
)


FULL_PREFIX = "full:"  # quality rows of full fine-tuning: weight set "full:q,v" (rank 0), beside the LoRA sweep


def quality_weight_set(point: Mapping[str, Any]) -> str:
    """The ``weight_set`` a grid point has in summary.csv and the quality table: its own for LoRA, ``full:<set>``
    for full fine-tuning (so no LoRA rank sweep or budget mixes it in)."""
    ws = str(point["weight_set"])
    return FULL_PREFIX + ws if point.get("method", "lora") == "full" else ws


def split_quality_weight_set(written: str) -> dict[str, str]:
    """``{"weight_set", "method"}`` of a weight set as summary.csv writes it: ``"full:q,v"`` is full fine-tuning of
    ``q,v``, anything else a LoRA weight set."""
    written = str(written)
    if written.startswith(FULL_PREFIX):
        return {"weight_set": written[len(FULL_PREFIX):], "method": "full"}
    return {"weight_set": written, "method": "lora"}


def default_run_dir() -> Path:
    """``$LORA_RUNS_DIR`` if set, else ``runs/default`` under the current directory."""
    env = os.environ.get(RUNS_ENV)
    return Path(env) if env else DEFAULT_RUN_DIR


# ---------------------------------------------------------------------------------------------- reading
def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from ``path``; one-line :class:`UserError` for unreadable, non-UTF-8, invalid or non-object."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{p}: not UTF-8 text (invalid JSON)") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{p}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except OSError as exc:  # "permission denied", "is a directory", ...
        raise UserError(f"{p}: cannot read ({os_error_reason(exc)})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{p}: expected a JSON object")
    return obj


def read_manifest(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's parsed ``manifest.json``, or ``None`` for a directory without one (e.g. a folder of peft adapters)."""
    path = Path(run_dir) / MANIFEST
    return read_json_object(path) if path.is_file() else None


def _number(path: Path, row: int, column: str, value: Any, cast=float):
    try:
        return int(float(value)) if cast is int else cast(value)
    except (TypeError, ValueError):
        raise UserError(f"{path}: row {row}: column {column} is not a number ({value!r})") from None


def quality_rows(run_dir: str | os.PathLike, *, manifest: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Tables 5 and 6 data of a run: one dict per grid point, plus the frozen linear probe.

    Read from ``summary.csv`` or, where it is missing, each adapter's ``metrics.json``. The linear-probe
    baseline (``weight_set="linear probe"``, rank 0) comes from ``manifest.json`` (``manifest``, where the caller
    has read it already). Keys: weight_set, method (``lora``, ``full`` for full fine-tuning, ``probe`` for the
    linear probe), rank, seed, alpha, trainable_params, val_metric, metric_name, wall_s. The ``full:`` prefix that
    summary.csv writes in ``weight_set`` (:func:`quality_weight_set`) is the file's business: rows carry the
    method in its own key and the plain weight set. A folder of adapters without training metrics
    gives ``[]``.
    """
    root = Path(run_dir)
    summary = root / SUMMARY
    rows: list[dict[str, Any]] = []
    if summary.is_file():
        try:
            with summary.open(newline="", encoding="utf-8") as fh:
                records = list(csv.DictReader(fh))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise UserError(f"{summary}: unreadable CSV ({exc})") from None
        needed = {"weight_set", "rank", "seed", "alpha", "trainable_params", "val_metric", "metric", "wall_time_s"}
        if records and not needed <= set(records[0]):
            raise UserError(f"{summary}: missing columns {sorted(needed - set(records[0]))}")
        for n, r in enumerate(records, start=2):
            rows.append({
                **split_quality_weight_set(r["weight_set"]), "rank": _number(summary, n, "rank", r["rank"], int),
                "seed": _number(summary, n, "seed", r["seed"], int), "alpha": _number(summary, n, "alpha", r["alpha"]),
                "trainable_params": _number(summary, n, "trainable_params", r["trainable_params"], int),
                "val_metric": _number(summary, n, "val_metric", r["val_metric"]), "metric_name": r["metric"],
                "wall_s": _number(summary, n, "wall_time_s", r["wall_time_s"]),
            })
    else:
        for d in sorted(p for p in root.iterdir() if p.is_dir() and (p / METRICS).is_file()):
            m = read_json_object(d / METRICS)
            p = m.get("point") or {}
            try:
                rows.append({"weight_set": str(p["weight_set"]), "method": str(p.get("method", "lora")),
                             "rank": int(p["rank"]), "seed": int(p["seed"]),
                             "alpha": float(p["alpha"]), "trainable_params": int(m["trainable_params"]),
                             "val_metric": float(m["val_metric"]), "metric_name": m["metric"],
                             "wall_s": float(m["wall_time_s"])})
            except (KeyError, TypeError, ValueError) as exc:
                raise UserError(f"{d / METRICS}: missing or bad field {exc}") from None
    if manifest is None:
        manifest = read_manifest(root) or {}
    probe = manifest.get("linear_probe") or {}
    if isinstance(probe, dict) and "val_metric" in probe:
        where = root / MANIFEST
        rows.append({"weight_set": "linear probe", "method": "probe", "rank": 0, "seed": _number(where, 0, "seed", probe.get("seed", 0), int),
                     "alpha": 0.0, "trainable_params": _number(where, 0, "trainable_params",
                                                               probe.get("trainable_params", 0), int),
                     "val_metric": _number(where, 0, "val_metric", probe["val_metric"]),
                     "metric_name": str(probe.get("metric", "")),
                     "wall_s": _number(where, 0, "wall_time_s", probe.get("wall_time_s", float("nan")))})
    return rows


# ---------------------------------------------------------------------------------------------- writing
def check_manifest_matches(out_dir: Path, manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """Refuse to mix runs: an existing run directory must hold a manifest with the same config, base weights and
    data as ``manifest``. Returns the existing manifest, or ``None`` for a new or empty directory."""
    old = read_manifest(out_dir)
    if old is not None:
        for key, what in (("config", "config"), ("base_fingerprint", "base model weights")):
            mine, theirs = old.get(key), manifest[key]
            if key == "config":  # a run written before a config field existed holds that field's default
                mine, theirs = _with_defaults(mine), _with_defaults(theirs)
            if mine != theirs:
                raise UserError(f"--out {out_dir}: holds a run with a different {what}; choose another --out")
        if (old.get("task") or {}).get("fingerprint") != manifest["task"]["fingerprint"]:
            raise UserError(f"--out {out_dir}: holds a run on different data; choose another --out")
        return old
    if out_dir.exists() and any(p for p in out_dir.iterdir() if not p.name.startswith(".")):
        raise UserError(f"--out {out_dir}: exists, is not empty and has no {MANIFEST}; choose another --out")
    return None


def _with_defaults(config: Any) -> Any:
    """A manifest's config with every :class:`lora.config.TrainConfig` field filled in (as ``to_dict`` writes it),
    so a run written before a field was added (e.g. ``snapshot_steps``) still matches its own config; a config
    that does not parse is compared as it is."""
    from lora.config import TrainConfig

    if not isinstance(config, dict):
        return config
    try:
        return TrainConfig.from_dict(config, source="manifest").to_dict()
    except UserError:
        return config


def _summary_row(adapter_dir: Path, probe: Mapping[str, Any]) -> dict[str, Any]:
    m = read_json_object(adapter_dir / METRICS)
    p = m["point"]
    return {
        "name": p["name"], "weight_set": quality_weight_set(p), "targets": " ".join(p["targets"]), "rank": p["rank"],
        "seed": p["seed"], "alpha": p["alpha"], "metric": m["metric"], "val_metric": m["val_metric"],
        "val_loss": m["val_loss"], "linear_probe_metric": probe.get("val_metric", ""),
        "lora_params": m["lora_params"], "trainable_params": m["trainable_params"],
        "total_params": m["total_params"], "steps": m["steps"], "wall_time_s": m["wall_time_s"],
    }


def write_summary(out_dir: Path, names: Iterable[str], probe: Mapping[str, Any]) -> Path:
    """``summary.csv``: one row per finished grid point (``names`` in grid order), written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for name in names:
        if (out_dir / name).is_dir():
            writer.writerow(_summary_row(out_dir / name, probe))
    return write_text(out_dir / SUMMARY, buf.getvalue(), if_changed=True)  # a no-op resume writes nothing

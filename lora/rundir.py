"""The run-directory format: the one module that knows where runs live and how their files are read and written.

A run directory (written by :mod:`lora.train`, read by :mod:`lora_analysis`)::

    <run>/manifest.json           config, grid, base and data fingerprints, versions, linear-probe baseline
    <run>/summary.csv             one row per finished grid point (SUMMARY_COLUMNS)
    <run>/<set>_r<r>_s<seed>/     one PEFT-layout adapter directory per grid point, with metrics.json
    <run>/<set>_full_s<seed>/     full fine-tuning of the same matrices (lora.full_ft): delta_weights.safetensors,
                                  full_finetune.json, metrics.json
    <run>/table5/                 the Table 5 budget run (a run directory of its own), written by reproduce

Each grid point's directory ends with ``files.json`` (:data:`RECORD`), written inside the point's temporary
directory as its last file, so it appears with the point or not at all: every other file of the point with its
size and SHA-256, the grid point and the training settings it was trained under (:func:`training_settings`).
Resuming (:mod:`lora.train`) retrains a point that fails :func:`point_problem`; ``figures`` refuses a run that
fails :func:`verify_run`. A point written before records existed has none: it is checked for its required
files, its grid point and whole safetensors files only, and said to be unverified.

The default run directory is ``runs/default`` under the current directory, or ``$LORA_RUNS_DIR`` when set: the
only place either is spelled. Every reader raises :class:`lora.errors.UserError` with one line naming the file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from lora.errors import UserError, os_error_reason, short_repr
from lora.fsio import write_json, write_text

__all__ = [
    "GRID_ONLY_FIELDS",
    "MANIFEST",
    "METRICS",
    "FULL_PREFIX",
    "QUICK_RUN_DIR",
    "RECORD",
    "RUNS_ENV",
    "RunCheck",
    "SUMMARY",
    "SUMMARY_COLUMNS",
    "TABLE5_SUBDIR",
    "check_manifest_matches",
    "default_run_dir",
    "point_problem",
    "quality_rows",
    "quality_weight_set",
    "read_json_object",
    "read_manifest",
    "split_quality_weight_set",
    "training_settings",
    "verify_run",
    "write_point_record",
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


# ---------------------------------------------------------------------------------------------- verified points
RECORD = "files.json"  # a point's record of its own files (see the module docstring)
RECORD_FORMAT = "lora-point-files/1"
# Config fields that choose which points a run holds, or that touch no LoRA point, not how one is trained: two
# runs that differ only in these train a point they share identically (lora.reuse copies it between them).
GRID_ONLY_FIELDS = ("targets", "ranks", "budget", "seeds", "linear_probe", "method", "full_lr")
SNAPSHOTS_FIELD = "snapshot_steps"  # which snapshot files a LoRA point has, not how it trains: checked on their own
_RUN_KEYS = ("base_model", "base_fingerprint", "task", "versions", "nested_init", "layout")
# The files every finished point holds, by method: lora.adapter_io's and lora.full_ft's names, spelled here since
# both modules import this one (tests/test_run_integrity.py checks that the names agree).
REQUIRED_FILES = {
    "lora": ("adapter_config.json", "adapter_model.safetensors", "init.safetensors", METRICS),
    "full": ("delta_weights.safetensors", "full_finetune.json", METRICS),
}
_ADAPTER_WEIGHTS, _FULL_DESCRIPTION = "adapter_model.safetensors", "full_finetune.json"
_MARKERS = (*{n for names in REQUIRED_FILES.values() for n in names}, RECORD)  # what makes a folder a point
_CHUNK = 1 << 20


def training_settings(manifest: Mapping[str, Any], method: str = "lora") -> dict[str, Any]:
    """What a point's files depend on besides the point itself, from its run's manifest: the config without the
    grid-only fields (:data:`GRID_ONLY_FIELDS`, but ``full_lr`` for full fine-tuning) and the snapshot steps, and
    the base, task, package versions, init nesting and thread layout. Runs with equal settings train the points
    they share identically (:func:`lora.reuse.same_training`), so a point copied between them stays verified.
    JSON-normalised (lists, not tuples), as a record stores it."""
    skip = {*GRID_ONLY_FIELDS, SNAPSHOTS_FIELD} - ({"full_lr"} if method == "full" else set())
    config = manifest.get("config")
    if isinstance(config, dict):
        config = {k: v for k, v in config.items() if k not in skip}
    return json.loads(json.dumps({"config": config, **{k: manifest.get(k) for k in _RUN_KEYS}}))


def _point_files(point_dir: Path) -> dict[str, Path]:
    """A point's files by POSIX name relative to it (``snapshots/step_000002.safetensors``), sorted; hidden names
    (and what lies in hidden folders) and the record itself are not among them."""
    out = {}
    for p in sorted(point_dir.rglob("*")):
        name = p.relative_to(point_dir).as_posix()
        if name != RECORD and not any(part.startswith(".") for part in name.split("/")) and p.is_file():
            out[name] = p
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_point_record(point_dir: str | os.PathLike, *, point: Mapping[str, Any],
                       manifest: Mapping[str, Any]) -> Path:
    """Write ``<point_dir>/files.json``: every other file of the point with its size and SHA-256, ``point`` (its
    grid entry, ``GridPoint.to_dict()``) and the :func:`training_settings` of the run's ``manifest``. Call it as
    the last write into the point's temporary directory, so the record appears with the point."""
    root = Path(point_dir)
    entry = json.loads(json.dumps(dict(point)))
    files = {name: {"size": p.stat().st_size, "sha256": _sha256(p)} for name, p in _point_files(root).items()}
    return write_json(root / RECORD, {"format": RECORD_FORMAT, "point": entry,
                                      "training": training_settings(manifest, entry.get("method", "lora")),
                                      "files": files})


def _safetensors_layout(path: Path) -> tuple[dict[str, Any], int] | str:
    """``(header, offset of the data)`` of a whole safetensors file, or why it is not one: "truncated (a of b
    bytes)", where the header's offsets say how long the file must be."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else None
        if n is None or n > size - 8:
            return (f"truncated ({size} of at least {8 + (n or 0)} bytes, inside its header)"
                    if n is None or n < _CHUNK else "not a safetensors file (no header)")
        try:
            header = json.loads(fh.read(n))
        except ValueError:  # UnicodeDecodeError included
            return "not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return "not a safetensors file (its header is not a JSON object)"
    end = 0
    for key, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if key == "__metadata__":
            continue
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"not a safetensors file (tensor {key!r} has no data offsets)"
        end = max(end, offsets[1])
    expected = 8 + n + end
    if size != expected:
        return f"truncated ({size} of {expected} bytes)" if size < expected else \
            f"{size - expected} bytes longer than its tensors ({size} of {expected} bytes)"
    return header, 8 + n


def _difference(theirs: Any, ours: Any, key: str = "") -> str | None:
    """The first key where two JSON values differ, as ``"<key> <theirs> (this run: <ours>)"``; ``None`` if equal."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        for k in sorted(set(theirs) | set(ours), key=str):
            found = _difference(theirs.get(k), ours.get(k), f"{key}.{k}" if key else str(k))
            if found:
                return found
        return None
    if theirs == ours:
        return None
    return f"{key.removeprefix('config.')} {short_repr(theirs, 40)} (this run: {short_repr(ours, 40)})"


def _json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _record_problem(root: Path, files: Mapping[str, Path], point: Mapping[str, Any],
                    manifest: Mapping[str, Any] | None, wanted: Sequence[int] | None, deep: bool) -> str | None:
    """What a point's files.json says is wrong with it (see :func:`point_problem`)."""
    from lora.snapshots import SNAPSHOT_DIR, step_of

    record = _json_or_none(root / RECORD)
    listed = record.get("files") if isinstance(record, dict) else None
    if not isinstance(listed, dict) or record.get("format") != RECORD_FORMAT or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            for v in listed.values()):
        return f"{RECORD}: unreadable or not a {RECORD_FORMAT} record"
    for name, info in listed.items():
        path = files.get(name)
        if path is None:
            step = step_of(name[len(SNAPSHOT_DIR) + 1:]) if name.startswith(SNAPSHOT_DIR + "/") else None
            if step is not None and wanted is not None and step not in wanted:
                continue  # a snapshot this run does not keep (lora.reuse copies a point without its snapshots)
            if step is not None and not (root / SNAPSHOT_DIR).is_dir():
                return f"{SNAPSHOT_DIR}/ missing (the whole folder, which {RECORD} lists)"
            return f"{name} missing"
        size = path.stat().st_size
        if size != info["size"]:
            return f"{name} truncated ({size} of {info['size']} bytes)" if size < info["size"] else \
                f"{name} has {size} bytes, {info['size']} when written ({RECORD})"
        if deep and _sha256(path) != info["sha256"]:
            return f"{name} changed since it was written (its SHA-256 differs from {RECORD}'s)"
    extra = [name for name in files if name not in listed]
    if extra:
        return f"{extra[0]}: not one of the files the point was written with ({RECORD})"
    found = _difference(record.get("point"), json.loads(json.dumps(dict(point))))
    if found:
        return f"{RECORD}: another grid point: {found}"
    if manifest is not None:
        found = _difference(record.get("training"), training_settings(manifest, point.get("method", "lora")))
        if found:
            return f"trained for another run: {RECORD} records {found}"
    return None


def _snapshot_problem(root: Path, files: Mapping[str, Path], wanted: Sequence[int], steps: Any,
                      deep: bool) -> str | None:
    """A LoRA point's snapshots against the run's steps ``wanted``: each there, no other, and the one at the last
    optimizer step (``steps``, from metrics.json) bitwise the saved adapter's factors (``deep``)."""
    from lora.snapshots import SNAPSHOT_DIR, snapshot_name, step_of

    have = {step_of(name.split("/", 1)[1]) for name in files if name.startswith(SNAPSHOT_DIR + "/")} - {None}
    listed = " ".join(map(str, wanted)) or "none"
    if wanted and not (root / SNAPSHOT_DIR).is_dir():
        return f"{SNAPSHOT_DIR}/ missing (the whole folder; the run saves steps {listed})"
    for s in wanted:
        if s not in have:
            return f"{SNAPSHOT_DIR}/{snapshot_name(s)} missing (the run saves steps {listed})"
    for s in sorted(have - set(wanted)):
        return f"{SNAPSHOT_DIR}/{snapshot_name(s)}: step {s} is not one of the run's snapshot steps ({listed})"
    if deep and isinstance(steps, int) and steps in wanted:
        return _final_snapshot_problem(root, f"{SNAPSHOT_DIR}/{snapshot_name(steps)}")
    return None


def _final_snapshot_problem(root: Path, snapshot: str) -> str | None:
    """The snapshot at the last step holds exactly the adapter's LoRA factors (same keys, dtypes, shapes, bytes)."""
    layouts = [_safetensors_layout(root / name) for name in (snapshot, _ADAPTER_WEIGHTS)]
    if any(isinstance(x, str) for x in layouts):
        return next(f"{name}: {x}" for name, x in zip((snapshot, _ADAPTER_WEIGHTS), layouts, strict=True)
                    if isinstance(x, str))
    (snap, snap_at), (full, full_at) = layouts  # type: ignore[misc]
    with (root / snapshot).open("rb") as fs, (root / _ADAPTER_WEIGHTS).open("rb") as fa:
        for key in sorted(k for k in snap if k != "__metadata__"):
            mine, theirs = snap[key], full.get(key)
            same = isinstance(theirs, dict) and all(mine.get(f) == theirs.get(f) for f in ("dtype", "shape"))
            if same:
                (a0, a1), (b0, b1) = mine["data_offsets"], theirs["data_offsets"]
                fs.seek(snap_at + a0)
                fa.seek(full_at + b0)
                same = fs.read(a1 - a0) == fa.read(b1 - b0)
            if not same:
                return (f"{snapshot}: {key} differs from {_ADAPTER_WEIGHTS}'s (the snapshot at the last step is the "
                        "saved adapter)")
    return None


def _full_problem(root: Path, point: Mapping[str, Any], manifest: Mapping[str, Any]) -> str | None:
    """A full fine-tuning's description against this run: base, weight set, seed and learning rates."""
    desc = _json_or_none(root / _FULL_DESCRIPTION)
    if not isinstance(desc, dict):
        return f"{_FULL_DESCRIPTION}: unreadable"
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    for key, ours in (("base_fingerprint", manifest.get("base_fingerprint")), ("weight_set", point.get("weight_set")),
                      ("seed", point.get("seed")), ("lr", config.get("lr")), ("full_lr", config.get("full_lr"))):
        if ours is not None and desc.get(key) != ours:
            return f"{_FULL_DESCRIPTION}: a full fine-tuning of another run: {_difference(desc.get(key), ours, key)}"
    return None


def _snapshot_steps_of(manifest: Mapping[str, Any] | None) -> tuple[int, ...] | None:
    config = (manifest or {}).get("config")
    if not isinstance(config, dict):
        return None
    steps = config.get(SNAPSHOTS_FIELD) or ()
    return tuple(s for s in steps if isinstance(s, int)) if isinstance(steps, list | tuple) else None


def point_problem(point_dir: str | os.PathLike, point: Mapping[str, Any], manifest: Mapping[str, Any] | None, *,
                  deep: bool = True) -> str | None:
    """Why ``point_dir`` is not a whole grid point of its run, or ``None``. The reason starts with the file it
    concerns, relative to ``point_dir`` (``"adapter_model.safetensors truncated (123 of 4567 bytes)"``).

    Args:
        point_dir: the point's directory.
        point: its grid entry (``GridPoint.to_dict()``: name, weight set, rank, seed, alpha, method).
        manifest: the run's manifest (``None`` outside a run: no training settings or snapshot steps to check).
        deep: also hash every file against the record and compare the last snapshot with the adapter (without
            it: names and sizes only, for a quick look before the run directory is locked).

    Checked: the method's required files (:data:`REQUIRED_FILES`); with files.json, each file it lists (missing,
    truncated, resized, SHA-256), no file it does not list, its grid point and training settings; without one,
    each safetensors file whole (its header's offsets); metrics.json's grid point; a full fine-tuning's
    description (base, weight set, seed, learning rates); a LoRA point's snapshots at exactly the run's steps,
    the last one bitwise the adapter's factors.
    """
    root = Path(point_dir)
    if not root.is_dir():
        return "not a directory"
    method = point.get("method", "lora")
    files = _point_files(root)
    missing = [name for name in REQUIRED_FILES.get(method, ()) if name not in files]
    if missing:
        return f"{missing[0]} missing"
    wanted = _snapshot_steps_of(manifest) if method == "lora" else None
    if (root / RECORD).is_file():
        problem = _record_problem(root, files, point, manifest, wanted, deep)
    else:
        layouts = ((name, _safetensors_layout(p)) for name, p in files.items() if name.endswith(".safetensors"))
        problem = next((f"{name} {why}" for name, why in layouts if isinstance(why, str)), None)
    if problem:
        return problem
    metrics = _json_or_none(root / METRICS)
    if not isinstance(metrics, dict):
        return f"{METRICS}: unreadable"
    found = _difference(metrics.get("point"), json.loads(json.dumps(dict(point))))
    if found:
        return f"{METRICS}: another grid point: {found}"
    if method == "full" and manifest is not None:
        return _full_problem(root, point, manifest)
    if wanted is not None:
        return _snapshot_problem(root, files, wanted, metrics.get("steps"), deep)
    return None


# ---------------------------------------------------------------------------------------------- a run, verified
_READ = object()  # verify_run's default: read the manifest itself


@dataclass(frozen=True)
class RunCheck:
    """What :func:`verify_run` found: ``errors``, each one line naming a file, that the analysis must not go on
    with, and ``notes``, each naming what is missing or unverified, that it can honestly go on without."""

    errors: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def raise_or_note(self, stream: TextIO | None = None) -> None:
        """Raise the first error as a :class:`UserError` (one line; the count of the others appended), else write
        each note as ``note: ...`` to ``stream`` (stderr)."""
        if self.errors:
            more = f" (and {len(self.errors) - 1} more problem(s) in this run)" if len(self.errors) > 1 else ""
            raise UserError(self.errors[0] + more)
        for note in self.notes:
            (stream or sys.stderr).write(f"note: {note}\n")


def _names(names: Sequence[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _only_full_problem(root: Path, grid: Mapping[str, Mapping[str, Any]]) -> str | None:
    """A run with full fine-tuning and no LoRA adapter: say so, and what ``figures`` can do with it (nothing)."""
    subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if (root / "adapter_config.json").is_file() or any((p / "adapter_config.json").is_file() for p in subdirs):
        return None
    full = sorted(p.name for p in subdirs if (p / _FULL_DESCRIPTION).is_file())
    if not full:
        return None
    pending = [n for n, e in grid.items() if e.get("method", "lora") == "lora"]
    if pending:
        return (f"{root}: holds only full fine-tuning so far ({_names(full)}); its {len(pending)} LoRA point(s) are "
                "not trained yet, and figures analyses LoRA adapters (and full fine-tuning against them): resume "
                "the run first")
    return (f"{root}: holds only full fine-tuning ({_names(full)}), no LoRA adapter: figures analyses LoRA "
            "adapters and compares full fine-tuning with them (ΔW's spectra, subspaces and Table 7 need an adapter "
            "of the same weight set and seed), so nothing here is analysable by it; train --method lora full into "
            "a new --out for both")


def verify_run(run_dir: str | os.PathLike, *, manifest: Mapping[str, Any] | None | object = _READ,
               table5: bool = True) -> RunCheck:
    """Check a run directory against its manifest before it is analysed (and its Table 5 run, ``table5/``).

    Errors (the analysis would silently use wrong data): a grid point whose directory fails
    :func:`point_problem` (a file damaged, missing or not recorded, a snapshot missing, extra or differing from
    the adapter at the last step, a point trained for another run), a point directory the grid does not list, a
    run of full fine-tuning alone. Notes: grid points not trained yet (the analysis goes on without them) and
    points written before records existed (checked without hashes). A folder without ``manifest.json`` (adapters
    from elsewhere) has nothing to be checked against, except that it holds some adapter.

    ``manifest``: the run's parsed manifest (``None``: it has none) where the caller has read it already, so a run
    is read once (:class:`lora_analysis.load.run.Run`). ``table5=False`` leaves ``table5/`` to its own check.
    """
    root = Path(run_dir)
    if not root.is_dir():
        return RunCheck()  # the commands say so first (lora_analysis.tables.cache.check_run_dir)
    if manifest is _READ:
        manifest = read_manifest(root)
    raw = (manifest or {}).get("grid")
    grid = {e["name"]: e for e in raw if isinstance(e, dict) and isinstance(e.get("name"), str)} \
        if isinstance(raw, list) else {}
    trained = {n: e for n, e in grid.items() if (root / n).exists()}
    only_full = _only_full_problem(root, {n: e for n, e in grid.items() if n not in trained})
    errors = [only_full] if only_full else []
    if manifest is None:
        return RunCheck(tuple(errors))
    notes = []
    if not isinstance(raw, list):
        return RunCheck(tuple(errors), (f"{root / MANIFEST}: lists no grid, so its points are not verified",))
    unverified = []
    for name, entry in trained.items():
        problem = point_problem(root / name, entry, manifest)
        if problem:
            errors.append(f"{root / name}: {problem}; resuming the run (lora.train --out {root}) retrains it")
        elif not (root / name / RECORD).is_file():
            unverified.append(name)
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in grid):
        if any((d / m).exists() for m in _MARKERS):
            errors.append(f"{d}: not a grid point of this run ({root / MANIFEST} lists {_names(list(grid))}); "
                          "remove it, or analyse it as a run of its own")
    missing = [n for n in grid if n not in trained]
    if missing:
        notes.append(f"{root}: {len(missing)} grid point(s) not trained: {_names(missing)}; analysed without them "
                     f"(resuming the run trains them)")
    if unverified:
        notes.append(f"{root}: {len(unverified)} point(s) without {RECORD} (written before points recorded their "
                     "files): checked for whole files and their grid point, not hashed")
    if table5 and (root / TABLE5_SUBDIR / MANIFEST).is_file():
        sub = verify_run(root / TABLE5_SUBDIR)
        errors += sub.errors
        notes += sub.notes
    return RunCheck(tuple(errors), tuple(notes))

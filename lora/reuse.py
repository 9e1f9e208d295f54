"""Reuse finished adapters of another run when a grid point there is the same training, bit for bit.

The main job trains two runs on one base and task: the rank sweep (ranks 1 2 4 8 64 × seeds on {q, v}) and
Table 5 (seven weight sets at one parameter budget). Table 5's {q, v} point gets rank 4 and alpha 8, the same
seeds, steps, lr, data order, A init, head init and dropout stream as the sweep's ``qv_r4_s*``: a point's adapter
depends only on its own settings (see :mod:`lora.train`), so training it again rewrites the same bits. Copying
the finished directory instead saves three of 36 adapter trainings.

A source point is reused only when everything its files depend on is equal: the config apart from the fields
that only shape the grid (``targets``, ``ranks``, ``budget``, ``seeds``, ``linear_probe``, ``method``) or
touch no LoRA point (``full_lr``), the base model and its fingerprint, the task and its fingerprint, the package
versions, the nested-init flag, the thread layout and the point itself (weight set, rank, seed, alpha).
Training snapshots (``snapshot_steps``) add files beside an adapter without changing it: a run that asks for
none copies a point without its ``snapshots/``, and a run that asks for some reuses only a source with the same
steps. Otherwise the point is trained as usual.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora import rundir
from lora.fsio import atomic_dir
from lora.rundir import GRID_ONLY_FIELDS, SNAPSHOTS_FIELD

__all__ = ["GRID_ONLY_FIELDS", "copy_identical_points", "same_training"]

SNAPSHOTS_DIR = "snapshots"


def same_training(ours: dict[str, Any], theirs: dict[str, Any]) -> bool:
    """Whether two run manifests train any point they share identically (see the module docstring): equal
    :func:`lora.rundir.training_settings`, which a copied point's ``files.json`` is checked against."""
    if not isinstance(theirs.get("config"), dict) or \
            rundir.training_settings(ours) != rundir.training_settings(theirs):
        return False
    wanted = list(ours["config"].get(SNAPSHOTS_FIELD) or ())
    return not wanted or wanted == list(theirs["config"].get(SNAPSHOTS_FIELD) or ())


def copy_identical_points(manifest: dict[str, Any], points: Sequence[Any], out: Path,
                          sources: Sequence[Path]) -> list[str]:
    """Copy into ``out`` each unfinished point of ``points`` (objects with ``name`` and ``to_dict()``) that a
    run in ``sources`` holds finished and trained identically; each copy is atomic (a temporary sibling renamed
    into place). Returns the names copied."""
    copied = []
    for src in sources:
        theirs = rundir.read_manifest(Path(src))
        if theirs is None or Path(src).resolve() == out.resolve() or not same_training(manifest, theirs):
            continue
        for p in points:
            twin = Path(src) / p.name
            if (out / p.name).exists() or not (twin / "metrics.json").is_file():
                continue
            try:
                point = json.loads((twin / "metrics.json").read_text(encoding="utf-8")).get("point")
            except (OSError, ValueError):
                continue
            if point != p.to_dict():
                continue
            # a run without snapshots gets none: its points look exactly as if trained here
            skip = None if manifest["config"].get(SNAPSHOTS_FIELD) else shutil.ignore_patterns(SNAPSHOTS_DIR)
            with atomic_dir(out / p.name) as tmp:
                shutil.copytree(twin, tmp, dirs_exist_ok=True, ignore=skip)
            copied.append(p.name)
    return copied

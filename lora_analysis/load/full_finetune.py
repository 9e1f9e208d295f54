"""Read full fine-tuning directories (written by :mod:`lora.full_ft`) that sit beside a run's LoRA adapters.

``<run>/<set>_full_s<seed>/`` holds ``delta_weights.safetensors`` (ΔW = W_ft − W0 per adapted matrix, keyed by
module path: the LoRA adapters' module keys), ``full_finetune.json`` and ``metrics.json``. :func:`load_full_finetune`
returns the ΔW matrices in float64.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from lora.errors import UserError
from lora.full_ft import DELTA_NAME, DESCRIPTION_NAME
from lora.rundir import read_json_object
from lora_analysis.load.adapters import factor_as_float64, natural_key

__all__ = ["FullFinetune", "find_full_finetunes", "load_full_finetune"]


@dataclass(frozen=True, eq=False)  # holds tensors
class FullFinetune:
    """One full fine-tuning run of a weight set.

    Attributes:
        path: its directory.
        seed: the training seed (shared with the LoRA adapters of that seed: same data order and head init).
        weight_set: e.g. ``"q,v"``.
        deltas: ``{module key: ΔW (d_out, d_in)}``, float64, natural order.
        val_metric: validation metric (``metrics.json``), ``None`` if absent.
        description: the parsed ``full_finetune.json``.
    """

    path: Path
    seed: int
    weight_set: str
    deltas: dict[str, Tensor]
    val_metric: float | None = None
    description: dict[str, Any] = field(default_factory=dict)


def find_full_finetunes(run_dir: str | os.PathLike) -> list[Path]:
    """The full fine-tuning directories of a run (sub-directories holding ``full_finetune.json``), by name."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                   and (p / DESCRIPTION_NAME).is_file()), key=lambda p: natural_key(p.name))


def load_full_finetune(path: str | os.PathLike) -> FullFinetune:
    """Load one full fine-tuning directory.

    Raises:
        UserError: naming the file, for a missing or bad description, weights file or metric, NaN/Inf, or a module
            the description does not list.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(path)
    desc = read_json_object(root / DESCRIPTION_NAME)
    seed, ws = desc.get("seed"), desc.get("weight_set")
    if not (isinstance(seed, int) and not isinstance(seed, bool)) or not isinstance(ws, str):
        raise UserError(f"{root / DESCRIPTION_NAME}: needs an integer 'seed' and a string 'weight_set'")
    weights = root / DELTA_NAME
    try:
        raw = load_file(str(weights))
    except FileNotFoundError:
        raise UserError(f"{weights}: missing (a full fine-tuning directory without its ΔW)") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{weights}: unreadable ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    if not raw:
        raise UserError(f"{weights}: holds no ΔW")
    listed = desc.get("modules")
    deltas = {}
    for key in sorted(raw, key=natural_key):
        if isinstance(listed, dict) and key not in listed:
            raise UserError(f"{weights}: module {key} is not listed in {DESCRIPTION_NAME}")
        deltas[key] = factor_as_float64(str(weights), key, "ΔW", raw[key])
    val = None
    if (root / "metrics.json").is_file():
        m = read_json_object(root / "metrics.json")
        v = m.get("val_metric")
        val = float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None
    return FullFinetune(path=root, seed=seed, weight_set=ws, deltas=deltas, val_metric=val, description=desc)

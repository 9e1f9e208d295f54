"""Read the training snapshots of an adapter directory (written by :mod:`lora.snapshots`) as adapters.

A snapshot ``<adapter dir>/snapshots/step_NNNNNN.safetensors`` holds A and B under their PEFT names at one
optimizer step; :func:`load_snapshot` returns the adapter as it was at that step (a :class:`LoadedAdapter` with the
snapshot's factors, float64, and the adapter's own scale, seed and init), so every table function of
:mod:`lora_analysis.tables.build` applies unchanged.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from lora.errors import UserError
from lora.layers import LoRAFactors
from lora.snapshots import PREFIX, SNAPSHOT_DIR, snapshot_name, step_of
from lora_analysis.load.adapters import LoadedAdapter, factor_as_float64

__all__ = ["load_snapshot", "snapshot_steps"]


def snapshot_steps(adapter_dir: str | os.PathLike) -> list[int]:
    """The steps with a snapshot in ``adapter_dir`` (sorted; empty when it has none)."""
    folder = Path(adapter_dir) / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    return sorted(s for s in (step_of(p.name) for p in folder.iterdir()) if s is not None)


def load_snapshot(adapter: LoadedAdapter, step: int) -> LoadedAdapter:
    """``adapter`` at optimizer ``step``: its factors replaced by the snapshot's (same keys, scale and shapes).

    Raises:
        UserError: naming the file, for a missing or unreadable snapshot, a module the adapter lacks or lacking
            one it has, or a shape that differs from the adapter's.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = adapter.path / SNAPSHOT_DIR / snapshot_name(step)
    if not path.is_file():
        raise UserError(f"{path}: no snapshot at step {step} (steps: {snapshot_steps(adapter.path) or 'none'})")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable snapshot ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    factors = {}
    for key, f in adapter.factors.items():
        parts = {}
        for side in "AB":
            name = f"{PREFIX}{key}.lora_{side}.weight"
            if name not in tensors:
                raise UserError(f"{path}: lacks {name} (module {key} of the adapter)")
            t = factor_as_float64(str(path), key, f"lora_{side}", tensors.pop(name))
            want = f.A.shape if side == "A" else f.B.shape
            if t.shape != want:
                raise UserError(f"{path}: module {key}: lora_{side} {tuple(t.shape)} differs from the adapter's "
                                f"{tuple(want)}")
            parts[side] = t
        factors[key] = LoRAFactors(parts["A"], parts["B"], f.scaling)
    if tensors:
        raise UserError(f"{path}: {next(iter(tensors))!r} is not a LoRA factor of this adapter")
    return dataclasses.replace(adapter, factors=factors)

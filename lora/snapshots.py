"""Training snapshots: A and B of every adapted matrix at chosen optimizer steps, inside the adapter directory.

``python -m lora.train --snapshot-steps 0 25 50 100 200`` keeps, for each grid point, ::

    <adapter dir>/snapshots/step_000000.safetensors   A = A_init, B = 0 (before the first step)
    <adapter dir>/snapshots/step_000025.safetensors   after 25 optimizer steps
    ...

Each file holds the LoRA factors under their PEFT tensor names (``base_model.model.<path>.lora_A.weight``
``(r, d_in)`` and ``....lora_B.weight`` ``(d_out, r)``, float32), so a snapshot is the adapter's own
``adapter_model.safetensors`` at that step minus the task head; its rank, alpha and scale are the adapter's
(``adapter_config.json``). The snapshots are collected in memory during training and written with the rest of
the grid point into its temporary directory, which is renamed into place only when complete: a killed run leaves
no partial snapshot. A snapshot at the last step equals the saved adapter's factors exactly.

This module knows the file names; :mod:`lora_analysis.load.snapshots` reads them back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from lora.errors import UserError

__all__ = ["PREFIX", "SNAPSHOT_DIR", "SnapshotRecorder", "check_snapshot_steps", "snapshot_name", "step_of",
           "write_snapshots"]

SNAPSHOT_DIR = "snapshots"
PREFIX = "base_model.model."  # PEFT's key prefix (PeftModel -> LoraModel -> base model), as adapter_model.safetensors
_NAME = re.compile(r"^step_(\d{6,})\.safetensors$")


def snapshot_name(step: int) -> str:
    """``step_000025.safetensors`` for step 25 (zero-padded so the files sort by step)."""
    return f"step_{int(step):06d}.safetensors"


def step_of(name: str) -> int | None:
    """The step of a snapshot file name, or ``None`` for any other name."""
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def check_snapshot_steps(steps: Sequence[int], total: int, *, option: str = "--snapshot-steps") -> None:
    """Refuse steps beyond the run's ``total`` optimizer steps (step 0 is the start, ``total`` the end)."""
    late = sorted(s for s in steps if s > total)
    if late:
        raise UserError(f"{option}: step {late[0]} is beyond the {total} optimizer steps of this run (0..{total})")


def _linear_lora(model: nn.Module) -> dict[str, nn.Module]:
    from lora.inject import lora_modules
    from lora.layers import LoRALinear

    layers = lora_modules(model)
    other = [(p, type(m).__name__) for p, m in layers.items() if not isinstance(m, LoRALinear)]
    if other:
        raise UserError(f"--snapshot-steps: {other[0][0]} is a {other[0][1]}; snapshots support nn.Linear targets "
                        "only (not GPT-2's fused c_attn or embeddings)")
    return layers


class SnapshotRecorder:
    """Collect ``{PEFT key: tensor}`` of a model's LoRA factors at the listed steps (in memory, cloned, float32).

    Call :meth:`record` with the number of optimizer steps taken so far (0 before the first); only listed steps
    are kept. :meth:`write` puts one file per recorded step into ``<adapter dir>/snapshots``.
    """

    def __init__(self, model: nn.Module, steps: Sequence[int]) -> None:
        self.layers = _linear_lora(model)
        self.steps = frozenset(int(s) for s in steps)
        self.taken: dict[int, dict[str, Tensor]] = {}

    def record(self, step: int) -> None:
        if step not in self.steps:
            return
        out = {}
        with torch.no_grad():
            for path, m in self.layers.items():
                out[f"{PREFIX}{path}.lora_A.weight"] = m.lora_A.detach().to(torch.float32).clone().contiguous()
                out[f"{PREFIX}{path}.lora_B.weight"] = m.lora_B.detach().to(torch.float32).clone().contiguous()
        self.taken[int(step)] = out

    def write(self, adapter_dir: str | Path) -> list[Path]:
        """Write the recorded steps into ``adapter_dir/snapshots`` (a directory being built atomically)."""
        return write_snapshots(adapter_dir, self.taken)


def write_snapshots(adapter_dir: str | Path, taken: Mapping[int, Mapping[str, Tensor]]) -> list[Path]:
    from safetensors.torch import save_file

    if not taken:
        return []
    folder = Path(adapter_dir) / SNAPSHOT_DIR
    folder.mkdir(exist_ok=True)
    paths = []
    for step in sorted(taken):
        path = folder / snapshot_name(step)
        save_file(dict(taken[step]), str(path), metadata={"step": str(step)})
        paths.append(path)
    return paths

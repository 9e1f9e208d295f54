"""Full fine-tuning of the adapted weight matrices: the reference LoRA approximates (Section 4.1's hypothesis).

``python -m lora.train --method full --targets q,v`` (or ``--method lora full`` beside the rank grid) trains, for
each weight set and seed, the *same* weight matrices LoRA adapts in full: only those ``weight`` matrices and the
task head (``modules_to_save``) are trainable, with the same data order, steps, seed, head init and lr schedule as
the LoRA points of that seed. The matrices use ``full_lr`` and no weight decay (decay towards zero would add a
``−c·W0`` term to ΔW, aligned with W0 by construction); the head keeps ``lr`` and ``weight_decay`` as for LoRA.

Output, one directory per (weight set, seed), written atomically like an adapter (``<set>_full_s<seed>``)::

    delta_weights.safetensors   ΔW = W_ft − W0 per adapted matrix, float32 (d_out, d_in), keyed by module path
                                (the module key the LoRA adapters use), e.g. "bert.encoder.layer.0.attention.self.query"
    head.safetensors            the trained task head (modules_to_save), keyed by parameter path
    full_finetune.json          what it is: format, method, weight set, targets, seed, base model and fingerprint,
                                modules with their shapes, lr, full_lr, steps
    metrics.json                as a LoRA point's (validation metric, loss curve, parameter counts), method "full"
    files.json                  written last: every file's size and SHA-256, the grid point and the run's training
                                settings (:func:`lora.rundir.write_point_record`), what resume and ``figures`` check

:func:`lora.train.train_point` trains a full point with these pieces; the analysis (:mod:`lora_analysis.load.full_finetune`) loads these beside the LoRA adapters of the run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lora.errors import UserError

__all__ = ["DELTA_NAME", "DESCRIPTION_NAME", "FORMAT", "HEAD_NAME", "check_full_targets", "delta_weights",
           "full_param_groups", "full_target_paths", "write_full_point"]

DELTA_NAME = "delta_weights.safetensors"
HEAD_NAME = "head.safetensors"
DESCRIPTION_NAME = "full_finetune.json"
FORMAT = "lora-structure-full-finetune/1"


def full_target_paths(model: nn.Module, targets: Sequence[str], *, layers: Sequence[int] | None = None) -> list[str]:
    """Module paths of the matrices a weight set names (as LoRA resolves them); nn.Linear only.

    Raises:
        UserError: a fused GPT-2 slice or a non-Linear module (its ΔW would not be one matrix per module key).
    """
    from lora.inject import resolve_targets

    plan = resolve_targets(model, tuple(targets), layers=layers)
    for path, slices in plan.items():
        m = model.get_submodule(path)
        if slices or not isinstance(m, nn.Linear):
            raise UserError(f"--method full: {path} is a {type(m).__name__}{' slice' if slices else ''}; full "
                            "fine-tuning supports nn.Linear targets only")
    return list(plan)


def check_full_targets(cfg: Any, points: Sequence[Any], model: nn.Module) -> None:
    """Fail before any training if a full fine-tuning point's weight set names a module it cannot train."""
    from lora.config import parse_target_set

    for ws in dict.fromkeys(p.weight_set for p in points if p.method == "full"):
        full_target_paths(model, parse_target_set(ws), layers=cfg.layers)


def delta_weights(model: nn.Module, w0: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{path: W_ft − W0}`` in float32 for the matrices of ``w0`` (``{path: W0}``, copies taken before training)."""
    out = {}
    with torch.no_grad():
        for path, W0 in w0.items():
            W = model.get_submodule(path).weight
            out[path] = (W.detach().to(torch.float32) - W0.to(torch.float32)).contiguous()
    return out


def full_param_groups(model: nn.Module, paths: Sequence[str], cfg: Any) -> tuple[list[dict[str, Any]], dict[str, Tensor]]:
    """Make ``paths``' weight matrices trainable beside the already-trainable head; returns the AdamW groups
    (matrices at ``cfg.full_lr`` without weight decay, the head at ``cfg.lr`` / ``cfg.weight_decay``) and W0, a
    copy of each matrix before training."""
    head_params = [p for p in model.parameters() if p.requires_grad]
    mats = []
    for path in paths:
        w = model.get_submodule(path).weight
        w.requires_grad_(True)
        mats.append(w)
    w0 = {path: model.get_submodule(path).weight.detach().clone() for path in paths}
    groups = [{"params": mats, "lr": cfg.full_lr, "weight_decay": 0.0}]
    if head_params:
        groups.append({"params": head_params, "lr": cfg.lr, "weight_decay": cfg.weight_decay})
    return groups, w0


def write_full_point(final: Path, model: nn.Module, w0: dict[str, Tensor], *, point: Any, cfg: Any, heads: Sequence[str],
                     base_name: str, fingerprint: str, task: str, metric: str, result: Any,
                     manifest: Mapping[str, Any]) -> Path:
    """Write one full fine-tuning directory atomically (see the module docstring), replacing a damaged one there;
    ``result`` is the trainer's ``FitResult``, ``manifest`` the run's (its record is checked against it)."""
    from safetensors.torch import save_file

    from lora.fsio import atomic_dir, write_json
    from lora.inject import count_parameters
    from lora.rundir import write_point_record

    deltas = delta_weights(model, w0)
    counts = count_parameters(model)
    metrics: dict[str, Any] = {
        "point": point.to_dict(), "method": "full", "metric": metric, "val_metric": result.val[metric],
        "val_loss": result.val["loss"], "val": result.val, "steps": result.steps,
        "train_loss": list(result.losses), "wall_time_s": round(result.wall_time_s, 3), "lora_params": 0,
        "full_params": sum(int(d.numel()) for d in deltas.values()), "trainable_params": counts.trainable,
        "total_params": counts.total, "modules_to_save": list(heads), "threads": torch.get_num_threads(),
    }
    description = {
        "format": FORMAT, "method": "full", "weight_set": point.weight_set, "targets": list(point.targets),
        "seed": point.seed, "base_model_name_or_path": base_name, "base_fingerprint": fingerprint,
        "modules": {p: list(d.shape) for p, d in deltas.items()}, "lr": cfg.lr, "full_lr": cfg.full_lr,
        "steps": result.steps, "task": task, "modules_to_save": list(heads),
    }
    head_tensors = {name: t.detach().to(torch.float32).contiguous() for name, t in model.state_dict().items()
                    if any(name == h or name.startswith(h + ".") or f".{h}." in f".{name}" for h in heads)}
    with atomic_dir(final, overwrite=True) as tmp:  # only a damaged point is there (lora.train.unfinished)
        save_file(deltas, str(tmp / DELTA_NAME), metadata={"format": FORMAT})
        if head_tensors:
            save_file(head_tensors, str(tmp / HEAD_NAME))
        write_json(tmp / DESCRIPTION_NAME, description)
        write_json(tmp / "metrics.json", metrics)
        write_point_record(tmp, point=point.to_dict(), manifest=manifest)
    return final

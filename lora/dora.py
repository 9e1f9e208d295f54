"""DoRA (Liu et al., 2024, "Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353) as ``peft`` stores and merges it.

A DoRA adapter (``use_dora: true``) adds one magnitude vector ``m`` per adapted matrix to the LoRA factors
(``base_model.model.<path>.lora_magnitude_vector``, shape ``(d_out,)``). In ``nn.Linear`` orientation
``W0 (d_out, d_in)`` the adapted weight is::

    V  = W0 + s·B·A                      the directional update, as plain LoRA
    W' = diag(m / ‖V‖_c) · V             ‖V‖_c: the norm of each row of V, one per output (peft's ``dim=1``)

DoRA's paper writes ``W ∈ R^{d×k}`` with ``y = xW`` and calls this norm "column-wise"; peft computes it on the
``(d_out, d_in)`` weight along ``dim=1`` (after undoing ``fan_in_fan_out`` for a GPT-2 ``Conv1D``), i.e. one norm
per output unit. For an ``nn.Embedding`` (table ``E (num, dim)``, ``W0 = Eᵀ``) it is one norm per embedding
dimension, the same rule in this orientation. ``‖V‖_c`` is detached in training (the paper's Section 4.3), which
changes gradients, not the merged weight. At initialisation ``B = 0`` and peft sets ``m = ‖W0‖_c``, so ``W' = W0``.

A fused GPT-2 ``c_attn`` carries one ``m`` of ``3·d_out`` rows; since each row is one output, it splits by rows
into the ``:q``, ``:k``, ``:v`` slices exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lora.errors import UserError
from lora.inject import strip_lora
from lora.layers import FUSED_SLICES, LoRAFactors, LoRAModule, delta_weight

__all__ = ["MAGNITUDE_SUFFIXES", "dora_weight", "merge_layers", "row_norms", "split_magnitudes"]

# peft >= 0.12 saves '<path>.lora_magnitude_vector'; the '.weight' form is the in-memory module name.
MAGNITUDE_SUFFIXES = (".lora_magnitude_vector", ".lora_magnitude_vector.weight")


def row_norms(W: Tensor) -> Tensor:
    """``‖W[i, :]‖₂`` for each row of ``W (d_out, d_in)``: DoRA's per-output norm ``‖·‖_c``, shape ``(d_out,)``."""
    return torch.linalg.vector_norm(W, dim=1)


def dora_weight(W0: Tensor, delta: Tensor, magnitude: Tensor) -> Tensor:
    """DoRA's adapted weight ``W' = diag(m / ‖W0 + ΔW‖_c) (W0 + ΔW)`` in float64, ``(d_out, d_in)``.

    Args:
        W0: the frozen weight ``(d_out, d_in)`` (for PiSSA/OLoRA the residual peft adapts).
        delta: ``ΔW = s·B·A`` ``(d_out, d_in)``.
        magnitude: ``m`` ``(d_out,)``.

    Example: ``delta = 0`` and ``m = ‖W0‖_c`` (DoRA's initialisation) give ``W0`` back.
    """
    if W0.shape != delta.shape or magnitude.shape != (W0.shape[0],):
        raise ValueError(f"dora_weight: W0 {tuple(W0.shape)}, ΔW {tuple(delta.shape)} and m {tuple(magnitude.shape)} "
                         "must be (d_out, d_in), (d_out, d_in) and (d_out,)")
    V = W0.to(torch.float64) + delta.to(torch.float64)
    return (magnitude.to(torch.float64) / row_norms(V)).unsqueeze(1) * V


def split_magnitudes(
    file: Path, config: Mapping[str, Any], raw: Mapping[str, Tensor], factors: Mapping[str, LoRAFactors]
) -> dict[str, Tensor]:
    """Magnitude vectors per module key, checked against the config and the factors.

    Args:
        file: the weights file, for messages.
        config: the parsed ``adapter_config.json`` (``use_dora``).
        raw: ``{module path: m}`` as stored (prefix and suffix removed).
        factors: ``{module key: LoRAFactors}`` as loaded (a fused ``c_attn`` as ``<path>:q`` ...).

    Returns:
        ``{module key: m (d_out,)}`` in the stored dtype; a fused module's ``m (3·d_out,)`` split by rows.

    Raises:
        UserError: magnitudes without ``use_dora`` or the reverse, a module with no magnitude or no factors, a
            shape that is not ``(d_out,)``, NaN/Inf, or a fused module whose slices are not all adapted.
    """
    use_dora = bool(config.get("use_dora", False))
    if raw and not use_dora:
        raise UserError(f"{file}: holds lora_magnitude_vector tensors but adapter_config.json has no use_dora: true")
    if not use_dora:
        return {}
    by_path: dict[str, list[str]] = {}
    for key in factors:
        by_path.setdefault(key.partition(":")[0], []).append(key)
    missing = [p for p in by_path if p not in raw]
    if missing:
        raise UserError(f"{file}: use_dora is true but module {missing[0]} has no lora_magnitude_vector (peft's "
                        "conversion of PiSSA/OLoRA drops it; DoRA cannot be rebuilt without it)")
    out: dict[str, Tensor] = {}
    for path, m in raw.items():
        keys = by_path.get(path)
        if keys is None:
            raise UserError(f"{file}: lora_magnitude_vector of {path} has no lora_A/lora_B")
        if m.is_floating_point() and not bool(torch.isfinite(m).all()):
            raise UserError(f"{file}: {path} lora_magnitude_vector contains NaN or Inf")
        slices = [k.partition(":")[2] for k in keys]
        if slices != [""] and sorted(slices, key=FUSED_SLICES.index) != list(FUSED_SLICES):
            raise UserError(f"{file}: module {path}: DoRA on a fused q/k/v module with slices {slices} only is "
                            "not supported (its magnitude rescales every slice)")
        rows = sum(int(factors[k].B.shape[0]) for k in keys)
        if m.ndim != 1 or m.shape[0] != rows or not m.is_floating_point():
            raise UserError(f"{file}: module {path}: lora_magnitude_vector {tuple(m.shape)} is not ({rows},), one "
                            "magnitude per output")
        if slices == [""]:
            out[path] = m
            continue
        d = rows // len(FUSED_SLICES)
        for t, s in enumerate(FUSED_SLICES):
            out[f"{path}:{s}"] = m[t * d : (t + 1) * d]
    return out


def _layer_path(layers: Mapping[str, LoRAModule], path: str) -> str:
    """The model path of the layer an adapter path names: equal, or differing by the task model's
    ``base_model_prefix`` (``bert.``) on either side, as :func:`lora.adapter_io.apply_adapter` resolves it."""
    if path in layers:
        return path
    hits = [q for q in layers if path.endswith("." + q) or q.endswith("." + path)]
    if len(hits) != 1:
        raise ValueError(f"merge_layers: adapter module {path} matches layers {hits}")
    return hits[0]


@torch.no_grad()
def merge_layers(model: nn.Module, layers: Mapping[str, LoRAModule], magnitudes: Mapping[str, Tensor]) -> nn.Module:
    """Merge every LoRA layer of ``model`` into its base and strip the wrappers, as peft's ``merge_and_unload``.

    Plain LoRA layers get ``W0 + s·B·A`` (:func:`lora.inject.strip_lora`). A layer with a DoRA magnitude gets
    :func:`dora_weight`, computed in float64 from the unmerged ``W0`` and rounded once to the weight's dtype.

    Args:
        model: the model holding ``layers`` (from :func:`lora.adapter_io.apply_adapter`).
        layers: ``{model path: LoRAModule}``.
        magnitudes: ``{module key: m}`` (:attr:`lora.adapter_io.Adapter.magnitudes`), keys as the adapter names
            them (``<path>`` or ``<path>:q``).
    """
    targets = []
    for key, m in magnitudes.items():
        path, _, s = key.partition(":")
        layer = layers[_layer_path(layers, path)]
        view = layer.base_weights()[s]  # a view into the stored weight, in nn.Linear orientation
        assert view.untyped_storage().data_ptr() == layer.base.weight.untyped_storage().data_ptr(), type(layer)
        f = layer.factors()[s]
        delta = delta_weight(f.A.to(torch.float64), f.B.to(torch.float64), f.scaling)
        targets.append((view, dora_weight(view, delta, m)))
    strip_lora(model, merge=True)
    for view, new in targets:
        view.copy_(new.to(view.dtype))  # overwrites W0 + ΔW with W': one rounding from float64
    return model

"""Put LoRA layers into any torch model by target names, and select adapter parameters by type.

Targets are resolved against module paths (``model.named_modules()``):

* ``q``, ``k``, ``v``, ``o``: the attention projections, translated per architecture family
  (BERT/RoBERTa ``attention.self.query`` ..., LLaMA-style ``self_attn.q_proj`` ..., GPT-2 ``attn.c_attn:q`` ...).
* a module name or dotted suffix: ``query``, ``self_attn.v_proj``, ``encoder.layer.3.attention.self.value``.
* ``c_attn:q``: one slice of a fused GPT-2 ``Conv1D`` (several slices of one module share one
  :class:`~lora.layers.LoRAFusedQKV`). Any other ``Conv1D`` (``c_proj``, ``c_fc``) is adapted whole
  (:class:`~lora.layers.LoRAConv1D`).
* ``re:<regex>``: a regular expression that must match the whole module path.

``layers`` restricts injection to those transformer blocks (the first integer in the module path).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lora.errors import UserError
from lora.layers import (
    FUSED_MODULE_NAMES,
    FUSED_SLICES,
    InitScheme,
    LoRAConv1D,
    LoRAEmbedding,
    LoRAFusedQKV,
    LoRALinear,
    LoRAModule,
)

# Per-family meaning of the short names used in the paper (W_q, W_k, W_v, W_o).
ALIASES: dict[str, dict[str, str]] = {
    "bert": {  # BERT, RoBERTa, MiniLM, DeBERTa-style encoders
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "o": "attention.output.dense",
    },
    "llama": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"},
    "gpt2": {"q": "attn.c_attn:q", "k": "attn.c_attn:k", "v": "attn.c_attn:v", "o": "attn.c_proj"},
}
_FAMILY_MARKERS = {"bert": "attention.self.query", "llama": "self_attn.q_proj", "gpt2": "attn.c_attn"}
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def model_family(model: nn.Module) -> str | None:
    """``"bert"``, ``"llama"`` or ``"gpt2"`` from the module names, or ``None`` if none is recognised."""
    names = [n for n, _ in model.named_modules()]
    for family, marker in _FAMILY_MARKERS.items():
        if any(n == marker or n.endswith("." + marker) for n in names):
            return family
    return None


def layer_index(path: str) -> int | None:
    """The transformer block of a module path: the first integer component (``encoder.layer.3.x`` -> 3)."""
    m = _LAYER_INDEX.search(path)
    return int(m.group(1)) if m else None


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, recognised by name so that transformers stays an optional import here.
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def _is_fused(path: str, module: nn.Module) -> bool:
    # GPT-2's c_attn holds [q | k | v]: it is adapted by slices. Every other Conv1D is one matrix.
    return isinstance(module, LoRAFusedQKV) or (_is_conv1d(module) and path.rpartition(".")[2] in FUSED_MODULE_NAMES)


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | nn.Embedding | LoRAModule) or _is_conv1d(module)


def _inside_lora(modules: dict[str, nn.Module], path: str) -> bool:
    parent = path.rpartition(".")[0]
    return bool(path) and isinstance(modules.get(parent), LoRAModule)


def _expand(targets: Iterable[str], family: str | None) -> list[str]:
    out = []
    for t in targets:
        for part in str(t).split(","):
            part = part.strip()
            if not part:
                continue
            if part in ("q", "k", "v", "o"):
                if family is None or part not in ALIASES[family]:
                    raise UserError(
                        f"--targets: short name {part!r} is not defined for this model "
                        f"(family {family or 'unknown'}); name the module instead, e.g. 'query' or 're:.*q_proj'"
                    )
                out.append(ALIASES[family][part])
            else:
                out.append(part)
    if not out:
        raise UserError("--targets: no target modules given")
    return out


def resolve_targets(
    model: nn.Module, targets: Sequence[str], *, layers: Sequence[int] | None = None
) -> dict[str, tuple[str, ...]]:
    """Map target names to module paths.

    Returns:
        ``{module_path: slices}``, where ``slices`` is ``()`` for an unfused module and e.g. ``("q", "v")`` for
        a fused GPT-2 ``c_attn``. Raises :class:`~lora.errors.UserError` if a target matches nothing.
    """
    modules = dict(model.named_modules())
    patterns = _expand(targets, model_family(model))
    wanted_layers = None if layers is None else set(int(i) for i in layers)
    found: dict[str, list[str]] = {}
    for pattern in patterns:
        name, _, slice_name = pattern.partition(":") if not pattern.startswith("re:") else (pattern, "", "")
        if slice_name and slice_name not in FUSED_SLICES:
            raise UserError(f"--targets: {pattern!r}: fused slice must be one of {FUSED_SLICES}")
        if name.startswith("re:"):
            try:
                rx = re.compile(name[3:])
            except re.error as exc:
                raise UserError(f"--targets: invalid regex {name[3:]!r}: {exc}") from None
            hits = [p for p in modules if p and rx.fullmatch(p)]
        else:
            hits = [p for p in modules if p == name or p.endswith("." + name)]
        if wanted_layers is not None:
            hits = [p for p in hits if layer_index(p) in wanted_layers]
        # A LoRA layer is kept (inject_lora then says it is already adapted); its inner `base` is never a target.
        hits = [p for p in hits if _adaptable(modules[p]) and not _inside_lora(modules, p)]
        if not hits:
            adaptable = sorted(
                {p.split(".")[-1] for p, m in modules.items() if _adaptable(m) and not _inside_lora(modules, p)}
            )
            where = f" in layers {sorted(wanted_layers)}" if wanted_layers is not None else ""
            raise UserError(
                f"--targets: {pattern!r} matches no Linear/Embedding/Conv1D module of {type(model).__name__}{where}; "
                f"adaptable module names: {', '.join(adaptable[:20])}"
            )
        for p in hits:
            slices = found.setdefault(p, [])
            if _is_fused(p, modules[p]):
                if not slice_name:
                    raise UserError(
                        f"--targets: {p} is a fused Conv1D; name its slices, e.g. '{name}:q' and '{name}:v'"
                    )
                if slice_name not in slices:
                    slices.append(slice_name)
            elif slice_name:
                raise UserError(f"--targets: {p} is not a fused Conv1D, so {pattern!r} has no slice")
    return {p: tuple(s for s in FUSED_SLICES if s in found[p]) for p in sorted(found, key=_natural_key)}


def _natural_key(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def module_generator(seed: int, path: str, *, rank: int | None = None) -> torch.Generator:
    """A generator for one module's ``A`` init, seeded from ``(seed, module path[, rank])``.

    Seeding per module (not one stream for the model) makes each module's start independent of which other
    modules are adapted, and, without ``rank``, nested across ranks: A_8's start is the first 8 rows of A_64's.
    """
    key = f"{seed}:{path}" if rank is None else f"{seed}:{path}:r{rank}"
    g = torch.Generator()
    g.manual_seed(zlib.crc32(key.encode()) ^ (int(seed) & 0xFFFFFFFF))
    return g


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def inject_lora(
    model: nn.Module,
    targets: Sequence[str],
    *,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    init: InitScheme = "kaiming",
    use_rslora: bool = False,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    init_seed_per_rank: bool = False,
) -> dict[str, LoRAModule]:
    """Replace each target module of ``model`` in place by its LoRA wrapper.

    Args:
        model: any torch model; its weights are not changed.
        targets: target names (see the module docstring).
        r, alpha, dropout, init, use_rslora: the LoRA hyperparameters (:class:`~lora.layers.LoRALinear`).
        seed: seeds each module's ``A`` (:func:`module_generator`).
        layers: only these transformer blocks (``None``: all).
        init_seed_per_rank: draw ``A``'s start independently for each rank instead of nested draws.

    Returns:
        ``{module_path: LoRAModule}`` in natural order.
    """
    plan = resolve_targets(model, targets, layers=layers)
    out: dict[str, LoRAModule] = {}
    for path, slices in plan.items():
        base = model.get_submodule(path)
        if isinstance(base, LoRAModule):
            raise UserError(f"{path}: already has a LoRA adapter")
        gen = module_generator(seed, path, rank=r if init_seed_per_rank else None)
        kw = dict(r=r, alpha=alpha, dropout=dropout, init=init, use_rslora=use_rslora, generator=gen)
        try:
            if slices:
                wrapped: LoRAModule = LoRAFusedQKV(base, slices=slices, **kw)
            elif isinstance(base, nn.Embedding):
                wrapped = LoRAEmbedding(base, **kw)
            elif _is_conv1d(base):
                wrapped = LoRAConv1D(base, **kw)
            else:
                wrapped = LoRALinear(base, **kw)
        except ValueError as exc:
            raise UserError(f"--ranks: module {path}: {exc}") from None
        _set_submodule(model, path, wrapped)
        out[path] = wrapped
    return out


def lora_modules(model: nn.Module) -> dict[str, LoRAModule]:
    """All LoRA layers of ``model``, found by type (never by matching ``'lora_' in name``)."""
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRAModule)}


def mark_only_lora_trainable(
    model: nn.Module, *, bias: str = "none", modules_to_save: Sequence[str] = ()
) -> None:
    """Freeze everything except the LoRA factors, optionally biases, and whole modules such as a task head.

    Args:
        bias: ``"none"`` (the paper), ``"lora_only"`` (biases of adapted modules) or ``"all"``.
        modules_to_save: module names or dotted suffixes trained in full (PEFT's ``modules_to_save``).
    """
    if bias not in ("none", "lora_only", "all"):
        raise ValueError(f"bias must be 'none', 'lora_only' or 'all', got {bias!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    for path, m in model.named_modules():
        if isinstance(m, LoRAModule):
            for p in m.lora_parameters():
                p.requires_grad_(True)
            if bias == "lora_only" and getattr(m.base, "bias", None) is not None:
                m.base.bias.requires_grad_(True)
        if any(path == t or path.endswith("." + t) for t in modules_to_save):
            for p in m.parameters():
                p.requires_grad_(True)
    if bias == "all":
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} / total {self.total:,} ({100 * self.fraction:.3f}%)"


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and total parameter counts (each shared tensor counted once)."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    return ParameterCount(
        trainable=sum(p.numel() for p in seen.values() if p.requires_grad),
        total=sum(p.numel() for p in seen.values()),
    )


def merge_lora(model: nn.Module) -> None:
    """Explicitly merge every LoRA layer: ``W0 <- W0 + ΔW``."""
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Explicitly undo :func:`merge_lora`."""
    for m in lora_modules(model).values():
        m.unmerge()


def strip_lora(model: nn.Module, *, merge: bool = True) -> nn.Module:
    """Replace each LoRA layer by its base module, merged first (``merge=True``) or discarded."""
    for path, m in list(lora_modules(model).items()):
        if merge:
            m.merge()
        else:
            m.unmerge()
        _set_submodule(model, path, m.base)
    return model

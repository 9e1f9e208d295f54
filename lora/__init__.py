"""A clean LoRA library: layers, injection, PEFT-layout adapter files, merging and a trainer.

See ``lora.layers`` for the maths (``h = W0 x + s·B·A x``) and ``lora.inject`` for putting layers into models.
"""

from lora.errors import UserError
from lora.inject import (
    count_parameters,
    inject_lora,
    lora_modules,
    mark_only_lora_trainable,
    merge_lora,
    resolve_targets,
    strip_lora,
    unmerge_lora,
)
from lora.layers import (
    LoRAConv1D,
    LoRAEmbedding,
    LoRAFactors,
    LoRAFusedQKV,
    LoRALinear,
    LoRAModule,
    delta_weight,
    lora_scaling,
)

__all__ = [
    "LoRAConv1D",
    "LoRAEmbedding",
    "LoRAFactors",
    "LoRAFusedQKV",
    "LoRALinear",
    "LoRAModule",
    "UserError",
    "count_parameters",
    "delta_weight",
    "inject_lora",
    "lora_modules",
    "lora_scaling",
    "mark_only_lora_trainable",
    "merge_lora",
    "resolve_targets",
    "strip_lora",
    "unmerge_lora",
]

"""A tiny LLaMA checkpoint in the hub's layout for a large model, and real peft adapters on it: the 7B route's
shapes in miniature (issue 24).

The checkpoint is bf16, sharded (``model-0000N-of-00002.safetensors`` + ``model.safetensors.index.json``) with
LLaMA key names ``model.layers.L.self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``: hidden 32,
intermediate 48 (so gate/up/down are non-square) and grouped-query attention (k/v are 16 x 32). Adapters are
written by peft's ``get_peft_model(...).save_pretrained`` with factors moved off their init as training would.
Plain helpers; fixtures live in the test modules.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

LLAMA_KW = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
INDEX = "model.safetensors.index.json"


def save_llama(out: Path, *, seed: int = 0, layers: int = 2) -> Path:
    """A bf16 ``LlamaForCausalLM`` saved at ``out`` in two shards with their index."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**LLAMA_KW, "num_hidden_layers": layers})).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(out, max_shard_size="20KB")
    shards = set(json.loads((out / INDEX).read_text())["weight_map"].values()) if (out / INDEX).is_file() else set()
    assert shards and all((out / s).is_file() for s in shards), sorted(p.name for p in out.iterdir())
    assert layers != 2 or shards == set(SHARDS), shards  # the tests that name the shards use 2 layers
    return out


def peft_adapter(base: Path, out: Path, *, r: int, targets=("q_proj", "v_proj"), seed: int = 0,
                 scale: float = 0.3) -> Path:
    """A peft LoRA adapter of rank ``r`` on ``targets`` of the checkpoint at ``base``, saved at ``out``, its
    factors moved off their init by a seeded Gaussian step (B is zero at init)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        pm = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(r=r, lora_alpha=2 * r,
                                                                                target_modules=list(targets)))
        g = torch.Generator().manual_seed(1000 + seed)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)
        pm.save_pretrained(out)
    return out

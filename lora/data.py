"""Training data for the trainer: the embedded default task, local CSV/JSONL files, hub datasets -> batches.

Two task kinds:

* ``"classification"``: examples ``(text, label)``; the model is ``AutoModelForSequenceClassification``.
* ``"causal_lm"``: examples ``(prompt, completion)``; the model is ``AutoModelForCausalLM`` and the loss is
  taken only on completion tokens (prompt tokens get label ``-100``), as for E2E data-to-text in the paper.

The embedded default (``"chatterbot"``) needs nothing but installed packages: each English utterance of the
chatterbot-corpus topic files is labelled with its topic (:func:`load_chatterbot`).

Batches are built deterministically from a ``torch.Generator``: each epoch shuffles the examples, sorts each
window of ``8 · batch_size`` examples by length, cuts it into batches and shuffles the batches, so every batch
is padded only to its own longest member (dynamic padding; much cheaper than padding everything to
``max_length``) while the data order stays random.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lora.errors import UserError, os_error_reason

TaskKind = Literal["classification", "causal_lm"]
IGNORE_INDEX = -100  # label value ignored by torch's cross-entropy

# Embedded default: topics (file stems) with at least this many distinct utterances after dedupe are kept,
# and each topic is capped so no single topic (trivia has ~540) dominates accuracy.
CHATTERBOT_MIN_PER_TOPIC = 40
CHATTERBOT_MAX_PER_TOPIC = 200
# Files about the chatbot itself or small talk rather than a subject ("Are you sentient?", "Hello", "No."): their
# utterances fit any of them equally, so as labels they are noise (a frozen-feature probe on all 12 large topics
# reached only ~0.73). The remaining subject topics form a clean 9-way task.
CHATTERBOT_PERSONA_TOPICS = ("ai", "botprofile", "conversations", "gossip", "greetings", "humor", "psychology")
VAL_FRACTION = 0.2


@dataclass(frozen=True)
class TaskData:
    """A task with a fixed train/validation split.

    Attributes:
        name: the task string it came from.
        kind: ``"classification"`` or ``"causal_lm"``.
        train, val: tuples of ``(text, label_index)`` or ``(prompt, completion)``.
        labels: class names (classification; index = label), ``()`` for causal LM.
        source: where the data came from, for the manifest.
    """

    name: str
    kind: TaskKind
    train: tuple[tuple[Any, Any], ...]
    val: tuple[tuple[Any, Any], ...]
    labels: tuple[str, ...]
    source: str

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def fingerprint(self) -> str:
        """sha256 of the split, so a manifest pins the exact data."""
        h = hashlib.sha256()
        h.update(json.dumps([self.kind, self.labels, self.train, self.val], ensure_ascii=False).encode())
        return h.hexdigest()[:16]


def _stable_hash(text: str, salt: str) -> str:
    return hashlib.sha1(f"{salt}\x00{text}".encode()).hexdigest()


def _normalise(text: str) -> str:
    return " ".join(text.split())


def chatterbot_dir() -> Path:
    """The English data folder of the installed chatterbot-corpus package."""
    try:
        import chatterbot_corpus
    except ImportError:
        raise UserError("--task chatterbot: the chatterbot-corpus package is not installed") from None
    return Path(chatterbot_corpus.__file__).parent / "data" / "english"


def load_chatterbot(
    *,
    min_per_topic: int = CHATTERBOT_MIN_PER_TOPIC,
    max_per_topic: int = CHATTERBOT_MAX_PER_TOPIC,
    exclude: Sequence[str] = CHATTERBOT_PERSONA_TOPICS,
) -> TaskData:
    """Topic classification on real chatterbot-corpus utterances (BSD licence).

    Every string of every conversation in a topic file (statements and responses) is an example labelled with
    the file's topic; the ``exclude`` files (the bot's persona and small talk, :data:`CHATTERBOT_PERSONA_TOPICS`)
    still take part in deduplication but are not classes. Utterances are whitespace-normalised and deduplicated case-insensitively; one that occurs
    in two topics is dropped (its label would be ambiguous). Topics with fewer than ``min_per_topic`` distinct
    utterances are left out; larger ones keep ``max_per_topic`` chosen by a salted sha1 of the text, so the
    classes are roughly balanced. Per topic, the 20 % of utterances with the smallest sha1 (another salt) form
    the validation split: fixed, stratified, and identical on every machine (no RNG involved).
    """
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when available: ~10x faster
    folder = chatterbot_dir()
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise UserError(f"--task chatterbot: no topic files in {folder}")
    by_topic: dict[str, dict[str, str]] = {}
    for f in files:
        try:
            doc = yaml.load(f.read_text(encoding="utf-8"), Loader=loader) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise UserError(f"{f}: cannot parse: {exc}") from None
        seen = by_topic.setdefault(f.stem, {})
        for conv in doc.get("conversations") or []:
            for utt in conv if isinstance(conv, list) else []:
                if isinstance(utt, str) and _normalise(utt):
                    seen.setdefault(_normalise(utt).lower(), _normalise(utt))
    owners: dict[str, int] = {}
    for utts in by_topic.values():
        for key in utts:
            owners[key] = owners.get(key, 0) + 1
    topics: dict[str, list[str]] = {}
    for topic, utts in by_topic.items():
        if topic in exclude:
            continue
        unique = [text for key, text in utts.items() if owners[key] == 1]
        if len(unique) >= min_per_topic:
            unique.sort(key=lambda t: _stable_hash(t, "cap"))
            topics[topic] = unique[:max_per_topic]
    labels = tuple(sorted(topics))
    train, val = [], []
    for idx, topic in enumerate(labels):
        texts = sorted(topics[topic], key=lambda t: _stable_hash(t, "split"))
        n_val = round(VAL_FRACTION * len(texts))
        val += [(t, idx) for t in texts[:n_val]]
        train += [(t, idx) for t in texts[n_val:]]
    # A fixed, label-interleaved order (by hash) so nothing downstream depends on file order.
    train.sort(key=lambda e: _stable_hash(e[0], "order"))
    val.sort(key=lambda e: _stable_hash(e[0], "order"))
    return TaskData("chatterbot", "classification", tuple(train), tuple(val), labels, f"chatterbot-corpus:{folder}")


# ---------------------------------------------------------------------------------------------- local files
def _read_rows(path: Path, option: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise UserError(f"{option}: {path}: no such file")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
        if suffix in (".csv", ".tsv"):
            rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
        elif suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
            rows = data.get("data", data.get("examples")) if isinstance(data, dict) else data
    except OSError as exc:
        raise UserError(f"{option}: {path}: cannot read: {os_error_reason(exc)}") from None
    except (ValueError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{option}: {path}: cannot parse: {exc}") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{option}: {path}: expected a non-empty list of records")
    return rows


def _file_kind(rows: list[dict[str, Any]], path: Path, option: str) -> TaskKind:
    cols = set(rows[0])
    if {"text", "label"} <= cols:
        return "classification"
    if {"prompt", "completion"} <= cols:
        return "causal_lm"
    raise UserError(
        f"{option}: {path}: needs columns text+label (classification) or prompt+completion (causal LM); "
        f"found {sorted(cols)}"
    )


def _records(rows: list[dict[str, Any]], kind: TaskKind, path: Path, option: str) -> list[tuple[str, str]]:
    keys = ("text", "label") if kind == "classification" else ("prompt", "completion")
    out = []
    for i, row in enumerate(rows):
        if any(row.get(k) is None or str(row.get(k)) == "" for k in keys):
            raise UserError(f"{option}: {path}: record {i + 1} lacks {keys[0]!r} or {keys[1]!r}")
        out.append((str(row[keys[0]]), str(row[keys[1]])))
    return out


def load_local(task: str, val_file: str | None = None) -> TaskData:
    """A local CSV/TSV/JSONL/JSON file of ``text,label`` or ``prompt,completion`` records.

    Without ``val_file`` the validation split is the 20 % of records with the smallest salted sha1 of their
    content: fixed and machine-independent.
    """
    path = Path(task)
    rows = _read_rows(path, "--task")
    kind = _file_kind(rows, path, "--task")
    train = _records(rows, kind, path, "--task")
    if val_file is not None:
        vpath = Path(val_file)
        vrows = _read_rows(vpath, "--val-file")
        if _file_kind(vrows, vpath, "--val-file") != kind:
            raise UserError(f"--val-file: {vpath}: has other columns than {path}")
        val = _records(vrows, kind, vpath, "--val-file")
    else:
        ranked = sorted(train, key=lambda e: _stable_hash("\x00".join(e), "split"))
        n_val = max(1, round(VAL_FRACTION * len(ranked)))
        if len(ranked) < 2:
            raise UserError(f"--task: {path}: needs at least 2 records to split off validation data")
        val, train = ranked[:n_val], ranked[n_val:]
    return _finish(task, kind, train, val, f"file:{path.resolve()}")


def _finish(name: str, kind: TaskKind, train, val, source: str) -> TaskData:
    if kind == "causal_lm":
        return TaskData(name, kind, tuple(train), tuple(val), (), source)
    labels = tuple(sorted({lab for _, lab in train} | {lab for _, lab in val}))
    if len(labels) < 2:
        raise UserError(f"--task: {name}: classification needs at least 2 distinct labels, found {list(labels)}")
    index = {lab: i for i, lab in enumerate(labels)}
    return TaskData(
        name, kind, tuple((t, index[lab]) for t, lab in train), tuple((t, index[lab]) for t, lab in val),
        labels, source,
    )


# ---------------------------------------------------------------------------------------------- hub datasets
# Known column layouts: (first text column, optional second text column, label column).
_HUB_CLASSIFICATION_COLUMNS = (
    ("sentence", None, "label"),
    ("sentence1", "sentence2", "label"),
    ("premise", "hypothesis", "label"),
    ("question", "sentence", "label"),
    ("question1", "question2", "label"),
    ("text", None, "label"),
)
_HUB_GENERATION_COLUMNS = (("meaning_representation", "human_reference"), ("prompt", "completion"))


def load_hub(task: str) -> TaskData:
    """A hub dataset ``NAME[/CONFIG]`` (``glue/sst2``, ``glue/mnli``, ``e2e_nlg``) via the ``datasets`` package.

    Needs ``pip install 'lora-structure[hub]'`` and a reachable hub; either missing is a :class:`UserError`.
    Pairs of sentences are joined with `` [SEP] ``-free concatenation by the tokenizer (text pair).
    """
    try:
        import datasets  # lazy: optional dependency, and slow to import
    except ImportError:
        raise UserError(
            f"--task {task}: hub datasets need the 'datasets' package (pip install 'lora-structure[hub]'); "
            "offline, use the embedded 'chatterbot' task or a local .csv/.jsonl file"
        ) from None
    name, _, config = task.partition("/")
    try:
        ds = datasets.load_dataset(name, config or None)
    except Exception as exc:  # the datasets package raises many types for offline / unknown names
        raise UserError(f"--task {task}: cannot load from the hub (offline or unknown name?): {exc}") from None
    val_split = next((s for s in ("validation", "validation_matched", "test") if s in ds), None)
    if "train" not in ds or val_split is None:
        raise UserError(f"--task {task}: needs a train and a validation split, has {list(ds)}")
    cols = set(ds["train"].column_names)
    for a, b, lab in _HUB_CLASSIFICATION_COLUMNS:
        if a in cols and lab in cols and (b is None or b in cols):
            def rows(split, a=a, b=b, lab=lab):
                return [((r[a], r[b]) if b else r[a], str(r[lab])) for r in ds[split]]

            return _finish(task, "classification", rows("train"), rows(val_split), f"hub:{task}")
    for p, c in _HUB_GENERATION_COLUMNS:
        if p in cols and c in cols:
            def pairs(split, p=p, c=c):
                return [(r[p], r[c]) for r in ds[split]]

            return _finish(task, "causal_lm", pairs("train"), pairs(val_split), f"hub:{task}")
    raise UserError(f"--task {task}: unknown column layout {sorted(cols)}")


def load_task(task: str, *, val_file: str | None = None) -> TaskData:
    """Dispatch on the task string: ``"chatterbot"``, a local file, or a hub dataset name."""
    from lora.config import looks_like_file

    if task == "chatterbot":
        return load_chatterbot()
    if looks_like_file(task):
        return load_local(task, val_file)
    return load_hub(task)


# ---------------------------------------------------------------------------------------------- tokenization
@dataclass(frozen=True)
class TokenizedSplit:
    """Token ids per example (unpadded) and labels: an int per example, or a per-token list (causal LM)."""

    input_ids: tuple[tuple[int, ...], ...]
    labels: tuple[Any, ...]
    kind: TaskKind

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize(examples: Sequence[tuple[Any, Any]], tokenizer, *, kind: TaskKind, max_length: int) -> TokenizedSplit:
    """Tokenize once (the trainer caches the result per run). Causal LM: ``prompt + completion + eos``, with
    labels ``-100`` on the prompt so the loss covers only the completion; truncated to ``max_length``."""
    if kind == "classification":
        texts = [t for t, _ in examples]
        pairs = [t for t in texts if isinstance(t, list | tuple)]
        if pairs:
            enc = tokenizer([t[0] for t in texts], [t[1] for t in texts], truncation=True, max_length=max_length)
        else:
            enc = tokenizer(texts, truncation=True, max_length=max_length)
        return TokenizedSplit(tuple(map(tuple, enc["input_ids"])), tuple(int(y) for _, y in examples), kind)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    prompts = tokenizer([p for p, _ in examples], add_special_tokens=False)["input_ids"]
    completions = tokenizer([" " + c for _, c in examples], add_special_tokens=False)["input_ids"]
    ids, labels = [], []
    for p, c in zip(prompts, completions, strict=True):
        c = list(c) + ([eos] if eos is not None else [])
        seq = (list(p) + c)[:max_length]
        lab = ([IGNORE_INDEX] * len(p) + c)[:max_length]
        ids.append(tuple(seq))
        labels.append(tuple(lab))
    return TokenizedSplit(tuple(ids), tuple(labels), kind)


# ---------------------------------------------------------------------------------------------- batching
@dataclass(frozen=True)
class Batch:
    """One padded batch: ``input_ids`` and ``attention_mask`` ``(B, T)``; ``labels`` ``(B,)`` or ``(B, T)``."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(split: TokenizedSplit, indices: Sequence[int], *, pad_id: int) -> Batch:
    """Pad the chosen examples to their longest member (right padding)."""
    T = max(len(split.input_ids[i]) for i in indices)
    ids = torch.full((len(indices), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), T), dtype=torch.long)
    if split.kind == "causal_lm":
        labels = torch.full((len(indices), T), IGNORE_INDEX, dtype=torch.long)
    else:
        labels = torch.tensor([split.labels[i] for i in indices], dtype=torch.long)
    for row, i in enumerate(indices):
        seq = split.input_ids[i]
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
        if split.kind == "causal_lm":
            labels[row, : len(seq)] = torch.tensor(split.labels[i], dtype=torch.long)
    return Batch(ids, mask, labels)


def epoch_batches(
    split: TokenizedSplit, *, batch_size: int, generator: torch.Generator, window: int = 8
) -> list[list[int]]:
    """Index lists for one shuffled, length-bucketed epoch (deterministic given ``generator``'s state).

    Shuffle all examples; sort each window of ``window · batch_size`` by length (ties by index); cut into
    batches; shuffle the batches. The last batch of an epoch may be smaller.
    """
    perm = torch.randperm(len(split), generator=generator).tolist()
    chunk = window * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(perm), chunk):
        part = sorted(perm[start : start + chunk], key=lambda i: (len(split.input_ids[i]), i))
        batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[k] for k in order]


def make_batches(
    split: TokenizedSplit, *, batch_size: int, steps: int, generator: torch.Generator, pad_id: int
) -> Iterator[Batch]:
    """Exactly ``steps`` training batches, epoch after epoch (:func:`epoch_batches`), padded by :func:`collate`.

    The packed trainer reuses this: the same generator state gives the same batches.
    """
    done = 0
    while done < steps:
        for idx in epoch_batches(split, batch_size=batch_size, generator=generator):
            if done == steps:
                return
            yield collate(split, idx, pad_id=pad_id)
            done += 1


def eval_batches(split: TokenizedSplit, *, batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Validation batches in length order (least padding); order does not affect the metric."""
    order = sorted(range(len(split)), key=lambda i: (len(split.input_ids[i]), i))
    for j in range(0, len(order), batch_size):
        yield collate(split, order[j : j + batch_size], pad_id=pad_id)

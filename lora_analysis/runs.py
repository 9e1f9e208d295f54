"""Find and load LoRA adapters for analysis: the only place where :mod:`lora_analysis` reads files.

Three sources, one result type (:class:`LoadedAdapter`, factors upcast to float64):

* a **run directory** written by :mod:`lora.train` (``manifest.json``, ``summary.csv`` and one adapter directory per
  grid point, ``<set>_r<rank>_s<seed>``), indexed by :func:`index_run` and selected by rank, seed and weight set;
* any single **PEFT-layout adapter directory** (ours, or written by ``peft``'s ``save_pretrained``);
* a **loralib checkpoint** (a ``.pt`` state dict with ``<module>.lora_A`` / ``.lora_B``; loralib stores no alpha).

Fused GPT-2 ``c_attn`` updates come back as separate ``<path>:q`` / ``<path>:v`` module keys
(:func:`lora.adapter_io.load_adapter` splits them). The base weights ``W0`` come from the adapter's
``base_model_name_or_path`` (the embedded default id maps to the installed package, anything else is a local
directory or a hub id) or from an explicit ``base``; :class:`BaseWeights` loads each base model once and shares one
:class:`~lora_analysis.linalg.WeightSVDCache`, so W's SVD is computed once per weight matrix for every rank and seed.

Every bad input raises :class:`lora.errors.UserError` with one line naming the file and, where it applies, the
module.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lora.adapter_io import quiet_transformers
from lora.errors import UserError
from lora.inject import layer_index
from lora.layers import LoRAFactors

__all__ = [
    "DEFAULT_RANKS",
    "DEFAULT_SEEDS",
    "RUNS_ENV",
    "AdapterEntry",
    "BaseWeights",
    "LoadedAdapter",
    "RunIndex",
    "default_run_dir",
    "ensure_default_run",
    "index_run",
    "load_adapter_dir",
    "load_any",
    "load_loralib",
    "load_run_adapter",
    "module_layer",
    "nearest",
    "weight_type",
]

RUNS_ENV = "LORA_RUNS_DIR"  # overrides the default run directory (runs/default under the current directory)
DEFAULT_RANKS = (8, 64)  # Figure 3: r=8 against r=64
DEFAULT_SEEDS = (0, 1)  # Figure 4: two seeds at r=64
CONFIG_NAME = "adapter_config.json"
_SHORT = {
    "query": "q", "key": "k", "value": "v", "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
    "out_proj": "o", "q_lin": "q", "k_lin": "k", "v_lin": "v", "out_lin": "o",
}
_ORDER = {"q": 0, "k": 1, "v": 2, "o": 3}


# ---------------------------------------------------------------------------------------------- module keys
def weight_type(module_key: str) -> str:
    """q, k, v or o for an attention projection, else the last path component.

    ``encoder.layer.3.attention.self.query`` -> ``q``; ``h.0.attn.c_attn:v`` -> ``v``; ``self_attn.q_proj`` -> ``q``;
    ``attention.output.dense`` (BERT) and ``attn.c_proj`` (GPT-2) -> ``o``; ``mlp.fc1`` -> ``fc1``.
    """
    path, _, slice_name = module_key.partition(":")
    if slice_name:
        return slice_name
    if path.endswith("attention.output.dense") or path.endswith("attn.c_proj"):
        return "o"
    last = path.rpartition(".")[2]
    return _SHORT.get(last, last)


def module_layer(module_key: str) -> int:
    """The transformer block index of a module key (``-1`` if the path has none, e.g. an embedding)."""
    i = layer_index(module_key.partition(":")[0])
    return -1 if i is None else i


def _weight_set_of(keys: Iterable[str]) -> str:
    types = sorted({weight_type(k) for k in keys}, key=lambda t: (_ORDER.get(t, 9), t))
    return ",".join(types)


def nearest(wanted: int, available: Sequence[int]) -> int:
    """The value of ``available`` closest to ``wanted`` (ties go to the smaller one)."""
    if not available:
        raise ValueError("nearest: nothing available")
    return min(available, key=lambda a: (abs(a - wanted), a))


# ---------------------------------------------------------------------------------------------- loaded adapters
@dataclass(frozen=True, eq=False)  # holds tensors: compare fields explicitly
class LoadedAdapter:
    """One adapter ready for analysis: every factor in float64 on the CPU.

    Attributes:
        path: the adapter directory (or loralib checkpoint).
        rank: nominal rank ``r`` (``adapter_config.json``).
        seed: training seed if recorded, else ``None``.
        weight_set: adapted weight types joined by commas, e.g. ``"q,v"``.
        alpha: LoRA alpha.
        base_model: ``base_model_name_or_path`` as recorded (may be ``None``).
        factors: ``{module key: LoRAFactors(A (r, d_in), B (d_out, r), scaling)}``, float64, natural order.
        init_A: ``{module key: A at step 0}`` float64, from ``init.safetensors``; ``None`` if absent.
        config: the adapter's parsed config (PEFT fields and the toolkit's).
    """

    path: Path
    rank: int
    seed: int | None
    weight_set: str
    alpha: float
    base_model: str | None
    factors: dict[str, LoRAFactors]
    init_A: dict[str, Tensor] | None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def module_keys(self) -> list[str]:
        return list(self.factors)

    def select(self, pattern: str | None) -> list[str]:
        """Module keys matching the regular expression ``pattern`` (``re.search``); all keys for ``None``."""
        if pattern is None:
            return self.module_keys
        rx = re.compile(pattern)
        return [k for k in self.factors if rx.search(k)]

    def __repr__(self) -> str:
        return f"LoadedAdapter({self.path}, r={self.rank}, seed={self.seed}, set={self.weight_set!r}, modules={len(self.factors)})"


def _natural_key(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _to64(where: str, key: str, name: str, t: Tensor) -> Tensor:
    if not isinstance(t, Tensor) or t.ndim != 2 or 0 in t.shape:
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise UserError(f"{where}: module {key}: {name} must be a non-empty matrix, got {shape}")
    if not t.is_floating_point():
        raise UserError(f"{where}: module {key}: {name} has non-float dtype {t.dtype}")
    out = t.detach().to(device="cpu", dtype=torch.float64)  # fp16/bf16 upcast happens here, before any SVD
    if not bool(torch.isfinite(out).all()):
        raise UserError(f"{where}: module {key}: {name} contains NaN or Inf")
    return out


def _from_adapter(adapter: Any, where: str) -> LoadedAdapter:
    """Convert a :class:`lora.adapter_io.Adapter` into a float64 :class:`LoadedAdapter`, checking every factor."""
    factors: dict[str, LoRAFactors] = {}
    for key in sorted(adapter.factors, key=_natural_key):
        f = adapter.factors[key]
        A, B = _to64(where, key, "lora_A", f.A), _to64(where, key, "lora_B", f.B)
        if A.shape[0] != B.shape[1]:
            raise UserError(f"{where}: module {key}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not form B @ A")
        s = float(f.scaling)
        if not math.isfinite(s):
            raise UserError(f"{where}: module {key}: scaling {s} is not finite")
        factors[key] = LoRAFactors(A, B, s)
    if not factors:
        raise UserError(f"{where}: holds no LoRA modules")
    init_A = None
    if adapter.init_A is not None:
        init_A = {}
        for key, t in adapter.init_A.items():
            if key not in factors:
                raise UserError(f"{where}: init.safetensors: {key!r} is not a module of this adapter")
            a0 = _to64(where, key, "init A", t)
            if a0.shape != factors[key].A.shape:
                raise UserError(f"{where}: module {key}: init A {tuple(a0.shape)} differs from lora_A {tuple(factors[key].A.shape)}")
            init_A[key] = a0
    config = dict(adapter.config)
    toolkit = config.get("lora_toolkit") or {}
    weight_set = toolkit.get("weight_set") if isinstance(toolkit, dict) else None
    seed = config.get("seed")
    if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool)):
        raise UserError(f"{where}: adapter_config.json: seed must be an integer, got {seed!r}")
    return LoadedAdapter(
        path=Path(adapter.path) if adapter.path is not None else Path(where),
        rank=int(config["r"]),
        seed=seed,
        weight_set=str(weight_set) if weight_set else _weight_set_of(factors),
        alpha=float(config.get("lora_alpha", config["r"])),
        base_model=config.get("base_model_name_or_path"),
        factors=factors,
        init_A=init_A,
        config=config,
    )


def load_adapter_dir(path: str | os.PathLike) -> LoadedAdapter:
    """Load one PEFT-layout adapter directory (ours or real ``peft``'s) in float64.

    Raises:
        UserError: naming the file (and module) for a missing, truncated or corrupt file, invalid JSON, NaN/Inf,
            or factors whose shapes do not fit each other.
    """
    from lora.adapter_io import load_adapter

    p = Path(path)
    if p.is_file():
        raise UserError(f"{p}: is a file; expected an adapter directory containing {CONFIG_NAME}")
    return _from_adapter(load_adapter(p), str(p))


def load_loralib(path: str | os.PathLike, *, alpha: float, base_model: str | None = None) -> LoadedAdapter:
    """Load a loralib checkpoint (``.pt`` state dict); ``alpha`` is required since loralib does not store it.

    A GPT-2 ``MergedLinear(enable_lora=[True, False, True])`` comes back as ``<path>:q`` and ``<path>:v``.
    """
    from lora.adapter_io import load_loralib_checkpoint

    if alpha is None or not math.isfinite(float(alpha)) or float(alpha) <= 0:
        raise UserError(f"--alpha: loralib checkpoints store no alpha; pass a positive --alpha (got {alpha})")
    adapter = load_loralib_checkpoint(path, alpha=float(alpha), base_model_name_or_path=base_model)
    return _from_adapter(adapter, str(path))


def load_any(path: str | os.PathLike, *, alpha: float | None = None, base_model: str | None = None) -> LoadedAdapter:
    """A PEFT adapter directory, or a loralib checkpoint file (which needs ``alpha``)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: does not exist")
    if p.is_dir():
        return load_adapter_dir(p)
    if alpha is None:
        raise UserError(f"{p}: is a file; expected an adapter directory (for a loralib checkpoint also pass --alpha)")
    return load_loralib(p, alpha=alpha, base_model=base_model)


# ---------------------------------------------------------------------------------------------- run directories
@dataclass(frozen=True)
class AdapterEntry:
    """One grid point of a run directory (read from its ``adapter_config.json`` only; tensors are not loaded)."""

    path: Path
    weight_set: str
    rank: int
    seed: int | None

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class RunIndex:
    """The adapters found in a run directory, in (weight set, rank, seed) order.

    Attributes:
        root: the run directory.
        entries: one :class:`AdapterEntry` per adapter directory.
        manifest: the parsed ``manifest.json`` (``{}`` if the directory has none).
    """

    root: Path
    entries: tuple[AdapterEntry, ...]
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def weight_sets(self) -> list[str]:
        return sorted({e.weight_set for e in self.entries})

    def ranks(self, weight_set: str | None = None) -> list[int]:
        return sorted({e.rank for e in self.entries if weight_set in (None, e.weight_set)})

    def seeds(self, weight_set: str | None = None, rank: int | None = None) -> list[int]:
        return sorted({e.seed for e in self.entries if e.seed is not None and weight_set in (None, e.weight_set)
                       and rank in (None, e.rank)})

    def default_weight_set(self) -> str:
        """``"q,v"`` (the paper's Section 7 choice) if present, else the weight set with the most adapters."""
        sets = self.weight_sets
        if "q,v" in sets:
            return "q,v"
        return max(sets, key=lambda s: (sum(e.weight_set == s for e in self.entries), s))

    def find(self, *, rank: int | None = None, seed: int | None = None, weight_set: str | None = None) -> list[AdapterEntry]:
        """Entries matching every given field (``None`` matches anything)."""
        return [e for e in self.entries if rank in (None, e.rank) and seed in (None, e.seed)
                and weight_set in (None, e.weight_set)]

    def select(self, *, rank: int, seed: int | None = 0, weight_set: str | None = None) -> AdapterEntry:
        """The one adapter with this rank, seed and weight set (default weight set: :meth:`default_weight_set`).

        Raises:
            UserError: listing the available weight sets, ranks or seeds if there is no such adapter.
        """
        ws = self.default_weight_set() if weight_set is None else _canon_set(weight_set)
        if ws not in self.weight_sets:
            raise UserError(f"{self.root}: no adapters for weight set {ws!r}; available: {', '.join(self.weight_sets)}")
        if rank not in self.ranks(ws):
            raise UserError(f"{self.root}: no adapter with rank {rank} (weight set {ws}); available ranks: "
                            f"{', '.join(map(str, self.ranks(ws)))}")
        hits = self.find(rank=rank, seed=seed, weight_set=ws)
        unseeded = [e for e in self.find(rank=rank, weight_set=ws) if e.seed is None]
        if not hits and len(unseeded) == 1 and not self.seeds(ws, rank):
            return unseeded[0]  # e.g. a peft adapter: it records no seed, and it is the only one at this rank
        if not hits:
            raise UserError(f"{self.root}: no adapter with seed {seed} at rank {rank} (weight set {ws}); available "
                            f"seeds: {', '.join(map(str, self.seeds(ws, rank)))}")
        if len(hits) > 1:
            raise UserError(f"{self.root}: several adapters with rank {rank}, seed {seed}, weight set {ws}: "
                            f"{', '.join(e.name for e in hits)}")
        return hits[0]


def _canon_set(spec: str) -> str:
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if all(p in _ORDER for p in parts):
        return ",".join(sorted(set(parts), key=_ORDER.__getitem__))
    return ",".join(parts)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text (invalid JSON)") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _entry(adapter_dir: Path) -> AdapterEntry:
    cfg_path = adapter_dir / CONFIG_NAME
    cfg = _read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_path}: expected a JSON object")
    r = cfg.get("r")
    if not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
        raise UserError(f"{cfg_path}: r must be a positive integer, got {r!r}")
    seed = cfg.get("seed")
    if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool)):
        raise UserError(f"{cfg_path}: seed must be an integer, got {seed!r}")
    toolkit = cfg.get("lora_toolkit") if isinstance(cfg.get("lora_toolkit"), dict) else {}
    ws = toolkit.get("weight_set")
    if not ws:
        targets = cfg.get("target_modules") or []
        if isinstance(targets, str):  # PEFT allows a regex string; fall back to the tensor keys' types
            targets = []
        fused = toolkit.get("fused") or {}
        keys = [f"{t}:{s}" for t in targets for s in (fused.get(t) or {}).get("slices", [])] or list(targets)
        ws = _weight_set_of(keys) if keys else "?"
    return AdapterEntry(path=adapter_dir, weight_set=_canon_set(ws), rank=r, seed=seed)


def index_run(run_dir: str | os.PathLike) -> RunIndex:
    """Index the adapter directories of a run (each sub-directory holding ``adapter_config.json``).

    Only the configs are read, so indexing a large sweep is instant. Temporary directories left by a killed
    trainer (``.name.tmp-*``) are ignored: they are never finished adapters.

    Raises:
        UserError: the path is missing, a file, empty, or holds no adapter directory; a config is invalid JSON.
    """
    root = Path(run_dir)
    if not root.exists():
        raise UserError(f"{root}: run directory does not exist")
    if not root.is_dir():
        raise UserError(f"{root}: is a file; expected a run directory (or pass an adapter directory with --a1/--adapter)")
    if (root / CONFIG_NAME).is_file():
        entries = [_entry(root)]  # a single adapter directory is a run of one
    else:
        subdirs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: _natural_key(p.name))
        entries = [_entry(p) for p in subdirs if (p / CONFIG_NAME).is_file()]
    if not entries:
        what = "is empty" if not any(root.iterdir()) else "holds no adapter directory (none has adapter_config.json)"
        raise UserError(f"{root}: run directory {what}")
    manifest: dict[str, Any] = {}
    if (root / "manifest.json").is_file():
        m = _read_json(root / "manifest.json")
        if not isinstance(m, dict):
            raise UserError(f"{root / 'manifest.json'}: expected a JSON object")
        manifest = m
    entries.sort(key=lambda e: (e.weight_set, e.rank, -1 if e.seed is None else e.seed, e.name))
    return RunIndex(root=root, entries=tuple(entries), manifest=manifest)


def load_run_adapter(
    run_dir: str | os.PathLike | RunIndex, *, rank: int, seed: int | None = 0, weight_set: str | None = None
) -> LoadedAdapter:
    """Load the adapter of a run with this rank, seed and weight set (see :meth:`RunIndex.select`)."""
    index = run_dir if isinstance(run_dir, RunIndex) else index_run(run_dir)
    entry = index.select(rank=rank, seed=seed, weight_set=weight_set)
    return load_adapter_dir(entry.path)


# ---------------------------------------------------------------------------------------------- base weights
def _resolve_base(name: str) -> str:
    """The path to load for a recorded base name: the embedded default id maps to the installed package's
    directory (no hub needed); a local directory stays; anything else is a hub id for ``from_pretrained``."""
    try:
        from lora.train import resolve_model_path
    except ImportError:  # the trainer is optional for analysis
        return name
    return resolve_model_path(name)[0]


class BaseWeights:
    """Base weights ``W0`` per module key (float64, ``(d_out, d_in)``) and their SVDs, each computed once.

    One instance serves a whole analysis: each base model is loaded once (keyed by its resolved path), each
    ``W0`` is extracted once, and :attr:`svd` (a :class:`~lora_analysis.linalg.WeightSVDCache`) gives W's SVD
    shared by every rank and seed that adapts it.

    Args:
        base: a base model directory or hub id that overrides every adapter's ``base_model_name_or_path``
            (the ``--base`` option), or a loaded ``nn.Module``.
    """

    def __init__(self, base: str | os.PathLike | nn.Module | None = None) -> None:
        from lora_analysis.linalg import WeightSVDCache

        self.base = base
        self.svd = WeightSVDCache()
        self._models: dict[str, nn.Module] = {}
        self._weights: dict[tuple[str, str], Tensor] = {}
        self._checked: set[tuple[str, str]] = set()  # (base, adapter fingerprint) pairs already compared
        self._svd_memo: dict[str, tuple[Tensor, Any]] = {}

    def _check_fingerprint(self, name: str, model: nn.Module, adapter: LoadedAdapter) -> None:
        """Warn (once per base and fingerprint) if ``base_fingerprint`` recorded by the trainer does not match the
        loaded base: shapes may agree while the weights differ (another checkpoint), and every W-vs-ΔW number
        would then describe a base the adapter never saw."""
        from lora.adapter_io import base_fingerprint

        recorded = adapter.config.get("base_fingerprint")
        if not recorded or (name, recorded) in self._checked:
            return
        self._checked.add((name, recorded))
        paths = sorted({k.partition(":")[0] for k in adapter.factors})
        try:
            actual = base_fingerprint(model, module_paths=paths)
        except (AttributeError, ValueError, KeyError):  # paths named differently in this model class: cannot compare
            return
        if actual != recorded:
            print(f"warning: {adapter.path}: the base weights in {name} differ from those it was trained on "
                  f"(base_fingerprint); W-vs-ΔW results describe {name}", file=sys.stderr)

    def _model_for(self, adapter: LoadedAdapter) -> tuple[str, nn.Module]:
        from lora.adapter_io import Adapter, base_model_for

        if isinstance(self.base, nn.Module):
            return "<model>", self.base
        if self.base is not None:
            p = Path(self.base)
            if p.is_file():
                raise UserError(f"--base {self.base}: is a file; expected a transformers model directory")
            name = str(self.base)
        elif adapter.base_model:
            name = adapter.base_model
        else:
            raise UserError(f"{adapter.path}: records no base_model_name_or_path; pass --base PATH")
        target = _resolve_base(name)
        if target not in self._models:
            # base_model_for picks the model class that owns the adapter's module paths (task head, LM head).
            shim = Adapter(path=adapter.path, config={**adapter.config, "base_model_name_or_path": target}, factors={})
            try:
                with quiet_transformers():
                    self._models[target] = base_model_for(shim, target if self.base is not None else None)
            except UserError as exc:
                hint = "" if self.base is not None else "; pass --base PATH to use a local copy"
                raise UserError(f"{exc}{hint}") from None
        return target, self._models[target]

    def weights(self, adapter: LoadedAdapter, keys: Iterable[str] | None = None) -> dict[str, Tensor]:
        """``{module key: W0}`` for ``keys`` (default: every module of ``adapter``), checked against the factors.

        Raises:
            UserError: naming the adapter and module if a module is missing from the base model or ``W0``'s shape
                does not match ``(B.shape[0], A.shape[1])``.
        """
        from lora.adapter_io import load_base_weights

        keys = list(adapter.factors) if keys is None else list(keys)
        name, model = self._model_for(adapter)
        missing = [k for k in keys if (name, k) not in self._weights]
        if missing:
            from lora.adapter_io import Adapter

            shim = Adapter(path=adapter.path, config=adapter.config, factors={})
            got = load_base_weights(shim, missing, base=model)
            for k, W in got.items():
                W = W.to(torch.float64)
                if not bool(torch.isfinite(W).all()):
                    raise UserError(f"base model {name}: module {k}: weight contains NaN or Inf")
                self._weights[(name, k)] = W
        out = {}
        for k in keys:
            W = self._weights[(name, k)]
            f = adapter.factors.get(k)
            if f is not None and tuple(W.shape) != (f.B.shape[0], f.A.shape[1]):
                raise UserError(
                    f"{adapter.path}: module {k}: ΔW is ({f.B.shape[0]}, {f.A.shape[1]}) but the base weight is "
                    f"{tuple(W.shape)} in {name}: adapter and base model do not match"
                )
            out[k] = W
        self._check_fingerprint(name, model, adapter)  # after the shape checks: a misfit base is an error, not a warning
        return out

    def w_svd(self, key: str, W: Tensor):
        """The full thin SVD of ``W`` (cached; slice it with ``.truncate(k)``).

        ``W`` tensors handed out by :meth:`weights` are memoised by identity, so repeated calls skip even the
        content hash that :class:`~lora_analysis.linalg.WeightSVDCache` uses to key its entries.
        """
        memo = self._svd_memo.get(key)
        if memo is not None and memo[0] is W:
            return memo[1]
        svd = self.svd.get(key, W)
        self._svd_memo[key] = (W, svd)
        return svd


# ---------------------------------------------------------------------------------------------- default run
def default_run_dir() -> Path:
    """``$LORA_RUNS_DIR`` if set, else ``runs/default`` under the current directory (where ``lora.train`` writes
    by default)."""
    env = os.environ.get(RUNS_ENV)
    return Path(env) if env else Path("runs") / "default"


def ensure_default_run(
    ranks: Sequence[int] = DEFAULT_RANKS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    *,
    run_dir: str | os.PathLike | None = None,
    progress: bool = True,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Make sure the default run holds q,v adapters for every rank × seed, training only the missing ones.

    A new run directory gets the trainer's default config (the full Section 7 grid on the embedded default:
    real all-MiniLM-L6-v2 on real chatterbot-corpus text, offline), extended by any rank or seed asked for, but only
    the points needed here are trained now; ``python -m lora.train --out DIR`` later resumes the rest of the
    grid in the same directory. An existing run keeps its own config. A line on stderr says what is trained.

    Args:
        ranks, seeds: the grid points needed (weight set ``q,v``).
        run_dir: default :func:`default_run_dir`.
        progress: tqdm progress bars.
        config: :class:`lora.config.TrainConfig` fields for a new run (tests pass tiny settings).

    Returns:
        The run directory.

    Raises:
        UserError: an existing run that does not include a needed rank or seed (its message lists what it has).
    """
    from tqdm.auto import tqdm

    from lora import train as trainer
    from lora.config import TrainConfig
    from lora.fsio import write_json

    root = Path(run_dir) if run_dir is not None else default_run_dir()
    needed = sorted({(int(r), int(s)) for r in ranks for s in seeds})
    if root.is_file():
        raise UserError(f"{root}: is a file; expected a run directory")
    if root.is_dir() and any(root.iterdir()):
        try:
            have = {(e.rank, e.seed) for e in index_run(root).find(weight_set="q,v")}
        except UserError:
            have = set()
        if all(k in have for k in needed):
            return root  # fast path: nothing to train, no model to load
    manifest_path = root / "manifest.json"
    if manifest_path.is_file():
        m = _read_json(manifest_path)
        if not isinstance(m, dict) or not isinstance(m.get("config"), dict):
            raise UserError(f"{manifest_path}: not a lora.train manifest (no config object)")
        cfg = TrainConfig.from_dict(m["config"], source=str(manifest_path))
    else:
        base = TrainConfig.from_dict(dict(config or {}), source="default run config")
        if base.budget is not None:
            raise UserError("default run config: --budget mode has no rank grid to add ranks to")
        cfg = TrainConfig.from_dict(
            {**base.to_dict(), "ranks": sorted(set(base.ranks or ()) | {r for r, _ in needed}),
             "seeds": sorted(set(base.seeds) | {s for _, s in needed})},
            source="default run config",
        )
    with quiet_transformers():
        prep = trainer.prepare(cfg)
    points = trainer.grid_points(cfg, model=prep.template)
    by_key = {(p.rank, p.seed): p for p in points if _canon_set(p.weight_set) == "q,v"}
    absent = [k for k in needed if k not in by_key]
    if absent:
        raise UserError(
            f"{root}: this run's grid has q,v ranks {sorted({r for r, _ in by_key})} and seeds "
            f"{sorted({s for _, s in by_key})}; (rank, seed) {absent[0]} is not part of it "
            f"(choose available ones, or pass --runs DIR for another run)"
        )
    todo = [by_key[k] for k in needed if not (root / by_key[k].name).is_dir()]
    if not todo:
        return root
    manifest = trainer._manifest(cfg, points, prep)
    old = trainer.check_run_dir(root, manifest)
    root.mkdir(parents=True, exist_ok=True)
    if old is None:
        write_json(manifest_path, manifest)
    print(
        f"{root}: training {len(todo)} missing adapter(s) ({', '.join(p.name for p in todo)}) on "
        f"{cfg.model} / {cfg.task} first; `python -m lora.train --out {root}` resumes the rest of the grid",
        file=sys.stderr,
    )
    for p in tqdm(todo, desc="training default adapters", disable=not progress, dynamic_ncols=True):
        trainer.train_point(cfg, p, root, progress=progress)  # an inner bar shows the optimizer steps
    current = _read_json(manifest_path)
    trainer.write_summary(root, points, current.get("linear_probe", {}) if isinstance(current, dict) else {})
    return root

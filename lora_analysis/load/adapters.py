"""Find and load LoRA adapters for analysis (with :mod:`lora_analysis.load.base`, the analysis's only file reads).

Three sources, one result type (:class:`LoadedAdapter`, factors upcast to float64):

* a **run directory** written by :mod:`lora.train` (``manifest.json``, ``summary.csv`` and one adapter directory per
  grid point, ``<set>_r<rank>_s<seed>``), indexed by :func:`index_run` and selected by rank, seed and weight set;
* any single **PEFT-layout adapter directory** (ours, or written by ``peft``'s ``save_pretrained``);
* a **loralib checkpoint** (a ``.pt`` state dict with ``<module>.lora_A`` / ``.lora_B``; loralib stores no alpha).

Fused GPT-2 ``c_attn`` updates come back as separate ``<path>:q`` / ``<path>:v`` module keys
(:func:`lora.adapter_io.load_adapter` splits them). The base weights ``W0`` come from the adapter's
``base_model_name_or_path`` or an explicit ``base``: see :class:`lora_analysis.load.base.BaseWeights`. The
run-directory format itself (manifest, summary, default directory) belongs to :mod:`lora.rundir`.

Every bad input raises :class:`lora.errors.UserError` with one line naming the file and, where it applies, the
module.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lora.errors import UserError
from lora.inject import layer_index
from lora.layers import LoRAFactors
from lora.rundir import read_manifest

__all__ = [
    "AdapterEntry",
    "LoadedAdapter",
    "RunIndex",
    "index_run",
    "load_adapter_dir",
    "load_all",
    "load_any",
    "load_loralib",
    "load_run_adapter",
    "module_layer",
    "weight_type",
]

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
        magnitude: DoRA's ``{module key: m (d_out,)}`` float64 (``use_dora: true``, :mod:`lora.dora`), else ``None``.
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
    magnitude: dict[str, Tensor] | None = None

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


def natural_key(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def factor_as_float64(where: str, key: str, name: str, t: Tensor) -> Tensor:
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
    for key in sorted(adapter.factors, key=natural_key):
        f = adapter.factors[key]
        A, B = factor_as_float64(where, key, "lora_A", f.A), factor_as_float64(where, key, "lora_B", f.B)
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
            a0 = factor_as_float64(where, key, "init A", t)
            if a0.shape != factors[key].A.shape:
                raise UserError(f"{where}: module {key}: init A {tuple(a0.shape)} differs from lora_A {tuple(factors[key].A.shape)}")
            init_A[key] = a0
    magnitude = None
    if getattr(adapter, "magnitudes", None):  # DoRA; shapes were checked against the factors at load
        magnitude = {key: adapter.magnitudes[key].detach().to("cpu", torch.float64) for key in factors}
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
        magnitude=magnitude,
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


def load_loralib(
    path: str | os.PathLike, *, alpha: float, base_model: str | None = None, enable_lora: str | None = None
) -> LoadedAdapter:
    """Load a loralib checkpoint (``.pt`` state dict); ``alpha`` is required since loralib does not store it.

    A GPT-2 ``MergedLinear`` comes back as ``<path>:q``, ``<path>:v`` (and ``:k``): ``enable_lora`` names the
    adapted slices (``"q,v"`` or ``"True,False,True"``, :func:`lora.adapter_io.parse_enable_lora`), or ``None``
    reads them from the shapes.
    """
    from lora.adapter_io import load_loralib_checkpoint, parse_enable_lora

    if alpha is None or not math.isfinite(float(alpha)) or float(alpha) <= 0:
        raise UserError(f"--alpha: loralib checkpoints store no alpha; pass a positive --alpha (got {alpha})")
    flags = parse_enable_lora(enable_lora) if enable_lora is not None else None
    adapter = load_loralib_checkpoint(path, alpha=float(alpha), base_model_name_or_path=base_model, enable_lora=flags)
    return _from_adapter(adapter, str(path))


def load_all(
    path: str | os.PathLike, *, alpha: float | None = None, base_model: str | None = None,
    enable_lora: str | None = None,
) -> list[LoadedAdapter]:
    """Every adapter ``path`` names: one adapter directory or loralib checkpoint (as :func:`load_any`), or each
    adapter of a folder that peft's ``save_pretrained`` wrote with several named adapters (the root as
    ``default`` if it holds one, then each sub-directory; :func:`lora.adapter_io.named_adapter_dirs`)."""
    from lora.adapter_io import named_adapter_dirs

    dirs = named_adapter_dirs(path)
    if len(dirs) > 1:
        return [load_adapter_dir(d) for d in dirs]
    return [load_any(path, alpha=alpha, base_model=base_model, enable_lora=enable_lora)]


def load_any(
    path: str | os.PathLike, *, alpha: float | None = None, base_model: str | None = None,
    enable_lora: str | None = None,
) -> LoadedAdapter:
    """A PEFT adapter directory, or a loralib checkpoint file (which needs ``alpha``; ``enable_lora`` as
    :func:`load_loralib`). A folder of named adapters (peft's ``save_pretrained`` with several) is refused with
    their list: see :func:`load_all` to load every one."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: does not exist")
    if p.is_dir():
        return load_adapter_dir(p)
    if alpha is None:
        raise UserError(f"{p}: is a file; expected an adapter directory (for a loralib checkpoint also pass --alpha)")
    return load_loralib(p, alpha=alpha, base_model=base_model, enable_lora=enable_lora)


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


def _entry(adapter_dir: Path) -> AdapterEntry:
    from lora.adapter_io import read_adapter_config

    cfg = read_adapter_config(adapter_dir)  # the one reader and schema: peft's fields and ours (either layout)
    r, seed = cfg["r"], cfg.get("seed")
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


def index_run(run_dir: str | os.PathLike, *, manifest: dict[str, Any] | None = None) -> RunIndex:
    """Index the adapter directories of a run (each sub-directory holding ``adapter_config.json``), or of a folder of
    peft named adapters (the root too, as ``default``, when it holds a config), or a single adapter directory.

    Only the configs are read, so indexing a large sweep is instant. ``manifest``: the run's parsed
    ``manifest.json`` when the caller has read it already (:class:`~lora_analysis.load.run.Run`), else it is
    read. Temporary directories left by a killed trainer (``.name.tmp-*``) are ignored: they are never finished
    adapters.

    Raises:
        UserError: the path is missing, a file, empty, or holds no adapter directory; a config is invalid JSON.
    """
    root = Path(run_dir)
    if not root.exists():
        raise UserError(f"{root}: run directory does not exist")
    if not root.is_dir():
        raise UserError(f"{root}: is a file; expected a run directory (or pass an adapter directory with --a1/--adapter)")
    from lora.adapter_io import named_adapter_dirs

    # A run's grid points, or peft's named adapters (the root is "default" when it holds a config), or one adapter.
    entries = [_entry(p) for p in named_adapter_dirs(root)]
    if not entries:
        what = "is empty" if not any(root.iterdir()) else "holds no adapter directory (none has adapter_config.json)"
        raise UserError(f"{root}: run directory {what}")
    if manifest is None:
        manifest = read_manifest(root) or {}
    entries.sort(key=lambda e: (e.weight_set, e.rank, -1 if e.seed is None else e.seed, e.name))
    return RunIndex(root=root, entries=tuple(entries), manifest=manifest)


def load_run_adapter(
    run_dir: str | os.PathLike | RunIndex, *, rank: int, seed: int | None = 0, weight_set: str | None = None
) -> LoadedAdapter:
    """Load the adapter of a run with this rank, seed and weight set (see :meth:`RunIndex.select`)."""
    index = run_dir if isinstance(run_dir, RunIndex) else index_run(run_dir)
    entry = index.select(rank=rank, seed=seed, weight_set=weight_set)
    return load_adapter_dir(entry.path)



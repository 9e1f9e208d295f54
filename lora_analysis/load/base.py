"""The frozen base weights ``W0`` behind each adapted module, and W's SVD computed once per weight matrix.

The base comes from the adapter's ``base_model_name_or_path`` (the embedded default id maps to the installed
package, a local directory stays, anything else is a hub id), from an explicit ``base`` (``--base``), or lazily
from a checkpoint's safetensors shards (:class:`CheckpointWeights`, a 7B base one W at a time).
:class:`BaseWeights` is the run's one base source: each base model loaded once, W's SVD computed once per weight
matrix for every rank, seed and table that adapts it (:meth:`BaseWeights.spectrum`, optionally kept on disk by
:mod:`lora_analysis.load.spectral_cache`), and a lazy W released once its module is done. For an adapter whose
``init_lora_weights`` rewrites the base on load (PiSSA, OLoRA), ``W0`` is the residual peft adapts, not the stored
weight (:mod:`lora.init_residual`).
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor, nn

from lora.adapter_io import quiet_transformers, resolve_base_name
from lora.errors import UserError, os_error_reason
from lora.threads import compute_device
from lora_analysis.load.adapters import LoadedAdapter
from lora_analysis.metrics.linalg import (
    DENSE_SVDVALS_MAX,
    SVD,
    as_float64_matrix,
    top_singular,
    top_singular_triplets,
)

if TYPE_CHECKING:
    from lora_analysis.load.spectral_cache import SpectralCache

T = TypeVar("T")

__all__ = ["BaseWeights", "CheckpointWeights"]


def svd_to(svd: SVD, device: torch.device) -> SVD:
    """``svd`` with its vectors, values and certificate moved to ``device``."""
    import dataclasses

    def moved(x):
        return x.to(device) if isinstance(x, Tensor) else x

    cert = svd.certificate
    if cert is not None:
        cert = dataclasses.replace(cert, **{f.name: moved(getattr(cert, f.name)) for f in dataclasses.fields(cert)})
    return SVD(moved(svd.U), moved(svd.S), moved(svd.V), cert)


def w_spectrum(W: Tensor, k: int | None = None) -> SVD:
    """W's SVD holding at least ``k`` triplets (``None``: all ``min(d_out, d_in)``), float64.

    On the GPU of :func:`lora.threads.compute_device` when there is one. Up to ``DENSE_SVDVALS_MAX`` (or for
    ``k=None``) the full dense SVD (:func:`~lora_analysis.metrics.linalg.
    top_singular`), whatever ``k``: it costs no more than a top-k there, every later request of that W is a
    slice of it, and the default run's numbers are exactly today's. Above it the top-``k`` triplets only.
    """
    if k is None or min(W.shape) <= DENSE_SVDVALS_MAX:
        return top_singular(W)
    device = compute_device()
    if device.type == "cpu":
        return top_singular_triplets(W, k)  # block Krylov with a certificate (or its dense fallback)
    # on a GPU: W moved for its decomposition only (float64 throughout), the triplets brought back
    return svd_to(top_singular_triplets(W.to(device), k), torch.device("cpu"))


class BaseWeights:
    """Base weights ``W0`` per module key (float64, ``(d_out, d_in)``) and their SVDs: the run's one base source.

    W comes from a loaded model (each base model loaded once, keyed by its resolved path; ``W0`` extracted once)
    or, with ``lazy=True`` or a :class:`CheckpointWeights` as ``base``, from a checkpoint's safetensors shards, one
    tensor at a time (never the model through transformers). :meth:`spectrum` is W's SVD (top-k or full), computed
    once per matrix for every rank, seed and table that needs it, and read from / stored in ``spectral_cache``
    (:class:`~lora_analysis.load.spectral_cache.SpectralCache`) when one is given.

    Memory: with a loaded model every W and SVD stays in memory for every later table (snapshots, full
    fine-tuning; the model is in memory anyway). From a lazy checkpoint (a 7B base: 64 W of 128 MB in float64,
    and their SVDs) :meth:`release` drops a module's W and SVD once its tables are done, so the analysis holds
    the modules it is working on only (:func:`lora_analysis.tables.build.weight_tables` goes module by module).

    Args:
        base: a base model directory or hub id that overrides every adapter's ``base_model_name_or_path``
            (the ``--base`` option), a loaded ``nn.Module``, or a lazy :class:`CheckpointWeights`.
        lazy: read ``base`` (a safetensors file or checkpoint directory) lazily as :class:`CheckpointWeights`.
        spectral_cache: W's SVDs on disk, shared by later analyses of the same base.

    Raises:
        ValueError: ``lazy`` without ``base``. UserError: an unreadable lazy checkpoint (:class:`CheckpointWeights`).
    """

    def __init__(self, base: str | os.PathLike | nn.Module | CheckpointWeights | None = None, *, lazy: bool = False,
                 spectral_cache: SpectralCache | None = None) -> None:
        if lazy and base is None:
            raise ValueError("lazy base weights need a checkpoint (a safetensors file or directory)")
        if lazy and not isinstance(base, CheckpointWeights):
            base = CheckpointWeights(base)
        self.base = base
        self.checkpoint = base if isinstance(base, CheckpointWeights) else None
        self.retain = self.checkpoint is None  # see the class docstring: a loaded model keeps W, a lazy one streams
        self.spectral_cache = spectral_cache
        self.computed = 0  # SVDs of W actually computed (not served from memory or the spectral cache)
        self._models: dict[str, nn.Module] = {}
        self._weights: dict[tuple[str, str, Any], Tensor] = {}  # (base, module key, residual tag)
        self._checked: set[tuple[str, str]] = set()  # (base, adapter fingerprint) pairs already compared
        self._lazy_checked: set[Path] = set()  # adapters checked against the lazy checkpoint's headers
        self._fingerprints: dict[str, list[tuple[Tensor, str]]] = {}  # module key -> [(W, content fingerprint)]
        self._spectra: dict[tuple[str, str], SVD] = {}  # (module key, fingerprint) -> SVD
        self._lock = threading.Lock()

    @property
    def lazy(self) -> bool:
        return self.checkpoint is not None

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
        target = resolve_base_name(name)[0]
        with self._lock:  # threads serving modules of one run: the model is loaded once
            if target not in self._models:
                # base_model_for picks the model class that owns the adapter's module paths (task head, LM head).
                shim = Adapter(path=adapter.path, config={**adapter.config, "base_model_name_or_path": target},
                               factors={})
                try:
                    with quiet_transformers():
                        self._models[target] = base_model_for(shim, target if self.base is not None else None)
                except UserError as exc:
                    hint = "" if self.base is not None else "; pass --base PATH to use a local copy"
                    raise UserError(f"{exc}{hint}") from None
        return target, self._models[target]

    @staticmethod
    def _tag(config: Mapping[str, Any], where: str) -> Any:
        """What, besides the module key, W0 depends on: ``None`` for the stored weight, else the base-changing
        init and peft's rank and scale per module (the residual ``W − s·B₀A₀`` of PiSSA, OLoRA)."""
        from lora.init_residual import base_changing_init

        init = base_changing_init(config, where)
        return None if init is None else (init, *(repr(config.get(c)) for c in
                                                  ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")))

    def source(self, adapter: LoadedAdapter) -> tuple[str, Any]:
        """Which W0 ``adapter``'s modules are added to, as a hashable ``(base, residual tag)``: adapters with equal
        sources share every W (the tables group them per module)."""
        if self.lazy:
            return str(self.checkpoint.path), None
        return self._model_for(adapter)[0], self._tag(adapter.config, str(adapter.path))

    def check(self, adapter: LoadedAdapter, keys: Iterable[str] | None = None) -> None:
        """``UserError`` (one line) unless W0 of each of ``keys`` (default: every module) exists and has ΔW's shape;
        before any work. A lazy checkpoint answers from its headers (:meth:`CheckpointWeights.check_adapter`),
        reading no tensor; a loaded model extracts W0 (kept: the model is in memory anyway)."""
        keys = list(adapter.factors) if keys is None else list(keys)
        if not self.lazy:
            self.weights(adapter, keys)
            return
        if adapter.path not in self._lazy_checked:
            self.checkpoint.check_adapter(adapter)
            self._lazy_checked.add(adapter.path)
        missing = [k for k in keys if k not in self.checkpoint]
        if missing:
            raise UserError(f"{self.checkpoint.path}: holds no tensor {missing[0]}.weight, which {adapter.path} "
                            f"adapts ({len(missing)} module(s) missing): adapter and checkpoint do not match")

    def weights(
        self, adapter: LoadedAdapter, keys: Iterable[str] | None = None, *, original: bool = False
    ) -> dict[str, Tensor]:
        """``{module key: W0}`` for ``keys`` (default: every module of ``adapter``), checked against the factors.

        ``W0`` is the weight peft adapts when it loads the adapter: for ``init_lora_weights`` ``"pissa"`` or
        ``"olora"`` the residual ``W − s·B₀A₀`` peft rebuilds (:mod:`lora.init_residual`), else the stored weight.
        ``original=True`` gives the stored weight in every case (DoRA's magnitude is initialised from its norms).
        From a lazy checkpoint W is read (and upcast) when first asked for; :meth:`release` drops it.

        Raises:
            UserError: naming the adapter and module if a module is missing from the base model or ``W0``'s shape
                does not match ``(B.shape[0], A.shape[1])``; naming the conversion route for an init whose base
                change cannot be rebuilt (``pissa_niter_*``, ``corda``, ``lora_ga``, ``loftq``).
        """
        from lora.adapter_io import load_base_weights

        keys = list(adapter.factors) if keys is None else list(keys)
        if self.lazy:  # the lazy route refuses base-changing inits (check), so the original is W itself
            self.check(adapter, keys)
            name = str(self.checkpoint.path)
            for k in keys:
                if (name, k, None) not in self._weights:
                    self._weights[(name, k, None)] = as_float64_matrix(self.checkpoint[k], name=f"{name}: {k}")
            return {k: self._weights[(name, k, None)] for k in keys}
        config = {**adapter.config, "init_lora_weights": True} if original else adapter.config
        # The residual depends on the init and on peft's rank and scale per module: part of the cache key.
        tag = self._tag(config, str(adapter.path))
        name, model = self._model_for(adapter)
        missing = [k for k in keys if (name, k, tag) not in self._weights]
        if missing:
            from lora.adapter_io import Adapter

            shim = Adapter(path=adapter.path, config=config, factors={})
            got = load_base_weights(shim, missing, base=model)
            for k, W in got.items():
                W = W.to(torch.float64)
                if not bool(torch.isfinite(W).all()):
                    raise UserError(f"base model {name}: module {k}: weight contains NaN or Inf")
                self._weights[(name, k, tag)] = W
        out = {}
        for k in keys:
            W = self._weights[(name, k, tag)]
            f = adapter.factors.get(k)
            if f is not None and tuple(W.shape) != (f.B.shape[0], f.A.shape[1]):
                raise UserError(
                    f"{adapter.path}: module {k}: ΔW is ({f.B.shape[0]}, {f.A.shape[1]}) but the base weight is "
                    f"{tuple(W.shape)} in {name}: adapter and base model do not match"
                )
            out[k] = W
        self._check_fingerprint(name, model, adapter)  # after the shape checks: a misfit base is an error, not a warning
        return out

    def _fingerprint(self, key: str, W: Tensor) -> str:
        """W's content fingerprint, hashed once per tensor handed out (memoised by identity)."""
        from lora_analysis.load.spectral_cache import content_fingerprint

        for held, fp in self._fingerprints.get(key, ()):
            if held is W:
                return fp
        fp = content_fingerprint(W)
        with self._lock:
            self._fingerprints.setdefault(key, []).append((W, fp))
        return fp

    def spectrum(self, key: str, W: Tensor, k: int | None = None) -> SVD:
        """W's SVD holding at least ``k`` triplets (``None``: the full thin SVD; slice it with ``.truncate``): the
        one place the analysis asks for W's singular vectors.

        Served from memory (per module key and content fingerprint), else from the spectral cache (a file holding
        at least ``k``), else computed (:func:`w_spectrum`) and stored there. A larger ``k`` than held recomputes
        and replaces.
        """
        need = min(W.shape) if k is None else k
        fp = self._fingerprint(key, W)
        svd = self._spectra.get((key, fp))
        if svd is not None and svd.k >= need:
            return svd
        cache = self.spectral_cache
        svd = cache.load(key, fp, k, tuple(W.shape)) if cache is not None else None
        if svd is None:
            svd = w_spectrum(W, k)
            with self._lock:
                self.computed += 1
            if cache is not None:
                cache.store(key, fp, svd)
        with self._lock:
            self._spectra[(key, fp)] = svd
        return svd

    def memo(self, key: str, W: Tensor, parts: tuple, compute: Callable[[], T], dump: Callable[[T], dict],
             load: Callable[[dict], T]) -> T:
        """A per-adapter result on W (e.g. its intruder count), kept in the spectral cache under W's fingerprint
        and the hash of ``parts`` (the adapter's factors and the parameters; :func:`~lora_analysis.load.
        spectral_cache.factors_fingerprint`): ``compute()`` on a miss, then stored as ``dump(result)``; a hit is
        ``load(stored)``. Without a spectral cache, ``compute()``."""
        from lora_analysis.load.spectral_cache import factors_fingerprint

        cache = self.spectral_cache
        if cache is None:
            return compute()
        fp, delta = self._fingerprint(key, W), factors_fingerprint(*parts)
        stored = cache.load_result(key, fp, delta)
        if stored is not None:
            try:
                return load(stored)
            except (KeyError, TypeError, ValueError) as exc:
                print(f"note: {cache.result_path(key, fp, delta)}: damaged spectral cache entry ({exc}); "
                      f"recomputed", file=sys.stderr)
        value = compute()
        cache.store_result(key, fp, delta, dump(value))
        return value

    def w_svd(self, key: str, W: Tensor) -> SVD:
        """The full thin SVD of ``W`` (:meth:`spectrum` with every triplet)."""
        return self.spectrum(key, W)

    def release(self, key: str) -> None:
        """Drop module ``key``'s W and SVDs when reading lazily (nothing with a loaded model, which keeps them
        for later tables): the module's tables are done, and at 7B each W and its SVD are hundreds of MB."""
        if self.retain:
            return
        with self._lock:
            for entry in [e for e in self._weights if e[1] == key]:
                del self._weights[entry]
            for entry in [e for e in self._spectra if e[0] == key]:
                del self._spectra[entry]
            self._fingerprints.pop(key, None)


class CheckpointWeights(Mapping):
    """``{module key: W}`` read lazily from a checkpoint's safetensors file(s): a 7B base never sits in memory whole.

    ``W`` of module ``key`` is the tensor ``key + ".weight"`` as stored (``nn.Linear`` layout ``(d_out, d_in)``,
    its own dtype: bf16 stays bf16 until the analysis upcasts it), read from the file that holds it each time it is
    asked for (memory-mapped, so one W costs its own bytes). Pass it as ``base`` to
    :func:`lora_analysis.tables.build.table7_tables`, which reads each W once, when its turn comes.

    What is read is checked here, so that the metrics get a finite floating-point matrix or the user gets one line
    naming the file and tensor: every file's header when the checkpoint is opened (a missing, empty, truncated or
    otherwise unreadable shard, a directory in a shard's place, an index naming a tensor its shard lacks), each W's
    dtype and shape from the header (:meth:`check_adapter`, before any work; :meth:`__getitem__`), and each W's
    values when it is read (NaN or Inf, e.g. an fp16 export that overflowed).

    For what this does not rebuild (GPT-2's transposed ``Conv1D``, a fused ``c_attn`` slice ``:q``, PiSSA/OLoRA
    residuals) use :class:`BaseWeights`, which loads the model through transformers.

    Args:
        path: a ``.safetensors`` file, or a directory holding ``model.safetensors`` or the shards listed in
            ``model.safetensors.index.json``.

    Raises:
        UserError: ``<file>: <problem>`` if the path holds no safetensors checkpoint, the index is unreadable or does
            not match its shards, or a shard is unreadable.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        import json

        path = Path(path)
        if path.is_dir():
            index = path / "model.safetensors.index.json"
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    raise UserError(f"{index}: not a safetensors index ({exc})") from None
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise UserError(f"{index}: weight_map is not a {{tensor name: shard file}} mapping")
                files = {name: path / shard for name, shard in weight_map.items()}
                # every shard's header now (a few KB each): a broken shard is one line before any work, not a
                # traceback when its turn comes
                headers = {shard: _header(shard, index) for shard in sorted(set(files.values()))}
                for name, shard in files.items():
                    if name not in headers[shard]:
                        raise UserError(f"{shard}: holds no tensor {name}, which {index.name} places there")
                specs = {name: headers[files[name]][name] for name in files}
            elif (path / "model.safetensors").is_file():
                specs = _header(path / "model.safetensors")
                files = dict.fromkeys(specs, path / "model.safetensors")
            else:
                raise UserError(f"{path}: no model.safetensors or model.safetensors.index.json")
        elif path.is_file():
            specs = _header(path)
            files = dict.fromkeys(specs, path)
        else:
            raise UserError(f"{path}: no such checkpoint file or directory")
        self.path = path
        self._files = {name[: -len(".weight")]: f for name, f in files.items() if name.endswith(".weight")}
        self._specs = {key: specs[key + ".weight"] for key in self._files}  # (safetensors dtype, shape)

    def _where(self, key: str) -> str:
        """``"<file>: tensor <key>.weight"``: where a message about ``key``'s W points."""
        return f"{self._files[key]}: tensor {key}.weight"

    def _check_spec(self, key: str, expected: tuple[int, int] | None = None, *, adapter: str = "") -> None:
        """``UserError`` unless W of ``key`` is, by the file's header, a non-empty floating-point matrix (of shape
        ``expected``, ΔW's in ``adapter``, if given). Reads no tensor data."""
        dtype, shape = self._specs[key]
        if not dtype.startswith(("F", "BF")):  # F64 F32 F16 BF16 F8_*; not I8 U8 I32 BOOL...
            raise UserError(f"{self._where(key)}: dtype {dtype} is not a floating-point weight (a quantised or "
                            "integer checkpoint: dequantise it first)")
        if len(shape) != 2 or 0 in shape:
            raise UserError(f"{self._where(key)}: shape {shape} is not a non-empty (d_out, d_in) matrix")
        if expected is not None and shape != expected:
            raise UserError(f"{self._where(key)}: shape {shape}, but ΔW of module {key} is {expected} in {adapter}: "
                            "adapter and checkpoint do not match")

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self._files.get(key)
        if file is None:
            raise KeyError(key)
        self._check_spec(key)
        try:
            with safe_open(str(file), framework="pt") as f:
                W = f.get_tensor(key + ".weight")
        except Exception as exc:  # the file changed since its header was read (safetensors raises its own types)
            raise UserError(f"{self._where(key)}: cannot read it ({_reason(exc)})") from None
        # A float64 sum of finite bf16/fp16/fp32 entries cannot overflow (3.4e38 x 1e9 entries < 1.8e308), so a
        # finite sum clears W in one pass; only a non-finite one (or an F64 W of huge entries) needs isfinite's mask
        if not math.isfinite(float(W.sum(dtype=torch.float64))):
            bad = int((~torch.isfinite(W)).sum())
            if bad:
                hint = " (float16 overflows beyond ±65504)" if W.dtype == torch.float16 else ""
                raise UserError(f"{self._where(key)}: {bad} of {W.numel()} entries are NaN or Inf{hint}")
        return W

    def check_adapter(self, adapter: LoadedAdapter) -> None:
        """``UserError`` (one line naming the adapter, or the file and tensor) unless the stored tensors are the
        ``W0`` that ``adapter``'s ΔW is added to: each a floating-point matrix of ΔW's shape (read from the headers),
        not for GPT-2's ``Conv1D`` (``fan_in_fan_out``: stored transposed), a slice of a fused
        weight (``c_attn:q``) or an init that adapts a residual of the stored weight (PiSSA, OLoRA); those need
        the model loaded (:class:`BaseWeights`, the CLI's ``--base`` without ``--lazy-base``)."""
        from lora.init_residual import base_changing_init

        where = str(adapter.path)
        route = "load the base model instead (--base DIR without --lazy-base; BaseWeights in Python)"
        if adapter.config.get("fan_in_fan_out"):
            raise UserError(f"{where}: fan_in_fan_out (GPT-2 Conv1D) weights are stored transposed and a lazy "
                            f"checkpoint reads tensors as stored: {route}")
        fused = next((k for k in adapter.factors if ":" in k), None)
        if fused is not None:
            raise UserError(f"{where}: module {fused} is a slice of a fused weight, which a lazy checkpoint does "
                            f"not cut: {route}")
        init = base_changing_init(adapter.config, where)
        if init is not None:
            raise UserError(f"{where}: init_lora_weights={init!r} adapts a residual of the stored weight, which a "
                            f"lazy checkpoint does not rebuild: {route}")
        for key, f in adapter.factors.items():  # dtype and shape from the headers: before any W is read
            if key in self._files:
                self._check_spec(key, (int(f.B.shape[0]), int(f.A.shape[1])), adapter=where)

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor to answer
        return key in self._files

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def _reason(exc: BaseException) -> str:
    """An exception's message on one line, first letter lower-case (safetensors' errors carry no file name)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:1].lower() + text[1:]


def _header(file: Path, index: Path | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor name: (safetensors dtype, shape)}`` from ``file``'s header (no tensor data is read).

    Raises:
        UserError: ``<file>: <problem>`` if it is missing (named by ``index``), not a regular file, empty, or not a
            readable safetensors file (truncated, a bad header).
    """
    from safetensors import safe_open

    named = f" (named in {index.name})" if index is not None else ""
    if not file.exists():
        raise UserError(f"{file}: no such file{named}")
    if not file.is_file():
        raise UserError(f"{file}: is {'a directory' if file.is_dir() else 'not a regular file'}, not a safetensors "
                        f"file{named}")
    try:
        if file.stat().st_size == 0:
            raise UserError(f"{file}: is empty (0 bytes), not a safetensors file{named}")
        with safe_open(str(file), framework="pt") as f:
            return {name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape())) for name in f.keys()}
    except UserError:
        raise
    except OSError as exc:
        raise UserError(f"{file}: {os_error_reason(exc)}") from None
    except Exception as exc:  # safetensors raises its own error types for a bad or truncated header
        raise UserError(f"{file}: not a readable safetensors file, truncated or damaged ({_reason(exc)})") from None

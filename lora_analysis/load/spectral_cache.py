"""W's top-k spectral data on disk, per base weight: a second report on the same base pays no SVD of W.

One file per weight matrix, ``<dir>/<module key>.<fingerprint>.safetensors``, holding ``U (d_out, k)``,
``S (k,)``, ``V (d_in, k)`` in float64 (each stored in its own memory order and given back in it, so a reloaded
SVD feeds every later product exactly as the computed one did: the numbers are bit-identical), the
certificate's tensors where the iterative route gave one, and in the header: the format, the module key, the
fingerprint of W's content (:func:`content_fingerprint`), ``k``, and a checksum of the tensors' bytes.

* A request for ``k`` triplets is a hit when the file holds at least ``k`` (``None``, all of them: a full SVD);
  a larger ``k`` is computed by the caller and :meth:`SpectralCache.store` replaces the file.
* W changed (another checkpoint, a re-download that differs) is another fingerprint, so another file: a miss,
  never a stale answer. Several bases can share one cache directory.
* Safe under concurrent use and after a kill: each file is written to a locked temporary sibling and renamed into
  place (:func:`lora.fsio.atomic_path`), so a reader sees the old file, the new one, or none; a killed writer's
  temporary is removed the next time the cache is opened. A damaged or truncated file (or one whose checksum,
  key, fingerprint or shapes do not match) is a ``note:`` and a miss: recomputed, never trusted.
* Beside W's SVDs it keeps results computed from W and a few parameters (:meth:`SpectralCache.load_result`,
  ``<key>.<W fingerprint>.<parts fingerprint>.json``): each adapter's **intruder count** on that W (the top-``k``
  of W + ΔW and the bounds that decide it: seconds per adapter at d = 4096) and **Table 7's sampled null** per k
  (≈ 3 s per W), so a report rerun on the same adapters (a new output folder, another figure option) recomputes
  none of them and new adapters on the base draw no null. The parts fingerprint hashes the float64 factors, the
  scaling and every parameter; the floats are stored as their shortest round-trip text, so a reloaded result is
  bit-identical.
* The cache is optional: a directory that cannot be created or written, or a disk that fills while a file is
  written, is one ``note:`` on stderr; the analysis goes on without storing (as the notebook cache,
  :mod:`lora_analysis.tables.cache`, does).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import threading
from pathlib import Path

import torch
from torch import Tensor

from lora.errors import UserError
from lora.fsio import atomic_path, remove_stale_temps
from lora_analysis.metrics.linalg import SVD

__all__ = ["SPECTRA_SUBDIR", "SpectralCache", "content_fingerprint", "factors_fingerprint"]

SPECTRA_SUBDIR = "analysis/spectra"  # <run>/analysis/spectra: the default place, beside the notebook cache
FORMAT = "1"
_TENSORS = ("U", "S", "V")
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def content_fingerprint(W: Tensor) -> str:
    """A hash of ``W``'s shape and float64 values: the same matrix gives the same fingerprint whichever route
    read it (a lazy bf16 checkpoint upcast to float64, or the loaded model's float32 upcast), as every float16,
    bfloat16 or float32 value is exact in float64."""
    t = W.detach().to(device="cpu", dtype=torch.float64).contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(t.shape)}:float64".encode())
    h.update(memoryview(t.numpy()).cast("B"))
    return h.hexdigest()


def factors_fingerprint(*parts: Tensor | float | int | str) -> str:
    """A hash of tensors (shape, float64 values) and plain values, in order: an adapter's ``A``, ``B``, scaling and
    the parameters of what was computed from them."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        if isinstance(part, Tensor):
            t = part.detach().to(device="cpu", dtype=torch.float64).contiguous()
            h.update(f"T{tuple(t.shape)}:".encode())
            h.update(memoryview(t.numpy()).cast("B"))
        else:
            h.update(f"V{part!r};".encode())
    return h.hexdigest()


def _checksum(tensors: dict[str, Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(memoryview(t.contiguous().numpy()).cast("B"))
    return h.hexdigest()


def _stored(t: Tensor) -> tuple[Tensor, str]:
    """``t`` as a contiguous tensor and how to give it back: ``"C"`` as is, ``"T"`` transposed (LAPACK's U is
    column-major: stored as its row-major transpose and handed back as the same column-major view)."""
    if t.ndim == 2 and not t.is_contiguous() and t.T.is_contiguous():
        return t.T, "T"
    return t.contiguous(), "C"


def _certificate_parts(svd: SVD) -> tuple[dict[str, Tensor], dict]:
    """The certificate of an iterative SVD (if any) as ``({name: tensor}, {name: json value})``."""
    cert = getattr(svd, "certificate", None)
    if cert is None:
        return {}, {}
    tensors, values = {}, {"class": type(cert).__name__}
    for f in dataclasses.fields(cert):
        v = getattr(cert, f.name)
        if isinstance(v, Tensor):
            tensors[f"certificate.{f.name}"] = v.detach().to("cpu").contiguous()
        else:
            values[f.name] = v
    return tensors, values


def _rebuild_certificate(tensors: dict[str, Tensor], values: dict):
    """The certificate object back from :func:`_certificate_parts`' pieces (``None`` if there was none)."""
    if not values:
        return None
    from lora_analysis.metrics import linalg

    cls = getattr(linalg, values.pop("class", ""), None)
    if cls is None:  # written by a version whose certificate class this one lacks: not trusted
        raise ValueError("unknown certificate class")
    fields = {name.partition(".")[2]: t for name, t in tensors.items() if name.startswith("certificate.")}
    return cls(**fields, **values)


class SpectralCache:
    """W's SVDs (top-k or full) on disk in ``directory``, keyed by module key and W's content fingerprint.

    Counters ``hits``, ``misses`` and ``writes`` say what happened (tests, logs). Thread-safe: the analysis
    serves modules from several threads.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        self.hits = self.misses = self.writes = 0
        self._off: str | None = None  # why storing stopped (one note, then silence)
        self._lock = threading.Lock()
        if self.dir.is_dir():
            try:
                remove_stale_temps(self.dir)  # what a killed writer left (a live writer's are locked, kept)
            except OSError:
                pass

    def path(self, key: str, fingerprint: str) -> Path:
        return self.dir / f"{_SAFE.sub('_', key)}.{fingerprint}.safetensors"

    def _note(self, text: str) -> None:
        print(f"note: {text}", file=sys.stderr)

    def load(self, key: str, fingerprint: str, k: int | None, shape: tuple[int, int]) -> SVD | None:
        """The stored SVD of W (module ``key``, content ``fingerprint``, ``shape``) if it holds at least ``k``
        triplets (``None``: all ``min(shape)``), else ``None``. A damaged file is a note and ``None``."""
        path = self.path(key, fingerprint)
        if not path.is_file():
            with self._lock:
                self.misses += 1
            return None
        try:
            svd, meta = self._read(path)
            if meta.get("key") != key or meta.get("fingerprint") != fingerprint:
                raise ValueError("written for another weight")
            n = svd.k
            if tuple(svd.U.shape) != (shape[0], n) or tuple(svd.V.shape) != (shape[1], n) or not 0 < n <= min(shape):
                raise ValueError(f"shapes U {tuple(svd.U.shape)}, V {tuple(svd.V.shape)} do not fit W {shape}")
        except Exception as exc:  # truncated, damaged, foreign: recompute, never trust it
            self._note(f"{path}: damaged spectral cache entry ({' '.join(str(exc).split())[:200]}); recomputed")
            with self._lock:
                self.misses += 1
            return None
        hit = n >= (min(shape) if k is None else k)
        with self._lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1
        return svd if hit else None

    @staticmethod
    def _read(path: Path) -> tuple[SVD, dict]:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        if _checksum(tensors) != meta.get("checksum"):
            raise ValueError("checksum mismatch")
        layout = json.loads(meta["layout"])
        parts = {}
        for name in _TENSORS:
            t = tensors[name]
            if t.dtype != torch.float64:
                raise ValueError(f"{name} is {t.dtype}")
            parts[name] = t.T if layout.get(name) == "T" else t
        cert = _rebuild_certificate(tensors, json.loads(meta.get("certificate", "{}")))
        extra = {"certificate": cert} if cert is not None else {}
        return SVD(parts["U"], parts["S"], parts["V"], **extra), meta

    def store(self, key: str, fingerprint: str, svd: SVD) -> bool:
        """Write ``svd`` for (``key``, ``fingerprint``), replacing what was there. On a failure (read-only or full
        disk) one ``note:`` line, and no more writes in this process; returns whether it was written."""
        if self._off is not None:
            return False
        tensors, layout = {}, {}
        for name in _TENSORS:
            tensors[name], layout[name] = _stored(getattr(svd, name).detach().to("cpu"))
        cert_tensors, cert_values = _certificate_parts(svd)
        tensors.update(cert_tensors)
        meta = {"format": FORMAT, "key": key, "fingerprint": fingerprint, "k": str(svd.k),
                "layout": json.dumps(layout), "certificate": json.dumps(cert_values), "checksum": _checksum(tensors)}
        from safetensors.torch import save_file

        return self._write(self.path(key, fingerprint), lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def _write(self, path: Path, write) -> bool:
        """``write(tmp)`` then rename onto ``path``; a full or read-only disk is one note (the cache is optional,
        the analysis goes on) and no more writes in this process."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                write(tmp)
        except (OSError, UserError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            with self._lock:
                first = self._off is None
                self._off = reason
            if first:
                self._note(f"{self.dir}: spectral cache not written ({reason}); the analysis goes on without it")
            return False
        with self._lock:
            self.writes += 1
        return True

    def result_path(self, key: str, fingerprint: str, delta: str) -> Path:
        return self.dir / f"{_SAFE.sub('_', key)}.{fingerprint}.{delta}.json"

    def load_result(self, key: str, fingerprint: str, delta: str) -> dict | None:
        """A stored per-adapter result (a JSON object) for W (``key``, ``fingerprint``) and ΔW (``delta``, from
        :func:`factors_fingerprint`), or ``None``; a damaged file is a note and ``None``."""
        path = self.result_path(key, fingerprint, delta)
        if not path.is_file():
            with self._lock:
                self.misses += 1
            return None
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("format") != FORMAT or doc.get("key") != key or doc.get("fingerprint") != fingerprint \
                    or doc.get("delta") != delta or not isinstance(doc.get("result"), dict):
                raise ValueError("written for another weight or adapter")
        except Exception as exc:
            self._note(f"{path}: damaged spectral cache entry ({' '.join(str(exc).split())[:200]}); recomputed")
            with self._lock:
                self.misses += 1
            return None
        with self._lock:
            self.hits += 1
        return doc["result"]

    def store_result(self, key: str, fingerprint: str, delta: str, result: dict) -> bool:
        """Write a per-adapter result (JSON-serialisable) atomically; a failure is the same one note as
        :meth:`store`."""
        if self._off is not None:
            return False
        text = json.dumps({"format": FORMAT, "key": key, "fingerprint": fingerprint, "delta": delta,
                           "result": result})
        return self._write(self.result_path(key, fingerprint, delta),
                           lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

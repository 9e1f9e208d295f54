"""The spectral cache (issue 24): W's SVD kept on disk per module key and W's content, so a second report on the
same base computes none. Hit, miss, larger k, stale fingerprint, damaged and half-written files, a full disk,
concurrent writers; the numbers read back are the computed ones, bit for bit and in the same memory layout."""

from __future__ import annotations

import dataclasses
import errno
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import lora_analysis.load.base as base_mod
from lora.fsio import TEMP_MARK
from lora_analysis.load.base import BaseWeights
from lora_analysis.load.spectral_cache import SpectralCache, content_fingerprint
from lora_analysis.metrics.linalg import SVD

KEY = "model.layers.0.self_attn.q_proj"


def _w(seed: int = 0, shape=(40, 30)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _same(a: SVD, b: SVD) -> None:
    for name in ("U", "S", "V"):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.equal(x, y) and x.stride() == y.stride(), name


def _files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def test_a_second_analysis_computes_no_svd_and_gets_the_same_bits(tmp_path):
    W = _w()
    first = BaseWeights(spectral_cache=SpectralCache(tmp_path))
    svd = first.spectrum(KEY, W)
    assert first.computed == 1 and first.spectral_cache.writes == 1 and len(_files(tmp_path)) == 1
    assert first.spectrum(KEY, W) is svd and first.computed == 1  # memory
    second = BaseWeights(spectral_cache=SpectralCache(tmp_path))
    again = second.spectrum(KEY, W.clone())  # the same content from another read
    assert second.computed == 0 and second.spectral_cache.hits == 1
    _same(svd, again)  # LAPACK's column-major U comes back column-major: later products are bit-identical


def test_a_changed_w_is_a_miss_and_both_bases_are_kept(tmp_path):
    W = _w()
    BaseWeights(spectral_cache=SpectralCache(tmp_path)).spectrum(KEY, W)
    W2 = W.clone()
    W2[3, 4] += 1e-12  # another checkpoint that differs in one entry
    assert content_fingerprint(W2) != content_fingerprint(W)
    bw = BaseWeights(spectral_cache=SpectralCache(tmp_path))
    got = bw.spectrum(KEY, W2)
    assert bw.computed == 1 and bw.spectral_cache.misses == 1 and len(_files(tmp_path)) == 2
    _same(got, base_mod.w_spectrum(W2))


def test_k_up_to_the_stored_k_is_a_hit_and_a_larger_k_replaces_it(tmp_path, monkeypatch):
    monkeypatch.setattr(base_mod, "DENSE_SVDVALS_MAX", 4)  # the top-k route at a test's size
    W = _w(shape=(40, 30))
    bw = BaseWeights(spectral_cache=SpectralCache(tmp_path))
    assert bw.spectrum(KEY, W, 3).k == 3 and bw.computed == 1
    bw = BaseWeights(spectral_cache=SpectralCache(tmp_path))
    assert bw.spectrum(KEY, W, 2).k == 3 and bw.computed == 0  # a hit: callers slice
    assert bw.spectrum(KEY, W, 5).k == 5 and bw.computed == 1  # more than stored: recomputed ...
    assert bw.spectrum(KEY, W, 4).k == 5 and bw.computed == 1
    (path,) = _files(tmp_path)  # ... and replaced
    bw = BaseWeights(spectral_cache=SpectralCache(tmp_path))
    assert bw.spectrum(KEY, W, 5).k == 5 and bw.computed == 0
    full = bw.spectrum(KEY, W)  # all of them
    assert full.k == 30 and bw.computed == 1
    ref = torch.linalg.svdvals(W)
    torch.testing.assert_close(full.S, ref, rtol=1e-12, atol=0)


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])  # a copy or a write cut short


def _garbage(p: Path) -> None:
    p.write_bytes(os.urandom(300))


def _flip_a_value(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-9] ^= 0x40  # inside the last tensor's bytes: the header still parses
    p.write_bytes(bytes(data))


def _empty(p: Path) -> None:
    p.write_bytes(b"")


@pytest.mark.parametrize("damage", [_truncate, _garbage, _flip_a_value, _empty])
def test_a_damaged_entry_is_a_note_and_recomputed(tmp_path, damage, capsys):
    W = _w()
    ref = BaseWeights(spectral_cache=SpectralCache(tmp_path)).spectrum(KEY, W)
    (path,) = _files(tmp_path)
    damage(path)
    capsys.readouterr()
    bw = BaseWeights(spectral_cache=SpectralCache(tmp_path))
    got = bw.spectrum(KEY, W)
    err = capsys.readouterr().err
    assert bw.computed == 1, err
    _same(got, ref)  # never wrong numbers
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"note: {path}: damaged spectral cache entry"), err
    bw = BaseWeights(spectral_cache=SpectralCache(tmp_path))  # replaced by a good one
    bw.spectrum(KEY, W)
    assert bw.computed == 0


def test_an_entry_of_another_weight_under_this_name_is_not_trusted(tmp_path, capsys):
    W, W2 = _w(0), _w(1)
    cache = SpectralCache(tmp_path)
    BaseWeights(spectral_cache=cache).spectrum(KEY, W2)
    os.replace(cache.path(KEY, content_fingerprint(W2)), cache.path(KEY, content_fingerprint(W)))
    bw = BaseWeights(spectral_cache=SpectralCache(tmp_path))
    got = bw.spectrum(KEY, W)
    assert bw.computed == 1 and "written for another weight" in capsys.readouterr().err
    _same(got, base_mod.w_spectrum(W))


def test_what_a_killed_writer_left_is_removed_and_is_a_miss(tmp_path):
    """kill -9 during a write leaves only the unlocked temporary sibling (the rename never happened)."""
    W = _w()
    cache = SpectralCache(tmp_path)
    final = cache.path(KEY, content_fingerprint(W))
    tmp_path.mkdir(exist_ok=True)
    leftover = tmp_path / f".{final.name}{TEMP_MARK}abc123"
    leftover.write_bytes(b"half a file")
    bw = BaseWeights(spectral_cache=SpectralCache(tmp_path))  # opening the cache removes it
    assert not leftover.exists()
    bw.spectrum(KEY, W)
    assert bw.computed == 1 and _files(tmp_path) == [final]


def test_a_full_disk_is_one_note_and_the_analysis_goes_on(tmp_path, monkeypatch, capsys):
    import safetensors.torch

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(errno.ENOSPC)} (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    bw = BaseWeights(spectral_cache=SpectralCache(tmp_path))
    capsys.readouterr()
    got = [bw.spectrum(f"m{i}", _w(i)) for i in range(3)]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"note: {tmp_path}: spectral cache not written")
    assert "no space left on device" in err[0]
    for i, svd in enumerate(got):
        _same(svd, base_mod.w_spectrum(_w(i)))
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_concurrent_writers_and_readers_see_whole_entries(tmp_path):
    W = _w(shape=(60, 50))
    ref = base_mod.w_spectrum(W)
    fp = content_fingerprint(W)
    errors = []

    def work():
        try:
            for _ in range(5):
                cache = SpectralCache(tmp_path)
                cache.store(KEY, fp, ref)
                got = cache.load(KEY, fp, None, tuple(W.shape))
                assert got is not None
                _same(got, ref)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(_files(tmp_path)) == 1 and not [p for p in tmp_path.iterdir() if TEMP_MARK in p.name]


@pytest.mark.skipif("certificate" not in {f.name for f in dataclasses.fields(SVD)},
                    reason="the engine's certified SVD is not merged yet")
def test_the_certificate_round_trips(tmp_path, monkeypatch):
    monkeypatch.setattr(base_mod, "DENSE_SVDVALS_MAX", 8)
    W = _w(shape=(120, 100))
    bw = BaseWeights(spectral_cache=SpectralCache(tmp_path))
    svd = bw.spectrum(KEY, W, 4)
    again = BaseWeights(spectral_cache=SpectralCache(tmp_path)).spectrum(KEY, W, 4)
    assert (svd.certificate is None) == (again.certificate is None)
    if svd.certificate is not None:
        for f in dataclasses.fields(svd.certificate):
            a, b = getattr(svd.certificate, f.name), getattr(again.certificate, f.name)
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


# ---------------------------------------------------------------------------------------------- per-adapter results
def _intruder_case(seed: int = 0):
    """W (60 x 50) and a rank-3 ΔW whose σ₁ is 3x W's σ₁₀ (intruder dimensions), as at 7B."""
    W = _w(seed, shape=(60, 50))
    g = torch.Generator().manual_seed(100 + seed)
    A, B = torch.randn(3, 50, generator=g, dtype=torch.float64), torch.randn(60, 3, generator=g, dtype=torch.float64)
    B *= 3 * float(torch.linalg.svdvals(W)[9]) / float(torch.linalg.svdvals(B @ A)[0])
    return W, A, B


def _memo_count(bw: BaseWeights, W, A, B, calls: list, k: int = 10):
    from lora_analysis.metrics.spectra import IntruderResult, intruder_dimensions

    def compute():
        calls.append(1)
        return intruder_dimensions(W, A, B, scaling=1.0, k=k)

    return bw.memo(KEY, W, ("intruders", A, B, 1.0, k), compute, IntruderResult.as_dict, IntruderResult.from_dict)


def test_an_adapters_intruder_count_is_kept_and_read_back_bit_for_bit(tmp_path):
    W, A, B = _intruder_case()
    calls: list = []
    first = _memo_count(BaseWeights(spectral_cache=SpectralCache(tmp_path)), W, A, B, calls)
    assert first.count > 0 and len(calls) == 1 and len(list(tmp_path.glob("*.json"))) == 1
    again = _memo_count(BaseWeights(spectral_cache=SpectralCache(tmp_path)), W.clone(), A.clone(), B.clone(), calls)
    assert len(calls) == 1  # a hit: nothing recomputed
    for name in ("singular_values", "max_cosine", "is_intruder"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert (again.indices, again.decided_by, again.threshold, again.side) == \
        (first.indices, first.decided_by, first.threshold, first.side)
    B2 = B.clone()
    B2[0, 0] += 1e-12  # another adapter: a miss, and both are kept
    _memo_count(BaseWeights(spectral_cache=SpectralCache(tmp_path)), W, A, B2, calls)
    _memo_count(BaseWeights(spectral_cache=SpectralCache(tmp_path)), W, A, B, calls, k=5)  # another parameter
    assert len(calls) == 3 and len(list(tmp_path.glob("*.json"))) == 3
    W2 = W.clone()
    W2[1, 1] += 1e-12  # another base
    _memo_count(BaseWeights(spectral_cache=SpectralCache(tmp_path)), W2, A, B, calls)
    assert len(calls) == 4


@pytest.mark.parametrize("damage", [_truncate, _garbage, _empty])
def test_a_damaged_result_is_a_note_and_recomputed(tmp_path, damage, capsys):
    W, A, B = _intruder_case(1)
    calls: list = []
    ref = _memo_count(BaseWeights(spectral_cache=SpectralCache(tmp_path)), W, A, B, calls)
    (path,) = tmp_path.glob("*.json")
    damage(path)
    capsys.readouterr()
    got = _memo_count(BaseWeights(spectral_cache=SpectralCache(tmp_path)), W, A, B, calls)
    err = capsys.readouterr().err
    assert len(calls) == 2 and got.indices == ref.indices
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"note: {path}: damaged spectral cache entry"), err
    _memo_count(BaseWeights(spectral_cache=SpectralCache(tmp_path)), W, A, B, calls)
    assert len(calls) == 2  # rewritten whole


def test_a_rerun_of_the_report_tables_recomputes_no_intruder_count_nor_table7_null(tmp_path, monkeypatch):
    """weight_tables on a lazy LLaMA-layout base above the dense threshold (lowered to the test's size), then again
    on a new BaseWeights with the same cache: every count read back, the spectra table identical."""
    import numpy as np
    import pandas as pd
    from llama_checkpoint import peft_adapter, save_llama

    import lora_analysis.tables.build as build
    from lora_analysis.load.adapters import load_adapter_dir

    ckpt = save_llama(tmp_path / "ckpt")
    adapter = load_adapter_dir(peft_adapter(ckpt, tmp_path / "a", r=4, scale=3.0))
    monkeypatch.setattr(build, "DENSE_SVDVALS_MAX", 8)  # below every W's width (q 32 x 32, v 16 x 32)
    calls, nulls = [], []
    real, real_null = build.intruder_dimensions, build.sampled_random_projection
    monkeypatch.setattr(build, "intruder_dimensions", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(build, "sampled_random_projection", lambda *a, **kw: nulls.append(1) or real_null(*a, **kw))

    def tables():
        bw = BaseWeights(ckpt, lazy=True, spectral_cache=SpectralCache(tmp_path / "c"))
        return build.weight_tables([adapter], bw, tables=("table7", "spectra"))

    first = tables()
    assert len(calls) == len(adapter.factors) == 4 and (first["spectra"]["n_intruders"] > 0).any()
    assert len(nulls) == 4  # Table 7's sampled null: once per W (and k)
    second = tables()
    assert len(calls) == 4 and len(nulls) == 4
    for name in ("table7", "spectra"):
        pd.testing.assert_frame_equal(first[name], second[name])
    # the kept null is the one table7_rows draws itself (same seeds, same pairs; GEMM blocking aside)
    from lora_analysis.load.base import CheckpointWeights

    plain = build.weight_tables([adapter], CheckpointWeights(ckpt), tables=("table7",))["table7"]  # inline draws
    for c in ("random_mean", "random_sd", "delta", "random", "z"):
        np.testing.assert_allclose(first["table7"][c], plain[c], rtol=1e-12, err_msg=c)

"""Metrics -> tidy long-format tables (pandas), one per paper artefact; the contract with figures and report.

Tables and their columns (``module`` is a module key, ``weight_type`` q/k/v/o, ``layer`` the block index):

* ``phi`` (Figures 3, 4, 6, 7): comparison, quantity, module, weight_type, layer, r1, r2, seed1, seed2, i, j, phi.
* ``fig8`` (Appendix H.3, Figure 8): module, weight_type, layer, rank, seed, source, i, j, phi.
* ``table7`` (Section 7.3, Table 7): module, weight_type, layer, rank, seed, d_out, d_in, top, delta, weight,
  random, w_norm, dw_norm, amplification, and the random null: random_expected, random_mean, random_sd,
  delta_over_random, z, amplification_random.
* ``spectra``: module, weight_type, layer, rank, seed, stable_rank, entropy_rank, energy_rank_90, dw_norm,
  n_intruders.
* ``dora`` (DoRA adapters, beside Table 7): module, weight_type, layer, rank, seed, d_out, d_in, top, the
  magnitude change mag_rel_mean, mag_rel_abs_mean, mag_rel_min, mag_rel_max, mag_rel_norm, and the directional
  dw_norm beside the effective dw_eff_norm, delta_eff, amplification_eff
  (:mod:`lora_analysis.metrics.dora`).
* ``singular_values``: module, weight_type, layer, rank, seed, index, sigma.
* ``quality`` (Tables 5 and 6): weight_set, method (``lora``, ``full``, ``probe``), rank, seed, alpha,
  trainable_params, val_metric, metric_name, wall_s.

Every number comes from the pure metrics in :mod:`lora_analysis.metrics`; every file read goes through
:mod:`lora_analysis.load` and :mod:`lora.rundir`. W's SVD is computed once
per weight matrix (:class:`lora_analysis.load.base.BaseWeights`) and shared by every rank and seed.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import sys
import zlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from lora.errors import UserError
from lora.fsio import atomic_path
from lora.threads import analysis_workers, process_group, torch_threads
from lora_analysis.load.adapters import LoadedAdapter, module_layer, weight_type
from lora_analysis.load.base import BaseWeights, CheckpointWeights, w_spectrum
from lora_analysis.load.run import Run
from lora_analysis.metrics.dora import dora_summary
from lora_analysis.metrics.linalg import (
    DENSE_SVDVALS_MAX,
    SVD,
    as_float64_matrix,
    factored_svd,
    right_singular_vectors,
    top_singular,
)
from lora_analysis.metrics.projection import RandomProjection, sampled_random_projection, table7_rows
from lora_analysis.metrics.spectra import IntruderResult, intruder_dimensions, spectrum_summary
from lora_analysis.metrics.subspace import (
    delta_directions,
    init_control,
    phi_delta,
    phi_grid,
    phi_weight_vs_delta,
    random_phi_expected,
    random_phi_sampled,
    start_null,
    subspace_similarity,
)
from lora_analysis.tables.select import PAPER_D, PAPER_FIG8_RANKS, nearest_rank, rank_pair

__all__ = [
    "COLUMNS",
    "PAPER_FIG8_RANKS",
    "PAPER_RANK_PAIR",
    "analyse_run",
    "compared_rank_pairs",
    "adapted_layers",
    "dora_table",
    "fig8_layers_for",
    "fig8_table",
    "map_workers",
    "module_phi_grids",
    "phi_table",
    "quality_table",
    "random_phi_table",
    "singular_values_table",
    "spectra_table",
    "table7_table",
    "table7_tables",
    "torch_threads",
    "weight_tables",
    "write_tables",
]

COLUMNS: dict[str, list[str]] = {
    "phi": ["comparison", "quantity", "module", "weight_type", "layer", "r1", "r2", "seed1", "seed2", "i", "j", "phi"],
    "fig8": ["module", "weight_type", "layer", "rank", "seed", "source", "i", "j", "phi"],
    "table7": ["module", "weight_type", "layer", "rank", "seed", "d_out", "d_in", "top", "delta", "weight", "random",
               "w_norm", "dw_norm", "amplification", "random_expected", "random_mean", "random_sd",
               "delta_over_random", "z", "amplification_random"],
    "spectra": ["module", "weight_type", "layer", "rank", "seed", "stable_rank", "entropy_rank", "energy_rank_90",
                "dw_norm", "n_intruders"],
    "singular_values": ["module", "weight_type", "layer", "rank", "seed", "index", "sigma"],
    "dora": ["module", "weight_type", "layer", "rank", "seed", "d_out", "d_in", "top", "mag_rel_mean",
             "mag_rel_abs_mean", "mag_rel_min", "mag_rel_max", "mag_rel_norm", "dw_norm", "dw_eff_norm", "delta_eff",
             "amplification_eff"],
    "quality": ["weight_set", "method", "rank", "seed", "alpha", "trainable_params", "val_metric", "metric_name",
                "wall_s"],
}
PAPER_RANK_PAIR = (8, 64)  # Figure 3
NULL_DRAWS = 32  # random pairs per Table 7 row for the null's spread (the paper shows one draw)
START_NULL_DRAWS = 16  # random B's per start for the start-only null of φ on ΔW (its mean: sd/4 of one draw)
PHI_QUANTITIES = ("A", "A-A_init", "A_init", "B", "dW", "dW-top", "start_null", "start_null-top", "expected_random")
FIG8_FRACTION = 0.1  # Figure 8 shows W's top directions up to about 10 % of d
# Above the dense threshold W's top 10 % is the report's largest cost (≈ 9 s per 4096² W on one core, against ≈ 2 s
# for the top 64 every other table needs), so Figure 8 is computed at this many evenly spaced layers there: the
# paper's Figure 8 is one layer (the 48th of 96) and its per-layer Figures 6 and 7 four (1, 32, 64, 96)
FIG8_LAYERS_LARGE = 5


def _empty(name: str) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="float64") for c in COLUMNS[name]})


def concat_table(name: str, frames: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(frames, ignore_index=True)[COLUMNS[name]] if frames else _empty(name)


def _ids(key: str) -> dict:
    return {"module": key, "weight_type": weight_type(key), "layer": module_layer(key)}


def _seed(a: LoadedAdapter) -> int:
    return -1 if a.seed is None else int(a.seed)


def _grid_frame(grid: Tensor, meta: Mapping) -> pd.DataFrame:
    """An ``(i_max, j_max)`` grid as rows ``meta..., i, j, phi`` (i, j 1-based)."""
    n_i, n_j = grid.shape
    i, j = np.meshgrid(np.arange(1, n_i + 1), np.arange(1, n_j + 1), indexing="ij")
    df = pd.DataFrame({"i": i.ravel(), "j": j.ravel(), "phi": grid.detach().to(torch.float64).numpy().ravel()})
    for k, v in meta.items():
        df[k] = v
    return df


def _common_keys(a1: LoadedAdapter, a2: LoadedAdapter, keys: Iterable[str] | None) -> list[str]:
    shared = [k for k in a1.factors if k in a2.factors]
    if keys is not None:
        wanted = list(keys)
        shared = [k for k in wanted if k in a1.factors and k in a2.factors]
    return shared


def module_seed(key: str, seed: int) -> int:
    """A deterministic per-module seed, so each module's random baseline is an independent draw."""
    return (zlib.crc32(key.encode()) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------- phi
def module_phi_grids(
    a1: LoadedAdapter, a2: LoadedAdapter, key: str, *, quantities: Sequence[str] = ("A", "A-A_init", "A_init")
) -> dict[str, Tensor]:
    """The φ grids of one module shared by two adapters, ``{quantity: (r1, r2) grid}`` (see :func:`phi_table`).

    A quantity that cannot be computed for this module is absent: ``A-A_init`` / ``A_init`` without
    ``init.safetensors`` in both adapters or where nothing was learned (A == A_init), ``B`` where a B is zero.

    Raises:
        UserError: if the module's factors act on different dimensions in the two adapters.
    """
    f1, f2 = a1.factors[key], a2.factors[key]
    if f1.A.shape[1] != f2.A.shape[1] or f1.B.shape[0] != f2.B.shape[0]:
        raise UserError(f"{a2.path}: module {key}: ΔW is ({f2.B.shape[0]}, {f2.A.shape[1]}) but "
                        f"({f1.B.shape[0]}, {f1.A.shape[1]}) in {a1.path}")
    grids: dict[str, Tensor] = {}
    if "A" in quantities:
        grids["A"] = subspace_similarity(f1.A, f2.A, side="A")
    init1, init2 = (a1.init_A or {}).get(key), (a2.init_A or {}).get(key)
    if {"A-A_init", "A_init"} & set(quantities) and init1 is not None and init2 is not None:
        try:
            ctl = init_control(f1.A, init1, f2.A, init2, side="A")
        except ValueError:  # nothing learned in one of them (A == A_init): the learned change has no subspace
            ctl = None
        if ctl is not None:
            if "A-A_init" in quantities:
                grids["A-A_init"] = ctl.phi_learned
            if "A_init" in quantities:
                grids["A_init"] = ctl.phi_init
    trained = bool(f1.B.abs().max() > 0) and bool(f2.B.abs().max() > 0)  # ΔW = 0 at step 0 has no subspace
    if "B" in quantities and trained:
        grids["B"] = subspace_similarity(f1.B, f2.B, side="B")
    if {"dW", "dW-top"} & set(quantities) and trained:
        # ΔW's own right singular vectors: ordered by what B·A learned, not by A's singular values, which the
        # random start can set (issue: φ(1,1) near 0 beside high φ(1, j >= 2) is a reordering inside A).
        on_delta = phi_delta(delta_directions(f1.A, f1.B, scaling=f1.scaling),
                             delta_directions(f2.A, f2.B, scaling=f2.scaling))
        grids.update({q: g for q, g in on_delta.items() if q in quantities})
    if {"start_null", "start_null-top"} & set(quantities) and init1 is not None and init2 is not None:
        # what the starts alone give φ on ΔW (nested starts share rows): the null claims 1 and 2 are read against
        null = start_null(init1, init2, d_out=int(f1.B.shape[0]), draws=START_NULL_DRAWS,
                          seed=module_seed(key, 7919 * f1.rank + f2.rank))
        grids.update({q: g for q, g in null.items() if q in quantities})
    if "expected_random" in quantities:
        grids["expected_random"] = random_phi_expected(f1.rank, f2.rank, d=int(f1.A.shape[1]))
    return grids


def phi_table(
    a1: LoadedAdapter,
    a2: LoadedAdapter,
    *,
    comparison: str,
    keys: Iterable[str] | None = None,
    quantities: Sequence[str] = PHI_QUANTITIES,
    workers: int | None = None,
) -> pd.DataFrame:
    """φ grids between two adapters for every module they share (Section 7.2, Figures 3, 4, 6, 7).

    Quantities: ``"A"`` φ(A_1, A_2) on right singular vectors (the paper); ``"A-A_init"`` on the learned change and
    ``"A_init"`` between the starting points (both need ``init.safetensors`` in the two adapters; skipped for a
    module where either is missing or nothing was learned); ``"B"`` on B's left singular vectors (footnote 7;
    skipped where a B is still zero); ``"dW"`` on ΔW = s·B·A's own right singular vectors (ordered by what was
    learned; skipped where a B is zero); ``"dW-top"`` the same without ΔW's top direction (``i`` counts
    directions 2..i+1; claim 2); ``"start_null"`` and ``"start_null-top"`` what the starting points alone give
    those two (:func:`~lora_analysis.metrics.subspace.start_null`, needs ``init.safetensors``); and
    ``"expected_random"`` the analytic ``max(i, j)/d_in``. The start-only null is drawn for ``comparison="rank"``
    only (independent seeds share no start).

    Args:
        a1, a2: the adapters; rows have ``r1 = a1``'s module rank, ``r2 = a2``'s.
        comparison: ``"rank"`` or ``"seed"`` (written to the table).
        keys: module keys to compare (default: all shared keys).
        workers: modules compared at once (threads; default and meaning as in :func:`table7_tables`).

    Raises:
        UserError: if the adapters share no module, or a module's factors act on different dimensions.
    """
    shared = _common_keys(a1, a2, keys)
    if not shared:
        raise UserError(f"{a1.path} and {a2.path}: no module in common to compare")
    if comparison != "rank":
        # Independent seeds share no start: their null is the random one, and the start-only null (0.2-0.3 s per
        # module pair) is drawn for rank comparisons only
        quantities = tuple(q for q in quantities if not q.startswith("start_null"))

    def frames_of(key: str) -> list[pd.DataFrame]:
        f1, f2 = a1.factors[key], a2.factors[key]
        meta = {"comparison": comparison, **_ids(key), "r1": f1.rank, "r2": f2.rank, "seed1": _seed(a1),
                "seed2": _seed(a2)}
        grids = module_phi_grids(a1, a2, key, quantities=quantities)
        return [_grid_frame(grids[q], {**meta, "quantity": q}) for q in quantities if q in grids]

    return concat_table("phi", list(itertools.chain.from_iterable(map_workers(frames_of, shared, workers))))


def map_workers(fn, jobs: Sequence, workers: int | None) -> list:
    """``[fn(job) for job in jobs]``, computed by up to ``workers`` threads (:func:`lora.threads.analysis_workers`)
    when there is more than one job; results in the order of ``jobs``. Threads, not processes: torch releases the
    GIL inside its kernels, and the adapters and weights are shared instead of pickled."""
    n = min(analysis_workers(workers), len(jobs))
    if n <= 1:
        return [fn(job) for job in jobs]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(fn, jobs))


def random_phi_table(
    adapter: LoadedAdapter, *, r1: int, r2: int, keys: Iterable[str] | None = None, seed: int = 0
) -> pd.DataFrame:
    """The random panel of Figure 4: φ between two seeded Gaussian ``(r1, d_in)`` and ``(r2, d_in)`` matrices per
    module (``d_in`` from the adapter's A), rows with ``comparison="random"``, ``quantity="A"``, seeds ``-1``."""
    frames = []
    for key in adapter.factors if keys is None else keys:
        d = int(adapter.factors[key].A.shape[1])
        grid = random_phi_sampled(min(r1, d), min(r2, d), d=d, seed=module_seed(key, seed))
        meta = {"comparison": "random", "quantity": "A", **_ids(key), "r1": min(r1, d), "r2": min(r2, d),
                "seed1": -1, "seed2": -1}
        frames.append(_grid_frame(grid, meta))
    return concat_table("phi", frames)


# ---------------------------------------------------------------------------------------------- W vs ΔW
WEIGHT_TABLES = ("table7", "dora", "spectra", "fig8")  # the tables that need the base weight W


def _check_mapping(adapter: LoadedAdapter, base: Mapping[str, Tensor], keys: list[str]) -> None:
    """``UserError`` if a plain-mapping ``base`` lacks one of ``keys``, or (a lazy checkpoint) stores W in a form
    it does not rebuild for ``adapter`` (:meth:`~lora_analysis.load.base.CheckpointWeights.check_adapter`)."""
    if isinstance(base, CheckpointWeights):
        base.check_adapter(adapter)
    missing = [k for k in keys if k not in base]
    if missing:
        raise UserError(f"{adapter.path}: module {missing[0]}: no base weight given")


def _top(adapter: LoadedAdapter, key: str, shape: tuple[int, int], top: int | None) -> int:
    """The subspace dimension k for a module of W's ``shape``: ``top``, or its rank; ``UserError`` if it exceeds
    either."""
    r = adapter.factors[key].rank
    k = r if top is None else top
    if not 0 < k <= min(r, *shape):
        raise UserError(f"top k = {top} must be in 1..{min(r, *shape)} for module {key} of {adapter.path}")
    return k


# bump when the intruder count or Table 7's sampled null changes what it stores: older cached results are then misses
RESULT_CACHE_VERSION = "1"


def _spectra_row(adapter: LoadedAdapter, key: str, W: Tensor | None, w_svd: SVD | None, intruder_k: int,
                 w0_full=None, base: BaseWeights | None = None) -> dict:
    """One ``spectra`` row; ``n_intruders`` is -1 without ``W``. With ``base`` and W above ``DENSE_SVDVALS_MAX``,
    the intruder count is kept in its spectral cache (:meth:`BaseWeights.memo`): a rerun on the same adapters
    recomputes none (each is seconds at d = 4096)."""
    f = adapter.factors[key]
    s = spectrum_summary(f.A, f.B, scaling=f.scaling, fraction=0.9)
    n_intr = -1
    if W is not None:
        # a partial SVD decides only with its certificate (a dense fallback truncated to k has none)
        partial = w_svd is not None and w_svd.k < min(W.shape) and w_svd.certificate is None
        w0 = None if partial else w_svd
        k, threshold, side = min(intruder_k, *W.shape), 0.5, "left"  # the paper's and peft's ε, output side

        def count() -> IntruderResult:
            return intruder_dimensions(W, f.A, f.B, scaling=f.scaling, k=k, threshold=threshold, side=side,
                                       w0_svd=w0, w0_full=w0_full)

        if base is None or min(W.shape) <= DENSE_SVDVALS_MAX:  # a dense count costs milliseconds: not kept
            n_intr = count().count
        else:
            parts = ("intruders", RESULT_CACHE_VERSION, f.A, f.B, float(f.scaling), k, threshold, side,
                     -1 if w0 is None else w0.k)
            n_intr = base.memo(key, W, parts, count, IntruderResult.as_dict, IntruderResult.from_dict).count
    return {**_ids(key), "rank": f.rank, "seed": _seed(adapter), "stable_rank": s.stable_rank,
            "entropy_rank": s.effective_rank, "energy_rank_90": s.energy_rank, "dw_norm": s.frobenius,
            "n_intruders": n_intr}


def weight_tables(
    adapters: Sequence[LoadedAdapter],
    base: BaseWeights | Mapping[str, Tensor],
    *,
    keys: Sequence[Iterable[str]] | None = None,
    tables: Collection[str] = WEIGHT_TABLES,
    fig8: Collection[int] = (),
    fig8_layers: Collection[int] | None = None,
    intruders: bool = True,
    top: int | None = None,
    random_seed: int = 0,
    null_draws: int = NULL_DRAWS,
    intruder_k: int = 10,
    i_max: int | None = None,
    fig8_random: bool = True,
    workers: int | None = None,
    progress: bool = False,
) -> dict[str, pd.DataFrame]:
    """Every table that needs the base weight W, in ONE pass over the modules (module-major): each W is read once,
    every adapter adapting it is served (Table 7, DoRA, spectra with intruders, Figure 8), and W is released
    (:meth:`~lora_analysis.load.base.BaseWeights.release`) before the next; so a 7B base streams through memory
    ``workers`` matrices at a time. Rows come back in adapter-major order (each adapter's modules in its order),
    exactly as the per-adapter functions (:func:`table7_tables`, :func:`dora_table`, :func:`spectra_table`,
    :func:`fig8_table`) give them, with the same numbers: every module's rows are computed by the same operations
    whichever thread computes them.

    W's SVD is asked for once per module (:meth:`~lora_analysis.load.base.BaseWeights.spectrum`, with the
    spectral cache; :func:`~lora_analysis.load.base.w_spectrum` for a plain mapping) with the largest number of
    triplets any table needs: all of them for the intruder count (today's :func:`~lora_analysis.metrics.spectra.
    intruder_dimensions` decides on W's full SVD), else Figure 8's ``i_max``; Table 7's "W" column takes W's singular
    values from it where it holds them (below ``DENSE_SVDVALS_MAX`` the full SVD, as always).

    Args:
        adapters: the adapters. base: the run's :class:`~lora_analysis.load.base.BaseWeights`, or
            ``{module key: W}`` (e.g. a :class:`~lora_analysis.load.base.CheckpointWeights`).
        keys: per adapter, its module keys (default: all of each adapter's modules).
        tables: which of ``table7``, ``dora``, ``spectra``, ``fig8`` to compute.
        fig8: indices of the adapters that get Figure 8 (in this order in the table).
        fig8_layers: the layers whose modules get Figure 8 (``None``: every layer; see :func:`fig8_layers_for`).
        intruders: count intruder dimensions in ``spectra`` (else ``n_intruders`` is -1).
        top, random_seed, null_draws: Table 7's (:func:`table7_tables`); ``random_seed`` also seeds Figure 8's
            random ``A`` (:func:`fig8_table`). intruder_k: :func:`spectra_table`'s. i_max, fig8_random:
            :func:`fig8_table`'s ``i_max`` and ``random``.
        workers: modules computed at once (threads; :func:`map_workers`). progress: one bar over the modules.

    Raises:
        UserError: before any W is read, if a module is missing from the base or does not fit ΔW's shape, or
            ``top`` exceeds a module's rank.
    """
    from tqdm import tqdm  # plain text bars: tqdm.auto warns without ipywidgets in a notebook

    bw = base if isinstance(base, BaseWeights) else None
    ks_of = [list(a.factors) if keys is None else list(keys[i]) for i, a in enumerate(adapters)]
    fig8 = list(fig8) if "fig8" in tables else []
    modules: dict[tuple[str, object], list[int]] = {}  # (key, W's source) -> adapters adapting it, in order
    for i, a in enumerate(adapters):  # every check before any work
        if bw is not None:
            bw.check(a, ks_of[i])
        else:
            _check_mapping(a, base, ks_of[i])
        source = None if bw is None else bw.source(a)
        for key in ks_of[i]:
            if {"table7", "dora"} & set(tables):
                f = a.factors[key]
                _top(a, key, (f.B.shape[0], f.A.shape[1]), top)
            modules.setdefault((key, source), []).append(i)
    # under torchrun the modules are split over the ranks (i::N) and every rank gathers every row (below)
    rank, world = process_group()
    jobs = list(modules.items())[rank::world]
    bar = tqdm(total=len(jobs), desc="base weights", unit="module", disable=not progress, dynamic_ncols=True)

    def module_rows(job: tuple[tuple[str, object], list[int]]) -> dict[tuple[str, int, str], object]:
        (key, _), members = job
        W = (bw.weights(adapters[members[0]], [key])[key] if bw is not None
             else as_float64_matrix(base[key], name=f"base weight of {key}"))
        shape = (int(W.shape[0]), int(W.shape[1]))
        dense = min(shape) <= DENSE_SVDVALS_MAX
        n_w = min(i_max or max(1, round(FIG8_FRACTION * min(shape))), min(shape))
        count = "spectra" in tables and intruders
        drawn = any(i in fig8 for i in members) and (fig8_layers is None or module_layer(key) in fig8_layers)
        # one request for the most triplets any table needs: Figure 8's n_w, Table 7's largest k (its "W" column),
        # and the intruder count's head (W's top max(64, 4k) left vectors, as intruder_dimensions takes alone);
        # below DENSE_SVDVALS_MAX every request is the full dense SVD
        k_t7 = max(adapters[i].factors[key].rank if top is None else top for i in members) if "table7" in tables else 0
        k = max(n_w if drawn else 0, k_t7, max(64, 4 * intruder_k) if count else 0)
        k = min(k, min(shape)) or None
        svd = None
        if count or drawn or (bw is not None and "table7" in tables and dense):
            svd = bw.spectrum(key, W, k) if bw is not None else w_spectrum(W, k)
        out: dict[tuple[str, int, str], object] = {}
        full: list[SVD] = []

        def w0_full(W: Tensor = W) -> SVD:
            # W's dense SVD, for an intruder count its top directions cannot decide: once per W for every adapter
            if not full:
                full.append(top_singular(W))
            return full[0]

        if "table7" in tables:
            deltas = [(f.A, f.B, f.scaling, f.rank if top is None else top)
                      for f in (adapters[i].factors[key] for i in members)]
            k_max = max(t for *_, t in deltas)
            # W's singular values from its SVD where it holds them (below DENSE_SVDVALS_MAX a plain mapping's
            # Table 7 has always taken them from svdvals, kept so); else table7_rows' own (block Krylov above it)
            w_values = svd.S if svd is not None and svd.k >= k_max and (bw is not None or not dense) else None
            seed_m = module_seed(key, random_seed)
            nulls = None
            if bw is not None and not dense and null_draws >= 2:
                # the sampled null is per W and k, not per adapter (a 4096 x 33k GEMM per k at 7B): kept in the
                # spectral cache beside W's SVD, so a rerun or new adapters on this base draw it only once
                nulls = {k: bw.memo(key, W, ("table7-null", RESULT_CACHE_VERSION, k, null_draws, seed_m + 1),
                                    functools.partial(sampled_random_projection, W, k, n=null_draws, seed=seed_m + 1),
                                    dataclasses.asdict, lambda d: RandomProjection(**d))
                         for k in sorted({t for *_, t in deltas})}
            got = table7_rows(W, deltas, random_seed=seed_m, null_draws=null_draws, w_values=w_values, nulls=nulls)
            for i, row in zip(members, got, strict=True):
                a = adapters[i]
                out[("table7", i, key)] = {**_ids(key), "rank": a.factors[key].rank, "seed": _seed(a),
                                           "d_out": shape[0], "d_in": shape[1], "top": row.rank,
                                           **{c: getattr(row, c) for c in COLUMNS["table7"][8:]}}
        for i in members:
            a = adapters[i]
            f = a.factors[key]
            if "dora" in tables and a.magnitude:
                original = bw.weights(a, [key], original=True)[key] if bw is not None else W
                kd = _top(a, key, shape, top)
                d = dora_summary(W, f.A, f.B, a.magnitude[key], scaling=f.scaling, top=kd,
                                 reference_norms=torch.linalg.vector_norm(original, dim=1))
                out[("dora", i, key)] = {**_ids(key), "rank": f.rank, "seed": _seed(a), "d_out": shape[0],
                                         "d_in": shape[1], "top": kd, **d.as_dict()}
            if "spectra" in tables:
                out[("spectra", i, key)] = _spectra_row(a, key, W if count else None, svd, intruder_k,
                                                        w0_full=w0_full, base=bw)
            if i in fig8 and drawn:
                ws = svd.truncate(n_w)
                meta = {**_ids(key), "rank": f.rank, "seed": _seed(a)}
                grid = phi_weight_vs_delta(W, f.A, f.B, scaling=f.scaling, i_max=n_w, w_svd=ws)  # the metric owns it
                frames = [_grid_frame(grid, {**meta, "source": "delta"})]
                if fig8_random:
                    g = torch.Generator().manual_seed(module_seed(key, random_seed + f.rank))
                    A_rand = torch.randn(f.rank, shape[1], generator=g, dtype=torch.float64)
                    frames.append(_grid_frame(phi_grid(ws.V, right_singular_vectors(A_rand)),
                                              {**meta, "source": "random"}))
                out[("fig8", i, key)] = frames
        del W, svd
        if bw is not None:
            bw.release(key)  # a lazy base: this module's W and SVD are done with
        bar.update(1)
        return out

    try:
        done: dict = {}
        for part in map_workers(module_rows, jobs, workers):
            done.update(part)
    finally:
        bar.close()
    if world > 1:
        import torch.distributed as dist

        parts: list = [None] * world
        dist.all_gather_object(parts, done)  # every rank gets every module's rows (rank 0 renders)
        done = {key: rows for part in parts for key, rows in part.items()}
    result: dict[str, pd.DataFrame] = {}
    for name in ("table7", "dora", "spectra"):
        if name in tables:
            rows = [done[(name, i, key)] for i in range(len(adapters)) for key in ks_of[i]
                    if (name, i, key) in done]
            result[name] = pd.DataFrame(rows, columns=COLUMNS[name]) if rows else _empty(name)
    if "fig8" in tables:
        result["fig8"] = concat_table("fig8", [fr for i in fig8 for key in ks_of[i] for fr in done.get(("fig8", i, key), ())])
    return result


def adapted_layers(adapters: Sequence[LoadedAdapter], keys: Sequence[Iterable[str]] | None = None) -> list[int]:
    """The transformer blocks the adapters' modules (``keys``, default all) sit in, ascending."""
    ks = [list(a.factors) if keys is None else list(keys[i]) for i, a in enumerate(adapters)]
    return sorted({module_layer(k) for kk in ks for k in kk})


def fig8_layers_for(adapters: Sequence[LoadedAdapter], keys: Sequence[Iterable[str]] | None = None,
                    choice: str | Collection[int] = "auto") -> list[int] | None:
    """The layers that get Figure 8 (``None``: every layer).

    ``choice``: ``"all"``; a collection of layer indices (each must be adapted); or ``"auto"``: every layer while
    every adapted W is at most ``DENSE_SVDVALS_MAX`` wide (W's full SVD is computed anyway), else
    :data:`FIG8_LAYERS_LARGE` evenly spaced adapted layers, first and last included (e.g. 0, 8, 16, 23, 31 of 32).
    Shapes come from the factors (``B (d_out, r)``, ``A (r, d_in)``): no W is read.
    """
    ks = [list(a.factors) if keys is None else list(keys[i]) for i, a in enumerate(adapters)]
    layers = adapted_layers(adapters, ks)
    if isinstance(choice, str):
        if choice == "all":
            return None
        if choice != "auto":
            raise ValueError(f"fig8 layers: expected 'auto', 'all' or layer indices, got {choice!r}")
        widths = [min(a.factors[k].B.shape[0], a.factors[k].A.shape[1]) for a, kk in zip(adapters, ks, strict=True)
                  for k in kk]
        if not widths or max(widths) <= DENSE_SVDVALS_MAX or len(layers) <= FIG8_LAYERS_LARGE:
            return None
        picks = np.linspace(0, len(layers) - 1, FIG8_LAYERS_LARGE).round().astype(int)
        return sorted({layers[int(p)] for p in picks})
    wanted = sorted({int(x) for x in choice})
    missing = [x for x in wanted if x not in layers]
    if missing or not wanted:
        raise UserError(f"Figure 8 layers: layer(s) {', '.join(map(str, missing)) or '(none given)'} not adapted; "
                        f"adapted layers: {', '.join(map(str, layers))}")
    return wanted


def fig8_table(
    adapter: LoadedAdapter,
    base: BaseWeights | Mapping[str, Tensor],
    *,
    keys: Iterable[str] | None = None,
    i_max: int | None = None,
    random: bool = True,
    random_seed: int = 0,
) -> pd.DataFrame:
    """φ(W's top-i right singular vectors, ΔW's top-j) for every module (Appendix H.3, Figure 8).

    Args:
        adapter: the adapter (ΔW = s·B·A per module).
        base: :class:`~lora_analysis.load.base.BaseWeights` (shared SVD cache) or ``{module key: W (d_out, d_in)}``.
        i_max: W's directions (default ``round(0.1 · min(d_out, d_in))``, as the paper's ~10 % of d).
        random: add ``source="random"`` rows: a seeded Gaussian ``A`` of the same rank in place of ΔW.
    """
    return weight_tables([adapter], base, keys=None if keys is None else [keys], tables=("fig8",), fig8=[0],
                         i_max=i_max, fig8_random=random, random_seed=random_seed)["fig8"]


def table7_table(
    adapter: LoadedAdapter,
    base: BaseWeights | Mapping[str, Tensor],
    *,
    keys: Iterable[str] | None = None,
    top: int | None = None,
    random_seed: int = 0,
    null_draws: int = NULL_DRAWS,
) -> pd.DataFrame:
    """Table 7 (Section 7.3) for every module of one adapter: ‖UᵀWV‖_F for ΔW's, W's own and a random top-k
    subspace, ‖W‖_F, ‖ΔW‖_F (with s) and the amplification ‖ΔW‖_F / ‖UᵀWV‖_F. ``k = top`` or the module's rank.

    Beside them the random null (:func:`lora_analysis.metrics.projection.table7_row`): the analytic expectation,
    the mean and sd of ``null_draws`` random pairs, the margin ``delta / random_expected``, the z-score and the
    amplification a same-norm ΔW in a random subspace would have. :func:`table7_tables` for several adapters.

    Raises:
        UserError: if ``top`` exceeds a module's rank.
    """
    return table7_tables([adapter], base, keys=None if keys is None else [keys], top=top, random_seed=random_seed,
                         null_draws=null_draws)


def table7_tables(
    adapters: Sequence[LoadedAdapter],
    base: BaseWeights | Mapping[str, Tensor],
    *,
    keys: Sequence[Iterable[str]] | None = None,
    top: int | None = None,
    random_seed: int = 0,
    null_draws: int = NULL_DRAWS,
    workers: int | None = None,
) -> pd.DataFrame:
    """:func:`table7_table` of each adapter, concatenated in order, with every W's rows computed together.

    All ranks and seeds that adapt one W are one :func:`~lora_analysis.metrics.projection.table7_rows` call: one
    GEMM ``W @ [V_1 … V_n, random and null V's]``; the random pair and the sampled null (seeded per module by
    ``random_seed``, as :func:`table7_table` always did) are drawn once per W and k and shared by every rank and
    seed of that k, which gives the same numbers as drawing them per row. W's column needs only W's singular
    values: up to ``DENSE_SVDVALS_MAX`` they come from the shared SVD (which Figure 8 and the intruder count need
    anyway), above it from :func:`~lora_analysis.metrics.linalg.top_singular_values` (block Krylov).

    Args:
        keys: per adapter, the module keys (default: all of each adapter's modules).
        workers: W matrices computed at once, each in its own thread running torch's ops on the threads the
            process already has (default: the cores available divided by those threads). The numbers do not
            depend on it: each W's rows are computed by the same operations in the same order. W is read (and
            upcast) only when its turn comes, so a 7B base streams through memory ``workers`` matrices at a time
            (:func:`weight_tables`).
    """
    return weight_tables(adapters, base, keys=keys, tables=("table7",), top=top, random_seed=random_seed,
                         null_draws=null_draws, workers=workers)["table7"]


def dora_table(
    adapter: LoadedAdapter,
    base: BaseWeights | Mapping[str, Tensor],
    *,
    keys: Iterable[str] | None = None,
    top: int | None = None,
) -> pd.DataFrame:
    """DoRA's magnitude change and effective update per module (:func:`lora_analysis.metrics.dora.dora_summary`),
    reported beside Table 7, which DoRA gets on its directional update ``s·B·A``. Empty for a plain LoRA adapter.

    The magnitude is compared with the norms it started from: ``‖W0‖_c``, or for PiSSA/OLoRA (whose ``W0`` is
    the residual) the original weight's, which :class:`~lora_analysis.load.base.BaseWeights` gives with
    ``original=True``.
    """
    if not adapter.magnitude:
        return _empty("dora")
    return weight_tables([adapter], base, keys=None if keys is None else [keys], tables=("dora",), top=top)["dora"]


def spectra_table(
    adapter: LoadedAdapter,
    base: BaseWeights | Mapping[str, Tensor] | None = None,
    *,
    keys: Iterable[str] | None = None,
    intruder_k: int = 10,
) -> pd.DataFrame:
    """ΔW's spectrum summary per module: stable rank, entropy effective rank, 90 %-energy rank, ‖ΔW‖_F and the
    number of intruder dimensions among the top ``intruder_k`` directions of W0 + ΔW (needs ``base``;
    ``n_intruders`` is ``-1`` without it)."""
    if base is not None:
        return weight_tables([adapter], base, keys=None if keys is None else [keys], tables=("spectra",),
                             intruder_k=intruder_k)["spectra"]
    rows = [_spectra_row(adapter, key, None, None, intruder_k) for key in (adapter.factors if keys is None else keys)]
    return pd.DataFrame(rows, columns=COLUMNS["spectra"]) if rows else _empty("spectra")


def singular_values_table(adapter: LoadedAdapter, *, keys: Iterable[str] | None = None) -> pd.DataFrame:
    """σ_k(ΔW) per module from the factored SVD (k = 1..min(r, d_out, d_in))."""
    frames = []
    for key in adapter.factors if keys is None else keys:
        f = adapter.factors[key]
        S = factored_svd(f.A, f.B, scaling=f.scaling).S.numpy()
        df = pd.DataFrame({"index": np.arange(1, len(S) + 1), "sigma": S})
        for k, v in {**_ids(key), "rank": f.rank, "seed": _seed(adapter)}.items():
            df[k] = v
        frames.append(df)
    return concat_table("singular_values", frames)


# ---------------------------------------------------------------------------------------------- quality
def quality_table(run: Run) -> pd.DataFrame:
    """Tables 5 and 6 data: one row per grid point and the frozen linear probe (:meth:`Run.quality_rows`), then
    the Table 5 budget run's points (``<run>/table5``) where the run has one. Empty (with the columns) for a
    directory of adapters without training metrics."""
    rows = run.quality_rows()
    table = pd.DataFrame(rows, columns=COLUMNS["quality"]) if rows else _empty("quality")
    if run.table5 is not None:
        extra = quality_table(run.table5)
        extra = extra[extra["weight_set"] != "linear probe"]
        # the q,v point of the budget run may duplicate a rank-sweep point: keep one row per (set, rank, seed)
        both = pd.concat([table, extra], ignore_index=True)
        table = both.drop_duplicates(subset=["weight_set", "rank", "seed"], keep="first")
    return table


# ---------------------------------------------------------------------------------------------- a whole run
def compared_rank_pairs(adapters: Mapping[tuple[int, int], LoadedAdapter],
                        ranks_compared: tuple[int, int] = PAPER_RANK_PAIR) -> list[tuple[int, int]]:
    """The ``(r_small, r_large)`` pairs a run's rank comparison uses (``adapters``: ``{(rank, seed): adapter}``,
    two ranks or more): the paper's literal pair (nearest 8 vs 64), then, if different, the pair nearest its r/d
    (8 and 64 of GPT-3's d = 12,288, scaled to this model's d_in)."""
    present_r = sorted({r for r, _ in adapters})
    d = int(next(iter(next(iter(adapters.values())).factors.values())).A.shape[1])
    pairs = [rank_pair(present_r, small=ranks_compared[0], large=ranks_compared[1])]
    scaled = rank_pair(present_r, small=ranks_compared[0] * d / PAPER_D, large=ranks_compared[1] * d / PAPER_D)
    return pairs + ([scaled] if scaled not in pairs else [])


def analyse_run(
    run: Run | str | os.PathLike,
    *,
    base: str | os.PathLike | BaseWeights | None = None,
    layers: Sequence[int] | None = None,
    ranks: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    weight_set: str | None = None,
    ranks_compared: tuple[int, int] = PAPER_RANK_PAIR,
    fig8_ranks: Sequence[int] = PAPER_FIG8_RANKS,
    intruders: bool = True,
    progress: bool = True,
    threads: int | None = 1,
    fig8_layers: str | Collection[int] = "auto",
) -> dict[str, pd.DataFrame]:
    """Every Section 7 table of a run (:class:`~lora_analysis.load.run.Run`, or a directory opened here).

    What is computed (weight set default ``q,v``; every adapted layer unless ``layers``):

    * ``phi``: the rank comparison r_small vs r_large (the ranks present nearest 8 and 64, as Figure 3, and those
      nearest the paper's r/d) for every seed trained at both; the seed comparison of every pair of seeds at the
      largest rank (Figure 4; the empirical null of independent replicates); and the random Gaussian baseline.
      Adapters that record no seed (peft's) are replicates 0, 1, ... of their rank in name order (a note says so).
    * ``table7``, ``spectra``, ``singular_values``: every adapter; ``dora``: every DoRA adapter.
    * ``fig8``: the ranks nearest 4, 8 and 64 at every seed, with a random A of each rank, at the layers of
      :func:`fig8_layers_for` (every layer up to d = 1024; 5 evenly spaced ones above).
    * ``quality``: :func:`quality_table`.

    Args:
        fig8_layers: ``"auto"``, ``"all"`` or layer indices (:func:`fig8_layers_for`).
        base: with a directory for ``run``: the ``--base`` override, or a :class:`BaseWeights` to share.
        ranks, seeds: restrict to these (each must exist in the run).
        intruders: count intruder dimensions (one dense SVD of W0 + ΔW per module and adapter).
        threads: torch threads while computing (default 1: the matrices are small, so thread start-up dominates
            and on a busy 2-core machine 2 threads ran ~20x slower than 1); ``None`` keeps torch's setting.

    Returns:
        ``{"phi", "fig8", "table7", "spectra", "singular_values", "dora", "quality"}`` -> DataFrame.
    """
    if not isinstance(run, Run):
        run = Run.open(run, base=base, option="run directory")
    with torch_threads(threads):
        adapters = _select_adapters(run, ranks=ranks, seeds=seeds, weight_set=weight_set)
        return _section7_tables(run, adapters, layers=layers, ranks_compared=ranks_compared, fig8_ranks=fig8_ranks,
                                intruders=intruders, progress=progress, fig8_layers=fig8_layers)


def _select_adapters(run: Run, *, ranks, seeds, weight_set) -> dict[tuple[int, int], LoadedAdapter]:
    """``{(rank, seed): adapter}`` of the weight set (default :meth:`RunIndex.default_weight_set`), in (rank,
    seed, name) order; adapters that record no seed become replicates 0, 1, ... of their rank in name order."""
    index = run.index
    ws = index.default_weight_set() if weight_set is None else weight_set
    avail_r = index.ranks(ws)
    for r in ranks or ():
        if r not in avail_r:
            raise UserError(f"ranks: {index.root} has no rank {r} for weight set {ws}; available: "
                            f"{', '.join(map(str, avail_r))}")
    use_r = sorted(set(ranks)) if ranks else avail_r
    avail_s = index.seeds(ws)
    for s in seeds or ():
        if s not in avail_s:
            raise UserError(f"seeds: {index.root} has no seed {s} for weight set {ws}; available: "
                            f"{', '.join(map(str, avail_s))}")
    entries = [e for e in index.find(weight_set=ws) if e.rank in use_r and (not seeds or e.seed in seeds)]
    adapters: dict[tuple[int, int], LoadedAdapter] = {}
    replicates: dict[int, list[str]] = {}
    for e in entries:  # in (weight set, rank, seed, name) order
        a = run.adapter(e)
        if a.seed is None:  # e.g. peft adapters: no seed recorded; same-rank ones are replicates in name order
            names = replicates.setdefault(e.rank, [])
            a = dataclasses.replace(a, seed=len(names))
            names.append(e.name)
        adapters[(e.rank, _seed(a))] = a
    for r, names in replicates.items():
        if len(names) > 1:
            print(f"note: {index.root}: {len(names)} adapters of rank {r} record no seed; treated as replicates "
                  f"0..{len(names) - 1} in name order: {', '.join(names)}", file=sys.stderr)
    if not adapters:
        raise UserError(f"{index.root}: no adapters left for weight set {ws} after selecting ranks/seeds")
    return adapters


def _section7_tables(run: Run, adapters: dict[tuple[int, int], LoadedAdapter], *, layers, ranks_compared,
                     fig8_ranks, intruders, progress, fig8_layers="auto") -> dict[str, pd.DataFrame]:
    from tqdm import tqdm  # plain text bars: tqdm.auto warns without ipywidgets in a notebook

    def keys_of(a: LoadedAdapter) -> list[str]:
        return [k for k in a.factors if layers is None or module_layer(k) in set(layers)]

    out: dict[str, list[pd.DataFrame]] = {k: [] for k in COLUMNS}
    present_r = sorted({r for r, _ in adapters})
    present_s = sorted({s for _, s in adapters})
    # Every table that needs W in one pass over the modules: each W read once for every rank and seed that adapts
    # it (Table 7, DoRA, spectra, Figure 8 at the ranks nearest 4, 8 and 64, every seed: claim 6's unit is the run)
    listed = list(adapters.values())
    position = {rs: i for i, rs in enumerate(adapters)}
    fig8 = [position[(r, s)] for r in sorted({nearest_rank(present_r, r) for r in fig8_ranks}) for s in present_s
            if (r, s) in adapters]
    keys = [keys_of(a) for a in listed]
    for name, table in weight_tables(listed, run.base, keys=keys, fig8=fig8,
                                     fig8_layers=fig8_layers_for(listed, keys, fig8_layers),
                                     intruders=intruders, progress=progress).items():
        out[name].append(table)
    for a in listed:
        out["singular_values"].append(singular_values_table(a, keys=keys_of(a)))
    bar = tqdm(total=2, desc="subspaces", disable=not progress, dynamic_ncols=True)
    if len(present_r) >= 2:
        pairs = compared_rank_pairs(adapters, ranks_compared)
        for r_small, r_large in pairs:
            for s in present_s:
                if (r_small, s) in adapters and (r_large, s) in adapters:
                    a1, a2 = adapters[(r_small, s)], adapters[(r_large, s)]
                    out["phi"].append(phi_table(a1, a2, comparison="rank", keys=keys_of(a1)))
        r_small, r_large = pairs[0]
        ref = adapters[(r_large, present_s[0])] if (r_large, present_s[0]) in adapters else next(iter(adapters.values()))
        out["phi"].append(random_phi_table(ref, r1=r_small, r2=r_large, keys=keys_of(ref)))
    bar.update(1)
    r_max = present_r[-1]
    seeds_at_max = sorted(s for r, s in adapters if r == r_max)
    for s1, s2 in itertools.combinations(seeds_at_max, 2):  # every pair of independent replicates: the empirical null
        a1, a2 = adapters[(r_max, s1)], adapters[(r_max, s2)]
        out["phi"].append(phi_table(a1, a2, comparison="seed", keys=keys_of(a1)))
    if len(seeds_at_max) >= 2:
        a1 = adapters[(r_max, seeds_at_max[0])]
        out["phi"].append(random_phi_table(a1, r1=r_max, r2=r_max, keys=keys_of(a1), seed=1))
    bar.update(1)
    bar.close()
    tables = {name: concat_table(name, frames) for name, frames in out.items() if name != "quality"}
    tables["quality"] = quality_table(run)
    return tables


class _Tee:
    """A text sink that writes what pandas formats to the CSV file and, UTF-8 encoded, to its gzip copy: the table
    is formatted once and never held whole as one string (at 7B Figure 8's CSV is hundreds of MB). pandas writes
    row by row, so chunks are gathered to about 1 MB before each write. Deflate's output depends on the bytes fed,
    not on how they are split, so the copy is byte-identical to compressing the whole CSV at once."""

    CHUNK = 1 << 20

    def __init__(self, text, packed) -> None:
        self.text, self.packed = text, packed
        self._parts: list[str] = []
        self._size = 0

    def write(self, chunk: str) -> int:
        self._parts.append(chunk)
        self._size += len(chunk)
        if self._size >= self.CHUNK:
            self.flush()
        return len(chunk)

    def flush(self) -> None:
        block = "".join(self._parts)
        self._parts, self._size = [], 0
        self.text.write(block)
        self.packed.write(block.encode("utf-8"))


def write_tables(tables: Mapping[str, pd.DataFrame], out_dir: str | os.PathLike, *,
                 gzipped: Collection[str] = ()) -> list[Path]:
    """Write each table to ``out_dir/<name>.csv`` atomically (full float precision); returns the paths.

    ``gzipped``: tables also written as ``<name>.csv.gz`` (gzip with no name and no time in its header, so the
    bytes depend on the table only): the large φ and Figure 8 tables are committed that way, so every verdict can
    be recomputed from files in the repository. Both files come from one formatting pass (:class:`_Tee`).
    """
    import gzip

    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise UserError(f"{root}: is a file; expected an output directory")
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, df in tables.items():
        path = root / f"{name}.csv"
        if name not in gzipped:
            with atomic_path(path) as tmp:
                df.to_csv(tmp, index=False)
            paths.append(path)
            continue
        packed = root / f"{name}.csv.gz"
        with atomic_path(path) as tmp, atomic_path(packed) as tmp_gz:
            with open(tmp, "w", encoding="utf-8", newline="") as text, open(tmp_gz, "wb") as raw, \
                    gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as fh:
                tee = _Tee(text, fh)
                df.to_csv(tee, index=False)
                tee.flush()
        paths += [path, packed]
    return paths

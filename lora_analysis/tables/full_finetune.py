"""Full fine-tuning as the reference: tables of the dense ΔW beside the LoRA adapters of the same run.

For each full fine-tuning run (:mod:`lora.full_ft`) and adapted matrix, with W0 from the base and the LoRA adapters
of the same seed (same data order, head init and steps):

* ``full_spectra``: module, weight_type, layer, seed, d_out, d_in, dw_norm, stable_rank, entropy_rank,
  energy_rank_90, random_entropy_rank, random_energy_rank_90, n_intruders. Section 4.1's hypothesis, measured:
  the effective ranks of the full ΔW beside those of a Gaussian matrix of the same shape and norm (the null of a
  ΔW with no low-rank structure), and intruder dimensions (Shuttleworth et al., 2024) of W0 + ΔW_full.
* ``full_singular_values``: module, weight_type, layer, seed, index, sigma (σ of the full ΔW).
* ``full_vs_lora``: module, weight_type, layer, seed, rank, k, phi, null, lora_intruders, full_intruders:
  φ(full ΔW's top-k right singular vectors, LoRA r's ΔW's, k, r) at k = r (how much of full fine-tuning's
  top-r subspace LoRA's r-dimensional one captures), the random null max(k, r)/d = r/d, and the intruder counts.
* ``full_table7``: Table 7 for the full ΔW (columns of ``table7``; ``rank`` = the k used, the LoRA ranks
  nearest the paper's 4 and 64).

The full ΔW is handed to the factored metrics as ``A = Vᵀ``, ``B = U·diag(σ)`` (its exact SVD), so Table 7, the
spectra and intruders are the same functions the LoRA tables use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor

from lora_analysis.load.adapters import LoadedAdapter, module_layer, weight_type
from lora_analysis.load.full_finetune import FullFinetune, load_full_finetune
from lora_analysis.load.run import Run
from lora_analysis.metrics.linalg import factored_svd
from lora_analysis.metrics.projection import table7_row
from lora_analysis.metrics.spectra import (
    energy_rank,
    entropy_effective_rank,
    intruder_dimensions,
    stable_rank,
)
from lora_analysis.metrics.subspace import phi_grid
from lora_analysis.tables.build import COLUMNS, NULL_DRAWS, module_seed
from lora_analysis.tables.select import PAPER_TABLE7_RANKS, nearest_rank

__all__ = ["FULL_COLUMNS", "dense_factors", "effective_ranks", "full_finetune_tables", "full_tables"]

FULL_COLUMNS: dict[str, list[str]] = {
    "full_spectra": ["module", "weight_type", "layer", "seed", "d_out", "d_in", "dw_norm", "stable_rank",
                     "entropy_rank", "energy_rank_90", "random_entropy_rank", "random_energy_rank_90", "n_intruders"],
    "full_singular_values": ["module", "weight_type", "layer", "seed", "index", "sigma"],
    "full_vs_lora": ["module", "weight_type", "layer", "seed", "rank", "k", "phi", "null", "lora_intruders",
                     "full_intruders"],
    "full_table7": COLUMNS["table7"],
}
INTRUDER_K = 10  # Shuttleworth et al. and PEFT: the top 10 directions of the tuned matrix


def dense_factors(delta: Tensor) -> tuple[Tensor, Tensor]:
    """``(A, B)`` with ``B @ A == delta`` from its thin SVD: ``A = Vᵀ (m, d_in)``, ``B = U·diag(σ) (d_out, m)``,
    m = min(d_out, d_in), float64, so the factored metrics take a dense ΔW exactly."""
    U, S, Vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    return Vh, U * S


def _ids(key: str, seed: int) -> dict:
    return {"module": key, "weight_type": weight_type(key), "layer": module_layer(key), "seed": int(seed)}


def full_tables(full: FullFinetune, W0: Mapping[str, Tensor], lora: Mapping[int, LoadedAdapter], *,
                w_svd=None, table7_ranks: Sequence[int] = (), intruder_k: int = INTRUDER_K,
                null_seed: int = 0) -> dict[str, pd.DataFrame]:
    """The four tables for one full fine-tuning run.

    Args:
        full: the run's ΔW per module.
        W0: ``{module key: W0}`` for its modules.
        lora: ``{rank: adapter}`` of the same seed (may be empty: no ``full_vs_lora``).
        w_svd: ``(key, W) -> full thin SVD of W`` (shared cache), computed here if ``None``.
        table7_ranks: the k of ``full_table7`` (none: no rows).
    """
    from lora_analysis.metrics.linalg import top_singular

    svd_of = w_svd or (lambda key, W: top_singular(W))
    rows: dict[str, list[dict]] = {k: [] for k in FULL_COLUMNS}
    for key, delta in full.deltas.items():
        W = W0[key].to(torch.float64)
        if tuple(W.shape) != tuple(delta.shape):
            raise ValueError(f"{full.path}: module {key}: ΔW {tuple(delta.shape)} but W0 {tuple(W.shape)}")
        A, B = dense_factors(delta)
        S = torch.linalg.svdvals(delta)
        ids = _ids(key, full.seed)
        g = torch.Generator().manual_seed(module_seed(key, null_seed))
        noise = torch.randn(delta.shape, generator=g, dtype=torch.float64)
        S_rand = torch.linalg.svdvals(noise)
        ws = svd_of(key, W)
        k_int = min(intruder_k, *W.shape)
        n_full = intruder_dimensions(W, A, B, scaling=1.0, k=k_int, w0_svd=ws).count
        rows["full_spectra"].append({
            **ids, "d_out": int(W.shape[0]), "d_in": int(W.shape[1]), "dw_norm": float(torch.linalg.vector_norm(S)),
            "stable_rank": stable_rank(S), "entropy_rank": entropy_effective_rank(S),
            "energy_rank_90": energy_rank(S, fraction=0.9), "random_entropy_rank": entropy_effective_rank(S_rand),
            "random_energy_rank_90": energy_rank(S_rand, fraction=0.9), "n_intruders": n_full})
        rows["full_singular_values"] += [{**ids, "index": i + 1, "sigma": float(s)} for i, s in enumerate(S)]
        for r, a in sorted(lora.items()):
            f = a.factors.get(key)
            if f is None:
                continue
            k = min(r, *W.shape)
            v_lora = factored_svd(f.A, f.B, scaling=f.scaling).V  # (d_in, r)
            grid = phi_grid(A.T[:, :k].contiguous(), v_lora)
            n_lora = intruder_dimensions(W, f.A, f.B, scaling=f.scaling, k=k_int, w0_svd=ws).count
            rows["full_vs_lora"].append({**ids, "rank": int(r), "k": k, "phi": float(grid[k - 1, v_lora.shape[1] - 1]),
                                         "null": max(k, v_lora.shape[1]) / W.shape[1], "lora_intruders": n_lora,
                                         "full_intruders": n_full})
        for k in sorted(set(table7_ranks)):
            row = table7_row(W, A, B, scaling=1.0, top=k, random_seed=module_seed(key, null_seed), w_svd=ws,
                             null_draws=NULL_DRAWS)
            rows["full_table7"].append({**{c: ids[c] for c in ("module", "weight_type", "layer")}, "rank": k,
                                        "seed": full.seed, "d_out": int(W.shape[0]), "d_in": int(W.shape[1]),
                                        "top": k, **{c: getattr(row, c) for c in COLUMNS["table7"][8:]}})
    return {name: pd.DataFrame(r, columns=FULL_COLUMNS[name]) for name, r in rows.items()}


def full_finetune_tables(run: Run, *, progress: bool = False) -> dict[str, pd.DataFrame]:
    """The full fine-tuning tables of a run (``{}`` when it has no full fine-tuning directory): every
    ``<set>_full_s<seed>`` against the LoRA adapters of the same weight set and seed, W0 from the run's one
    base-weight source."""
    from tqdm import tqdm

    dirs = run.full_dirs
    if not dirs:
        return {}
    index = run.index
    bw = run.base
    frames: dict[str, list[pd.DataFrame]] = {k: [] for k in FULL_COLUMNS}
    for d in tqdm(dirs, desc="full fine-tuning", disable=not progress, dynamic_ncols=True):
        full = load_full_finetune(d)
        entries = [e for e in index.find(weight_set=full.weight_set) if e.seed == full.seed]
        if not entries:  # the base comes through an adapter's record: any adapter of the set will do
            entries = index.find(weight_set=full.weight_set)[:1]
        if not entries:
            continue
        lora = {e.rank: run.adapter(e) for e in entries if e.seed == full.seed}
        ref = lora[min(lora)] if lora else run.adapter(entries[0])
        W0 = bw.weights(ref, list(full.deltas))
        ranks = sorted(lora) or [ref.rank]
        t7_ranks = sorted({nearest_rank(ranks, r) for r in PAPER_TABLE7_RANKS})
        for name, t in full_tables(full, W0, lora, w_svd=bw.w_svd, table7_ranks=t7_ranks).items():
            frames[name].append(t)
    return {name: (pd.concat(f, ignore_index=True) if f else pd.DataFrame(columns=FULL_COLUMNS[name]))
            for name, f in frames.items()}


def effective_ranks(full_spectra: pd.DataFrame | None) -> pd.DataFrame:
    """Full fine-tuning's ΔW per weight type and layer, mean over seeds: entropy effective rank, 90 %-energy rank
    and stable rank beside a same-shape Gaussian's entropy rank (Section 4.1's hypothesis, layer by layer).

    Raises:
        MissingRows: without full fine-tuning rows.
    """
    from lora_analysis.tables.select import MissingRows

    if full_spectra is None or len(full_spectra) == 0:
        raise MissingRows("full_spectra: no full fine-tuning in this run")
    cols = ["entropy_rank", "energy_rank_90", "stable_rank", "random_entropy_rank"]
    out = full_spectra.groupby(["weight_type", "layer"], sort=True)[cols].mean()
    return out.assign(seeds=full_spectra.groupby(["weight_type", "layer"], sort=True)["seed"].nunique()).reset_index()

"""Renderers for the figures and tables of Section 7 (Hu et al., 2021): a tidy table in, a matplotlib Figure out.

Each renderer only *selects*, *pivots* and *averages over seeds* the long-format tables that
:mod:`lora_analysis.tables.build` writes (their schemas are documented there). No metric is computed here: φ, the
projections and the spectra come ready-made in the tables, so a figure always shows exactly the numbers in the
CSV beside it.

Figures (names match the files written into ``figures/``):

- ``figure3``: φ(A_8, A_64, i, j) for ΔW_q and ΔW_v of one layer, full 8 × 64 grid and the zoom j ≤ 8
  (Section 7.2, Figure 3). Colour scale 0–1, as the paper.
- ``figure4``: φ between two seeds at r = 64 for ΔW_q and ΔW_v, beside two random Gaussian matrices
  (Section 7.2, Figure 4). Colour scale 0–0.5, as the paper.
- ``figure6`` / ``figure7``: Figures 3 and 4 for the first, a middle and the last layer (Appendix H.1).
- ``figure8``: φ between W_q's top-i and ΔW_q's top-j singular directions, r = 4, 8, 64 and random
  (Appendix H.3, Figure 8).
- ``table5`` / ``table6`` / ``table7``: the tables (markdown + CSV) and a plot of each (Sections 7.1–7.3).
- ``spectra``: ΔW's singular values and effective ranks against r (beyond the paper).
- ``init_control``: φ on A beside φ on the learned change A − A_init and between the starting points
  A_init (beyond the paper: with nested initialisation, A_8 starts as the first rows of A_64's start).

Selection (which rank pair, which layer) comes from :mod:`lora_analysis.tables.select` and seed averages from
:mod:`lora_analysis.tables.aggregate`, the same rules the verdicts use. The command that re-renders a run is
``python -m lora_analysis.figures``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from lora.errors import UserError
from lora.fsio import atomic_path, write_text
from lora_analysis.render.beyond_figures import dynamics_plot, full_spectrum_plot
from lora_analysis.tables.aggregate import (
    QUALITY_COLUMNS,
    TABLE7_COLUMNS,
    table5,
    table5_rows,
    table6,
    table7,
)
from lora_analysis.tables.select import (
    PAPER_FIG8_RANKS,
    PAPER_RANK_SMALL,
    MissingRows,
    first_middle_last,
    middle_layer,
    modules_at,
    nearest_rank,
    phi_rank_pair,
    require,
    rows_where,
)

__all__ = [
    "Selection",
    "draw",
    "figure3",
    "figure4",
    "figure6",
    "figure7",
    "figure8",
    "init_control",
    "markdown_table",
    "phi_panels",
    "planted_rank",
    "render_all",
    "save_figure",
    "save_figure_as",
    "save_table",
    "spectra",
    "table5_plot",
    "table6_plot",
    "table7_plot",
    "tabulate",
]

log = logging.getLogger(__name__)

DPI = 200
CMAP = "viridis"
PHI_LABEL = r"$\phi(i, j)$"

# One look for every figure: seaborn's paper context, white background, the same font sizes everywhere.
THEME = {"style": "white", "context": "paper", "font_scale": 1.1, "rc": {"figure.dpi": 100, "savefig.bbox": "tight"}}


@dataclass(frozen=True)
class Selection:
    """Which slice of a table a figure shows, so the caption and the report can name it.

    Attributes:
        layer: transformer block index.
        modules: module keys shown, by weight type (``{"q": "...query", "v": "...value"}``).
        r1: the smaller rank (rows, index i).
        r2: the larger rank (columns, index j).
        seeds: the seeds shown.
    """

    layer: int
    modules: Mapping[str, str]
    r1: int
    r2: int
    seeds: tuple[int, ...]


# --------------------------------------------------------------------------------------------- selection


def _grid(rows: pd.DataFrame, *, i_max: int | None = None, j_max: int | None = None) -> pd.DataFrame:
    """Pivot φ rows into an i × j grid (mean over any repeated cells, e.g. several seed pairs)."""
    if i_max is not None:
        rows = rows[rows["i"] <= i_max]
    if j_max is not None:
        rows = rows[rows["j"] <= j_max]
    return rows.pivot_table(index="i", columns="j", values="phi", aggfunc="mean").sort_index().sort_index(axis=1)


def _wt_title(weight_type: str, layer: int) -> str:
    return rf"$\Delta W_{{{weight_type}}}$, layer {layer}"


# --------------------------------------------------------------------------------------------- drawing


def _ticks(n: int) -> list[int]:
    """1 and the multiples of a round step up to ``n`` (1, 8, 16, ... for n = 64), as the paper's axes."""
    step = next(s for s in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if n / s <= 8)
    return sorted({1, *range(step, n + 1, step)})


def _heatmap(ax, grid: pd.DataFrame, *, vmin: float, vmax: float, title: str,
             xlabel: str = "j", ylabel: str = "i") -> None:
    """One φ heat map: i down the rows (i = 1 at the top, as the paper), j across; no colour bar (shared).

    Cell (i, j) is centred on the integer coordinates (j, i), so tick k labels index k. ``grid`` must be
    indexed 1..n_i by 1..n_j (a pivot of a complete φ grid).
    """
    n_i, n_j = grid.shape
    ax.imshow(grid.to_numpy(dtype=float), cmap=CMAP, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest",
              extent=(0.5, n_j + 0.5, n_i + 0.5, 0.5))
    ax.set_xticks(_ticks(n_j))
    ax.set_yticks(_ticks(n_i))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def _colorbar(fig: Figure, axes, *, vmin: float, vmax: float, label: str = PHI_LABEL) -> None:
    mappable = plt.cm.ScalarMappable(norm=plt.Normalize(vmin, vmax), cmap=CMAP)
    fig.colorbar(mappable, ax=axes, label=label, fraction=0.025, pad=0.02)


def _new_figure(nrows: int, ncols: int, *, width: float, height: float, width_ratios=None):
    sns.set_theme(**THEME)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width, height), squeeze=False, gridspec_kw={"width_ratios": width_ratios},
        layout="constrained",
    )
    return fig, axes


# --------------------------------------------------------------------------------------------- Figures 3 / 6


def _rank_rows(phi: pd.DataFrame, *, quantity: str, r_small: int, r_large: int | None, seed: int | None):
    cols = ["comparison", "quantity", "module", "weight_type", "layer", "r1", "r2", "seed1", "seed2", "i", "j", "phi"]
    rows = rows_where(require(phi, "phi", cols), comparison="rank", quantity=quantity)
    if len(rows) == 0:
        raise MissingRows(f"phi: no rank comparison rows for quantity {quantity!r}")
    r1, r2 = phi_rank_pair(rows, small=r_small, large=r_large)
    rows = rows_where(rows, r1=r1, r2=r2)
    seed = int(rows["seed1"].min()) if seed is None else int(seed)
    rows = rows_where(rows, seed1=seed)
    if len(rows) == 0:
        raise MissingRows(f"phi: no rank comparison r={r1} vs r={r2} for seed {seed}")
    return rows, r1, r2, seed


def _rank_panels(fig, axes_row, rows, *, layer: int, r1: int, r2: int, zoom: int) -> dict[str, str]:
    modules = modules_at(rows, layer)
    if not modules:
        raise MissingRows(f"phi: no ΔW_q / ΔW_v rank comparison at layer {layer}")
    k = 0
    for zoomed in (False, True):
        for wt, module in modules.items():
            sub = rows_where(rows, module=module)
            grid = _grid(sub, j_max=zoom if zoomed else None)
            suffix = f" (j ≤ {zoom})" if zoomed else ""
            _heatmap(axes_row[k], grid, vmin=0.0, vmax=1.0, title=_wt_title(wt, layer) + suffix)
            k += 1
    for ax in axes_row[k:]:
        ax.set_visible(False)
    return modules


def figure3(phi: pd.DataFrame, *, layer: int | None = None, r_small: int = PAPER_RANK_SMALL,
            r_large: int | None = None, seed: int | None = None, quantity: str = "A") -> Figure:
    """Figure 3: φ(A_{r1}, A_{r2}, i, j) for ΔW_q and ΔW_v of one layer, full grid and the zoom j ≤ r1.

    Args:
        phi: the ``phi`` table (comparison ``"rank"`` rows are used).
        layer: transformer block (default: the middle one, as the paper's 48th of 96).
        r_small: rows rank; the present rank nearest it is used (paper: 8).
        r_large: columns rank (default: the largest compared, paper: 64).
        seed: which seed's pair (default: the smallest seed).
        quantity: ``"A"`` (paper), ``"A-A_init"``, ``"A_init"`` or ``"B"`` (footnote 7).

    Returns:
        A 1 × 4 figure: ΔW_q, ΔW_v (i ≤ r1, j ≤ r2), then both zoomed to j ≤ r1; colour scale 0–1.
    """
    rows, r1, r2, seed = _rank_rows(phi, quantity=quantity, r_small=r_small, r_large=r_large, seed=seed)
    layer = middle_layer(rows["layer"], layer)
    full = max(2.0, min(6.0, r2 / 10))
    fig, axes = _new_figure(1, 4, width=2 * full + 2 * 1.6 + 1.2, height=2.2 + r1 / 8,
                            width_ratios=[full, full, 1.6, 1.6])
    _rank_panels(fig, axes[0], rows, layer=layer, r1=r1, r2=r2, zoom=r1)
    _colorbar(fig, axes[0].tolist(), vmin=0.0, vmax=1.0)
    fig.suptitle(rf"Figure 3: $\phi(A_{{r={r1}}}, A_{{r={r2}}}, i, j)$ on {_quantity_name(quantity)}, seed {seed}")
    return fig


def figure6(phi: pd.DataFrame, *, layers: Sequence[int] | None = None, r_small: int = PAPER_RANK_SMALL,
            r_large: int | None = None, seed: int | None = None, quantity: str = "A") -> Figure:
    """Figure 6 (Appendix H.1): Figure 3 for several layers (default: first, middle, last), one row per layer."""
    rows, r1, r2, seed = _rank_rows(phi, quantity=quantity, r_small=r_small, r_large=r_large, seed=seed)
    layers = first_middle_last(rows["layer"]) if layers is None else [middle_layer(rows["layer"], x) for x in layers]
    full = max(2.0, min(6.0, r2 / 10))
    fig, axes = _new_figure(len(layers), 4, width=2 * full + 2 * 1.6 + 1.2, height=len(layers) * (2.0 + r1 / 8),
                            width_ratios=[full, full, 1.6, 1.6])
    for row, layer in zip(axes, layers, strict=True):
        _rank_panels(fig, row, rows, layer=layer, r1=r1, r2=r2, zoom=r1)
    _colorbar(fig, axes.ravel().tolist(), vmin=0.0, vmax=1.0)
    fig.suptitle(rf"Figure 6: $\phi(A_{{r={r1}}}, A_{{r={r2}}}, i, j)$ on {_quantity_name(quantity)} "
                 f"by layer, seed {seed}")
    return fig


def _quantity_name(quantity: str) -> str:
    return {"A": "A", "A-A_init": r"$A - A_{init}$", "A_init": r"$A_{init}$", "B": "B (left vectors)"}.get(
        quantity, quantity)


# --------------------------------------------------------------------------------------------- Figures 4 / 7


def _seed_rows(phi: pd.DataFrame, *, quantity: str, rank: int | None, seeds: tuple[int, int] | None):
    cols = ["comparison", "quantity", "module", "weight_type", "layer", "r1", "r2", "seed1", "seed2", "i", "j", "phi"]
    rows = rows_where(require(phi, "phi", cols), comparison="seed", quantity=quantity)
    rows = rows[rows["r1"] == rows["r2"]]
    if len(rows) == 0:
        raise MissingRows(f"phi: no seed comparison rows for quantity {quantity!r} (a run needs two seeds)")
    rank = int(rows["r1"].max()) if rank is None else nearest_rank(rows["r1"].tolist(), rank)
    rows = rows_where(rows, r1=rank)
    pairs = sorted(set(zip(rows["seed1"], rows["seed2"], strict=True)))
    pair = pairs[0] if seeds is None else tuple(int(s) for s in seeds)
    rows = rows_where(rows, seed1=pair[0], seed2=pair[1])
    if len(rows) == 0:
        raise MissingRows(f"phi: no seed comparison for seeds {pair} at r={rank} (pairs present: {pairs})")
    return rows, rank, pair


def _random_rows(phi: pd.DataFrame, *, rank: int, layer: int) -> tuple[pd.DataFrame, str]:
    """Two random Gaussian matrices of the same shape (``"random"`` rows), else the analytic E[φ] = max(i, j)/d."""
    rnd = rows_where(phi, comparison="random", r1=rank, r2=rank)
    if len(rnd):
        preferred = rows_where(rnd, quantity="A")
        rnd = preferred if len(preferred) else rnd
        at = rows_where(rnd, layer=layer)
        rnd = at if len(at) else rnd
        module = sorted(set(rnd["module"]))[0]
        return rows_where(rnd, module=module), "two random Gaussian matrices"
    exp = rows_where(phi, quantity="expected_random", r1=rank, r2=rank)
    if len(exp):
        module = sorted(set(exp["module"]))[0]
        return rows_where(exp, module=module), r"random, analytic $E[\phi] = \max(i, j)/d$"
    raise MissingRows(f"phi: no random baseline at r={rank}")


def _seed_panels(axes_row, phi, rows, *, layer: int, rank: int, vmax: float) -> None:
    modules = modules_at(rows, layer)
    if not modules:
        raise MissingRows(f"phi: no ΔW_q / ΔW_v seed comparison at layer {layer}")
    k = 0
    for wt, module in modules.items():
        _heatmap(axes_row[k], _grid(rows_where(rows, module=module)), vmin=0.0, vmax=vmax, title=_wt_title(wt, layer))
        k += 1
    rnd, what = _random_rows(phi, rank=rank, layer=layer)
    _heatmap(axes_row[k], _grid(rnd), vmin=0.0, vmax=vmax, title=what)
    for ax in axes_row[k + 1:]:
        ax.set_visible(False)


def figure4(phi: pd.DataFrame, *, layer: int | None = None, rank: int | None = None,
            seeds: tuple[int, int] | None = None, quantity: str = "A", vmax: float = 0.5) -> Figure:
    """Figure 4: φ(A_{r}^{seed 1}, A_{r}^{seed 2}, i, j) for ΔW_q and ΔW_v, beside two random Gaussian matrices.

    Args:
        phi: the ``phi`` table (``"seed"`` rows, and ``"random"`` or ``"expected_random"`` rows).
        layer: transformer block (default: the middle one).
        rank: r (default: the largest compared; paper: 64).
        seeds: the seed pair (default: the first pair).
        quantity: ``"A"`` (paper) or another φ quantity.
        vmax: top of the colour scale (paper: 0.5).

    Returns:
        A 1 × 3 figure with i, j = 1..r; colour scale 0–``vmax``.
    """
    rows, rank, pair = _seed_rows(phi, quantity=quantity, rank=rank, seeds=seeds)
    layer = middle_layer(rows["layer"], layer)
    side = max(2.4, min(4.0, rank / 16))
    fig, axes = _new_figure(1, 3, width=3 * side + 1.2, height=side + 0.6)
    _seed_panels(axes[0], phi, rows, layer=layer, rank=rank, vmax=vmax)
    _colorbar(fig, axes[0].tolist(), vmin=0.0, vmax=vmax)
    fig.suptitle(rf"Figure 4: $\phi(A_{{r={rank}}}^{{({pair[0]})}}, A_{{r={rank}}}^{{({pair[1]})}}, i, j)$ between "
                 f"seeds {pair[0]} and {pair[1]} on {_quantity_name(quantity)}")
    return fig


def figure7(phi: pd.DataFrame, *, layers: Sequence[int] | None = None, rank: int | None = None,
            seeds: tuple[int, int] | None = None, quantity: str = "A", vmax: float = 0.5) -> Figure:
    """Figure 7 (Appendix H.1): Figure 4 for several layers (default: first, middle, last), one row per layer."""
    rows, rank, pair = _seed_rows(phi, quantity=quantity, rank=rank, seeds=seeds)
    layers = first_middle_last(rows["layer"]) if layers is None else [middle_layer(rows["layer"], x) for x in layers]
    side = max(2.4, min(4.0, rank / 16))
    fig, axes = _new_figure(len(layers), 3, width=3 * side + 1.2, height=len(layers) * (side + 0.4))
    for row, layer in zip(axes, layers, strict=True):
        _seed_panels(row, phi, rows, layer=layer, rank=rank, vmax=vmax)
    _colorbar(fig, axes.ravel().tolist(), vmin=0.0, vmax=vmax)
    fig.suptitle(rf"Figure 7: seed {pair[0]} vs seed {pair[1]} at r={rank} on {_quantity_name(quantity)}, by layer")
    return fig


# --------------------------------------------------------------------------------------------- Figure 8


def figure8(fig8: pd.DataFrame, *, layer: int | None = None, weight_type: str = "q",
            ranks: Sequence[int] = PAPER_FIG8_RANKS, seed: int | None = None) -> Figure:
    """Figure 8 (Appendix H.3): φ between W's top-i and ΔW's top-j singular directions, per rank and random.

    Args:
        fig8: the ``fig8`` table.
        layer: transformer block (default: the middle one).
        weight_type: which weight (paper: q).
        ranks: the ranks to show; each is replaced by the present rank nearest it (paper: 4, 8, 64).
        seed: which seed (default: the smallest).

    Returns:
        One panel per rank plus one for a random matrix; i (W's directions) down, j (ΔW's) across.
        The colour scale is shared, from 0 to max(0.2, the largest φ shown) so "barely exceeds 0.2" is visible.
    """
    cols = ["module", "weight_type", "layer", "rank", "seed", "source", "i", "j", "phi"]
    table = rows_where(require(fig8, "fig8", cols), weight_type=weight_type)
    if len(table) == 0:
        raise MissingRows(f"fig8: no rows for weight type {weight_type!r}")
    layer = middle_layer(table["layer"], layer)
    table = rows_where(table, layer=layer)
    module = sorted(set(table["module"]))[0]
    table = rows_where(table, module=module)
    delta = rows_where(table, source="delta")
    if len(delta) == 0:
        raise MissingRows(f"fig8: no ΔW rows for {module}")
    seed = int(delta["seed"].min()) if seed is None else int(seed)
    delta = rows_where(delta, seed=seed)
    shown = sorted({nearest_rank(delta["rank"].tolist(), r) for r in ranks})
    panels = [(f"$\\Delta W_{{{weight_type}}}$, r={r}", _grid(rows_where(delta, rank=r))) for r in shown]
    rnd = rows_where(table, source="random")
    if len(rnd):
        r_rand = max(shown) if max(shown) in set(rnd["rank"]) else int(rnd["rank"].max())
        rnd = rows_where(rnd, rank=r_rand)
        rnd = rows_where(rnd, seed=int(rnd["seed"].min()))
        panels.append((f"random, r={r_rand}", _grid(rnd)))
    vmax = max(0.2, float(max(g.to_numpy().max() for _, g in panels)))
    widths = [max(1.0, min(4.0, g.shape[1] / 10)) for _, g in panels]
    fig, axes = _new_figure(1, len(panels), width=sum(widths) + 1.5 + 0.4 * len(panels), height=4.0,
                            width_ratios=widths)
    for ax, (title, grid) in zip(axes[0], panels, strict=True):
        _heatmap(ax, grid, vmin=0.0, vmax=vmax, title=title, xlabel=rf"j ($\Delta W_{{{weight_type}}}$)",
                 ylabel=f"i ($W_{{{weight_type}}}$)")
    _colorbar(fig, axes[0].tolist(), vmin=0.0, vmax=vmax)
    fig.suptitle(rf"Figure 8: $\phi(W_{{{weight_type}}}, \Delta W_{{{weight_type}}}, i, j)$, layer {layer}, seed {seed}")
    return fig


# --------------------------------------------------------------------------------------------- Tables 5 / 6


def _probe(quality: pd.DataFrame) -> pd.DataFrame:
    return quality[quality["weight_set"] == "linear probe"]


def _probe_line(ax, quality: pd.DataFrame) -> None:
    probe = _probe(quality)
    if len(probe):
        ax.axhline(float(probe["val_metric"].mean()), color="0.4", ls="--", lw=1, label="linear probe (frozen)")


def table6_plot(quality: pd.DataFrame) -> Figure:
    """Table 6 as a plot: validation metric against r (log scale) per weight set, mean ± std over seeds."""
    agg = table6(quality)
    metric = str(agg["metric_name"].iloc[0])
    fig, axes = _new_figure(1, 1, width=5.0, height=3.4)
    ax = axes[0, 0]
    is_full = agg["method"] == "full" if "method" in agg.columns else pd.Series(False, index=agg.index)
    for ws, sub in agg[is_full].groupby("weight_set", sort=True):  # full fine-tuning: no rank, a line across
        ax.axhline(float(sub["mean"].iloc[0]), color="C3", ls=":", lw=1.2, label=f"full fine-tuning {{{ws}}}")
    agg = agg[~is_full]
    for ws, sub in agg.groupby("weight_set", sort=True):
        ax.errorbar(sub["rank"], sub["mean"], yerr=sub["std"].fillna(0.0), marker="o", capsize=3,
                    label=_set_label(ws))
    _probe_line(ax, require(quality, "quality", QUALITY_COLUMNS))
    ax.set_xscale("log", base=2)
    ranks = sorted(set(agg["rank"]))
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("rank r")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("Table 6: validation metric vs rank (mean ± std over seeds)")
    ax.legend(frameon=False)
    sns.despine(fig)
    return fig


def _set_label(weight_set: str) -> str:
    if weight_set == "linear probe":
        return weight_set
    inner = ", ".join(f"$W_{t}$" for t in str(weight_set).split(","))
    return f"{{{inner}}}"


def table5_plot(quality: pd.DataFrame) -> Figure:
    """Table 5 as a bar chart: validation metric per weight set at one parameter budget (mean ± std, seeds as dots)."""
    rows = table5_rows(quality)
    agg = table5(quality)
    metric = str(agg["metric_name"].iloc[0])
    order = agg["weight_set"].tolist()
    fig, axes = _new_figure(1, 1, width=max(4.0, 1.4 * len(order) + 1.5), height=3.6)
    ax = axes[0, 0]
    labels = [f"{_set_label(ws)}\nr={r}" for ws, r in zip(agg["weight_set"], agg["rank"], strict=True)]
    ax.bar(range(len(order)), agg["mean"], yerr=agg["std"].fillna(0.0), capsize=3,
           color=sns.color_palette(n_colors=len(order)))
    for k, ws in enumerate(order):
        vals = rows_where(rows, weight_set=ws)["val_metric"]
        ax.scatter(np.full(len(vals), k), vals, color="k", s=8, zorder=3)
    _probe_line(ax, require(quality, "quality", QUALITY_COLUMNS))
    ax.set_xticks(range(len(order)), labels)
    shown = pd.concat([agg["mean"], rows["val_metric"], _probe(quality)["val_metric"]])
    lo, hi = float(shown.min()), float(shown.max())
    pad = max(0.02 * abs(hi), hi - lo)
    ax.set_ylim(lo - pad, hi + pad / 2)
    ax.set_xlabel("adapted weights")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(f"Table 5: {int(agg['trainable_params'].iloc[0]):,} trainable parameters each")
    if len(_probe(quality)):
        ax.legend(frameon=False, loc="lower right")
    sns.despine(fig)
    return fig


# --------------------------------------------------------------------------------------------- Table 7


def table7_plot(table: pd.DataFrame) -> Figure:
    """Amplification factor ‖ΔW‖_F / ‖UᵀWV‖_F against layer, one line per (weight type, rank), mean over seeds."""
    cols = ["module", "weight_type", "layer", "rank", "seed", *TABLE7_COLUMNS]
    t = require(table, "table7", cols)
    agg = t.groupby(["weight_type", "rank", "layer"], sort=True)["amplification"].agg(["mean", "std"]).reset_index()
    fig, axes = _new_figure(1, 1, width=5.2, height=3.4)
    ax = axes[0, 0]
    ranks = sorted(set(agg["rank"]))
    palette = dict(zip(ranks, sns.color_palette("mako", n_colors=len(ranks)), strict=True))
    styles = dict(zip(sorted(set(agg["weight_type"])), ["-", "--", ":", "-."] * 4, strict=False))
    for (wt, r), sub in agg.groupby(["weight_type", "rank"], sort=True):
        ax.errorbar(sub["layer"], sub["mean"], yerr=sub["std"].fillna(0.0), color=palette[r], ls=styles[wt],
                    marker="o", ms=3, capsize=2, label=rf"$\Delta W_{{{wt}}}$, r={r}")
    ax.set_yscale("log")
    ax.set_xticks(sorted(set(agg["layer"])))
    ax.set_xlabel("layer")
    ax.set_ylabel(r"amplification $\|\Delta W\|_F / \|U^\top W V\|_F$")
    ax.set_title("Table 7: amplification factor by layer (paper: 21.5 at r=4, 1.9 at r=64)")
    ax.legend(frameon=False, fontsize="small", ncol=2)
    sns.despine(fig)
    return fig


# --------------------------------------------------------------------------------------------- beyond the paper


def spectra(spectra_table: pd.DataFrame, singular_values: pd.DataFrame, *, layer: int | None = None,
            seed: int | None = None) -> Figure:
    """ΔW's singular values per rank (one layer, q and v) and its effective ranks against r (all layers).

    Left panels: σ_k of ΔW_q and ΔW_v for each r at one layer and seed. Right panel: stable rank, entropy rank
    and the 90 %-energy rank against r (mean over layers and seeds), with y = r for reference.
    """
    sv = require(singular_values, "singular_values", ["module", "weight_type", "layer", "rank", "seed", "index", "sigma"])
    sp = require(spectra_table, "spectra", ["weight_type", "rank", "seed", "stable_rank", "entropy_rank", "energy_rank_90"])
    layer = middle_layer(sv["layer"], layer)
    seed = int(sv["seed"].min()) if seed is None else int(seed)
    modules = modules_at(sv, layer)
    fig, axes = _new_figure(1, len(modules) + 1, width=4.0 * (len(modules) + 1), height=3.4)
    ranks = sorted(set(sv["rank"]))
    palette = dict(zip(ranks, sns.color_palette("mako", n_colors=len(ranks)), strict=True))
    for ax, (wt, module) in zip(axes[0], modules.items(), strict=False):
        sub = rows_where(sv, module=module, seed=seed)
        for r, rows in sub.groupby("rank", sort=True):
            ax.plot(rows["index"], rows["sigma"], marker="o", ms=2, color=palette[r], label=f"r={r}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("index k")
        ax.set_ylabel(r"$\sigma_k(\Delta W)$")
        ax.set_title(f"{_wt_title(wt, layer)}, seed {seed}")
        ax.legend(frameon=False, fontsize="small")
    ax = axes[0, -1]
    long = sp.melt(id_vars=["weight_type", "rank"], value_vars=["stable_rank", "entropy_rank", "energy_rank_90"],
                   var_name="measure", value_name="effective rank")
    long = long.groupby(["weight_type", "measure", "rank"], sort=True)["effective rank"].mean().reset_index()
    sns.lineplot(long, x="rank", y="effective rank", hue="measure", style="weight_type", markers=True, ax=ax)
    ax.plot(ranks, ranks, color="0.6", lw=1, ls=":", label="y = r")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("rank r")
    ax.set_ylabel("effective rank of ΔW")
    ax.set_title("Effective rank vs r (mean over layers, seeds)")
    ax.legend(frameon=False, fontsize="x-small")
    sns.despine(fig)
    fig.suptitle(r"$\Delta W$ spectrum (beyond the paper)")
    return fig


INIT_QUANTITIES = ("A", "A-A_init", "A_init")


def init_control(phi: pd.DataFrame, *, layer: int | None = None, r_small: int = PAPER_RANK_SMALL,
                 r_large: int | None = None, zoom: int = 8) -> Figure:
    """φ on A beside φ on the learned change A − A_init and between the starting points A_init.

    Rows: the three quantities. Columns: the rank comparison (r1 vs r2, same seed) and the seed comparison
    (r2, two seeds) for ΔW_q and ΔW_v, zoomed to i, j ≤ ``zoom`` (colour scale 0–1). With nested
    initialisation A_{r1}'s start is A_{r2}'s first rows, so the A_init row of the rank comparison is 1 on the
    diagonal; where φ on A is large only because of that, the A − A_init row shows it.
    """
    cols = ["comparison", "quantity", "module", "weight_type", "layer", "r1", "r2", "seed1", "seed2", "i", "j", "phi"]
    t = require(phi, "phi", cols)
    present = [q for q in INIT_QUANTITIES if len(rows_where(t, quantity=q, comparison="rank"))]
    if len(present) < 2:
        raise MissingRows("phi: needs rank comparison rows for A and A-A_init / A_init")
    rank_rows, r1, r2, seed = _rank_rows(t, quantity="A", r_small=r_small, r_large=r_large, seed=None)
    layer = middle_layer(rank_rows["layer"], layer)
    modules = modules_at(rank_rows, layer)
    seed_any = rows_where(t, comparison="seed", quantity="A")
    columns: list[tuple[str, str, dict]] = []
    for wt in modules:
        columns.append((f"{_wt_title(wt, layer)}\nr={r1} vs r={r2}, seed {seed}", wt,
                        {"comparison": "rank", "r1": r1, "r2": r2, "seed1": seed}))
    if len(seed_any):
        rank_s = int(seed_any["r1"].max())
        pair = sorted(set(zip(seed_any["seed1"], seed_any["seed2"], strict=True)))[0]
        for wt in modules:
            columns.append((f"{_wt_title(wt, layer)}\nr={rank_s}, seed {pair[0]} vs {pair[1]}", wt,
                            {"comparison": "seed", "r1": rank_s, "r2": rank_s, "seed1": pair[0], "seed2": pair[1]}))
    fig, axes = _new_figure(len(present), len(columns), width=2.6 * len(columns) + 1.0, height=2.4 * len(present))
    for a, quantity in enumerate(present):
        for b, (title, wt, sel) in enumerate(columns):
            ax = axes[a, b]
            rows = rows_where(t, quantity=quantity, module=modules[wt], **sel)
            if len(rows) == 0:
                ax.set_visible(False)
                continue
            _heatmap(ax, _grid(rows, i_max=zoom, j_max=zoom), vmin=0.0, vmax=1.0,
                     title=(title + "\n" if a == 0 else "") + f"φ on {_quantity_name(quantity)}")
    _colorbar(fig, axes.ravel().tolist(), vmin=0.0, vmax=1.0)
    fig.suptitle("Initialisation control: how much of each overlap did learning create?")
    return fig


# --------------------------------------------------------------------------------------------- output


def save_figure(fig: Figure, out_dir: str | Path, name: str) -> list[Path]:
    """Save ``fig`` as ``<out_dir>/<name>.png`` (dpi 200) and ``.pdf``, each atomically; closes the figure."""
    out = Path(out_dir)
    paths = []
    try:
        for fmt in ("png", "pdf"):
            path = out / f"{name}.{fmt}"
            # No creation date in the PDF: re-rendering the same tables gives byte-identical files.
            metadata = {"CreationDate": None} if fmt == "pdf" else None
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=fmt, dpi=DPI, bbox_inches="tight", metadata=metadata)
            paths.append(path)
    finally:
        plt.close(fig)
    return paths


def markdown_table(df: pd.DataFrame, *, floatfmt: str = ".4g") -> str:
    """A GitHub markdown table of ``df`` (floats formatted with ``floatfmt``, NaN shown as an empty cell)."""

    def cell(v) -> str:
        if isinstance(v, float | np.floating):
            return "" if math.isnan(v) else format(float(v), floatfmt)
        return str(v)

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body]) + "\n"


def save_table(df: pd.DataFrame, out_dir: str | Path, name: str, *, title: str = "") -> list[Path]:
    """Write ``df`` as ``<name>.csv`` and ``<name>.md`` (markdown, with an optional heading), atomically."""
    out = Path(out_dir)
    csv = out / f"{name}.csv"
    with atomic_path(csv) as tmp:
        df.to_csv(tmp, index=False)
    md = write_text(out / f"{name}.md", (f"## {title}\n\n" if title else "") + markdown_table(df))
    return [csv, md]


def save_figure_as(fig: Figure, path: str | Path, *, dpi: int = 150) -> Path:
    """Save ``fig`` to ``path`` (format from its suffix: png, pdf or svg) atomically; closes the figure."""
    fmt = str(path).rsplit(".", 1)[-1].lower()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, metadata={"CreationDate": None} if fmt == "pdf" else None)
    finally:
        plt.close(fig)
    return Path(path)


def phi_panels(grids: Mapping[str, object], *, title: str, ncols_max: int = 4) -> Figure:
    """One φ heat map per module (``{module key: (r1, r2) grid}``), 1-based i and j, colour scale 0–1."""
    keys = list(grids)
    ncols = min(ncols_max, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols + 1, 2.8 * nrows), squeeze=False,
                             layout="constrained")
    for ax, key in zip(axes.ravel(), keys, strict=False):
        phi = np.asarray(grids[key], dtype=np.float64)
        grid = pd.DataFrame(phi, index=range(1, phi.shape[0] + 1), columns=range(1, phi.shape[1] + 1))
        sns.heatmap(grid, ax=ax, vmin=0.0, vmax=1.0, cmap=CMAP, cbar=False,
                    xticklabels=max(1, grid.shape[1] // 8), yticklabels=max(1, grid.shape[0] // 8))
        ax.set_title(key if len(key) < 40 else "…" + key[-39:], fontsize=8)
        ax.set_xlabel("j")
        ax.set_ylabel("i")
        ax.tick_params(axis="both", labelrotation=0)
    for ax in axes.ravel()[len(keys):]:
        ax.set_visible(False)
    fig.colorbar(plt.cm.ScalarMappable(norm=plt.Normalize(0, 1), cmap=CMAP), ax=axes.ravel().tolist(), label=PHI_LABEL)
    fig.suptitle(title, fontsize=9)
    return fig


# (name, renderer taking the tables mapping) for every figure; render_all runs them in this order.
_FIGURES: list[tuple[str, Callable[[Mapping[str, pd.DataFrame]], Figure]]] = [
    ("figure3", lambda t: figure3(t.get("phi"))),
    ("figure3_B", lambda t: figure3(t.get("phi"), quantity="B")),
    ("figure4", lambda t: figure4(t.get("phi"))),
    ("figure6", lambda t: figure6(t.get("phi"))),
    ("figure7", lambda t: figure7(t.get("phi"))),
    ("figure8", lambda t: figure8(t.get("fig8"))),
    ("table5", lambda t: table5_plot(t.get("quality"))),
    ("table6", lambda t: table6_plot(t.get("quality"))),
    ("table7_amplification", lambda t: table7_plot(t.get("table7"))),
    ("spectra", lambda t: spectra(t.get("spectra"), t.get("singular_values"))),
    ("init_control", lambda t: init_control(t.get("phi"))),
]
# Beyond Section 7 (training snapshots, full fine-tuning): drawn where the tables hold their rows
_BEYOND_FIGURES: list[tuple[str, Callable[[Mapping[str, pd.DataFrame]], Figure]]] = [
    ("dynamics", lambda t: dynamics_plot(t.get("dynamics"))),
    ("full_spectrum", lambda t: full_spectrum_plot(t.get("full_singular_values"), t.get("full_spectra"))),
]

_TABLES: list[tuple[str, str, Callable[[Mapping[str, pd.DataFrame]], pd.DataFrame]]] = [
    ("table5", "Table 5: validation metric per weight set at one parameter budget", lambda t: table5(t.get("quality"))),
    ("table6", "Table 6: validation metric vs rank", lambda t: table6(t.get("quality"))),
    ("table7", "Table 7: projections of W onto ΔW's subspace, norms, amplification", lambda t: table7(t.get("table7"))),
]

FIGURE_NAMES = tuple(name for name, _ in _FIGURES)
BEYOND_FIGURE_NAMES = tuple(name for name, _ in _BEYOND_FIGURES)


def render_all(tables: Mapping[str, pd.DataFrame], out_dir: str | Path, *, quiet: bool = True) -> list[Path]:
    """Render every figure and table the given tables allow into ``out_dir``; returns the files written.

    A figure whose rows are absent (e.g. no seed comparison in a one-seed run) is skipped with a log message,
    so a partial run still gets every figure it can support.
    """
    from tqdm import tqdm  # plain text bars: tqdm.auto warns without ipywidgets in a notebook

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    jobs = [("figure", n, f) for n, f in [*_FIGURES, *_BEYOND_FIGURES]]
    jobs += [("table", n, (title, f)) for n, title, f in _TABLES]
    for kind, name, job in tqdm(jobs, desc="figures", disable=quiet, unit="fig"):
        try:
            if kind == "figure":
                written += save_figure(job(tables), out, name)
            else:
                title, make = job
                written += save_table(make(tables), out, name, title=title)
        except MissingRows as exc:
            log.info("skipped %s: %s", name, exc)
            plt.close("all")
    return written


def draw(name: str, tables: Mapping[str, pd.DataFrame]) -> Figure | None:
    """The figure ``name`` (one of :data:`FIGURE_NAMES`) from ``tables``, or ``None`` with the reason printed when
    the tables lack its rows (for notebooks and scripts that run on any adapter directory)."""
    makers = dict([*_FIGURES, *_BEYOND_FIGURES])
    if name not in makers:
        raise UserError(f"figure {name!r}: unknown; known: {', '.join(FIGURE_NAMES + BEYOND_FIGURE_NAMES)}")
    try:
        return makers[name](tables)
    except MissingRows as exc:
        plt.close("all")
        print(f"{name}: not drawn: {exc}")
        return None


def tabulate(name: str, tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame | None:
    """The table ``name`` (``table5``, ``table6``, ``table7``) from ``tables``, or ``None`` with the reason printed."""
    makers = {n: f for n, _, f in _TABLES}
    if name not in makers:
        raise UserError(f"table {name!r}: unknown; known: {', '.join(makers)}")
    try:
        return makers[name](tables)
    except MissingRows as exc:
        print(f"{name}: not available: {exc}")
        return None


def planted_rank(result) -> Figure:
    """The planted-rank validation (:func:`lora_analysis.validate.validate_layer`): φ(i, i) curves against i.

    Plots the fields of a ``LayerValidation`` as they are: φ between ranks on A, on A − A_init and between the
    starts, φ between seeds, and the random baseline i / d_in, with the planted rank K marked.
    """
    fig, axes = _new_figure(1, 1, width=5.4, height=3.6)
    ax = axes[0, 0]
    curves = [("ranks, on A", result.phi_ranks, "-"), ("ranks, on A − A_init", result.phi_ranks_learned, "--"),
              ("ranks, starts A_init", result.phi_ranks_init, ":"), ("seeds, on A", result.phi_seeds, "-."),
              ("random baseline i/d", result.phi_random, "-")]
    for label, ys, ls in curves:
        if len(ys):
            ax.plot(range(1, len(ys) + 1), ys, ls=ls, marker="o", ms=3, label=label)
    ax.axvline(result.planted_rank, color="0.5", lw=1, ls=":", label=f"planted rank K = {result.planted_rank}")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("i")
    ax.set_ylabel(r"$\phi(i, i)$")
    ax.set_title(f"Planted-rank validation: {result.module}")
    ax.legend(frameon=False, fontsize="small")
    sns.despine(fig)
    return fig

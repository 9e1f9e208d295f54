"""Renderers beyond Section 7: the training trajectory and full fine-tuning's spectrum. A tidy table in, a Figure
out; no maths (the values and nulls come ready-made from :mod:`lora_analysis.tables.dynamics` and
:mod:`lora_analysis.tables.full_finetune`).

- ``dynamics``: each Section 7 quantity against the training step, one line per layer (solid ΔW_q, dashed
  ΔW_v, averaged over seeds), the random null as a grey band (its range over layers and seeds).
- ``full_spectrum``: σ_i / σ_1 of full fine-tuning's ΔW per layer, for ΔW_q and ΔW_v, with its effective ranks.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from lora_analysis.tables.select import PAPER_TABLE7_RANKS, MissingRows, nearest_rank, phi_rank_pair

__all__ = ["DYNAMICS_PANELS", "dynamics_plot", "full_spectrum_plot"]

# (quantity, comparison, title); φ on ΔW's own directions, as the verdicts use it
DYNAMICS_PANELS = (
    ("phi11_dW", "rank", "φ(1,1) between ranks (ΔW)"),
    ("phikk_dW", "rank", "φ(k,k) between ranks (ΔW)"),
    ("phi11_dW", "seed", "φ(1,1) between seeds (ΔW)"),
    ("phikk_dW", "seed", "φ(k,k) between seeds (ΔW)"),
    ("phi11_A", "rank", "φ(1,1) between ranks (A)"),
    ("proj_ratio", "adapter", "‖UᵀWV‖ / random (Table 7)"),
    ("amplification", "adapter", "amplification ‖ΔW‖/‖UᵀWV‖"),
    ("entropy_rank", "adapter", "effective rank of ΔW"),
)


def _theme() -> None:
    sns.set_theme(style="white", context="paper", font_scale=1.0, rc={"savefig.bbox": "tight"})


def dynamics_plot(dynamics: pd.DataFrame | None) -> Figure:
    """Each quantity against the step: one line per layer and weight type (mean over seeds and pairs), the random
    null as a grey band. Table 7's quantities are shown at the rank nearest the paper's r = 4, the effective rank
    at the largest rank, the rank comparisons for the pair Figure 3 shows.

    Raises:
        MissingRows: without snapshot rows.
    """
    if dynamics is None or len(dynamics) == 0:
        raise MissingRows("dynamics: no training snapshots in this run")
    panels = [p for p in DYNAMICS_PANELS
              if ((dynamics["quantity"] == p[0]) & (dynamics["comparison"] == p[1])).any()]
    _theme()
    ncols = 4
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.7 * nrows), squeeze=False, layout="constrained")
    layers = sorted({int(x) for x in dynamics["layer"]})
    colours = dict(zip(layers, sns.color_palette("viridis", len(layers)), strict=True))
    for ax, (q, comp, title) in zip(axes.ravel(), panels, strict=False):
        rows = dynamics[(dynamics["quantity"] == q) & (dynamics["comparison"] == comp)]
        if comp == "adapter":
            # Table 7's quantities at the rank nearest the paper's r = 4; the effective rank at the largest rank
            # (a rank-1 ΔW has effective rank 1 at every step: nothing to see)
            present = sorted({int(r) for r in rows["r1"]})
            r = present[-1] if q == "entropy_rank" else nearest_rank(present, PAPER_TABLE7_RANKS[0])
            rows = rows[rows["r1"] == r]
            title += f", r={r}"
        elif comp == "rank":
            # one rank pair, as Figure 3 picks it (the pairs of a run need not include (min r1, max r2): the
            # paper's literal pair and the r/d-scaled one differ)
            r1, r2 = phi_rank_pair(rows)
            rows = rows[(rows["r1"] == r1) & (rows["r2"] == r2)]
            title += f", r={int(r1)} vs {int(r2)}"
        band = rows.groupby("step")["null"].agg(["min", "max"])
        ax.fill_between(band.index, band["min"], band["max"], color="0.8", alpha=0.8, lw=0, label="random null")
        ax.plot(band.index, band["max"], color="0.6", lw=0.6)
        for (layer, wt), sub in rows.groupby(["layer", "weight_type"], sort=True):
            mean = sub.groupby("step")["value"].mean()
            ax.plot(mean.index, mean.values, marker="o", ms=2.5, lw=1.1, color=colours[int(layer)],
                    ls="-" if wt == "q" else "--", label=f"layer {int(layer)} ΔW_{wt}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", frameon=False, fontsize="small")
    fig.suptitle("How the Section 7 quantities form during training (solid ΔW_q, dashed ΔW_v; grey: random null)")
    sns.despine(fig)
    return fig


def full_spectrum_plot(singular_values: pd.DataFrame | None, spectra: pd.DataFrame | None = None) -> Figure:
    """σ_i / σ_1 of the full ΔW against i (log scale), one line per layer (mean over seeds), for ΔW_q and ΔW_v.

    Raises:
        MissingRows: without full fine-tuning rows.
    """
    if singular_values is None or len(singular_values) == 0:
        raise MissingRows("full_singular_values: no full fine-tuning in this run")
    _theme()
    types = sorted(set(singular_values["weight_type"]))
    fig, axes = plt.subplots(1, len(types), figsize=(4.2 * len(types), 3.2), squeeze=False, layout="constrained")
    layers = sorted({int(x) for x in singular_values["layer"]})
    colours = dict(zip(layers, sns.color_palette("viridis", len(layers)), strict=True))
    for ax, wt in zip(axes[0], types, strict=True):
        rows = singular_values[singular_values["weight_type"] == wt]
        for layer, sub in rows.groupby("layer", sort=True):
            first = sub[sub["index"] == 1].set_index("seed")["sigma"]
            rel = sub.assign(rel=sub["sigma"] / sub["seed"].map(first)).groupby("index")["rel"].mean()
            ax.plot(rel.index, rel.values, color=colours[int(layer)], lw=1.1, label=f"layer {int(layer)}")
        ax.set_yscale("log")
        ax.set_xlabel("i")
        ax.set_ylabel("σ_i / σ_1")
        title = f"full fine-tuning ΔW_{wt}"
        if spectra is not None and len(spectra):
            s = spectra[spectra["weight_type"] == wt]
            title += (f"\nentropy rank {s['entropy_rank'].mean():.1f} (Gaussian {s['random_entropy_rank'].mean():.1f}),"
                      f" 90 % energy {s['energy_rank_90'].mean():.1f}")
        ax.set_title(title, fontsize=9)
        ax.legend(frameon=False, fontsize="small")
    sns.despine(fig)
    return fig

"""lora_analysis.render.beyond_figures: a figure from rows, MissingRows (and a skip in render_all) without them."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from lora_analysis.render import figures as F
from lora_analysis.render.beyond_figures import dynamics_plot, full_spectrum_plot
from lora_analysis.tables.dynamics import DYNAMICS_COLUMNS
from lora_analysis.tables.full_finetune import FULL_COLUMNS
from lora_analysis.tables.select import MissingRows


def _dynamics() -> pd.DataFrame:
    rows = []
    for step in (0, 10, 20):
        for layer in (0, 1):
            for wt in ("q", "v"):
                base = {"step": step, "module": f"l{layer}.{wt}", "weight_type": wt, "layer": layer, "seed1": 0,
                        "seed2": 0}
                rows.append({**base, "quantity": "phi11_A", "comparison": "rank", "r1": 2, "r2": 8,
                             "value": 0.1 * step / 20, "null": 1 / 32})
                if step:
                    rows.append({**base, "quantity": "proj_ratio", "comparison": "adapter", "r1": 2, "r2": 2,
                                 "value": 1 + step / 10, "null": 1.0})
    return pd.DataFrame(rows, columns=DYNAMICS_COLUMNS)


def test_dynamics_plot_one_panel_per_quantity_with_a_null_band():
    fig = dynamics_plot(_dynamics())
    shown = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert len(shown) == 2 and any("r=2 vs 8" in ax.get_title() for ax in shown)
    assert any(ax.get_title().endswith("r=2") for ax in shown)  # Table 7 at the rank nearest 4 of those present
    assert all(len(ax.collections) >= 1 for ax in shown)  # the random-null band
    assert all(len(ax.lines) == 1 + 4 for ax in shown)  # the band's edge + 2 layers × {q, v}
    plt.close(fig)


def test_dynamics_plot_with_rank_pairs_that_do_not_span_min_and_max():
    # the default run's pairs: the paper's literal (8, 64) and an r/d-scaled (1, 4); (1, 64) is not among them
    d = _dynamics()
    other = d[d["comparison"] == "rank"].assign(r1=1, r2=4, value=0.5)
    d = pd.concat([d.assign(r1=d["r1"].where(d["comparison"] != "rank", 8),
                            r2=d["r2"].where(d["comparison"] != "rank", 64)), other], ignore_index=True)
    fig = dynamics_plot(d)
    (ax,) = [ax for ax in fig.axes if ax.get_visible() and "vs" in ax.get_title()]
    assert "r=8 vs 64" in ax.get_title() and len(ax.lines) == 1 + 4
    assert all(max(line.get_ydata()) < 0.5 for line in ax.lines[1:])  # the (1, 4) rows are not mixed in
    plt.close(fig)


def test_full_spectrum_plot_and_missing_rows(tmp_path):
    sv = pd.DataFrame([{"module": f"l{layer}.{wt}", "weight_type": wt, "layer": layer, "seed": 0, "index": i,
                        "sigma": 1.0 / i} for layer in (0, 1) for wt in ("q", "v") for i in range(1, 6)],
                      columns=FULL_COLUMNS["full_singular_values"])
    fig = full_spectrum_plot(sv)
    assert len(fig.axes) == 2 and all(len(ax.lines) == 2 for ax in fig.axes)
    plt.close(fig)
    for bad in (None, sv.iloc[:0]):
        with pytest.raises(MissingRows):
            full_spectrum_plot(bad)
        with pytest.raises(MissingRows):
            dynamics_plot(None)
    assert F.draw("dynamics", {}) is None  # a run without snapshots: nothing drawn, the reason printed
    written = {p.name for p in F.render_all({}, tmp_path)}
    assert not {"dynamics.png", "full_spectrum.png"} & written

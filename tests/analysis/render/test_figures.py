"""Renderers of lora_analysis.render.figures on synthetic tables that follow the tables.build schemas.

Each renderer must show exactly the table's numbers (checked cell by cell), carry the paper's axes (i, j),
colour scales (0–1 for Figure 3, 0–0.5 for Figure 4) and titles, and write non-empty PNG + PDF files.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from synthetic_tables import module_key, synthetic_tables  # noqa: E402

from lora_analysis.render import figures as F  # noqa: E402
from lora_analysis.tables import aggregate as A  # noqa: E402
from lora_analysis.tables.select import MissingRows  # noqa: E402


@pytest.fixture(scope="module")
def tables() -> dict[str, pd.DataFrame]:
    return synthetic_tables()


@pytest.fixture(scope="module")
def small_tables() -> dict[str, pd.DataFrame]:
    """Ranks up to 8 only: small grids, so saving every figure stays fast."""
    return synthetic_tables(layers=(0, 1), ranks=(2, 4, 8))


def _visible(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.images]


def _image(ax) -> np.ndarray:
    return np.asarray(ax.images[0].get_array())


def test_figure3_shows_the_table(tables):
    fig = F.figure3(tables["phi"])
    axes = _visible(fig)
    assert len(axes) == 4
    q_full, v_full, q_zoom, v_zoom = axes
    assert _image(q_full).shape == (8, 64) and _image(q_zoom).shape == (8, 8)
    for ax in axes:
        assert ax.get_xlabel() == "j" and ax.get_ylabel() == "i"
        assert ax.images[0].get_clim() == (0.0, 1.0)
    assert "W_{q}" in q_full.get_title() and "layer 2" in q_full.get_title()
    assert "W_{v}" in v_full.get_title() and "j ≤ 8" in v_zoom.get_title()
    phi = tables["phi"]
    want = phi[(phi.comparison == "rank") & (phi.quantity == "A") & (phi.r1 == 8) & (phi.seed1 == 0)
               & (phi.module == module_key(2, "v")) & (phi.i == 3) & (phi.j == 40)]["phi"]
    assert _image(v_full)[2, 39] == pytest.approx(float(want.iloc[0]))
    assert _image(q_full)[0, 0] == pytest.approx(0.8)  # synthetic top = 0.8
    assert fig.axes[-1].get_ylabel() == F.PHI_LABEL  # the shared colour bar
    matplotlib.pyplot.close(fig)


def test_figure3_nearest_rank_and_quantity(tables):
    fig = F.figure3(tables["phi"], r_small=3, quantity="A-A_init", layer=5)
    q_full = _visible(fig)[0]
    assert _image(q_full).shape in {(2, 64), (4, 64)}
    assert _image(q_full)[0, 0] == pytest.approx(0.7)  # synthetic learned_top
    assert "layer 5" in q_full.get_title()
    matplotlib.pyplot.close(fig)


def test_figure4_seeds_and_random(tables):
    fig = F.figure4(tables["phi"])
    axes = _visible(fig)
    assert len(axes) == 3
    for ax in axes:
        assert ax.images[0].get_clim() == (0.0, 0.5)
        assert _image(ax).shape == (64, 64)
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("j", "i")
    assert "W_{q}" in axes[0].get_title() and "W_{v}" in axes[1].get_title()
    assert "random" in axes[2].get_title()
    matplotlib.pyplot.close(fig)


def test_figure4_falls_back_to_expected_random(tables):
    phi = tables["phi"][tables["phi"].comparison != "random"]
    fig = F.figure4(phi)
    rnd = _visible(fig)[2]
    assert "analytic" in rnd.get_title()
    assert _image(rnd)[9, 3] == pytest.approx(10 / 384)
    matplotlib.pyplot.close(fig)


def test_figures6_and_7_one_row_per_layer(tables):
    fig6 = F.figure6(tables["phi"])
    assert len(_visible(fig6)) == 3 * 4
    titles = " ".join(ax.get_title() for ax in _visible(fig6))
    assert all(f"layer {layer}" in titles for layer in (0, 2, 5))
    fig7 = F.figure7(tables["phi"], layers=[0, 5])
    assert len(_visible(fig7)) == 2 * 3
    assert all(ax.images[0].get_clim() == (0.0, 0.5) for ax in _visible(fig7))
    matplotlib.pyplot.close("all")


def test_figure8_panels(tables):
    fig = F.figure8(tables["fig8"])
    axes = _visible(fig)
    assert [ax.get_title() for ax in axes][:3] == [r"$\Delta W_{q}$, r=4", r"$\Delta W_{q}$, r=8", r"$\Delta W_{q}$, r=64"]
    assert "random" in axes[-1].get_title()
    assert _image(axes[0]).shape == (38, 4)  # i up to 10 % of d = 384, j up to r
    assert "W_{q}" in axes[0].get_ylabel() and "Delta W_{q}" in axes[0].get_xlabel()
    lo, hi = axes[0].images[0].get_clim()
    # one colour scale for every panel: the largest φ shown, or the paper's 0.2 if all are below it
    assert lo == 0.0 and hi == pytest.approx(max(0.2, max(float(_image(ax).max()) for ax in axes)))
    matplotlib.pyplot.close(fig)


def test_table6_aggregates_over_seeds(tables):
    agg = A.table6(tables["quality"])
    q = tables["quality"]
    rows = q[(q.weight_set == "q,v") & (q["rank"] == 8)]["val_metric"].to_numpy()
    got = agg[(agg.weight_set == "q,v") & (agg["rank"] == 8)].iloc[0]
    assert got["mean"] == pytest.approx(rows.mean()) and got["std"] == pytest.approx(rows.std(ddof=1))
    assert got["n_seeds"] == 2 and set(agg.weight_set) == {"q,v"}
    fig = F.table6_plot(tables["quality"])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "rank r" and ax.get_ylabel() == "validation accuracy"
    assert ax.get_xscale() == "log"
    assert any("linear probe" in t.get_text() for t in ax.get_legend().get_texts())
    matplotlib.pyplot.close(fig)


def test_table5_picks_the_common_budget(tables):
    rows = A.table5_rows(tables["quality"])
    assert set(rows.weight_set) == {"q", "k", "v", "o", "q,k", "q,v", "q,k,v,o"}
    assert rows.trainable_params.nunique() == 1
    agg = A.table5(tables["quality"])
    assert agg["mean"].is_monotonic_decreasing
    assert dict(zip(agg.weight_set, agg["rank"], strict=True))["q,k,v,o"] == 2
    fig = F.table5_plot(tables["quality"])
    assert fig.axes[0].get_ylabel() == "validation accuracy"
    assert len(fig.axes[0].patches) == 7
    matplotlib.pyplot.close(fig)


def test_table5_needs_a_shared_budget(tables):
    q = tables["quality"]
    with pytest.raises(MissingRows, match="budget"):
        A.table5(q[q.weight_set == "q,v"])


def test_table7_and_amplification_plot(tables):
    t = A.table7(tables["table7"])
    assert set(t["rank"]) == {4, 64} and set(t.layer) == {0, 2, 5}
    assert len(t) == 3 * 2 * 2  # layers × (q, v) × ranks
    src = tables["table7"]
    row = t[(t.layer == 2) & (t.weight_type == "q") & (t["rank"] == 64)].iloc[0]
    want = src[(src.layer == 2) & (src.weight_type == "q") & (src["rank"] == 64)]["amplification"].mean()
    assert row["amplification"] == pytest.approx(want)
    fig = F.table7_plot(tables["table7"])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "layer" and "amplification" in ax.get_ylabel()
    assert len(ax.get_legend().get_texts()) == 2 * 4  # (q, v) × 4 ranks
    matplotlib.pyplot.close(fig)


def test_spectra_and_init_control(tables):
    fig = F.spectra(tables["spectra"], tables["singular_values"])
    assert fig.axes[0].get_ylabel() == r"$\sigma_k(\Delta W)$" and fig.axes[-1].get_xlabel() == "rank r"
    fig2 = F.init_control(tables["phi"])
    axes = _visible(fig2)
    assert len(axes) == 3 * 4  # (A, A - A_init, A_init) × (rank q, rank v, seed q, seed v)
    assert all(_image(ax).shape == (8, 8) for ax in axes)
    assert _image(axes[8])[0, 0] == pytest.approx(1.0)  # nested starts: A_init rank comparison
    matplotlib.pyplot.close("all")


def test_markdown_table():
    md = F.markdown_table(pd.DataFrame({"a": [1, 2], "b": [0.5, float("nan")]}))
    assert md.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.5 |", "| 2 |  |"]


def test_render_all_writes_png_and_pdf(small_tables, tmp_path, monkeypatch):
    monkeypatch.setattr(F, "DPI", 50)  # the same files, faster on a busy CI machine
    written = F.render_all(small_tables, tmp_path)
    names = {p.name for p in written}
    for name in F.FIGURE_NAMES:
        assert f"{name}.png" in names and f"{name}.pdf" in names
    for name in ("table5", "table6", "table7"):
        assert f"{name}.md" in names and f"{name}.csv" in names
    for p in written:
        assert p.stat().st_size > 0
        head = p.read_bytes()[:8]
        if p.suffix == ".png":
            assert head.startswith(b"\x89PNG")
        elif p.suffix == ".pdf":
            assert head.startswith(b"%PDF")
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_render_all_skips_what_the_run_lacks(small_tables, tmp_path, monkeypatch):
    def fake_save(fig, out_dir, name):  # the skip logic is under test here, not the file writing
        matplotlib.pyplot.close(fig)
        return [tmp_path / f"{name}.png"]

    monkeypatch.setattr(F, "save_figure", fake_save)
    monkeypatch.setattr(F, "save_table", lambda df, out_dir, name, title="": [tmp_path / f"{name}.md"])
    one_seed = {k: v for k, v in small_tables.items()}
    one_seed["phi"] = small_tables["phi"][small_tables["phi"].comparison != "seed"]
    one_seed.pop("quality")
    names = {p.name for p in F.render_all(one_seed, tmp_path)}
    assert "figure3.png" in names and "figure8.png" in names
    assert "figure4.png" not in names and "table6.md" not in names

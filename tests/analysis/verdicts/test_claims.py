"""Verdict logic of lora_analysis.verdicts.claims (and the REPORT.md writer) on synthetic tables whose Section 7 structure is set by the test."""

from __future__ import annotations

import json

import pytest
from synthetic_tables import synthetic_tables

from lora_analysis.render import report_md
from lora_analysis.verdicts import claims as R

KEYS = ["top", "noise", "intrinsic", "amplification", "projection", "fig8", "flat", "table5"]


def _verdicts(tables) -> dict[str, str]:
    claims, _ = R.evaluate_claims(tables)
    return {c.key: c.verdict for c in claims}


@pytest.fixture(scope="module")
def paper_like():
    return synthetic_tables(layers=(0, 2, 5), ranks=(2, 8, 32), seeds=(0, 1))


def test_paper_like_tables_hold(paper_like):
    claims, ctx = R.evaluate_claims(paper_like)
    assert [c.key for c in claims] == KEYS
    assert {c.key: c.verdict for c in claims} == dict.fromkeys(KEYS, R.HOLDS)
    assert (ctx.layer, ctx.r_small, ctx.r_large) == (2, 8, 32)
    top = claims[0]
    assert "0.800" in top.ours  # the synthetic φ(1, 1)
    assert any("A − A_init 0.700" in d and "A_init 1.000" in d for d in top.details)  # init control beside it


def test_opposite_tables_do_not_hold():
    t = synthetic_tables(layers=(0, 2, 5), ranks=(2, 8, 32), top=0.2, noise_scale=8.0, q_shared=0.0, v_shared=0.4,
                         amp_small=2.0, amp_large=20.0, projection_order=("delta", "random", "weight"),
                         fig8_peak=0.9, rank_effect=0.05, best_set="k")
    assert _verdicts(t) == dict.fromkeys(KEYS, R.FAILS)


def test_partly_verdicts(paper_like):
    t = dict(paper_like)
    phi = t["phi"].copy()
    # ΔW_v's top direction no longer shared at the shown layer: one of two weight types -> partly
    mask = ((phi.comparison == "rank") & (phi.quantity == "A") & (phi.weight_type == "v") & (phi.i == 1)
            & (phi.j == 1))
    phi.loc[mask, "phi"] = 0.3
    t["phi"] = phi
    fig8 = t["fig8"].copy()
    fig8.loc[(fig8.source == "delta") & (fig8.weight_type == "q"), "phi"] = 0.4  # between 0.3 and 0.5
    t["fig8"] = fig8
    v = _verdicts(t)
    assert v["top"] == R.PARTLY and v["fig8"] == R.PARTLY
    assert v["noise"] == R.HOLDS  # only cells with i, j >= 2 count


def test_amplification_trend_only_at_shown_layer(paper_like):
    t7 = paper_like["table7"].copy()
    # reverse the trend in every layer but the shown one (2): at L but not in >= 2/3 of layers -> partly
    flip = (t7.layer != 2) & (t7.weight_type == "q")
    t7.loc[flip, "amplification"] = t7.loc[flip, "rank"].astype(float)
    v = _verdicts({**paper_like, "table7": t7})
    assert v["amplification"] == R.PARTLY


def test_missing_rows_are_not_measured(paper_like):
    phi = paper_like["phi"]
    t = {"phi": phi[phi.comparison != "seed"], "table7": paper_like["table7"]}
    v = _verdicts(t)
    assert v["intrinsic"] == R.NOT_MEASURED
    assert v["fig8"] == v["flat"] == v["table5"] == R.NOT_MEASURED
    assert v["top"] == R.HOLDS
    assert _verdicts({}) == dict.fromkeys(KEYS, R.NOT_MEASURED)


def test_write_report(paper_like, tmp_path):
    (tmp_path / "figure3.png").write_bytes(b"\x89PNG")  # a rendered figure: the report links it
    (tmp_path / "table6.md").write_text("x")
    manifest = {"base_model": "sentence-transformers/all-MiniLM-L6-v2", "base_fingerprint": "abc123",
                "task": {"name": "chatterbot", "kind": "classification", "labels": ["a", "b"], "n_train": 10,
                         "n_val": 5},
                "config": {"ranks": [2, 8, 32], "seeds": [0, 1], "steps": 300, "lr": 0.001}, "nested_init": True}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    setup = report_md.setup_from_run(tmp_path)
    assert "all-MiniLM-L6-v2" in setup["base model"] and "nested" in setup["initialisation"]
    path = report_md.write_report(paper_like, tmp_path, setup=setup, validation="layer level: PASSED")
    text = path.read_text()
    assert path.name == "REPORT.md"
    assert text.count("**holds**") >= len(KEYS)
    assert "21.5" in text and "0.32" in text and "73.4" in text  # the paper's numbers (arXiv v2)
    assert "[figure3](figure3.png)" in text and "[table6.md](table6.md)" in text
    assert "A − A_init" in text and "layer level: PASSED" in text
    assert "chatterbot" in text
    assert "figure4.png" not in text  # not rendered, so not linked


def test_report_says_plainly_what_fails(tmp_path):
    t = synthetic_tables(layers=(0, 1), ranks=(2, 8), top=0.2)
    text = report_md.write_report(t, tmp_path).read_text()
    assert "**Does not hold here:**" in text and "top singular direction" in text

"""lora_analysis.verdicts.dynamics: where a verdict settles, and the top-direction trend, each rule driven to pass
and to fail on synthetic tables whose answer the test sets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from synthetic_tables import synthetic_tables

from lora_analysis.tables.dynamics import DYNAMICS_COLUMNS, dynamics_table
from lora_analysis.verdicts import dynamics as V
from lora_analysis.verdicts.claims import FAILS, HOLDS, INCONCLUSIVE, NOT_MEASURED
from lora_analysis.verdicts.registry import SECTION7


def test_settled_at():
    assert V.settled_at([0, 25, 50, 100], [NOT_MEASURED, FAILS, HOLDS, HOLDS]) == 50
    assert V.settled_at([0, 25, 50], [HOLDS, HOLDS, HOLDS]) == 0
    assert V.settled_at([0, 25, 50], [HOLDS, HOLDS, FAILS]) is None  # changes at the last snapshot: never settles
    assert V.settled_at([7], [HOLDS]) is None
    with pytest.raises(ValueError, match="equal length"):
        V.settled_at([0, 1], [HOLDS])


def test_claim_settles_where_the_structure_appears():
    """φ(1, 1) below 0.5 at steps 0 and 25, above from 50 on: claim 1 fails, then holds from step 50."""
    kw = dict(layers=(0, 1, 2, 3), ranks=(2, 8, 32), seeds=(0, 1, 2))
    per_step = {0: synthetic_tables(top=0.05, learned_top=0.05, **kw), 25: synthetic_tables(top=0.1, learned_top=0.1, **kw),
                50: synthetic_tables(top=0.9, learned_top=0.9, **kw), 100: synthetic_tables(top=0.9, learned_top=0.9, **kw)}
    traj = {t.id: t for t in V.claim_trajectories(per_step)}
    top = traj["top_direction_shared"]
    assert top.verdicts == (FAILS, FAILS, HOLDS, HOLDS) and top.settled_at == 50 and "settles at step 50" in top.text()
    per_step[100] = synthetic_tables(top=0.1, learned_top=0.1, **kw)  # it flips back at the end: never settles
    top = {t.id: t for t in V.claim_trajectories(per_step)}["top_direction_shared"]
    assert top.settled_at is None and "never settles" in top.text()
    assert set(traj) == {s.id for s in SECTION7.specs if s.snapshot}  # the φ and Table 7 claims


def _trend_frame(first: dict, last: dict, *, seeds=(0, 1, 2), layers=(0, 1, 2, 3), spread=0.01) -> pd.DataFrame:
    """φ_dW(1, 1) rows at steps 10 and 200 (and step 0 without ΔW), value per weight type from ``first``/``last``."""
    rng = np.random.default_rng(0)
    rows = []
    for step, values in ((10, first), (200, last)):
        for s in seeds:
            for layer in layers:
                for wt, v in values.items():
                    rows.append({"step": step, "quantity": "phi11_dW", "comparison": "rank",
                                 "module": f"layer.{layer}.{wt}", "weight_type": wt, "layer": layer, "r1": 8,
                                 "r2": 64, "seed1": s, "seed2": s, "value": v + spread * rng.standard_normal(),
                                 "null": 1 / 384})
    return pd.DataFrame(rows, columns=DYNAMICS_COLUMNS)


def test_trend_grows_shrinks_flat_and_inconclusive():
    assert V.top_overlap_trend(_trend_frame({"q": 0.2, "v": 0.3}, {"q": 0.6, "v": 0.7})).verdict == V.GROWS
    assert V.top_overlap_trend(_trend_frame({"q": 0.6, "v": 0.7}, {"q": 0.2, "v": 0.3})).verdict == V.SHRINKS
    # a change of zero on average, exactly opposite across seeds: no trend, and too spread to call flat
    frame = _trend_frame({"q": 0.5, "v": 0.5}, {"q": 0.5, "v": 0.5}, spread=0.0)
    late = frame["step"] == 200
    frame.loc[late, "value"] += np.where(frame.loc[late, "seed1"] == 0, 0.3, np.where(frame.loc[late, "seed1"] == 1, -0.3, 0.0))
    assert V.top_overlap_trend(frame).verdict == INCONCLUSIVE
    exact = _trend_frame({"q": 0.5, "v": 0.5}, {"q": 0.51, "v": 0.49}, spread=0.0)
    assert V.top_overlap_trend(exact).verdict == V.FLAT
    assert V.top_overlap_trend(None).verdict == NOT_MEASURED
    assert V.top_overlap_trend(exact[exact["step"] == 10]).verdict == NOT_MEASURED  # one step: no trend


def test_trend_uses_one_rank_pair_when_the_pairs_do_not_span_min_and_max():
    # the default run compares the paper's literal (8, 64) and an r/d-scaled (1, 2); (1, 64) is not a pair
    literal = _trend_frame({"q": 0.2, "v": 0.3}, {"q": 0.6, "v": 0.7})
    scaled = _trend_frame({"q": 0.9, "v": 0.9}, {"q": 0.1, "v": 0.1}).assign(r1=1, r2=2)
    trend = V.top_overlap_trend(pd.concat([literal, scaled], ignore_index=True))
    assert trend.verdict == V.GROWS and trend.mean_first < 0.3  # the (8, 64) rows alone, not mixed with (1, 2)


def test_dynamics_table_from_step_tables():
    """Each step's synthetic tables give one φ(1, 1) row per (module, pair) with the analytic null 1/d."""
    kw = dict(layers=(0, 1), ranks=(2, 8), seeds=(0, 1))
    per_step = {0: synthetic_tables(top=0.2, **kw), 50: synthetic_tables(top=0.8, **kw)}
    dyn = dynamics_table(per_step)
    top = dyn[(dyn["quantity"] == "phi11_A") & (dyn["comparison"] == "rank")]
    assert sorted(set(top["step"])) == [0, 50]
    assert np.allclose(top[top["step"] == 50]["value"], 0.8) and np.allclose(top["null"], 1 / 384, rtol=0.5)
    assert {"proj_ratio", "amplification", "entropy_rank"} <= set(dyn["quantity"])
    doc = V.dynamics_json(V.claim_trajectories(per_step), V.top_overlap_trend(dyn), dyn)
    assert doc["steps"] == [0, 50] and doc["quantities"] and doc["claims"][0]["verdicts"]

"""lora_analysis.verdicts.full_finetune: each LoRA-vs-full rule driven to pass and to fail on synthetic tables."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
from synthetic_tables import synthetic_tables

from lora_analysis.tables.full_finetune import FULL_COLUMNS
from lora_analysis.verdicts import full_finetune as F
from lora_analysis.verdicts.claims import FAILS, HOLDS, INCONCLUSIVE, NOT_MEASURED
from lora_analysis.verdicts.registry import FULL_FINETUNE

SEEDS, LAYERS, D = (0, 1, 2), (0, 1, 2, 3), 384


def _units():
    return list(itertools.product(SEEDS, LAYERS, ("q", "v")))


def _spectra(ratio: float) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = [{"module": f"layer.{lay}.{wt}", "weight_type": wt, "layer": lay, "seed": s, "d_out": D, "d_in": D,
             "dw_norm": 1.0, "stable_rank": 2.0, "entropy_rank": 300 * ratio * (1 + 0.02 * rng.standard_normal()),
             "energy_rank_90": 10, "random_entropy_rank": 300.0, "random_energy_rank_90": 250, "n_intruders": 0}
            for s, lay, wt in _units()]
    return pd.DataFrame(rows, columns=FULL_COLUMNS["full_spectra"])


def _vs(phi_over_null: float, *, lora_intr: float = 2, full_intr: float = 0) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = []
    for (s, lay, wt), r in itertools.product(_units(), (2, 8, 32)):
        null = r / D
        rows.append({"module": f"layer.{lay}.{wt}", "weight_type": wt, "layer": lay, "seed": s, "rank": r, "k": r,
                     "phi": min(1.0, null * phi_over_null * (1 + 0.05 * rng.standard_normal())), "null": null,
                     "lora_intruders": lora_intr + (s % 2), "full_intruders": full_intr})
    return pd.DataFrame(rows, columns=FULL_COLUMNS["full_vs_lora"])


def _by_id(full: dict) -> dict:
    return {c.id: c for c in F.evaluate_full_claims(full)}


def test_low_rank_rule_fails_and_passes():
    assert _by_id({"full_spectra": _spectra(0.1)})["full_low_rank"].verdict == HOLDS
    assert _by_id({"full_spectra": _spectra(0.9)})["full_low_rank"].verdict == FAILS
    assert _by_id({"full_spectra": _spectra(0.5)})["full_low_rank"].verdict == INCONCLUSIVE
    claim = _by_id({"full_spectra": _spectra(0.1)})["full_low_rank"]
    assert claim.null and claim.rule and len(claim.measures["per_layer"]) == 2 * len(LAYERS)


def test_capture_rule_fails_and_passes():
    held = _by_id({"full_vs_lora": _vs(20.0)})["lora_captures_full_subspace"]
    assert held.verdict == HOLDS and held.measures["rank"] == 8
    assert _by_id({"full_vs_lora": _vs(1.0)})["lora_captures_full_subspace"].verdict == FAILS


def test_intruder_rule_fails_and_passes():
    assert _by_id({"full_vs_lora": _vs(1.0, lora_intr=3, full_intr=0)})["lora_more_intruders"].verdict == HOLDS
    assert _by_id({"full_vs_lora": _vs(1.0, lora_intr=0, full_intr=3)})["lora_more_intruders"].verdict == FAILS


def test_full_amplification_uses_table7_rule():
    """Full ΔW rows in Table 7's schema: the amplification rule of claim 4, relabelled."""
    aligned = synthetic_tables(layers=LAYERS, ranks=(4, 64), seeds=SEEDS, f=0.05)["table7"]  # paper-sized
    random_like = synthetic_tables(layers=LAYERS, ranks=(4, 64), seeds=SEEDS, margin=1.0)["table7"]
    a = _by_id({"full_table7": aligned})["full_amplification"]
    assert a.verdict == HOLDS and a.id == "full_amplification" and a.title == FULL_FINETUNE.spec("full_amplification").title
    assert _by_id({"full_table7": random_like})["full_amplification"].verdict == FAILS


def test_missing_tables_are_not_measured():
    assert {c.verdict for c in F.evaluate_full_claims({})} == {NOT_MEASURED}


def test_quality_beside_lora():
    q = pd.DataFrame([{"weight_set": "q,v", "method": "lora", "rank": r, "seed": s, "val_metric": 0.8 + 0.01 * r,
                       "metric_name": "accuracy"} for r in (2, 8) for s in SEEDS]
                     + [{"weight_set": "q,v", "method": "full", "rank": 0, "seed": s, "val_metric": 0.9,
                         "metric_name": "accuracy"} for s in SEEDS])
    out = F.full_quality(q)
    assert out["weight_set"] == "q,v" and out["full"]["mean"] == 0.9 and out["full"]["seeds"] == 3
    assert np.isclose(out["lora"][8]["mean"], 0.88)
    assert F.full_quality(q[q["method"] == "lora"]) == {}

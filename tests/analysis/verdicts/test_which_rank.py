"""The "Which rank?" rule on synthetic accuracy tables, the seed-overlap k, the section rendered, the rank advice."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lora.errors import UserError
from lora_analysis.render.which_rank import rank_advice_lines, which_rank_lines, write_which_rank
from lora_analysis.verdicts.rank_advice import rank_advice, rank_pattern, round_up_pow2
from lora_analysis.verdicts.which_rank import (
    MARGIN,
    decide,
    judge_which_rank,
    rank_span,
    seed_overlap,
    shared_k,
    spectral_answers,
)

LADDER = (1, 2, 4, 8, 64)
N_VAL = 180  # the default task's validation examples: accuracies are multiples of 1/180


def _curve(means: dict[int, float], per_seed: list[float]) -> pd.DataFrame:
    """accuracy = mean(rank) + a seed effect shared by every rank (paired by seed), rounded to whole examples."""
    rows = [{"rank": r, "seed": s, "value": round((m + e) * N_VAL) / N_VAL}
            for r, m in means.items() for s, e in enumerate(per_seed)]
    return pd.DataFrame(rows)


def test_rank_span_names_runs_of_the_ladder():
    assert rank_span([2, 4, 8, 64], LADDER) == "2–64"
    assert rank_span([1, 4, 8], LADDER) == "1, 4–8"
    assert rank_span([64], LADDER) == "64"


def test_must_recommend_the_smallest_rank_within_the_margin():
    # r = 1 loses 5 points on every seed, r = 2 .. 64 are the same adapter quality: recommend 2, call 1 worse
    values = _curve({1: 0.85, 2: 0.90, 4: 0.90, 8: 0.90, 64: 0.90}, [0.0, 0.011, -0.011])
    d = decide(values, curve="resized")
    assert d.best == 2 and d.recommended == 2  # a tie in the mean goes to the smaller rank
    assert d.worse == (1,)
    assert "worse by more than 0.01: 1" in d.answer and "no smaller rank shown within" in d.answer  # 2 is the best
    # now the best is r = 64 by a fraction of an example, paired: r = 4 is within the margin, 1 and 2 are worse
    values = _curve({1: 0.80, 2: 0.85, 4: 0.905, 8: 0.905, 64: 0.91}, [0.0, 0.02, -0.02])
    d = decide(values, curve="resized")
    assert d.best == 64 and d.recommended == 4 and d.worse == (1, 2)
    assert "recommended r=4, the smallest within 0.01 of the best" in d.answer and "ranks 4–64" in d.answer


def test_must_say_indistinguishable_when_three_seeds_cannot_separate_the_ranks():
    rng = np.random.default_rng(0)
    rows = [{"rank": r, "seed": s, "value": round((0.9 + rng.normal(0, 0.02)) * N_VAL) / N_VAL}
            for r in LADDER for s in range(3)]  # independent noise per adapter: differences of ±3 points
    d = decide(pd.DataFrame(rows), curve="trained")
    assert set(d.indistinguishable) | {d.best} == set(LADDER)
    assert "ranks 1–64 are indistinguishable at 3 seeds" in d.answer
    assert d.recommended == d.best and d.worse == ()
    assert f"no smaller rank shown within {MARGIN:g} of the best" in d.answer


def test_one_seed_recommends_nothing():
    d = decide(_curve({1: 0.8, 64: 0.9}, [0.0]), curve="trained")
    assert d.recommended is None and "one seed" in d.answer
    assert decide(_curve({64: 0.9}, [0.0, 0.01]), curve="trained") is None  # one rank: no curve to judge


def _evals() -> pd.DataFrame:
    rows = []
    for s, e in enumerate([0.0, 0.011, -0.011]):
        for r in LADDER:
            rows.append({"curve": "resized", "types": "q,v", "rank": r, "seed": s, "val_metric": 0.9 + e - (r == 1) * 0.05})
            rows.append({"curve": "extracted", "types": "q,v", "rank": r, "seed": s, "val_metric": 0.88 + e})
            if r < 64:
                rows.append({"curve": "resized", "types": "q", "rank": r, "seed": s, "val_metric": 0.9 + e})
                rows.append({"curve": "resized", "types": "v", "rank": r, "seed": s,
                             "val_metric": 0.9 + e - (r <= 2) * 0.05})
    f = pd.DataFrame(rows).assign(metric_name="accuracy", val_loss=0.3, kept=1.0, eval_s=1.5, source="x", key="k")
    return f


def _quality() -> pd.DataFrame:
    rows = [{"weight_set": "q,v", "method": "lora", "rank": r, "seed": s, "val_metric": 0.9, "metric_name": "accuracy"}
            for r in LADDER for s in range(3)]
    rows += [{"weight_set": "q,v", "method": "full", "rank": 0, "seed": s, "val_metric": 0.89,
              "metric_name": "accuracy"} for s in range(3)]
    return pd.DataFrame(rows)


def _phi() -> pd.DataFrame:
    """Seed comparisons at r = 8, d = 64: ΔW_q's seeds share 3 directions, ΔW_v's 1 (φ(k, k) = s/k for k ≥ s)."""
    rows = []
    d = 64
    for wt, s_shared in (("q", 3), ("v", 1)):
        for a, b in ((0, 1), (0, 2), (1, 2)):
            for layer in range(2):
                for k in range(1, 9):
                    phi = min(k, s_shared) / k + (k - min(k, s_shared)) / d + 0.001 * (a + layer)
                    base = {"comparison": "seed", "module": f"l{layer}.{wt}", "weight_type": wt, "layer": layer,
                            "r1": 8, "r2": 8, "seed1": a, "seed2": b, "i": k, "j": k}
                    rows.append({**base, "quantity": "dW", "phi": phi})
                    rows.append({**base, "quantity": "expected_random", "phi": k / d})
    return pd.DataFrame(rows)


def test_seed_overlap_k_follows_claim_2s_rule_and_counts_the_shared_directions():
    ov = seed_overlap(_phi())
    # ratio = d·φ(k, k)/k: q with 3 shared directions stays above 2× while 3·64/k² + (k−3)/k > 2, i.e. k ≤ 9 (all 8)
    assert shared_k(ov, "q") == 8
    # v with 1 shared direction: 64/k² + (k−1)/k > 2 up to k = 5 (k = 6: 1.78 + 0.83 = 2.61 > 2; k = 7: 2.16)
    ratio_v = ov[ov["weight_type"] == "v"].set_index("k")["ratio"]
    expected = [k for k in range(1, 9) if (64 / k**2 + (k - 1) / k) > 2.0]
    assert shared_k(ov, "v") <= max(expected) and ratio_v.loc[shared_k(ov, "v") + 1] < 2.2
    shared = ov.set_index(["weight_type", "k"])["shared"]
    # k·φ − k²/d with φ = 3/8 + 5/64 (+ the 0.001 offsets): 3 + 5/8 − 1
    assert shared.loc[("q", 8)] == pytest.approx(3 + 5 / 8 - 1, abs=0.02)
    spec = spectral_answers(pd.DataFrame([{"module": "m", "weight_type": "q", "layer": 0, "rank": 8, "seed": 0,
                                           "energy_rank_90": 3, "entropy_rank": 4.0, "stable_rank": 1.5}]), ov)
    assert int(spec["shared_k"].iloc[0]) == 8
    assert shared_k(ov.assign(above=lambda f: f["k"] != 2), "q") == 1  # the first failure ends the run
    assert seed_overlap(None).empty and seed_overlap(_phi().query("quantity == 'nothing'")).empty


def test_section_rendered_with_a_recommendation_per_weight_type(tmp_path):
    # the spectral answers are judged from the phi and spectra tables (verdicts.which_rank)
    tables = {"quality": _quality(), "which_rank_evals": _evals(), "phi": _phi(),
              "spectra": pd.DataFrame([{"module": f"l0.{t}", "weight_type": t, "layer": 0, "rank": 64, "seed": s,
                                        "energy_rank_90": 3, "entropy_rank": 5.0, "stable_rank": 1.2}
                                       for t in "qv" for s in range(3)])}
    wr = judge_which_rank(tables)
    assert wr.measured and wr.per_type["q"].recommended == 1 and wr.per_type["v"].recommended == 4
    assert "the smallest rank measured" in wr.per_type["q"].answer and wr.full == {"mean": pytest.approx(0.89),
                                                                                   "seeds": 3}
    assert [d.curve for d in wr.curves] == ["trained", "resized", "extracted"]
    files = write_which_rank(wr, tmp_path)
    assert {p.name for p in files} == {"which_rank.png", "which_rank.pdf", "which_rank_spectral.csv",
                                       "which_rank_overlap.csv"}
    text = "\n".join(which_rank_lines(wr, files={"which_rank.png"}))
    assert "## Which rank?" in text and "**ΔW_q: r=1**, **ΔW_v: r=4**" in text
    assert "![which rank](which_rank.png)" in text and "Rule" in text and "indistinguishable" in text
    assert "| ΔW_q | 64 |" in text and "Cost:" in text
    doc = json.loads(json.dumps(wr.as_json(), allow_nan=False))
    assert doc["recommended"] == {"q": 1, "v": 4} and doc["margin"] == MARGIN


def test_section_without_evaluations_says_not_measured_and_why():
    wr = judge_which_rank({"quality": _quality()})
    assert not wr.measured and [d.curve for d in wr.curves] == ["trained"]
    text = "\n".join(which_rank_lines(wr))
    assert "**not measured**" in text and "lora_analysis.reproduce" in text
    assert wr.as_json()["why_not_measured"]
    assert which_rank_lines(judge_which_rank({})) == []  # nothing at all: no section


def test_rank_advice_rule():
    assert [round_up_pow2(k, 64) for k in (1, 2, 3, 5, 8, 9, 40, 100)] == [1, 2, 4, 8, 8, 16, 64, 64]
    spectra = pd.DataFrame([
        {"module": "a.query", "weight_type": "q", "layer": 0, "rank": r, "seed": s, "energy_rank_90": e,
         "entropy_rank": 3.0, "stable_rank": 1.1}
        for r, s, e in ((8, 0, 3), (8, 1, 5), (4, 0, 4), (8, 2, 2))])
    advice = rank_advice(spectra)
    assert set(advice["rank"]) == {8} and set(advice["suggested_rank"]) == {8}  # max over seeds 5 -> 8
    assert rank_pattern(advice) == {"a.query": 8}
    assert rank_advice(None).empty and rank_advice_lines(None) == []
    with pytest.raises(UserError, match="energy_rank_90"):
        rank_advice(spectra.drop(columns=["energy_rank_90"]))
    assert "rank_pattern.json" in "\n".join(rank_advice_lines(advice))


def test_report_md_and_json_carry_the_section(tmp_path):
    from lora_analysis.render.report_md import write_report
    from lora_analysis.verdicts.claims import Context
    from lora_analysis.verdicts.judgement import Judgement

    wr = judge_which_rank({"quality": _quality(), "which_rank_evals": _evals()})
    advice = rank_advice(pd.DataFrame([{"module": "a.query", "weight_type": "q", "layer": 0, "rank": 8, "seed": 0,
                                        "energy_rank_90": 3, "entropy_rank": 3.0, "stable_rank": 1.1}]))
    md, js = write_report(Judgement([], Context()), tmp_path, which_rank=wr, rank_advice=advice)
    text = md.read_text()
    assert text.index("## Which rank?") < text.index("### Per-layer rank advice")
    assert json.loads(js.read_text())["which_rank"]["recommended"] == {"q": 1, "v": 4}
    md, js = write_report(Judgement([], Context()), tmp_path)  # without it: no section, no key
    assert "Which rank?" not in md.read_text() and "which_rank" not in json.loads(js.read_text())

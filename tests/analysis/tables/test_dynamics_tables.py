"""lora_analysis.tables.dynamics.step_tables on synthetic adapters: a start (B = 0) has no ΔW quantities, a trained
step has them, and shared directions give φ = 1."""

from __future__ import annotations

from pathlib import Path

import torch

from lora.layers import LoRAFactors
from lora_analysis.load.adapters import LoadedAdapter
from lora_analysis.tables.dynamics import common_steps, dynamics_table, step_tables

KEY = "encoder.layer.0.attention.self.query"
D = 40


def _adapter(rank: int, seed: int, *, trained: bool) -> LoadedAdapter:
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(99), dtype=torch.float64))[0]
    A = torch.randn(rank, D, generator=g, dtype=torch.float64)
    B = torch.zeros(D, rank, dtype=torch.float64)
    if trained:  # every adapter learns the same top direction basis[:, 0] (rows) with a strong singular value
        A[0] = 10 * basis[:, 0]
        B[:, 0] = basis[:, 1]
    return LoadedAdapter(path=Path(f"r{rank}_s{seed}"), rank=rank, seed=seed, weight_set="q", alpha=float(rank),
                         base_model=None, factors={KEY: LoRAFactors(A, B, 1.0)}, init_A=None)


def test_start_has_no_delta_quantities_and_trained_step_has_them():
    start = {(r, s): _adapter(r, s, trained=False) for r in (2, 8) for s in (0, 1)}
    t0 = step_tables(start, None)
    assert set(t0["phi"]["quantity"]) == {"A", "expected_random"} and len(t0["spectra"]) == 0
    trained = {(r, s): _adapter(r, s, trained=True) for r in (2, 8) for s in (0, 1)}
    t1 = step_tables(trained, None)
    dw = t1["phi"][(t1["phi"]["quantity"] == "dW") & (t1["phi"]["i"] == 1) & (t1["phi"]["j"] == 1)]
    assert set(dw["comparison"]) == {"rank", "seed"} and torch.allclose(torch.tensor(dw["phi"].values),
                                                                         torch.ones(len(dw), dtype=torch.float64))
    dyn = dynamics_table({0: t0, 10: t1})
    assert set(dyn[dyn["step"] == 0]["quantity"]) == {"phi11_A", "phikk_A"}
    top = dyn[(dyn["step"] == 10) & (dyn["quantity"] == "phi11_dW")]
    assert (top["value"] > 0.999).all() and (top["null"] == 1 / D).all()
    ranks = dyn[dyn["quantity"] == "entropy_rank"]
    assert ((ranks["value"] >= 1) & (ranks["value"] <= ranks["null"])).all()


def test_common_steps(tmp_path):
    for name, steps in (("a", (0, 5, 10)), ("b", (0, 10))):
        (tmp_path / name / "snapshots").mkdir(parents=True)
        for s in steps:
            (tmp_path / name / "snapshots" / f"step_{s:06d}.safetensors").write_bytes(b"")
    assert common_steps([tmp_path / "a", tmp_path / "b"]) == [0, 10]
    assert common_steps([tmp_path / "a", tmp_path / "none"]) == []

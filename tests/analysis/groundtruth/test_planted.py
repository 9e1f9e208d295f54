"""lora_analysis.validate: planted ground truth on the real MiniLM and real text (quick sizes), and the CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from lora_analysis import validate as command
from lora_analysis.groundtruth import planted as V
from lora_analysis.metrics.linalg import top_singular
from lora_analysis.metrics.projection import table7_row

F64 = torch.float64


@pytest.mark.float_sensitive
@pytest.mark.parametrize("alignment", ["weight", "random"])
def test_plant_update_is_exact(alignment):
    W0 = torch.randn(48, 40, generator=torch.Generator().manual_seed(0), dtype=F64)
    cfg = V.PlantConfig(rank=3, amplification=5.0, alignment=alignment, direction_start=0.5)
    p = V.plant_update(W0, cfg)
    S = torch.linalg.svdvals(p.delta())
    torch.testing.assert_close(S[:3], p.S)  # rank exactly K, with the planted singular values
    assert S[3:].max() < 1e-10
    torch.testing.assert_close(p.S / p.S[0], torch.tensor([1.0, 0.75, 0.5], dtype=F64))
    A, B = p.factors()
    assert table7_row(W0, A, B, scaling=1.0).amplification == pytest.approx(5.0, rel=1e-10)
    if alignment == "weight":
        assert p.indices == (20, 21, 22)  # the middle of min(48, 40) = 40 directions
        ws = top_singular(W0)
        torch.testing.assert_close((p.V * ws.V[:, 20:23]).sum(0), torch.ones(3, dtype=F64))
    else:
        assert p.indices is None


def test_plant_config_bad_input():
    with pytest.raises(V.UserError, match="--planted-rank"):
        V.PlantConfig(rank=0)
    with pytest.raises(V.UserError, match="--direction-start"):
        V.PlantConfig(direction_start=1.0)
    with pytest.raises(V.UserError, match="--ranks"):
        V.LayerConfig(ranks=(16, 8))
    with pytest.raises(V.UserError, match="--ranks: the smallest rank 2"):
        V.LayerConfig(ranks=(2, 8))
    with pytest.raises(V.UserError, match="--planted-rank: 50 exceeds"):
        V.plant_update(torch.randn(10, 50), V.PlantConfig(rank=50))


@pytest.mark.float_sensitive
def test_student_branch_is_the_lora_forward():
    """The trained quantity s·B·A·x is exactly LoRALinear.forward(x) − W0·x."""
    g = torch.Generator().manual_seed(0)
    X, W0 = torch.randn(64, 12, generator=g, dtype=F64), torch.randn(10, 12, generator=g, dtype=F64)
    target = X @ torch.randn(10, 12, generator=g, dtype=F64).T
    layer, A0, loss = V.train_layer_student(X, W0, target, r=4, seed=0, steps=3, batch=16, lr=1e-2)
    assert A0.shape == (4, 12) and math.isfinite(loss)
    with torch.no_grad():
        branch = layer(X) - X @ W0.T
    torch.testing.assert_close(branch, X @ layer.factors()[""].delta_weight().T)


def test_corpus_sentences_real_and_deterministic():
    a = V.corpus_sentences(20)
    assert a == V.corpus_sentences(20) and len(set(a)) == 20 and all(isinstance(t, str) and t for t in a)
    with pytest.raises(V.UserError, match="--texts"):
        V.corpus_sentences(10**6)


@pytest.fixture(scope="module")
def layer_result(minilm_path):
    cfg = V.LayerConfig(**V.QUICK_LAYER)
    return V.validate_layer(cfg, model_path=minilm_path)


def test_layer_level_recovers_planted_update(layer_result):
    res = layer_result
    K = res.planted_rank
    assert res.module == "encoder.layer.3.attention.self.query" and res.d_in == 384 and res.tokens > 4 * res.d_in
    assert res.passed, V.format_layer(res)
    assert res.rank_estimate == res.rank_estimate_delta == K
    assert res.phi_ranks[K - 1] >= 0.8 and res.phi_seeds[K - 1] >= 0.8
    assert all(s.relative_error <= 0.1 for s in res.students)
    assert all(abs(s.amplification - res.planted_amplification) <= 0.1 * res.planted_amplification for s in res.students)
    assert res.init_nested == pytest.approx(1.0, abs=1e-8)  # same seed: A_8's start is inside A_16's
    assert len(res.phi_seeds) == len(res.phi_seeds_delta) == len(res.phi_random) == 16
    text = V.format_layer(res)
    assert "PASSED" in text and "rank estimate" in text


def test_model_level_sanity(minilm_path):
    cfg = V.ModelConfig(**V.QUICK_MODEL)
    res = V.validate_model(cfg, model_path=minilm_path)
    assert len(res.modules) == 12  # query and value of 6 layers
    assert {m.layer for m in res.modules} == set(range(6))
    for m in res.modules:
        assert all(math.isfinite(x) for x in (m.relative_error, m.phi_to_planted, m.amplification))
        assert 0.0 <= m.phi_to_planted <= 1.0 and m.relative_error > 0
        assert m.planted_amplification == pytest.approx(cfg.plant.amplification)
    assert math.isfinite(res.initial_loss) and math.isfinite(res.final_loss)
    assert "not expected" in res.limit and "Limit:" in V.format_model(res)
    assert set(f.name for f in dataclasses.fields(res)) >= {"modules", "limit", "final_loss"}


def test_cli_json_and_bad_input(tmp_path, minilm_path, capsys):
    out = tmp_path / "v.json"
    argv = ["--level", "model", "--quick", "--quiet", "--model-steps", "1", "--model-texts", "8", "--json", str(out),
            "--model-path", minilm_path]
    assert command.main(argv) == 0
    data = json.loads(out.read_text())
    assert len(data["model"]["modules"]) == 12 and data["config"]["model"]["steps"] == 1
    assert "Model level" in capsys.readouterr().out

    assert command.main(["--planted-rank", "0"]) == 2
    assert command.main(["--ranks", "16", "8", "--level", "layer"]) == 2
    assert command.main(["--model-path", str(tmp_path / "missing"), "--level", "model"]) == 2
    (tmp_path / "a_file").write_text("x")
    assert command.main(["--json", str(tmp_path / "a_file" / "v.json"), "--level", "model"]) == 2  # before any work
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: --") for line in err)
    assert "is a file, not a directory" in err[-1]
    with pytest.raises(SystemExit) as exc:
        command.main(["--level", "nope"])
    assert exc.value.code == 2

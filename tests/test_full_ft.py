"""lora.full_ft through lora.train --method full: the dense ΔW = W_ft − W0 of each adapted matrix, beside LoRA."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from lora.config import TrainConfig
from lora.errors import UserError
from lora.full_ft import DELTA_NAME, DESCRIPTION_NAME, full_target_paths
from lora.train import grid_points, main, prepare, run_sweep


def _cfg(model_dir, **kw) -> TrainConfig:
    base = dict(model=model_dir, steps=4, batch_size=8, max_length=12, ranks=(2,), seeds=(0,), linear_probe=False,
                method=("lora", "full"))
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def full_run(tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full_run") / "run"
    run_sweep(_cfg(tiny_bert_dir), out, progress=False)
    return out


def test_grid_adds_one_full_point_per_seed(tiny_bert_dir):
    cfg = _cfg(tiny_bert_dir, seeds=(0, 1))
    names = [p.name for p in grid_points(cfg, model=prepare(cfg).template)]
    assert names == ["qv_r2_s0", "qv_r2_s1", "qv_full_s0", "qv_full_s1"]
    only = _cfg(tiny_bert_dir, method=("full",))
    assert [p.name for p in grid_points(only, model=prepare(only).template)] == ["qv_full_s0"]


def test_delta_is_the_difference_of_the_weights(tiny_bert_dir, tmp_path, monkeypatch):
    """ΔW saved = W_ft − W0 of exactly the adapted matrices: the trained model is kept (by wrapping the trainer's
    fit) and its weights compared with the base's."""
    from lora import train

    kept = {}
    real_fit = train.fit

    def keep(model, *args, **kw):
        result = real_fit(model, *args, **kw)
        kept["model"] = model
        return result

    monkeypatch.setattr(train, "fit", keep)
    cfg = _cfg(tiny_bert_dir, method=("full",))
    prep = prepare(cfg)
    point = grid_points(cfg, model=prep.template)[0]
    d = train.train_point(cfg, point, tmp_path)
    deltas = load_file(d / DELTA_NAME)
    paths = full_target_paths(prep.template, ("q", "v"))
    assert sorted(deltas) == sorted(paths) and len(paths) == 4
    model = kept["model"]
    for path in paths:
        expected = model.get_submodule(path).weight.detach() - prep.template.get_submodule(path).weight.detach()
        assert deltas[path].dtype == torch.float32
        assert torch.equal(deltas[path], expected), path
        assert torch.count_nonzero(deltas[path]) > 0
    # nothing else of the backbone was trained: a key matrix stayed at W0
    for name, m in model.named_modules():
        if name.endswith("attention.self.key"):
            assert torch.equal(m.weight, prep.template.get_submodule(name).weight)


def test_description_metrics_and_summary(full_run):
    d = full_run / "qv_full_s0"
    desc = json.loads((d / DESCRIPTION_NAME).read_text())
    assert desc["method"] == "full" and desc["seed"] == 0 and desc["targets"] == ["q", "v"]
    assert desc["full_lr"] == TrainConfig().full_lr and len(desc["modules"]) == 4
    metrics = json.loads((d / "metrics.json").read_text())
    assert 0.0 <= metrics["val_metric"] <= 1.0 and metrics["steps"] == 4 and metrics["lora_params"] == 0
    assert not (d / "adapter_config.json").exists()  # not an adapter: LoRA loaders do not pick it up
    rows = list(csv.DictReader((full_run / "summary.csv").open()))
    full = [r for r in rows if r["name"] == "qv_full_s0"]
    assert len(full) == 1 and full[0]["weight_set"] == "full:q,v" and full[0]["rank"] == "0"
    manifest = json.loads((full_run / "manifest.json").read_text())
    assert manifest["config"]["method"] == ["lora", "full"]
    assert any(p["method"] == "full" for p in manifest["grid"])


def test_bad_method_and_lr(tiny_bert_dir, tmp_path, capsys):
    with pytest.raises(UserError, match="--method: each must be"):
        _cfg(tiny_bert_dir, method=("lora", "dense"))
    with pytest.raises(UserError, match="--full-lr: must be > 0"):
        _cfg(tiny_bert_dir, full_lr=0.0)
    code = main(["--model", tiny_bert_dir, "--method", "full", "--pack", "--steps", "2", "--quiet",
                 "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "--pack" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()

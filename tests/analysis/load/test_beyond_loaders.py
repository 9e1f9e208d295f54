"""lora_analysis.load.snapshots and .full_finetune on a tiny trained run: the last snapshot is the adapter, ΔW
comes back in float64, and bad files give one-line errors naming the file."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import tiny_train_setup

from lora.config import TrainConfig
from lora.errors import UserError
from lora.train import run_sweep
from lora_analysis.load.adapters import load_adapter_dir
from lora_analysis.load.full_finetune import find_full_finetunes, load_full_finetune
from lora_analysis.load.snapshots import load_snapshot, snapshot_steps


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("beyond_load")
    cfg = {**tiny_train_setup(root), "seeds": [0], "snapshot_steps": [0, 3], "method": ["lora", "full"]}
    run_sweep(TrainConfig.from_dict(cfg), root / "run", progress=False)
    return root / "run"


def test_snapshots_load_as_adapters(run):
    a = load_adapter_dir(run / "qv_r2_s0")
    assert snapshot_steps(a.path) == [0, 3]
    last, first = load_snapshot(a, 3), load_snapshot(a, 0)
    for key, f in a.factors.items():
        assert torch.equal(last.factors[key].A, f.A) and torch.equal(last.factors[key].B, f.B)
        assert last.factors[key].scaling == f.scaling and last.factors[key].A.dtype == torch.float64
        assert torch.equal(first.factors[key].A, a.init_A[key]) and not first.factors[key].B.any()
    with pytest.raises(UserError, match="no snapshot at step 7"):
        load_snapshot(a, 7)


def test_bad_snapshot_names_the_file(run, tmp_path):
    import shutil

    copy = tmp_path / "qv_r2_s0"
    shutil.copytree(run / "qv_r2_s0", copy)
    a = load_adapter_dir(copy)
    (copy / "snapshots" / "step_000003.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="step_000003.safetensors: unreadable"):
        load_snapshot(a, 3)
    key = next(iter(a.factors))
    save_file({f"base_model.model.{key}.lora_A.weight": torch.zeros(3, 3)}, str(copy / "snapshots" / "step_000000.safetensors"))
    with pytest.raises(UserError, match="step_000000.safetensors"):
        load_snapshot(a, 0)


def test_full_finetune_loads(run, tmp_path):
    dirs = find_full_finetunes(run)
    assert [d.name for d in dirs] == ["qv_full_s0"]
    full = load_full_finetune(dirs[0])
    assert full.seed == 0 and full.weight_set == "q,v" and len(full.deltas) == 4
    assert all(d.dtype == torch.float64 and d.shape == (32, 32) for d in full.deltas.values())
    assert full.val_metric is not None
    import shutil

    bad = tmp_path / "qv_full_s0"
    shutil.copytree(dirs[0], bad)
    (bad / "delta_weights.safetensors").unlink()
    with pytest.raises(UserError, match="delta_weights.safetensors: missing"):
        load_full_finetune(bad)
    (bad / "full_finetune.json").write_text(json.dumps({"seed": "zero", "weight_set": "q,v"}))
    with pytest.raises(UserError, match="full_finetune.json: needs an integer 'seed'"):
        load_full_finetune(bad)

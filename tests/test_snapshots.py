"""lora.snapshots through lora.train: A and B saved at chosen steps inside each adapter directory.

Step 0 is the start (A = A_init, B = 0); the last step equals the saved adapter; the files use PEFT tensor
names; they work with --workers and are refused with --pack; bad steps exit before training.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lora.config import TrainConfig
from lora.errors import UserError
from lora.snapshots import SNAPSHOT_DIR, snapshot_name, step_of
from lora.train import main, run_sweep


def _cfg(model_dir, **kw) -> TrainConfig:
    base = dict(model=model_dir, steps=4, batch_size=8, max_length=12, ranks=(2, 4), seeds=(0,),
                linear_probe=False, snapshot_steps=(0, 2, 4))
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def snap_run(tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("snap_run") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures start before the per-test one-thread fixture; workers use 1
    try:
        run_sweep(_cfg(tiny_bert_dir), out, progress=False)
    finally:
        torch.set_num_threads(before)
    return out


def test_names_sort_by_step():
    assert snapshot_name(25) == "step_000025.safetensors"
    assert step_of(snapshot_name(1234567)) == 1234567
    assert step_of("adapter_model.safetensors") is None


def test_step0_is_the_start_and_last_is_the_adapter(snap_run):
    for d in ("qv_r2_s0", "qv_r4_s0"):
        folder = snap_run / d / SNAPSHOT_DIR
        assert sorted(p.name for p in folder.iterdir()) == [snapshot_name(s) for s in (0, 2, 4)]
        first = load_file(folder / snapshot_name(0))
        init = load_file(snap_run / d / "init.safetensors")
        final = load_file(snap_run / d / "adapter_model.safetensors")
        a_keys = [k for k in first if k.endswith(".lora_A.weight")]
        assert a_keys and all(k.startswith("base_model.model.") for k in first)
        assert set(first) == {k for k in final if ".lora_" in k}  # PEFT names, the adapter's own keys
        for k in a_keys:
            path = k[len("base_model.model."):-len(".lora_A.weight")]
            assert torch.equal(first[k], init[path])
            assert torch.count_nonzero(first[k.replace("lora_A", "lora_B")]) == 0
        last = load_file(folder / snapshot_name(4))
        middle = load_file(folder / snapshot_name(2))
        for k in last:
            assert torch.equal(last[k], final[k]), k
        assert any(not torch.equal(middle[k], last[k]) for k in last)  # training moved between the steps


def test_manifest_records_the_steps(snap_run):
    cfg = json.loads((snap_run / "manifest.json").read_text())["config"]
    assert cfg["snapshot_steps"] == [0, 2, 4]


def test_workers_write_the_same_snapshots(tiny_bert_dir, snap_run, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    run_sweep(_cfg(tiny_bert_dir), out, progress=False, workers=2)
    for d in ("qv_r2_s0", "qv_r4_s0"):
        for s in (0, 2, 4):
            a = load_file(out / d / SNAPSHOT_DIR / snapshot_name(s))
            b = load_file(snap_run / d / SNAPSHOT_DIR / snapshot_name(s))
            # bitwise: same machine, kernel path (the workers inherit the environment) and one thread each
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_steps_are_refused(tiny_bert_dir, tmp_path):
    with pytest.raises(UserError, match="--snapshot-steps: steps must be >= 0"):
        _cfg(tiny_bert_dir, snapshot_steps=(-1, 2))
    with pytest.raises(UserError, match="--snapshot-steps: duplicate"):
        _cfg(tiny_bert_dir, snapshot_steps=(2, 2))
    with pytest.raises(UserError, match="--snapshot-steps: step 9 is beyond the 4 optimizer steps"):
        run_sweep(_cfg(tiny_bert_dir, snapshot_steps=(0, 9)), tmp_path / "late", progress=False)
    assert not (tmp_path / "late").exists()  # refused before anything was written


def test_pack_is_refused_clearly(tiny_bert_dir, tmp_path, capsys):
    code = main(["--model", tiny_bert_dir, "--steps", "4", "--batch-size", "8", "--max-length", "12", "--ranks", "2",
                 "--seeds", "0", "--snapshot-steps", "0", "4", "--pack", "--quiet", "--no-linear-probe",
                 "--out", str(tmp_path / "packed")])
    err = capsys.readouterr().err
    assert code == 2 and "--pack" in err and "--snapshot-steps" in err and "Traceback" not in err


def test_a_run_from_before_the_new_fields_still_matches(tmp_path):
    """A manifest written before snapshot_steps / method / full_lr existed holds their defaults: it resumes,
    while a config that differs in one of them is refused."""
    from lora import rundir

    cfg = TrainConfig(seeds=(0,))
    new = {"config": cfg.to_dict(), "base_fingerprint": "x", "task": {"fingerprint": "t"}}
    old = {**new, "config": {k: v for k, v in cfg.to_dict().items()
                             if k not in ("snapshot_steps", "method", "full_lr")}}
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    assert rundir.check_manifest_matches(tmp_path, new) is not None
    with pytest.raises(UserError, match="different config"):
        rundir.check_manifest_matches(tmp_path, {**new, "config": {**new["config"], "snapshot_steps": [0, 5]}})

"""A run is verified, not assumed: each finished point records its files (lora.rundir.write_point_record), resume
retrains a damaged point with one note line, and `figures` refuses a damaged run in one line (exit 2) or goes on
with a note naming what is missing (lora.rundir.verify_run). Plus the config checks of the same issue.

One tiny run (a d=32 BERT, 4 steps: LoRA r=2 with snapshots at 0 2 4, and full fine-tuning, seed 0) is trained
per module; each test damages a copy of it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora import rundir
from lora.config import TrainConfig
from lora.errors import UserError
from lora.train import ensure_adapters, main, run_sweep
from lora_analysis import figures

FLAGS = ["--steps", "4", "--batch-size", "8", "--max-length", "12", "--ranks", "2", "--seeds", "0",
         "--no-linear-probe", "--quiet", "--threads", "1", "--workers", "1"]
BOTH = ["--snapshot-steps", "0", "2", "4", "--method", "lora", "full"]
LORA, FULL = "qv_r2_s0", "qv_full_s0"
ADAPTER, DELTA = "adapter_model.safetensors", "delta_weights.safetensors"


def _cfg(model_dir: str, **kw) -> TrainConfig:
    base = dict(model=model_dir, steps=4, batch_size=8, max_length=12, ranks=(2,), seeds=(0,), linear_probe=False,
                snapshot_steps=(0, 2, 4), method=("lora", "full"))
    return TrainConfig(**{**base, **kw})


def _train(cfg: TrainConfig, out: Path) -> Path:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures start before the per-test one-thread fixture; --threads 1 resumes
    try:
        run_sweep(cfg, out, progress=False)
    finally:
        torch.set_num_threads(before)
    return out


@pytest.fixture(scope="module")
def trained(tiny_bert_dir, tmp_path_factory) -> Path:
    return _train(_cfg(tiny_bert_dir), tmp_path_factory.mktemp("integrity") / "run")


@pytest.fixture(scope="module")
def other_full(tiny_bert_dir, tmp_path_factory) -> Path:
    """Another run's full fine-tuning of the same weight set and seed: another full_lr, no LoRA point."""
    cfg = _cfg(tiny_bert_dir, snapshot_steps=None, method=("full",), full_lr=1e-3)
    return _train(cfg, tmp_path_factory.mktemp("other") / "run")


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _resume(model_dir: str, run: Path, capsys) -> list[str]:
    capsys.readouterr()
    assert main(["--model", model_dir, *FLAGS, *BOTH, "--out", str(run)]) == 0
    return capsys.readouterr().err.splitlines()


def _figures(run: Path, tmp_path: Path, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = figures.main(["--runs", str(run), "--out", str(tmp_path / "fig"), "--quiet"])
    return code, capsys.readouterr().err.splitlines()


def _same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _truncate(path: Path, size: int | None = None) -> int:
    whole = path.stat().st_size
    os.truncate(path, whole // 2 if size is None else size)
    return whole


# ---------------------------------------------------------------------------------------------- the record
def test_each_point_records_every_file_it_wrote(trained):
    for name in (LORA, FULL):
        d = trained / name
        record = json.loads((d / rundir.RECORD).read_text())
        files = {p.relative_to(d).as_posix(): p for p in d.rglob("*") if p.is_file() and p.name != rundir.RECORD}
        assert set(record["files"]) == set(files) and record["point"]["name"] == name
        for rel, p in files.items():
            assert record["files"][rel] == {"size": p.stat().st_size,
                                            "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    assert {"snapshots/step_000004.safetensors", ADAPTER, "init.safetensors", "lora_toolkit.json",
            "metrics.json"} <= set(json.loads((trained / LORA / rundir.RECORD).read_text())["files"])
    assert {DELTA, "full_finetune.json", "head.safetensors"} <= set(
        json.loads((trained / FULL / rundir.RECORD).read_text())["files"])
    assert rundir.verify_run(trained) == rundir.RunCheck()  # a whole run: no error, no note


def test_required_names_are_the_writers_names():
    from lora import adapter_io, full_ft

    assert rundir.REQUIRED_FILES["lora"] == (adapter_io.CONFIG_NAME, adapter_io.WEIGHTS_NAME, adapter_io.INIT_NAME,
                                             rundir.METRICS)
    assert rundir.REQUIRED_FILES["full"] == (full_ft.DELTA_NAME, full_ft.DESCRIPTION_NAME, rundir.METRICS)


# ---------------------------------------------------------------------------------------------- resume repairs
@pytest.mark.parametrize("damage, point, needle", [
    ("truncate_adapter", LORA, "adapter_model.safetensors truncated (123 of "),
    ("delete_adapter", LORA, "adapter_model.safetensors missing"),
    ("truncate_snapshot", LORA, "snapshots/step_000002.safetensors truncated ("),
    ("half_delta", FULL, "delta_weights.safetensors truncated ("),
    ("delete_description", FULL, "full_finetune.json missing"),
    ("delete_snapshots", LORA, "snapshots/ missing"),
    ("flip_a_byte", LORA, "init.safetensors changed since it was written"),
])
def test_resume_retrains_a_damaged_point_with_one_note(tiny_bert_dir, trained, run, capsys, damage, point, needle):
    d = run / point
    if damage == "truncate_adapter":
        _truncate(d / ADAPTER, 123)
    elif damage == "delete_adapter":
        (d / ADAPTER).unlink()
    elif damage == "truncate_snapshot":
        _truncate(d / "snapshots" / "step_000002.safetensors")
    elif damage == "half_delta":
        _truncate(d / DELTA)
    elif damage == "delete_description":
        (d / "full_finetune.json").unlink()
    elif damage == "delete_snapshots":
        shutil.rmtree(d / "snapshots")
    else:  # same size, other bytes: only the hash sees it
        raw = bytearray((d / "init.safetensors").read_bytes())
        raw[-1] ^= 0xFF
        (d / "init.safetensors").write_bytes(bytes(raw))
    err = _resume(tiny_bert_dir, run, capsys)
    assert len(err) == 1 and err[0].startswith(f"note: {d}: ") and needle in err[0] and err[0].endswith("; retraining")
    # the point is whole again, bitwise what the uninterrupted run wrote (same seed, one thread)
    assert rundir.verify_run(run) == rundir.RunCheck()
    weights = ADAPTER if point == LORA else DELTA
    assert _same_tensors(d / weights, trained / point / weights)
    other = FULL if point == LORA else LORA  # the healthy point was left alone (its record is unchanged)
    assert (run / other / rundir.RECORD).read_bytes() == (trained / other / rundir.RECORD).read_bytes()
    assert not list(run.glob(".*tmp*"))  # the damaged directory was replaced, nothing left beside it
    assert _resume(tiny_bert_dir, run, capsys) == []  # and the next resume has nothing to say


def test_resume_retrains_a_full_finetuning_copied_from_another_run(tiny_bert_dir, trained, other_full, run, capsys):
    shutil.rmtree(run / FULL)
    shutil.copytree(other_full / FULL, run / FULL)
    err = _resume(tiny_bert_dir, run, capsys)
    assert len(err) == 1 and "trained for another run" in err[0] and "full_lr 0.001 (this run: 0.0003)" in err[0]
    assert _same_tensors(run / FULL / DELTA, trained / FULL / DELTA)


def test_ensure_adapters_retrains_a_damaged_adapter(trained, run, capsys):
    _truncate(run / LORA / ADAPTER)
    capsys.readouterr()
    ensure_adapters(run, (2,), (0,), progress=False)
    err = capsys.readouterr().err
    assert f"note: {run / LORA}: {ADAPTER} truncated" in err and "retraining" in err
    assert _same_tensors(run / LORA / ADAPTER, trained / LORA / ADAPTER)


# ---------------------------------------------------------------------------------------------- figures refuses
def _rerecord(point_dir: Path) -> None:
    """Write the point's record again over its present files: a damage its record cannot see."""
    manifest = rundir.read_manifest(point_dir.parent)
    entry = next(e for e in manifest["grid"] if e["name"] == point_dir.name)
    rundir.write_point_record(point_dir, point=entry, manifest=manifest)


@pytest.mark.parametrize("damage, where, needle", [
    ("delete_snapshot", "qv_r2_s0", "snapshots/step_000002.safetensors missing"),
    ("delete_snapshots", "qv_r2_s0", "snapshots/ missing"),
    ("extra_step", "qv_r2_s0", "snapshots/step_000003.safetensors: not one of the files"),
    ("extra_step_recorded", "qv_r2_s0", "snapshots/step_000003.safetensors: step 3 is not one of the run's "
                                        "snapshot steps (0 2 4)"),
    ("final_snapshot", "qv_r2_s0", "snapshots/step_000004.safetensors: base_model.model."),
    ("half_delta", "qv_full_s0", "delta_weights.safetensors truncated"),
    ("changed_metrics", "qv_r2_s0", "metrics.json changed since it was written"),
    ("extra_adapter", "qv_r8_s0", "not a grid point of this run"),
])
def test_figures_refuses_a_damaged_run_in_one_line(run, tmp_path, capsys, damage, where, needle):
    snaps = run / LORA / "snapshots"
    if damage == "delete_snapshot":
        (snaps / "step_000002.safetensors").unlink()
    elif damage == "delete_snapshots":
        shutil.rmtree(snaps)
    elif damage in ("extra_step", "extra_step_recorded"):
        shutil.copy(snaps / "step_000002.safetensors", snaps / "step_000003.safetensors")
        if damage == "extra_step_recorded":  # listed in the record too: the manifest's steps still refuse it
            _rerecord(run / LORA)
    elif damage == "final_snapshot":  # the last snapshot replaced by the middle one, record rewritten to match
        shutil.copy(snaps / "step_000002.safetensors", snaps / "step_000004.safetensors")
        _rerecord(run / LORA)
    elif damage == "half_delta":
        _truncate(run / FULL / DELTA)
    elif damage == "changed_metrics":
        text = (run / LORA / "metrics.json").read_text()
        assert '"steps": 4,' in text  # an edit of the same length: only the hash sees it
        (run / LORA / "metrics.json").write_text(text.replace('"steps": 4,', '"steps": 5,'))
    else:  # an adapter the manifest never listed
        shutil.copytree(run / LORA, run / "qv_r8_s0")
    code, err = _figures(run, tmp_path, capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {run / where}: ") and needle in err[0] and "Traceback" not in err[0]
    if damage == "final_snapshot":
        assert "differs from adapter_model.safetensors's (the snapshot at the last step is the saved adapter)" in err[0]
    assert not (tmp_path / "fig").exists()  # refused before anything was written


def test_figures_refuses_a_full_finetuning_copied_from_another_run(run, other_full, tmp_path, capsys):
    shutil.rmtree(run / FULL)
    shutil.copytree(other_full / FULL, run / FULL)
    code, err = _figures(run, tmp_path, capsys)
    assert code == 2 and len(err) == 1 and f"{run / FULL}: trained for another run" in err[0]
    (run / FULL / rundir.RECORD).unlink()  # a run from before records: its description still tells
    code, err = _figures(run, tmp_path, capsys)
    assert code == 2 and len(err) == 1
    assert "full_finetune.json: a full fine-tuning of another run: full_lr 0.001 (this run: 0.0003)" in err[0]


def test_figures_on_full_finetuning_alone_says_so(other_full, run, tmp_path, capsys):
    code, err = _figures(other_full, tmp_path, capsys)
    assert code == 2 and len(err) == 1 and "holds only full fine-tuning (qv_full_s0), no LoRA adapter" in err[0]
    assert "nothing here is analysable" in err[0] and "--method lora full" in err[0]
    shutil.rmtree(run / LORA)  # a run whose LoRA points are still to come
    code, err = _figures(run, tmp_path, capsys)
    assert code == 2 and len(err) == 1 and "holds only full fine-tuning so far (qv_full_s0)" in err[0]
    assert "1 LoRA point(s) are not trained yet" in err[0] and "resume the run first" in err[0]


# ---------------------------------------------------------------------------------------------- notes
def test_a_grid_point_not_trained_yet_is_a_note(run):
    shutil.rmtree(run / FULL)
    check = rundir.verify_run(run)
    assert check.errors == () and len(check.notes) == 1
    assert "1 grid point(s) not trained: qv_full_s0; analysed without them" in check.notes[0]
    stream = io.StringIO()
    check.raise_or_note(stream)
    assert stream.getvalue() == f"note: {check.notes[0]}\n"


def test_an_old_run_without_records_is_unverified_not_broken(tiny_bert_dir, run, capsys):
    for name in (LORA, FULL):
        (run / name / rundir.RECORD).unlink()
    check = rundir.verify_run(run)
    assert check.errors == () and len(check.notes) == 1 and "2 point(s) without files.json" in check.notes[0]
    err = _resume(tiny_bert_dir, run, capsys)  # resume trusts what it can check: nothing retrained
    assert len(err) == 1 and err[0].startswith("note: ") and "2 finished point(s) without files.json" in err[0]
    assert not (run / LORA / rundir.RECORD).exists()
    # a cut safetensors file is still seen without a record, from its own header
    whole = _truncate(run / LORA / ADAPTER, 3000)
    assert rundir.verify_run(run).errors[0].startswith(
        f"{run / LORA}: {ADAPTER} truncated (3000 of {whole} bytes)")
    err = _resume(tiny_bert_dir, run, capsys)
    assert f"note: {run / LORA}: {ADAPTER} truncated (3000 of {whole} bytes); retraining" in err
    assert (run / LORA / rundir.RECORD).is_file()  # retrained points get a record


def test_a_point_reused_without_its_snapshots_still_verifies(trained, tmp_path):
    """lora.reuse copies a point into a run that keeps no snapshots, leaving them out: its record still holds."""
    manifest = rundir.read_manifest(trained)
    other = tmp_path / "t5"
    shutil.copytree(trained / LORA, other / LORA, ignore=shutil.ignore_patterns("snapshots"))
    (other / rundir.MANIFEST).write_text(json.dumps({
        **manifest, "config": {**manifest["config"], "snapshot_steps": None, "targets": ["q", "q,v"],
                               "method": ["lora"]},
        "grid": [e for e in manifest["grid"] if e["name"] == LORA]}))
    assert rundir.verify_run(other) == rundir.RunCheck()
    assert rundir.training_settings(manifest) == rundir.training_settings(rundir.read_manifest(other))


# ---------------------------------------------------------------------------------------------- config items
def test_snapshot_steps_need_a_lora_point(tiny_bert_dir, tmp_path, capsys):
    code = main(["--model", tiny_bert_dir, *FLAGS, "--method", "full", "--snapshot-steps", "0", "2",
                 "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and "--snapshot-steps" in err[0] and "--method full" in err[0]
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="--snapshot-steps"):
        _cfg(tiny_bert_dir, method=("full",))
    assert _cfg(tiny_bert_dir, method=("full", "lora")).snapshot_steps == (0, 2, 4)  # with lora: accepted


def test_a_config_value_of_the_wrong_type_is_refused_even_under_a_flag(tiny_bert_dir, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('lr = "fast"\nsteps = 4\n', encoding="utf-8")
    code = main(["--model", tiny_bert_dir, "--config", str(bad), "--lr", "0.01", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and err == [f"error: --config {bad}: lr: must be a number, got 'fast'"]
    assert not (tmp_path / "x").exists()
    from lora.config import config_from_args, load_config_file
    from lora.train import build_parser

    good = tmp_path / "good.toml"
    good.write_text("lr = 0.5\nsteps = 4\n", encoding="utf-8")
    args = build_parser().parse_args(["--config", str(good), "--lr", "0.01"])
    cfg = config_from_args(args, load_config_file(good))
    assert cfg.lr == 0.01 and cfg.steps == 4  # a value of the right type: the flag wins

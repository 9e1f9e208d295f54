"""The whole report on a LLaMA-layout base read lazily (issue 24): ``figures --base CKPT --lazy-base`` on folders
of real peft adapters over a sharded bf16 checkpoint, against the loaded-model route; W read once per module and
released; bad input through the command.

The checkpoint and adapters are tests/llama_checkpoint.py's (hidden 32, intermediate 48, GQA k/v 16 x 32): every
layout the 7B route meets, in miniature, q/v only and all seven linear modules.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from llama_checkpoint import ALL_LINEAR, INDEX, SHARDS, peft_adapter, save_llama
from test_faults import _fill, small_tmpfs  # noqa: F401 (a fixture: a real 1 MiB tmpfs, skipped where none mounts)

from lora.fsio import TEMP_MARK
from lora_analysis import figures
from lora_analysis.load.adapters import load_adapter_dir
from lora_analysis.load.base import BaseWeights, CheckpointWeights
from lora_analysis.tables.build import weight_tables

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict[str, Path]:
    """``{"ckpt", "qv", "all", "ko", "one"}``: the checkpoint and four folders of peft adapters on it: q/v at
    r = 2 and 8, two replicates each; all-linear at r = 2 and 4; k/o only (no {q, v} pair) at r = 2 and 4; one
    all-linear adapter alone (one rank, one replicate)."""
    root = tmp_path_factory.mktemp("llama")
    ckpt = save_llama(root / "ckpt")
    for name, r, targets, seed in [("qv/r2_a", 2, ("q_proj", "v_proj"), 0), ("qv/r2_b", 2, ("q_proj", "v_proj"), 1),
                                   ("qv/r8_a", 8, ("q_proj", "v_proj"), 2), ("qv/r8_b", 8, ("q_proj", "v_proj"), 3),
                                   ("all/r2", 2, ALL_LINEAR, 4), ("all/r4", 4, ALL_LINEAR, 5),
                                   ("ko/r2", 2, ("k_proj", "o_proj"), 6), ("ko/r4", 4, ("k_proj", "o_proj"), 7)]:
        peft_adapter(ckpt, root / name, r=r, targets=targets, seed=seed)
    shutil.copytree(root / "all" / "r4", root / "one" / "r4")
    return {"ckpt": ckpt, **{k: root / k for k in ("qv", "all", "ko", "one")}}


def _figures(capsys, runs: Path, out: Path, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = figures.main(["--runs", str(runs), "--out", str(out), "--quiet", *extra])
    return rc, capsys.readouterr().err


def _one_line(err: str) -> str:
    """The one error line of ``err`` (notes, e.g. that peft adapters record no seed, may come before it)."""
    lines = [line for line in err.strip("\n").split("\n") if not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _verdicts(out: Path) -> dict[str, str]:
    doc = json.loads((out / "report.json").read_text(encoding="utf-8"))
    claims = doc["claims"] if isinstance(doc["claims"], list) else list(doc["claims"].values())
    return {str(c["id"]): c["verdict"] for c in claims}


# ---------------------------------------------------------------------------------------------- the whole report
@pytest.mark.parametrize("folder", ["qv", "all"])
def test_lazy_report_equals_the_loaded_model_route(llama, folder, tmp_path, capsys):
    """Every table within float64 rounding of the route that loads the model through transformers (the same bf16
    values upcast, the same operations: in practice equal), the same verdicts, every figure and REPORT.md."""
    lazy, loaded = tmp_path / "lazy", tmp_path / "loaded"
    rc, err = _figures(capsys, llama[folder], lazy, "--base", str(llama["ckpt"]), "--lazy-base",
                       "--spectral-cache", str(tmp_path / "c1"))
    assert rc == 0, err
    rc, err = _figures(capsys, llama[folder], loaded, "--base", str(llama["ckpt"]),
                       "--spectral-cache", str(tmp_path / "c2"))
    assert rc == 0, err
    names = sorted(p.name for p in (loaded / "tables").glob("*.csv"))
    assert names == sorted(p.name for p in (lazy / "tables").glob("*.csv"))
    assert {"table7.csv", "spectra.csv", "fig8.csv", "phi.csv"} <= set(names)
    for name in names:
        a, b = pd.read_csv(lazy / "tables" / name), pd.read_csv(loaded / "tables" / name)
        assert list(a.columns) == list(b.columns) and len(a) == len(b), name
        for c in a.columns:
            if pd.api.types.is_float_dtype(a[c]):
                # identical inputs and operations: any difference would be rounding, bounded far inside 1e-12
                np.testing.assert_allclose(a[c], b[c], rtol=1e-12, atol=1e-14, err_msg=f"{name}:{c}")
            else:
                assert a[c].tolist() == b[c].tolist(), f"{name}:{c}"
    t7 = pd.read_csv(lazy / "tables" / "table7.csv")
    types = {"q", "v"} if folder == "qv" else {"q", "k", "v", "o", "gate", "up", "down"}
    assert set(t7["module"].str.extract(r"\.(\w+)_proj$")[0]) == types
    if folder == "all":  # non-square gate/up/down and GQA k/v
        assert {(48, 32), (32, 48), (16, 32)} <= set(zip(t7["d_out"], t7["d_in"], strict=True))
    assert _verdicts(lazy) == _verdicts(loaded)
    assert (lazy / "REPORT.md").is_file() and list(lazy.glob("figure*.png"))
    assert not list(lazy.glob("tables/*.gz"))  # adapters from elsewhere: the plain CSV only (pipeline)


@pytest.mark.parametrize("folder", ["ko", "one"])
def test_claims_that_do_not_apply_are_not_measured(llama, folder, tmp_path, capsys):
    """No {q, v} pair (k/o only), or one rank and one replicate: the report is written, and each claim that needs
    what the folder lacks is "not measured" with its reason, never a crash."""
    out = tmp_path / "out"
    rc, err = _figures(capsys, llama[folder], out, "--base", str(llama["ckpt"]), "--lazy-base")
    assert rc == 0, err
    doc = json.loads((out / "report.json").read_text(encoding="utf-8"))
    claims = doc["claims"] if isinstance(doc["claims"], list) else list(doc["claims"].values())
    unmeasured = {c["id"]: c["ours"] for c in claims if c["verdict"] == "not measured"}
    assert {"ko": "q_higher_rank_than_v", "one": "top_direction_shared"}[folder] in unmeasured, claims
    assert all(re.fullmatch(r"not measured: \S.{10,}", why) for why in unmeasured.values()), unmeasured


# ---------------------------------------------------------------------------------------------- one pass over W
def test_each_w_is_read_once_and_released(llama, monkeypatch, capsys):
    """Module-major: every W of a q/v folder (4 adapters) read from the shards once, each SVD computed once, and
    nothing left in memory after the pass; one progress bar over the modules, with its ETA."""
    reads = []
    real = CheckpointWeights.__getitem__

    def counting(self, key):
        reads.append(key)
        return real(self, key)

    monkeypatch.setattr(CheckpointWeights, "__getitem__", counting)
    adapters = [load_adapter_dir(p) for p in sorted(llama["qv"].iterdir()) if p.is_dir()]
    bw = BaseWeights(llama["ckpt"], lazy=True)
    capsys.readouterr()
    got = weight_tables(adapters, bw, fig8=[0, 2], progress=True)
    shown = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if line.strip()]
    assert {line.split(":")[0] for line in shown} == {"base weights"}, shown  # one bar, over the modules
    assert re.search(r"base weights: 100%.* 4/4 \[\S+<\S+", shown[-1]), shown  # elapsed<remaining
    keys = list(adapters[0].factors)
    assert sorted(reads) == sorted(keys) and len(keys) == 4  # 2 layers x {q, v}, each read once
    assert bw.computed == len(keys)
    assert not bw._weights and not bw._spectra  # released
    assert len(got["table7"]) == len(got["spectra"]) == 4 * len(keys)
    assert set(got["fig8"]["rank"]) == {2, 8}


# ---------------------------------------------------------------------------------------------- bad input
def _copy_ckpt(llama, tmp_path) -> Path:
    return Path(shutil.copytree(llama["ckpt"], tmp_path / "ckpt"))


def _missing_shard(ckpt: Path) -> str:
    (ckpt / SHARDS[1]).unlink()
    return rf"{re.escape(str(ckpt / SHARDS[1]))}: no such file \(named in {INDEX}\)"


def _truncated_shard(ckpt: Path) -> str:
    shard = ckpt / SHARDS[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    return rf"{re.escape(str(shard))}: not a readable safetensors file, truncated or damaged.*"


def _index_names_a_missing_file(ckpt: Path) -> str:
    doc = json.loads((ckpt / INDEX).read_text())
    doc["weight_map"]["model.layers.0.self_attn.q_proj.weight"] = "model-00003-of-00003.safetensors"
    (ckpt / INDEX).write_text(json.dumps(doc))
    return rf"{re.escape(str(ckpt / 'model-00003-of-00003.safetensors'))}: no such file \(named in {INDEX}\)"


def _index_names_a_missing_tensor(ckpt: Path) -> str:
    doc = json.loads((ckpt / INDEX).read_text())
    where = doc["weight_map"].pop("model.layers.1.self_attn.v_proj.weight")
    doc["weight_map"]["model.layers.1.self_attn.v_proj.weight"] = SHARDS[0] if where == SHARDS[1] else SHARDS[1]
    (ckpt / INDEX).write_text(json.dumps(doc))
    return r".*: holds no tensor model\.layers\.1\.self_attn\.v_proj\.weight, which " + INDEX + " places there"


def _another_model(ckpt: Path) -> str:
    shutil.rmtree(ckpt)
    save_llama(ckpt, layers=2)  # same keys, then v_proj made 32 x 32: the adapter's ΔW (16, 32) does not fit
    from safetensors.torch import load_file, save_file

    doc = json.loads((ckpt / INDEX).read_text())
    name = "model.layers.0.self_attn.v_proj.weight"
    shard = ckpt / doc["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name] = torch.zeros(32, 32, dtype=torch.bfloat16)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return r".*: tensor model\.layers\.0\.self_attn\.v_proj\.weight: shape \(32, 32\), but ΔW .* do not match"


BAD = {"missing shard": _missing_shard, "truncated shard": _truncated_shard,
       "index names a missing file": _index_names_a_missing_file,
       "index names a missing tensor": _index_names_a_missing_tensor,
       "adapter does not fit the checkpoint": _another_model}


@pytest.mark.parametrize("case", list(BAD))
def test_a_broken_checkpoint_is_one_line_and_writes_nothing(case, llama, tmp_path, capsys):
    ckpt = _copy_ckpt(llama, tmp_path)
    expected = BAD[case](ckpt)
    out = tmp_path / "out"
    rc, err = _figures(capsys, llama["qv"], out, "--base", str(ckpt), "--lazy-base",
                       "--spectral-cache", str(tmp_path / "cache"))
    assert rc == 2, err
    assert re.fullmatch(f"error: {expected}", _one_line(err)), err
    assert not out.exists() or not any(out.rglob("*"))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*"))


def test_lazy_base_without_base_and_a_cache_that_is_a_file(llama, tmp_path, capsys):
    rc, err = _figures(capsys, llama["qv"], tmp_path / "out", "--lazy-base")
    assert rc == 2 and _one_line(err) == "error: --lazy-base: needs --base (the checkpoint's safetensors file or " \
                                         "directory)"
    (tmp_path / "f").write_text("x")
    rc, err = _figures(capsys, llama["qv"], tmp_path / "out", "--base", str(llama["ckpt"]), "--lazy-base",
                       "--spectral-cache", str(tmp_path / "f"))
    assert rc == 2 and _one_line(err) == f"error: --spectral-cache {tmp_path / 'f'}: is a file; expected a directory"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


# ---------------------------------------------------------------------------------------------- a full disk
def test_a_full_disk_for_the_cache_is_a_note_and_for_the_report_one_line(llama, small_tmpfs, tmp_path, capsys):  # noqa: F811
    """A real full tmpfs: the spectral cache there is one note and the report is written elsewhere in full; the
    report there is one line, exit 2, no temporary left."""
    _fill(small_tmpfs, 8)
    cache, out = small_tmpfs / "cache", tmp_path / "out"
    rc, err = _figures(capsys, llama["qv"], out, "--base", str(llama["ckpt"]), "--lazy-base",
                       "--spectral-cache", str(cache))
    assert rc == 0, err
    notes = [line for line in err.splitlines() if "spectral cache" in line]
    assert len(notes) == 1 and notes[0].startswith("note: ") and "no space left on device" in notes[0], err
    assert (out / "REPORT.md").is_file() and not [p for p in small_tmpfs.rglob("*") if TEMP_MARK in p.name]

    out = small_tmpfs / "out"
    rc, err = _figures(capsys, llama["qv"], out, "--base", str(llama["ckpt"]), "--lazy-base",
                       "--spectral-cache", str(tmp_path / "cache"))
    assert rc == 2, err
    line = _one_line(err)
    assert line.endswith(": cannot write: no space left on device"), line
    assert not [p for p in small_tmpfs.rglob("*") if TEMP_MARK in p.name]


def test_two_torchrun_processes_write_the_single_process_report(llama, tmp_path, capsys):
    """``torchrun --nproc_per_node 2 -m lora_analysis.figures``: the weight matrices are split over the ranks and
    gathered, rank 0 writes: every table equals the one-process report's, byte for byte (each module's rows are
    computed by the same operations whichever process computes them), and the verdicts are the same."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--runs", str(llama["all"]), "--base", str(llama["ckpt"]), "--lazy-base", "--quiet"]
    rc, err = _figures(capsys, llama["all"], one, *common[2:], "--spectral-cache", str(tmp_path / "c1"))
    assert rc == 0, err
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "lora_analysis.figures", *common, "--spectral-cache", str(tmp_path / "c2"), "--out", str(two)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in (one / "tables").glob("*.csv"))
    assert names == sorted(p.name for p in (two / "tables").glob("*.csv")) and "table7.csv" in names
    for name in names:
        assert (one / "tables" / name).read_bytes() == (two / "tables" / name).read_bytes(), name
    assert _verdicts(one) == _verdicts(two)
    # each rank decomposed its own share: the two caches hold every module once between them
    assert len(list((tmp_path / "c2").rglob("*.safetensors"))) == len(list((tmp_path / "c1").rglob("*.safetensors")))

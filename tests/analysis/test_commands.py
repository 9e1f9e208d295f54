"""The analysis commands: `python -m lora_analysis.subspace`, `.projection` and `.figures`.

Every bad input must give exit status 2 and exactly one stderr line naming the file/option (and module), with no
traceback, and must leave an existing --json file untouched. Most cases call ``main(argv)`` in-process (the same
code path as the console script, and fast); a few run the real ``python -m`` subprocess end to end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_adapter, peft_named_adapters, tiny_train_setup

from lora_analysis import figures, projection, subspace
from lora_analysis.load.adapters import load_run_adapter
from lora_analysis.load.base import BaseWeights
from lora_analysis.metrics.projection import table7_row
from lora_analysis.metrics.subspace import init_control, subspace_similarity

KEY = "bert.encoder.layer.1.attention.self.query"  # the trainer adapts a task model (BertForSequenceClassification)
SENTINEL = '{"keep": "me"}\n'


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real run of the trainer (Python API) on a tiny BERT and a 40-line CSV: q,v at ranks 2, 4 x seeds 0, 1."""
    from lora.config import TrainConfig
    from lora.threads import torch_threads
    from lora.train import run_sweep

    root = tmp_path_factory.mktemp("cli")
    config = tiny_train_setup(root)
    config["seeds"] = [0, 1]
    with torch_threads(1):  # module-scoped: set up before the per-test one-thread fixture
        run_sweep(TrainConfig.from_dict(config), root / "run", progress=False)
    return root


@pytest.fixture
def run(trained) -> Path:
    return trained / "run"


def _call(module, argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what setting up the case printed (e.g. transformers' save progress bars)
    try:
        rc = module.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse errors exit directly (lora.errors.ArgumentParser: one line, status 2)
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_bad(module, argv, capsys, tmp_path, *patterns: str) -> str:
    """exit 2, one stderr line matching every pattern, no traceback, the existing --json file untouched."""
    js = tmp_path / "existing.json"
    js.write_text(SENTINEL, encoding="utf-8")
    before = js.stat().st_mtime_ns
    argv = [*argv, "--json", js] if "--json" not in argv else argv
    rc, _, err = _call(module, argv, capsys)
    assert rc == 2, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for p in patterns:
        assert p in lines[0], lines[0]
    assert js.read_text(encoding="utf-8") == SENTINEL and js.stat().st_mtime_ns == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".existing.json")]  # no temp file left
    return lines[0]


def _broken_copy(run: Path, tmp_path: Path, how: str) -> Path:
    d = tmp_path / f"broken_{how}"
    shutil.copytree(run / "qv_r4_s0", d)
    w = d / "adapter_model.safetensors"
    if how == "truncated":
        w.write_bytes(w.read_bytes()[:64])
    elif how == "json":
        (d / "adapter_config.json").write_text('{"r": 4,', encoding="utf-8")
    elif how == "nan":
        t = load_file(str(w))
        t[f"base_model.model.{KEY}.lora_A.weight"][1, 2] = float("inf")
        save_file(t, str(w))
    return d


# ------------------------------------------------------------------------------------------- subspace
def test_subspace_rank_comparison_json(run, tmp_path, capsys):
    js = tmp_path / "phi.json"
    rc, out, err = _call(subspace, ["--runs", run, "--r1", 2, "--r2", 4, "--json", js], capsys)
    assert rc == 0, err
    assert "φ(1,1)" in out and "random" in out and KEY in out
    doc = json.loads(js.read_text())
    assert (doc["r1"], doc["r2"], doc["seed1"], doc["seed2"], doc["side"]) == (2, 4, 0, 0, "A")
    a1, a2 = load_run_adapter(run, rank=2), load_run_adapter(run, rank=4)
    assert set(doc["modules"]) == set(a1.factors)
    m = doc["modules"][KEY]
    phi = np.array(m["phi"])
    assert phi.shape == (2, 4)  # phi[i-1][j-1], i = 1..r1, j = 1..r2
    np.testing.assert_allclose(phi, subspace_similarity(a1.factors[KEY].A, a2.factors[KEY].A).numpy(), atol=1e-12)
    ctl = init_control(a1.factors[KEY].A, a1.init_A[KEY], a2.factors[KEY].A, a2.init_A[KEY])
    np.testing.assert_allclose(np.array(m["phi_learned"]), ctl.phi_learned.numpy(), atol=1e-12)
    np.testing.assert_allclose(np.array(m["phi_init"]), ctl.phi_init.numpy(), atol=1e-12)
    assert m["random_expected_11"] == pytest.approx(1 / a1.factors[KEY].A.shape[1])


def test_subspace_seed_comparison_side_b_modules_and_plot(run, tmp_path, capsys):
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    rc, out, err = _call(subspace, ["--runs", run, "--r1", 4, "--r2", 4, "--seed2", 1, "--side", "B",
                                    "--modules", r"layer\.0\.", "--json", js, "--plot", png], capsys)
    assert rc == 0, err
    doc = json.loads(js.read_text())
    assert sorted(doc["modules"]) == ["bert.encoder.layer.0.attention.self.query",
                                      "bert.encoder.layer.0.attention.self.value"]
    assert doc["modules"]["bert.encoder.layer.0.attention.self.query"]["phi_learned"] is None  # B starts at 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_subspace_two_adapter_dirs(run, capsys):
    rc, out, err = _call(subspace, ["--a1", run / "qv_r4_s0", "--a2", run / "qv_r4_s1", "--quiet"], capsys)
    assert rc == 0 and out == "" and err == ""


def test_named_adapters_parent_is_listed_and_analysed(trained, tmp_path, capsys):
    """peft's save_pretrained with several adapters writes one sub-directory each: projection --adapter PARENT
    analyses every one; subspace --a1 PARENT names them and asks for PARENT/NAME (exit 2, one line)."""
    from transformers import AutoModel

    AutoModel.from_pretrained(trained / "tiny").save_pretrained(tmp_path / "base")
    peft_named_adapters(tmp_path / "base", tmp_path)
    named = tmp_path / "named"
    js = tmp_path / "t7.json"
    rc, out, err = _call(projection, ["--adapter", named, "--json", js], capsys)
    assert rc == 0, err
    assert f"{named}: 2 named adapters: other, third" in out
    doc = json.loads(js.read_text())["adapters"]
    assert sorted(doc) == [str(named / "other"), str(named / "third")]
    assert len(doc[str(named / "other")]["modules"]) == 4 and doc[str(named / "third")]["rank"] == 4
    _assert_bad(subspace, ["--a1", named, "--a2", named / "other"], capsys, tmp_path,
                str(named), "2 named adapter(s) (other, third)", f"e.g. {named / 'other'}")
    rc, _, err = _call(subspace, ["--a1", named / "other", "--a2", tmp_path / "both" / "other", "--quiet"], capsys)
    assert rc == 0, err
    # figures on the folder: lists what it found (the root's own adapter as '.'), analyses and reports; Table 7
    # holds one rank only (q,v at r=2), so its claims are measured at that rank instead of failing
    rc, out, err = _call(figures, ["--runs", tmp_path / "both", "--out", tmp_path / "fig"], capsys)
    assert rc == 0, err
    assert f"{tmp_path / 'both'}: 2 adapter(s): . (q, r=2), other (q,v, r=2)" in out
    report = json.loads((tmp_path / "fig" / "report.json").read_text())
    amp = next(c for c in report["claims"] if c["id"] == "amplification")
    assert amp["measures"]["rank"] == 2 and amp["verdict"] != "not measured"


def test_loralib_checkpoints_from_the_command_line(tmp_path, capsys):
    """subspace compares loralib checkpoints without --alpha (φ does not depend on it); --enable-lora names the
    slices of a MergedLinear whose shapes do not tell them; projection still needs --alpha (ΔW's norm does)."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)).save_pretrained(tmp_path / "g")
    g = torch.Generator().manual_seed(1)
    for name in ("a", "b"):  # one group of rank 2: q, k or v? The shapes cannot say.
        torch.save({"h.0.attn.c_attn.lora_A": torch.randn(2, 16, generator=g),
                    "h.0.attn.c_attn.lora_B": torch.randn(16, 2, generator=g)}, tmp_path / f"{name}.pt")
    js = tmp_path / "phi.json"
    argv = ["--a1", tmp_path / "a.pt", "--a2", tmp_path / "b.pt", "--quiet"]
    rc, _, err = _call(subspace, [*argv, "--enable-lora", "k", "--json", js], capsys)
    assert rc == 0, err
    assert list(json.loads(js.read_text())["modules"]) == ["h.0.attn.c_attn:k"]
    _assert_bad(subspace, argv, capsys, tmp_path, "a.pt", "--enable-lora")
    _assert_bad(subspace, [*argv, "--enable-lora", "True,False"], capsys, tmp_path, "--enable-lora True,False")
    _assert_bad(projection, ["--adapter", tmp_path / "a.pt", "--base", tmp_path / "g", "--enable-lora", "v"],
                capsys, tmp_path, "--alpha")
    rc, _, err = _call(projection, ["--adapter", tmp_path / "a.pt", "--base", tmp_path / "g", "--enable-lora", "v",
                                    "--alpha", 4, "--quiet", "--json", js], capsys)
    assert rc == 0, err
    assert list(json.loads(js.read_text())["modules"]) == ["h.0.attn.c_attn:v"]


def test_subspace_default_run_trains_missing_adapter_first(run, tmp_path, capsys, monkeypatch):
    partial = tmp_path / "partial"
    shutil.copytree(run, partial)
    shutil.rmtree(partial / "qv_r4_s1")
    monkeypatch.setenv("LORA_RUNS_DIR", str(partial))
    rc, out, err = _call(subspace, ["--r1", 4, "--r2", 4, "--seed2", 1, "--quiet"], capsys)
    assert rc == 0, err
    assert "training 1 missing adapter(s) (qv_r4_s1)" in err
    assert (partial / "qv_r4_s1" / "adapter_model.safetensors").is_file()
    # a rank the run's grid does not have cannot be trained into it
    _assert_bad(subspace, ["--r1", 2, "--r2", 64], capsys, tmp_path, str(partial), "(64, 0)")


@pytest.mark.parametrize("case", [
    "missing_dir", "file_as_dir", "empty_dir", "rank_absent", "seed_absent", "truncated", "json", "nan",
    "shape_mismatch", "bad_regex", "no_match", "a1_without_a2", "mixed", "bad_side", "plot_format", "json_is_dir",
    "json_under_file", "plot_under_file",
])
def test_subspace_bad_input(case, run, trained, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    r = ["--runs", run]
    cases = {
        "missing_dir": lambda: ([*["--runs", tmp_path / "nope"], "--r1", 2, "--r2", 4], [str(tmp_path / "nope"), "does not exist"]),
        "file_as_dir": lambda: (["--runs", tmp_path / "file", "--r1", 2, "--r2", 4], [str(tmp_path / "file"), "is a file"]),
        "empty_dir": lambda: (["--runs", tmp_path / "empty", "--r1", 2, "--r2", 4], [str(tmp_path / "empty"), "empty"]),
        "rank_absent": lambda: ([*r, "--r1", 8, "--r2", 64], ["rank 8", "available ranks: 2, 4"]),
        "seed_absent": lambda: ([*r, "--r1", 2, "--r2", 4, "--seed2", 7], ["seed 7", "available seeds: 0, 1"]),
        "truncated": lambda: (["--a1", _broken_copy(run, tmp_path, "truncated"), "--a2", run / "qv_r2_s0"],
                                      ["broken_truncated/adapter_model.safetensors"]),
        "json": lambda: (["--a1", run / "qv_r2_s0", "--a2", _broken_copy(run, tmp_path, "json")],
                                 ["broken_json/adapter_config.json", "JSON"]),
        "nan": lambda: (["--a1", _broken_copy(run, tmp_path, "nan"), "--a2", run / "qv_r2_s0"],
                                ["broken_nan", KEY, "NaN or Inf"]),
        "shape_mismatch": lambda: (["--a1", run / "qv_r2_s0", "--a2", _other_adapter(trained, tmp_path)],
                                           ["other_adapter", "module bert.encoder.layer.0.attention.self.query", "ΔW is (48, 48)"]),
        "bad_regex": lambda: ([*r, "--r1", 2, "--r2", 4, "--modules", "("], ["--modules", "invalid regular expression"]),
        "no_match": lambda: ([*r, "--r1", 2, "--r2", 4, "--modules", "mlp"], ["--modules", "matches none"]),
        "a1_without_a2": lambda: (["--a1", run / "qv_r2_s0"], ["--a2", "missing"]),
        "mixed": lambda: (["--a1", run / "qv_r2_s0", "--a2", run / "qv_r4_s0", "--r1", 2], ["--a1/--a2", "--r1/--r2"]),
        "bad_side": lambda: ([*r, "--r1", 2, "--r2", 4, "--side", "C"], ["--side", "invalid choice"]),
        "plot_format": lambda: ([*r, "--r1", 2, "--r2", 4, "--plot", tmp_path / "x.gif"], ["--plot", "unsupported format"]),
        "json_is_dir": lambda: ([*r, "--r1", 2, "--r2", 4, "--json", tmp_path / "empty"], ["--json", "is a directory"]),
        "json_under_file": lambda: ([*r, "--r1", 2, "--r2", 4, "--json", tmp_path / "file" / "phi.json"],
                                    ["--json", "is a file, not a directory"]),
        "plot_under_file": lambda: ([*r, "--r1", 2, "--r2", 4, "--plot", tmp_path / "file" / "phi.png"],
                                    ["--plot", "is a file, not a directory"]),
    }
    argv, patterns = cases[case]()  # built lazily: only this case's files are made
    _assert_bad(subspace, argv, capsys, tmp_path, *patterns)


def _a_file(tmp_path: Path) -> Path:
    (tmp_path / "a_file").write_text("x")
    return tmp_path / "a_file"


def _other_adapter(trained: Path, tmp_path: Path) -> Path:
    """An adapter with the same module keys on a base of another width (48): shapes do not match d=32."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64)
    model = BertForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path / "other_base")
    make_adapter(tmp_path / "other_base", tmp_path / "other_adapter", r=2, seed=0, model=model)
    return tmp_path / "other_adapter"


# ------------------------------------------------------------------------------------------- projection
def test_projection_run_point_json(run, tmp_path, capsys):
    js = tmp_path / "t7.json"
    rc, out, err = _call(projection, ["--runs", run, "--rank", 4, "--seed", 1, "--json", js], capsys)
    assert rc == 0, err
    assert "amplification" in out and KEY in out
    doc = json.loads(js.read_text())
    a = load_run_adapter(run, rank=4, seed=1)
    assert set(doc["modules"]) == set(a.factors)
    m = doc["modules"][KEY]
    f = a.factors[KEY]
    # checked against the metric called directly, not against the table function the command itself uses
    row = table7_row(BaseWeights().weights(a, [KEY])[KEY], f.A, f.B, scaling=f.scaling)
    for col in ("delta", "weight", "w_norm", "dw_norm", "amplification"):
        assert m[col] == pytest.approx(getattr(row, col), rel=1e-12)
    assert 0 < m["random"] < m["weight"]  # a random pair's projection (its own seed) lies below W's top one
    assert m["top"] == 4 and m["amplification"] == pytest.approx(m["dw_norm"] / m["delta"])


def test_projection_adapter_dir_top_and_base(run, trained, capsys, tmp_path):
    js = tmp_path / "t.json"
    rc, _, err = _call(projection, ["--adapter", run / "qv_r4_s0", "--top", 2, "--base", trained / "tiny",
                                    "--modules", "value", "--quiet", "--json", js], capsys)
    assert rc == 0, err
    doc = json.loads(js.read_text())
    assert len(doc["modules"]) == 2 and {m["top"] for m in doc["modules"].values()} == {2}


@pytest.mark.parametrize("case", [
    "missing_dir", "file_as_dir", "empty_dir", "rank_absent", "seed_absent", "nan", "base_other_shape",
    "base_missing", "top_too_large", "adapter_and_rank", "nothing", "truncated", "json_under_file",
])
def test_projection_bad_input(case, run, trained, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    r = ["--runs", run]
    cases = {
        "missing_dir": lambda: (["--adapter", tmp_path / "nope"], [str(tmp_path / "nope"), "does not exist"]),
        "file_as_dir": lambda: (["--adapter", tmp_path / "file"], [str(tmp_path / "file"), "is a file"]),
        "empty_dir": lambda: (["--adapter", tmp_path / "empty"], [str(tmp_path / "empty"), "empty"]),
        "rank_absent": lambda: ([*r, "--rank", 64], ["rank 64", "available ranks: 2, 4"]),
        "seed_absent": lambda: ([*r, "--rank", 2, "--seed", 9], ["seed 9", "available seeds: 0, 1"]),
        "nan": lambda: (["--adapter", _broken_copy(run, tmp_path, "nan")], ["broken_nan", KEY, "NaN or Inf"]),
        "base_other_shape": lambda: (["--adapter", run / "qv_r2_s0", "--base", _other_base(tmp_path)],
                                             ["qv_r2_s0", "module bert.encoder.layer.0.attention.self.query", "do not match"]),
        "base_missing": lambda: (["--adapter", run / "qv_r2_s0", "--base", tmp_path / "nobase"], ["--base", "nobase"]),
        "top_too_large": lambda: (["--adapter", run / "qv_r2_s0", "--top", 3], ["--top"]),
        "adapter_and_rank": lambda: (["--adapter", run / "qv_r2_s0", "--rank", 2], ["--rank", "not used with --adapter"]),
        "nothing": lambda: ([], ["--rank", "missing"]),
        "truncated": lambda: (["--adapter", _broken_copy(run, tmp_path, "truncated")], ["adapter_model.safetensors"]),
        "json_under_file": lambda: (["--adapter", run / "qv_r2_s0", "--json", _a_file(tmp_path) / "t7.json"],
                                    ["--json", "is a file, not a directory"]),
    }
    argv, patterns = cases[case]()  # built lazily: only this case's files are made
    _assert_bad(projection, argv, capsys, tmp_path, *patterns)


def _other_base(tmp_path: Path) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "other_base")
    return tmp_path / "other_base"


# ------------------------------------------------------------------------------------------- real processes
def _run(*argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *map(str, argv)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_subprocess_subspace(run, tmp_path):
    js = tmp_path / "phi.json"
    ok = _run("lora_analysis.subspace", "--runs", run, "--r1", 2, "--r2", 4, "--json", js)
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(js.read_text())["modules"]) == 4
    js.write_text(SENTINEL)
    bad = _run("lora_analysis.subspace", "--runs", run, "--r1", 2, "--r2", 64, "--json", js)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.count("\n") == 1 and "available ranks: 2, 4" in bad.stderr
    assert js.read_text() == SENTINEL


def test_subprocess_projection_bad_file_and_help(run, tmp_path):
    d = _broken_copy(run, tmp_path, "truncated")
    bad = _run("lora_analysis.projection", "--adapter", d)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1
    assert f"{d}/adapter_model.safetensors" in bad.stderr


def test_help_explains_the_metrics(capsys):
    for module, words in ((subspace, ["min(i, j)", "max(i, j) / d", "--side", "--a1"]),
                          (projection, ["||U^T W V||_F", "amplification", "--top", "--base"])):
        with pytest.raises(SystemExit) as exc:
            module.main(["--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        for w in words:
            assert w in out


# ------------------------------------------------------------------------------------------- figures
def test_a_rerun_cleans_what_a_killed_render_left(run, tmp_path):
    out = tmp_path / "figs"
    (out / "tables").mkdir(parents=True)
    stale = [out / ".figure3.png.tmp-abc123", out / "tables" / ".phi.csv.tmp-def456"]
    for p in stale:
        p.write_bytes(b"half a file")
    assert figures.main(["--runs", str(run), "--out", str(out), "--quiet"]) == 0
    assert not any(p.exists() for p in stale) and (out / "REPORT.md").is_file() and (out / "report.json").is_file()
    # a run trained here (a manifest) gets the gzipped copies it may commit; a folder of adapters does not
    assert {p.name for p in (out / "tables").glob("*.csv.gz")} == {"phi.csv.gz", "fig8.csv.gz"}
    assert (run / "analysis" / "spectra").is_dir()  # W's SVDs kept beside the run for the next report


def test_cli_bad_inputs_exit_2(tmp_path, capsys):
    assert figures.main(["--runs", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--runs" in err and "missing" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert figures.main(["--runs", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "empty" in capsys.readouterr().err
    afile = tmp_path / "f.txt"
    afile.write_text("x")
    assert figures.main(["--runs", str(afile)]) == 2
    assert "is a file" in capsys.readouterr().err
    nothing = tmp_path / "nothing"
    (nothing / "sub").mkdir(parents=True)
    assert figures.main(["--runs", str(nothing), "--out", str(tmp_path / "o")]) == 2
    assert "adapter" in capsys.readouterr().err
    bad = tmp_path / "bad_types"
    (bad / "a").mkdir(parents=True)
    (bad / "a" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, '
                                                   '"target_modules": 5}', encoding="utf-8")
    assert figures.main(["--runs", str(bad), "--out", str(tmp_path / "o")]) == 2  # valid JSON, wrong type
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a/adapter_config.json" in err and "target_modules" in err
    assert figures.main(["--runs", str(tmp_path), "--out", str(afile / "out")]) == 2  # checked before any work
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out" in err and "is a file" in err and not (tmp_path / "analysis").exists()
    with pytest.raises(SystemExit) as exc:
        figures.main(["--bogus"])
    assert exc.value.code == 2


# ------------------------------------------------------------------------------------------- DoRA and inits
def test_projection_dora_reports_the_magnitude_beside_table7(tmp_path, capsys):
    """A peft DoRA adapter: Table 7 on s·B·A against W0, and per module the magnitude change and effective update."""
    pytest.importorskip("peft")
    from peft_adapters import peft_adapter, save_bases

    from lora_analysis.load.adapters import load_adapter_dir
    from lora_analysis.metrics.dora import dora_summary

    bases = save_bases(tmp_path)
    ad = peft_adapter(bases["bert"], tmp_path / "dora", r=4, lora_alpha=8, target_modules=["query"], use_dora=True)
    js = tmp_path / "t7.json"
    rc, out, err = _call(projection, ["--adapter", ad, "--json", js], capsys)
    assert rc == 0, err
    assert "DoRA" in out and "mag_rel_mean" in out
    doc = json.loads(js.read_text())
    a = load_adapter_dir(ad)
    key = "encoder.layer.0.attention.self.query"
    f, W = a.factors[key], BaseWeights().weights(a, [key])[key]
    row, ref = doc["modules"][key], table7_row(W, f.A, f.B, scaling=f.scaling)
    assert row["delta"] == pytest.approx(ref.delta, rel=1e-12)  # Table 7 on the directional update
    d = dora_summary(W, f.A, f.B, a.magnitude[key], scaling=f.scaling)
    assert row["dora"]["mag_rel_abs_mean"] == pytest.approx(d.mag_rel_abs_mean, rel=1e-12) and d.mag_rel_abs_mean > 0
    assert row["dora"]["dw_eff_norm"] == pytest.approx(d.dw_eff_norm, rel=1e-12)


@pytest.mark.parametrize("init", ["pissa_niter_16", "corda"])
def test_projection_refuses_a_base_it_cannot_rebuild_but_phi_still_works(tmp_path, capsys, init):
    """φ needs only A; Table 7 needs the W peft adapts, which cannot be rebuilt here: one line with the way out."""
    pytest.importorskip("peft")
    from peft_adapters import peft_adapter, save_bases

    bases = save_bases(tmp_path)
    ad = peft_adapter(bases["bert"], tmp_path / "ad", r=4, lora_alpha=8, target_modules=["query"])
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": init}))
    _assert_bad(projection, ["--adapter", ad], capsys, tmp_path, str(ad), init,
                "path_initial_model_for_weight_conversion")
    rc, _, err = _call(subspace, ["--a1", ad, "--a2", ad, "--quiet", "--json", tmp_path / "phi.json"], capsys)
    assert rc == 0, err


def test_projection_lazy_base_reads_the_checkpoint_and_refuses_what_it_cannot_rebuild(run, trained, tmp_path, capsys):
    """--lazy-base reads each W from a safetensors checkpoint (the 7B route) and gives the loaded base's Table 7;
    without --base, on a missing checkpoint, or for a GPT-2 Conv1D adapter (W stored transposed) it is one line."""
    from safetensors.torch import save_file

    from lora_analysis.load.adapters import load_adapter_dir
    from lora_analysis.load.base import BaseWeights

    ad = run / "qv_r4_s0"
    Ws = BaseWeights(trained / "tiny").weights(load_adapter_dir(ad))
    save_file({f"{k}.weight": W.to(torch.float32).contiguous() for k, W in Ws.items()}, str(tmp_path / "w.safetensors"))
    docs = []
    for extra in (["--base", trained / "tiny"], ["--base", tmp_path / "w.safetensors", "--lazy-base"]):
        js = tmp_path / f"t{len(docs)}.json"
        rc, _, err = _call(projection, ["--adapter", ad, "--quiet", "--json", js, *extra], capsys)
        assert rc == 0, err
        docs.append(json.loads(js.read_text())["modules"])
    assert docs[0].keys() == docs[1].keys() and len(docs[0]) == len(Ws)
    for key, row in docs[0].items():
        for col in ("delta", "weight", "random", "w_norm", "amplification"):
            assert docs[1][key][col] == pytest.approx(row[col], rel=1e-12), (key, col)
    _assert_bad(projection, ["--adapter", ad, "--lazy-base"], capsys, tmp_path, "--lazy-base", "needs --base")
    _assert_bad(projection, ["--adapter", ad, "--lazy-base", "--base", tmp_path / "nope"], capsys, tmp_path,
                "nope", "no such checkpoint")
    pytest.importorskip("peft")
    from peft_adapters import peft_adapter, save_bases

    bases = save_bases(tmp_path / "bases")
    gpt = peft_adapter(bases["gpt2"], tmp_path / "gpt", r=4, lora_alpha=8, target_modules=["c_proj"],
                       fan_in_fan_out=True)
    _assert_bad(projection, ["--adapter", gpt, "--lazy-base", "--base", bases["gpt2"]], capsys, tmp_path,
                str(gpt), "fan_in_fan_out", "without --lazy-base")

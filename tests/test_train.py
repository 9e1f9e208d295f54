"""lora.train: the grid, one adapter per point (PEFT layout, loads in real peft), determinism, resume after
kill -9, two torchrun processes, and bad configs that exit 2 before training.

Most tests train a tiny randomly initialised BERT (d=32) that uses the real MiniLM tokenizer on the real
embedded chatterbot task, a few steps per point; one test trains the real MiniLM for a few steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora.adapter_io import read_adapter_config
from lora.config import TrainConfig
from lora.train import GridPoint, grid_points, lora_params_per_rank, main, prepare, run_sweep, train_point

REPO = Path(__file__).resolve().parents[1]
TINY = ["--steps", "4", "--batch-size", "8", "--max-length", "12", "--quiet", "--threads", "1"]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise comparisons need the same thread count as the CLI runs (--threads 1)
    yield
    torch.set_num_threads(before)


def _tiny_cfg(model_dir, **kw) -> TrainConfig:
    base = dict(model=model_dir, steps=4, batch_size=8, max_length=12, ranks=(2, 4), seeds=(0,))
    base.update(kw)
    return TrainConfig(**base)


def _tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for d in sorted(p for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in ("adapter_model.safetensors", "init.safetensors"):
            for k, v in load_file(d / f).items():
                out[f"{d.name}/{f}/{k}"] = v
    return out


def _assert_same_tensors(a: dict, b: dict) -> None:
    """Bitwise equality: the claim of resume, worker count and same-seed tests. It holds between runs on one
    machine with the same kernel path (CPU, MKL_CBWR / ATEN_CPU_CAPABILITY, inherited by workers) and the same
    torch threads per process (--threads 1, the one_thread fixture), not across CPUs."""
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in d.rglob("*") if p.is_file()}


def test_grid_names_and_table5_budget(minilm_path):
    cfg = TrainConfig(targets=("q,v", "q"), ranks=(1, 8), seeds=(0, 2))
    names = [p.name for p in grid_points(cfg)]
    assert names == ["qv_r1_s0", "qv_r1_s2", "qv_r8_s0", "qv_r8_s2", "q_r1_s0", "q_r1_s2", "q_r8_s0", "q_r8_s2"]
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_path)  # the real MiniLM: q, k, v, o are all 384 x 384 in 6 layers
    budget = 8 * lora_params_per_rank(model, "q")
    ranks = {p.weight_set: p.rank for p in grid_points(TrainConfig(budget=budget, seeds=(0,)), model=model)}
    assert ranks == {"q": 8, "k": 8, "v": 8, "o": 8, "q,k": 4, "q,v": 4, "q,k,v,o": 2}  # the paper's Table 5


def test_sweep_writes_adapters_manifest_summary_and_resumes(tiny_bert_dir, tmp_path, one_thread):
    cfg = _tiny_cfg(tiny_bert_dir)
    res = run_sweep(cfg, tmp_path / "run", progress=False)
    assert res.trained == ("qv_r2_s0", "qv_r4_s0")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"] == cfg.to_dict() and manifest["base_fingerprint"].startswith("sha256:")
    assert [g["name"] for g in manifest["grid"]] == list(res.trained)
    assert 0.0 <= manifest["linear_probe"]["val_metric"] <= 1.0
    rows = (tmp_path / "run" / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("name,weight_set,targets,rank,seed,alpha") and len(rows) == 3
    for name, r in (("qv_r2_s0", 2), ("qv_r4_s0", 4)):
        d = tmp_path / "run" / name
        adapter_cfg = json.loads((d / "adapter_config.json").read_text())
        assert adapter_cfg["r"] == r and adapter_cfg["peft_type"] == "LORA"
        metrics = json.loads((d / "metrics.json").read_text())
        assert metrics["steps"] == 4 and len(metrics["train_loss"]) == 4
        assert metrics["lora_params"] == 2 * 2 * r * (32 + 32)  # 2 layers x {q, v} x r (d_in + d_out)
    # Nested draws: A_2's start is the first 2 rows of A_4's, module by module.
    init2 = load_file(tmp_path / "run" / "qv_r2_s0" / "init.safetensors")
    init4 = load_file(tmp_path / "run" / "qv_r4_s0" / "init.safetensors")
    assert init2.keys() == init4.keys() and len(init2) == 4
    assert all(torch.equal(init2[k], init4[k][:2]) for k in init2)
    again = run_sweep(cfg, tmp_path / "run", progress=False)
    assert again.trained == () and set(again.skipped) == set(res.trained)


@pytest.mark.float_sensitive
def test_point_is_bitwise_reproducible_and_independent_of_the_grid(tiny_bert_dir, tmp_path, one_thread):
    cfg_alone = _tiny_cfg(tiny_bert_dir, ranks=(4,), seeds=(1,), linear_probe=False)
    (point,) = grid_points(cfg_alone)
    assert point == GridPoint("q,v", 4, 1, cfg_alone.scale_alpha(4))
    train_point(cfg_alone, point, tmp_path / "a")
    # The same point inside a bigger grid, listed in another order, with another weight set before it.
    cfg_grid = _tiny_cfg(tiny_bert_dir, targets=("q", "q,v"), ranks=(4, 2), seeds=(2, 1), linear_probe=False)
    run_sweep(cfg_grid, tmp_path / "b", progress=False)
    a = load_file(tmp_path / "a" / point.name / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / point.name / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise: one process, same kernels and threads
    other = load_file(tmp_path / "b" / "qv_r4_s2" / "adapter_model.safetensors")
    assert not all(torch.equal(a[k], other[k]) for k in a)  # another seed really differs


@pytest.mark.float_sensitive
def test_adapter_loads_in_real_peft_with_the_same_predictions(minilm_path, tmp_path, one_thread):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    from lora.data import eval_batches

    cfg = TrainConfig(steps=3, batch_size=16, max_length=16, ranks=(2,), seeds=(0,), linear_probe=False)
    path = train_point(cfg, grid_points(cfg)[0], tmp_path)
    metrics = json.loads((path / "metrics.json").read_text())
    prep = prepare(cfg)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=prep.task.num_labels)
    model = peft.PeftModel.from_pretrained(base, str(path)).eval()
    correct = 0
    loss = 0.0
    with torch.no_grad():
        for batch in eval_batches(prep.val, batch_size=64, pad_id=prep.pad_id):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            correct += int((logits.argmax(-1) == batch.labels).sum())
            loss += float(torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum"))
    # Same head, same pooler, same LoRA factors: PEFT reproduces the trainer's own validation numbers. Two
    # float32 forwards by different code (peft's LoRA layer, ours) of MiniLM (6 layers, d = 384): rounding
    # moves the logits by ~√384·u ≈ 1e-6 relative, so the mean loss by about that (measured: equal under every
    # forced kernel choice); rel 1e-5. The accuracy is exact unless a logit pair ties within 1e-6.
    assert correct / len(prep.val) == metrics["val_metric"]
    assert loss / len(prep.val) == pytest.approx(metrics["val_loss"], rel=1e-5)


def test_causal_lm_on_tiny_gpt2_adapts_fused_q_and_v(tmp_path, minilm_path, one_thread):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(minilm_path)  # a real vocabulary for the tiny GPT-2 (vocab sizes match)
    torch.manual_seed(0)
    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(tok), n_positions=64)).save_pretrained(
        model_dir)
    tok.save_pretrained(model_dir)
    rows = [{"prompt": f"name[cafe {i}] food[{f}]", "completion": f"cafe {i} serves {f} food."}
            for i, f in enumerate(["french", "thai", "indian", "greek", "italian"] * 4)]
    data = tmp_path / "e2e.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(model=str(model_dir), task=str(data), ranks=(2,), seeds=(0,), steps=3, batch_size=4,
                      max_length=24, linear_probe=False)
    path = train_point(cfg, grid_points(cfg)[0], tmp_path / "run")
    metrics = json.loads((path / "metrics.json").read_text())
    assert metrics["metric"] == "loss" and 0 < metrics["val_metric"] < 20
    init = load_file(path / "init.safetensors")
    assert sorted(init) == [f"transformer.h.{i}.attn.c_attn:{s}" for i in range(2) for s in ("q", "v")]
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["fan_in_fan_out"] is True
    # GPT-2's other Conv1D modules train whole (W_o = attn.c_proj, and the MLP's c_fc), beside the fused slices
    cfg2 = TrainConfig(model=str(model_dir), task=str(data), ranks=(2,), seeds=(0,), steps=3, batch_size=4,
                       max_length=24, linear_probe=False, targets=("q,v,o,c_fc",))
    path2 = train_point(cfg2, grid_points(cfg2)[0], tmp_path / "run2")
    from lora.adapter_io import load_adapter

    ad = load_adapter(path2)
    assert sorted(k for k in ad.factors if ".h.0." in k) == [
        "transformer.h.0.attn.c_attn:q", "transformer.h.0.attn.c_attn:v", "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc"]
    fc = ad.factors["transformer.h.0.mlp.c_fc"]
    assert fc.A.shape == (2, 32) and fc.B.shape == (128, 2) and bool(fc.B.abs().max() > 0)  # trained


def test_kill_9_then_resume_gives_the_uninterrupted_files(tiny_bert_dir, tmp_path, one_thread):
    args = ["--model", tiny_bert_dir, "--ranks", "1", "2", "4", "--seeds", "0", "1", "--steps", "15",
            "--batch-size", "8", "--max-length", "12", "--quiet", "--threads", "1", "--no-linear-probe"]
    cmd = [sys.executable, "-m", "lora.train", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(killed)], cwd=REPO, env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while time.time() < deadline and not (killed / "qv_r1_s0").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # lands while the next point trains (or saves)
    proc.wait()
    finished = [p for p in killed.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert 1 <= len(finished) < 6, "the kill should land mid-sweep"
    for d in finished:  # whatever exists is complete
        assert {"adapter_config.json", "adapter_model.safetensors", "init.safetensors", "metrics.json"} <= {
            p.name for p in d.iterdir()}
    resumed = subprocess.run([*cmd, "--out", str(killed)], cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    clean_cfg = _tiny_cfg(tiny_bert_dir, ranks=(1, 2, 4), seeds=(0, 1), steps=15, linear_probe=False)
    run_sweep(clean_cfg, tmp_path / "clean", progress=False)  # uninterrupted, in-process, also one thread
    _assert_same_tensors(_tensors(killed), _tensors(tmp_path / "clean"))
    assert not list(killed.glob(".*tmp*"))  # stale temporaries cleaned up
    assert (killed / "summary.csv").read_text().count("\n") == 7


def test_two_torchrun_processes_give_the_single_process_adapters(tiny_bert_dir, tmp_path, one_thread):
    args = ["-m", "lora.train", "--model", tiny_bert_dir, "--ranks", "1", "2", "--seeds", "0", "1", *TINY]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    dist = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         *args, "--out", str(tmp_path / "two")], cwd=REPO, env=env, capture_output=True, text=True)
    assert dist.returncode == 0, dist.stderr[-2000:]
    run_sweep(_tiny_cfg(tiny_bert_dir, ranks=(1, 2), seeds=(0, 1)), tmp_path / "one", progress=False)
    _assert_same_tensors(_tensors(tmp_path / "one"), _tensors(tmp_path / "two"))
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    two = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert one["linear_probe"]["val_metric"] == two["linear_probe"]["val_metric"]
    assert (tmp_path / "two" / "summary.csv").read_text().count("\n") == 5


def test_two_workers_give_the_one_worker_adapters_bitwise(tiny_bert_dir, tmp_path, one_thread):
    """--workers 2 (spawned processes, one torch thread each) writes the adapters of --workers 1, bit for bit,
    and records the layout they are reproducible for in manifest.json."""
    cfg = _tiny_cfg(tiny_bert_dir, ranks=(1, 2), seeds=(0, 1), linear_probe=False)
    run_sweep(cfg, tmp_path / "one", progress=False, workers=1)
    two = run_sweep(cfg, tmp_path / "two", progress=False, workers=2)
    assert sorted(two.trained) == sorted(p.name for p in grid_points(cfg))
    _assert_same_tensors(_tensors(tmp_path / "one"), _tensors(tmp_path / "two"))
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["layout"] == {"threads_per_process": 1}
    assert main(["--model", tiny_bert_dir, "--workers", "0", "--out", str(tmp_path / "x"), *TINY]) == 2


BAD_BASE = ["--ranks", "1", "--seeds", "0", "--no-linear-probe", *TINY]


@pytest.fixture(scope="module")
def finished_run(tiny_bert_dir, tmp_path_factory):
    """A small finished run directory that every bad-config case tries (and must fail) to touch."""
    out = tmp_path_factory.mktemp("finished") / "run"
    before = torch.get_num_threads()
    assert main(["--model", tiny_bert_dir, *BAD_BASE, "--out", str(out)]) == 0
    torch.set_num_threads(before)
    return out


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--ranks", "0"], "--ranks"),
        (["--ranks", "33"], "--ranks"),  # above the tiny model's width (32)
        (["--targets", "q,zz"], "--targets"),
        (["--task", "missing.jsonl"], "--task"),
        (["--lr", "-1"], "--lr"),
        (["--steps", "2"], "--out"),  # a different config than the one in the existing run dir
        (["--bogus"], "unrecognized"),
        (["--config", "nope.toml"], "--config"),
    ],
)
def test_bad_configs_exit_2_with_one_line_and_leave_the_run_dir(tiny_bert_dir, finished_run, capsys, extra,
                                                                 needle):
    before = _snapshot(finished_run)
    capsys.readouterr()
    argv = ["--model", tiny_bert_dir, *BAD_BASE, "--out", str(finished_run)]
    if extra[0] in argv:  # replace the flag's value rather than give it twice
        i = argv.index(extra[0])
        argv = argv[:i] + argv[i + 2:]
    try:
        code = main([*argv, *extra])
    except SystemExit as exc:  # argparse errors exit from inside parse_args
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err
    assert _snapshot(finished_run) == before


def test_unloadable_model_exits_2(tmp_path, capsys):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    assert main(["--model", str(empty), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--model" in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- --pack
@pytest.fixture(scope="module")
def tiny_bert_no_dropout_dir(tmp_path_factory, minilm_path):
    """The tiny BERT without dropout of its own: then nothing random is left in a step, so packed and sequential
    training compute the same maths (a base with dropout draws other masks when packed; see train_pack)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    d = tmp_path_factory.mktemp("tiny_bert_no_dropout")
    BertModel(cfg).save_pretrained(d)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(d)
    return str(d)


def _assert_close_tensors(a: dict, b: dict, *, atol: float) -> float:
    assert a.keys() == b.keys() and a
    worst = 0.0
    for k in a:
        if k.split("/")[1] == "init.safetensors":  # A at step 0 is drawn, not computed: bitwise equal
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)
            worst = max(worst, float((a[k] - b[k]).abs().max()))
    return worst


def _copy_run(src: Path, dst: Path, *, drop: Sequence[str]) -> None:
    """A run interrupted after some points: the directory minus the adapters in ``drop`` (and the summary)."""
    shutil.copytree(src, dst)
    for name in drop:
        shutil.rmtree(dst / name)
    (dst / "summary.csv").unlink()


# float32 training, 4 AdamW steps of lr 3e-3: a packed batch pads to the longest of the K batches and runs
# larger products, so activations differ from the sequential ones by float32 rounding (~1e-7 relative). Adam's
# update m/(sqrt(v)+eps) is about lr per element per step whatever the gradient's size, so rounding shows at most
# as a small fraction of lr; a wrong batch, init, head draw or schedule changes elements by ~lr = 3e-3 or more.
# atol 1e-5 sits between the two (the measured worst difference is printed by -s).
# Measured: 1.5e-8 with the default kernels, 3e-8 with ATEN_CPU_CAPABILITY=default (.ci/run).
PACK_ATOL = 1e-5


@pytest.mark.float_sensitive
def test_pack_gives_the_sequential_adapters_and_resumes_either_way(tiny_bert_no_dropout_dir, tmp_path, one_thread):
    cfg = _tiny_cfg(tiny_bert_no_dropout_dir, ranks=(2, 4), seeds=(0, 1), linear_probe=False)
    seq = run_sweep(cfg, tmp_path / "seq", progress=False)
    packed = run_sweep(cfg, tmp_path / "packed", progress=False, pack=True, pack_size=3)  # packs of 3 and 1
    assert packed.trained == seq.trained and len(seq.trained) == 4
    worst = _assert_close_tensors(_tensors(tmp_path / "seq"), _tensors(tmp_path / "packed"), atol=PACK_ATOL)
    print(f"packed vs sequential: max |diff| {worst:.2e}")
    for name in seq.trained:
        ms = json.loads((tmp_path / "seq" / name / "metrics.json").read_text())
        mp = json.loads((tmp_path / "packed" / name / "metrics.json").read_text())
        for key in ("point", "metric", "steps", "lora_params", "trainable_params", "total_params",
                    "modules_to_save"):
            assert ms[key] == mp[key], key
        assert mp["train_loss"] == pytest.approx(ms["train_loss"], rel=1e-4)
        assert mp["val_loss"] == pytest.approx(ms["val_loss"], rel=1e-4)
        assert name in mp["pack"]["points"] and mp["pack"]["base_dropout"] is False and "pack" not in ms
        cs = read_adapter_config(tmp_path / "seq" / name)  # peft's fields and ours (lora_toolkit.json)
        cp = read_adapter_config(tmp_path / "packed" / name)
        assert cs == cp and cs["base_fingerprint"].startswith("sha256:")
    assert len(json.loads((tmp_path / "packed" / "qv_r4_s1" / "metrics.json").read_text())["pack"]["points"]) == 1

    # A sequential run resumed with --pack (through the CLI: the manifest's config must still match) ...
    _copy_run(tmp_path / "seq", tmp_path / "seq_then_pack", drop=["qv_r2_s1", "qv_r4_s0"])
    argv = ["--model", tiny_bert_no_dropout_dir, "--ranks", "2", "4", "--seeds", "0", "1", "--no-linear-probe",
            *TINY, "--out", str(tmp_path / "seq_then_pack"), "--pack"]
    assert main(argv) == 0
    _assert_close_tensors(_tensors(tmp_path / "seq"), _tensors(tmp_path / "seq_then_pack"), atol=PACK_ATOL)
    assert (tmp_path / "seq_then_pack" / "summary.csv").read_text().count("\n") == 5
    # ... and a packed run resumed without it: the points trained now are the sequential ones, bitwise.
    _copy_run(tmp_path / "packed", tmp_path / "pack_then_seq", drop=["qv_r2_s0", "qv_r4_s1"])
    again = run_sweep(cfg, tmp_path / "pack_then_seq", progress=False)
    assert again.trained == ("qv_r2_s0", "qv_r4_s1")
    seq_t, mixed_t = _tensors(tmp_path / "seq"), _tensors(tmp_path / "pack_then_seq")
    _assert_same_tensors({k: v for k, v in seq_t.items() if k.split("/")[0] in again.trained},
                         {k: v for k, v in mixed_t.items() if k.split("/")[0] in again.trained})
    assert (tmp_path / "pack_then_seq" / "summary.csv").read_text().count("\n") == 5


@pytest.mark.parametrize("extra, needle", [(["--dropout", "0.1", "--pack"], "--pack"),
                                           (["--pack-size", "2"], "--pack-size")])
def test_pack_with_dropout_exits_2_with_one_line(tiny_bert_dir, tmp_path, capsys, extra, needle):
    out = tmp_path / "run"
    assert main(["--model", tiny_bert_dir, *BAD_BASE, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("extra, packed", [
    ([], True),  # 8 x 12 = 96 tokens per step, one worker: packing pays
    (["--max-length", "40"], False),  # 8 x 40 = 320 tokens > 256: one by one
    (["--workers", "2", "--max-length", "8"], False),  # two workers would train on two cores; a pack on one
    (["--dropout", "0.1"], False),  # a packed adapter would not equal its sequential self: one by one, no error
])
def test_pack_auto_packs_only_where_it_pays(tiny_bert_no_dropout_dir, tmp_path, extra, packed, capsys):
    out = tmp_path / "run"
    argv = ["--model", tiny_bert_no_dropout_dir, "--ranks", "2", "4", "--seeds", "0", "--no-linear-probe", *TINY,
            "--workers", "1", "--out", str(out), "--pack", "auto", *extra]
    assert main(argv) == 0
    for name in ("qv_r2_s0", "qv_r4_s0"):
        assert ("pack" in json.loads((out / name / "metrics.json").read_text())) is packed


def test_linear_probe_is_trained_once_per_probe_setting(tiny_bert_dir, one_thread, monkeypatch):
    # The main job's rank sweep and its Table 5 run differ only in adapter settings: one probe serves both.
    from lora import train

    calls = []
    real = train._linear_probe
    monkeypatch.setattr(train, "_linear_probe", lambda cfg, **kw: calls.append(cfg) or real(cfg, **kw))
    monkeypatch.setattr(train, "_PROBES", {})
    sweep = _tiny_cfg(tiny_bert_dir, seeds=(0, 1))
    first = train.linear_probe(sweep)
    again = train.linear_probe(_tiny_cfg(tiny_bert_dir, targets=("q", "v", "q,v"), ranks=None, budget=500,
                                         seeds=(0, 1), alpha=4.0))
    assert again == first and len(calls) == 1
    fresh = real(sweep, progress=False)  # the cached probe is the one a fresh training gives, bitwise
    assert fresh["val"] == first["val"]
    # any setting the probe depends on trains a new one: the first seed, the learning rate, the steps
    for changed in ({"seeds": (1, 0)}, {"lr": 1e-3}, {"steps": 5}):
        train.linear_probe(_tiny_cfg(tiny_bert_dir, **{"seeds": (0, 1), **changed}))
    assert len(calls) == 4


def test_reuse_copies_only_identically_trained_points(tiny_bert_dir, tmp_path, one_thread):
    # The main job's Table 5 {q, v} point is the sweep's qv_r4 training: copied from the sweep, it is bitwise the
    # adapter a fresh training gives; a run whose training differs (here the lr) must train its own. The sweep
    # keeps training snapshots, as the main job's does; Table 5 asks for none and gets none.
    sweep = _tiny_cfg(tiny_bert_dir, ranks=(2, 4), linear_probe=False, snapshot_steps=(0, 2))
    run_sweep(sweep, tmp_path / "sweep", progress=False)
    table5 = _tiny_cfg(tiny_bert_dir, targets=("q", "q,v"), ranks=(4,), linear_probe=False)
    got = run_sweep(table5, tmp_path / "t5", progress=False, reuse=[tmp_path / "sweep"])
    assert got.trained == ("q_r4_s0",)  # qv_r4_s0 was finished (copied) before training began
    source = _snapshot(tmp_path / "sweep" / "qv_r4_s0")
    assert any(k.startswith("snapshots/") for k in source)
    assert _snapshot(tmp_path / "t5" / "qv_r4_s0") == {k: v for k, v in source.items()
                                                         if not k.startswith("snapshots/")}
    fresh = run_sweep(table5, tmp_path / "fresh", progress=False)
    assert fresh.trained == ("q_r4_s0", "qv_r4_s0")
    _assert_same_tensors(_tensors(tmp_path / "fresh"), _tensors(tmp_path / "t5"))
    other = _tiny_cfg(tiny_bert_dir, targets=("q", "q,v"), ranks=(4,), linear_probe=False, lr=1e-3)
    assert run_sweep(other, tmp_path / "other", progress=False, reuse=[tmp_path / "sweep"]).trained == (
        "q_r4_s0", "qv_r4_s0")


def test_same_training_ignores_only_the_grid_fields():
    from lora.reuse import same_training

    base = {"config": {"targets": ["q,v"], "ranks": [2, 4], "seeds": [0], "budget": None, "linear_probe": True,
                       "lr": 3e-3, "steps": 200}, "base_fingerprint": "abc", "task": {"fingerprint": "t"},
            "versions": {"torch": "2"}, "nested_init": True, "layout": {"threads_per_process": 1}}
    grid = {**base, "config": {**base["config"], "targets": ["q"], "ranks": None, "budget": 500, "seeds": [0, 1],
                               "linear_probe": False}}
    assert same_training(base, grid)
    for key, value in (("config", {**base["config"], "lr": 1e-3}), ("base_fingerprint", "xyz"),
                       ("layout", {"threads_per_process": 2}), ("versions", {"torch": "3"}),
                       ("task", {"fingerprint": "u"})):
        assert not same_training(base, {**base, key: value})
    assert not same_training(base, {"grid": []})  # not a run manifest
    # snapshots and full fine-tuning do not change a LoRA point: a run without snapshots reuses one with them, a
    # run with snapshots only a source with the same steps
    snap = {**base, "config": {**base["config"], "snapshot_steps": [0, 25], "method": ["lora", "full"],
                               "full_lr": 3e-4}}
    assert same_training(base, snap) and same_training(snap, snap)
    assert not same_training(snap, base)
    assert not same_training(snap, {**snap, "config": {**snap["config"], "snapshot_steps": [0, 50]}})


def test_the_probe_trained_in_the_worker_pool_is_the_one_process_probe(tiny_bert_dir, tmp_path, one_thread,
                                                                        monkeypatch):
    # With workers the probe is one more pool job (submitted last) instead of a serial tail: the same numbers.
    from lora import train

    cfg = _tiny_cfg(tiny_bert_dir, ranks=(1, 2), seeds=(0,))
    monkeypatch.setattr(train, "_PROBES", {})
    one = run_sweep(cfg, tmp_path / "one", progress=False, workers=1).linear_probe
    monkeypatch.setattr(train, "_PROBES", {})
    calls = []
    monkeypatch.setattr(train, "_linear_probe", lambda cfg, **kw: calls.append(cfg))  # must not run here
    two = run_sweep(cfg, tmp_path / "two", progress=False, workers=2).linear_probe
    assert calls == [] and two["val"] == one["val"] and two["steps"] == one["steps"]
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["linear_probe"]["val"] == one["val"]

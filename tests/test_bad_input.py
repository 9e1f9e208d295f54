"""Bad input to lora.train and lora.merge: every row exits 2 with exactly one line on stderr that names the file
or key, prints no traceback, and leaves everything on disk as it was (issue 12).

The tables below hold one row per bad input. A row's setup builds its inputs in the test's own folder and
returns the argv plus the words its error line must contain; the test snapshots the whole folder (file bytes,
directories, symbolic links, so temporaries left behind count too), runs ``main(argv)`` in-process, and compares.
A few rows also run as real processes to show there is no traceback end to end. Faults of the environment
(a full disk, permissions, a second trainer holding the lock) are rows too: simulated with monkeypatch where the
test runs as root (chmod does not stop root), and with real chmod in a separate test otherwise.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from safetensors.torch import load_file

from lora import merge, train
from lora.adapter_io import CONFIG_NAME, save_adapter
from lora.inject import inject_lora

REPO = Path(__file__).resolve().parents[1]
TINY = {"ranks": [2], "seeds": [0], "steps": 2, "batch_size": 4, "max_length": 12, "linear_probe": False}
BERT_KW = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=64)


# ---------------------------------------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def inputs(tmp_path_factory, minilm_path) -> Iterator[Path]:
    """Shared, never modified: a tiny BERT with the MiniLM tokenizer and a 16-line task (the trainer's), a tiny
    BERT base and a trained-looking adapter on it (the merge's), a pickled base, and a finished tiny run.
    Every test here uses it, so the whole module runs on one torch thread (restored afterwards)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, **BERT_KW)).save_pretrained(root / "model")
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(root / "model")
    rows = [{"text": f"{w} number {i}", "label": w} for i in range(8) for w in ("apple", "river")]
    (root / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    BertModel(BertConfig(vocab_size=100, **BERT_KW)).save_pretrained(root / "base")
    model = BertModel.from_pretrained(root / "base").eval()
    inject_lora(model, ["query", "value"], r=2, alpha=4, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # nonzero B, as after training
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_adapter(model, root / "adapter", base_model_name_or_path=str(root / "base"))

    (root / "pickled").mkdir()
    shutil.copy(root / "base" / "config.json", root / "pickled")
    state = load_file(root / "base" / "model.safetensors")
    torch.save({**state, "meta": np.float64(1.0)}, root / "pickled" / "pytorch_model.bin")  # weights_only refuses

    assert train.main([*_flags(root), "--out", str(root / "run")]) == 0
    yield root
    torch.set_num_threads(threads)


def _flags(root: Path) -> list[str]:
    """The TINY config as flags (the finished run's config)."""
    out = ["--model", str(root / "model"), "--task", str(root / "task.jsonl"), "--quiet", "--threads", "1"]
    for key, value in TINY.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out += [flag, *map(str, value if isinstance(value, list) else [value])]
    return out


@dataclass
class Env:
    """A row's world: ``tmp`` (snapshotted), the shared ``inputs``, ``monkeypatch``, and cleanups to run."""

    tmp: Path
    inputs: Path
    monkeypatch: pytest.MonkeyPatch
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    @property
    def run(self) -> Path:
        """A copy of the finished run (made on first use), which every train row may try to touch."""
        run = self.tmp / "run"
        if not run.exists():
            shutil.copytree(self.inputs / "run", run, symlinks=True)
        return run

    @property
    def adapter(self) -> Path:
        """A copy of the adapter, for rows that edit it."""
        ad = self.tmp / "ad"
        if not ad.exists():
            shutil.copytree(self.inputs / "adapter", ad)
        return ad

    def write(self, name: str, data: str | bytes) -> Path:
        p = self.tmp / name
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        return p

    def deny(self, path: Path, mode: int) -> None:
        """Make ``os.access(path, mode)`` false, as it is for a non-root user after chmod (or on a read-only
        mount for W_OK), without needing either."""
        real = os.access

        def access(p, m, *args, **kwargs):
            if Path(p) == path and m & mode:
                return False
            return real(p, m, *args, **kwargs)

        self.monkeypatch.setattr(os, "access", access)

    def fail_write(self, module, attr: str, code: int, *, arg: int = 0) -> None:
        """Replace ``module.attr`` (a writer) by one that writes part of its file, then fails with ``code`` as a full
        (ENOSPC) or read-only (EROFS) disk would. ``arg``: the position of the path among its arguments."""

        def broken(*args, **kwargs):
            target = Path(args[arg])
            (target / "model.safetensors" if target.is_dir() else target).write_bytes(b"partial")
            raise OSError(code, os.strerror(code))

        self.monkeypatch.setattr(module, attr, broken)


def _snapshot(root: Path) -> dict[str, tuple]:
    """Everything under ``root``: file bytes (hash), directories, symbolic links (target), without following
    links."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                with open(p, "rb") as f:  # not Path.read_bytes: a row may have patched it
                    out[rel] = ("file", hashlib.sha256(f.read()).hexdigest())
    return out


# ---------------------------------------------------------------------------------------------- lora.train rows
def _config(env: Env, text: str | bytes, name: str = "bad.json") -> list[str]:
    """argv training from a config file holding ``text`` (flags would override it) into a new --out: a bad value
    used to crash mid-training and leave a manifest.json there that refused the corrected rerun."""
    return ["--config", str(env.write(name, text)), "--out", str(env.tmp / "new_run"), "--quiet", "--threads", "1"]


def _config_with(env: Env, **bad) -> list[str]:
    cfg = {"model": str(env.inputs / "model"), "task": str(env.inputs / "task.jsonl"), **TINY, **bad}
    return _config(env, json.dumps(cfg))


def _train(env: Env, *extra: str, out: Path | None = None) -> list[str]:
    return [*_flags(env.inputs), "--out", str(out if out is not None else env.run), *extra]


def _unfinished(env: Env) -> Path:
    """The run copy with its one point removed, so that the trainer must write."""
    shutil.rmtree(env.run / "qv_r2_s0")
    return env.run


def _config_unreadable(env: Env) -> tuple[list[str], list[str]]:
    argv = _config(env, "{}")
    env.monkeypatch.setattr(Path, "read_bytes", _refuse_read(env.tmp / "bad.json"))
    return argv, ["bad.json", "permission denied"]


def _run_dir_unreadable(env: Env) -> tuple[list[str], list[str]]:
    env.deny(env.run, os.R_OK)
    return _train(env), [f"--out {env.run}: permission denied"]


def _run_dir_not_writable(env: Env) -> tuple[list[str], list[str]]:
    env.deny(_unfinished(env), os.W_OK)
    return _train(env), [f"--out {env.run}: cannot write there: permission denied"]


def _train_disk_full(env: Env) -> tuple[list[str], list[str]]:
    env.fail_write(safetensors.torch, "save_file", errno.ENOSPC, arg=1)
    return _train(env, out=_unfinished(env)), [f"{env.run}/qv_r2_s0: cannot write: no space left on device"]


def _hold_lock(env: Env) -> tuple[list[str], list[str]]:
    """Another process holds the run directory's lock (and wrote its PID, as a trainer does)."""
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.write(fd, b'%d' % os.getpid()); "
            "print('locked', flush=True); time.sleep(300)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(env.run / ".lock")], stdout=subprocess.PIPE)
    env.cleanup.append(lambda: (holder.kill(), holder.wait()))
    assert holder.stdout.readline().strip() == b"locked"
    return _train(env), [f"--out {env.run}: run directory in use by PID {holder.pid}"]


def _pickled_model(env: Env) -> tuple[list[str], list[str]]:
    model = env.tmp / "pickled_model"
    shutil.copytree(env.inputs / "model", model)
    (model / "model.safetensors").unlink()
    shutil.copy(env.inputs / "pickled" / "pytorch_model.bin", model)
    return _train(env, "--model", str(model)), [f"{model}/pytorch_model.bin: pickled weights are refused"]


def _symlink(env: Env, name: str, target: str) -> Path:
    link = env.tmp / name
    link.symlink_to(target)
    return link


# id -> setup(env) returning (argv, words the one error line must contain)
TRAIN_ROWS: dict[str, Callable[[Env], tuple[list[str], list[str]]]] = {
    # 3. config values of the wrong type, from a file: the line names the file and the key
    "config_batch_size_float": lambda e: (_config_with(e, batch_size=1.5), ["bad.json", "batch_size", "1.5"]),
    "config_max_length_float": lambda e: (_config_with(e, max_length=2.5), ["bad.json", "max_length"]),
    "config_modules_to_save_int": lambda e: (_config_with(e, modules_to_save=5), ["bad.json", "modules_to_save"]),
    "config_alpha_str": lambda e: (_config_with(e, alpha="x"), ["bad.json", "alpha", "'x'"]),
    "config_linear_probe_str": lambda e: (_config_with(e, linear_probe="false"),
                                          ["bad.json", "linear_probe", "true or false"]),
    "config_lr_str": lambda e: (_config_with(e, lr="fast"), ["bad.json", "lr", "'fast'"]),
    "config_ranks_bool": lambda e: (_config_with(e, ranks=[True]), ["bad.json", "ranks"]),
    "config_toml_seeds_fraction": lambda e: (_config(e, "seeds = [0, 0.5]\n", "bad.toml"), ["bad.toml", "seeds"]),
    "config_unknown_key": lambda e: (_config_with(e, rnaks=[1]), ["bad.json", "unknown option 'rnaks'"]),
    "config_not_utf8": lambda e: (_config(e, b'{"lr": "\xff"}'), ["bad.json", "UTF-8"]),
    "config_unreadable": _config_unreadable,
    "flag_batch_size_float": lambda e: (_train(e, "--batch-size", "1.5"), ["--batch-size", "1.5"]),
    "task_json_holds_5": lambda e: (_train(e, "--task", str(e.write("five.json", "5"))), ["--task", "five.json"]),
    "task_json_holds_string": lambda e: (_train(e, "--task", str(e.write("hello.json", '"hello"'))),
                                         ["--task", "hello.json"]),
    # 4. --out that cannot be a run directory: refused before any work
    "out_is_a_file": lambda e: (_train(e, out=e.write("out.txt", "keep")), ["--out", "out.txt", "is a file"]),
    "out_dangling_symlink": lambda e: (_train(e, out=_symlink(e, "dangling", "nowhere")),
                                       ["--out", "dangling symbolic link"]),
    "out_under_a_file": lambda e: (_train(e, out=e.write("f.txt", "keep") / "run"),
                                   ["--out", "f.txt is a file, not a directory"]),
    # 5. the environment
    "run_dir_unreadable": _run_dir_unreadable,
    "run_dir_not_writable": _run_dir_not_writable,
    "disk_full_while_saving": _train_disk_full,
    # 6. a second trainer on the same --out
    "run_dir_in_use": _hold_lock,
    # 8. a pickled base model
    "pickled_model": _pickled_model,
}


def _refuse_read(path: Path):
    real = Path.read_bytes

    def read_bytes(self):
        if self == path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self)

    return read_bytes


# ---------------------------------------------------------------------------------------------- lora.merge rows
def _edit(env: Env, **changes) -> tuple[list[str], list[str]]:
    """The adapter copy with ``changes`` in adapter_config.json (nested dicts merged); the line must name the file."""
    path = env.adapter / CONFIG_NAME
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    path.write_text(json.dumps(cfg))  # allow_nan: Python's json writes (and reads) NaN
    return _merge(env), [str(path)]


def _merge(env: Env, *extra: str, out: Path | None = None) -> list[str]:
    return ["--adapter", str(env.adapter), "--out", str(out if out is not None else env.tmp / "merged"), "--quiet",
            *extra]


def _expect(setup_words: tuple[list[str], list[str]], *words: str) -> tuple[list[str], list[str]]:
    argv, base = setup_words
    return argv, base + list(words)


def _out_first(env: Env, argv: list[str], words: list[str]) -> tuple[list[str], list[str]]:
    """An --out row: the merge must refuse before it loads anything (it used to run the whole merge first)."""

    def too_late(*args, **kwargs):
        raise AssertionError("the merge ran before --out was checked")

    env.monkeypatch.setattr(merge, "load_adapter", too_late)
    return argv, words


def _existing_out(env: Env) -> Path:
    out = env.tmp / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    return out


def _out_symlink_overwrite(env: Env) -> tuple[list[str], list[str]]:
    (env.tmp / "target").mkdir()
    link = _symlink(env, "link", str(env.tmp / "target"))
    return _out_first(env, _merge(env, "--overwrite", out=link), ["--out", "link", "is a symbolic link"])


def _out_parent_not_writable(env: Env) -> tuple[list[str], list[str]]:
    (env.tmp / "sub").mkdir()
    env.deny(env.tmp / "sub", os.W_OK)
    return _out_first(env, _merge(env, out=env.tmp / "sub" / "m"),
                      ["--out", f"cannot create it in {env.tmp / 'sub'}: permission denied"])


def _init_row(env: Env, init: str, *words: str) -> tuple[list[str], list[str]]:
    return _edit(env, init_lora_weights=init)[0], [str(env.adapter), f"init_lora_weights {init!r}", *words]


def _adapter_unreadable(env: Env) -> tuple[list[str], list[str]]:
    env.deny(env.adapter, os.R_OK)
    return _merge(env), [f"{env.adapter}: permission denied"]


def _merge_write_fails(code: int, reason: str, *, existing: bool):
    """A merge whose save fails like a full (ENOSPC) or read-only (EROFS) disk; with ``existing``, over an --out
    that --overwrite would replace (it must survive whole)."""

    def setup(env: Env) -> tuple[list[str], list[str]]:
        env.fail_write(transformers.PreTrainedModel, "save_pretrained", code, arg=1)
        argv = _merge(env, "--overwrite", out=_existing_out(env)) if existing else _merge(env)
        return argv, [f"{env.tmp / 'merged'}: cannot write: {reason}"]

    return setup


def _sidecar(env: Env, **changes) -> Env:
    path = env.adapter / "lora_toolkit.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return env


def _named_parent(env: Env) -> tuple[list[str], list[str]]:
    """A folder as peft's save_pretrained writes several named adapters: one sub-directory each, no root config."""
    parent = env.tmp / "parent"
    for name in ("first", "second"):
        shutil.copytree(env.inputs / "adapter", parent / name)
    return (["--adapter", str(parent), "--out", str(env.tmp / "merged"), "--quiet"],
            [str(parent), "2 named adapter(s) (first, second)", f"e.g. {parent / 'first'}"])


def _loralib(env: Env, *extra: str) -> list[str]:
    """A loralib checkpoint of the merge's base (BERT query, r=2)."""
    g = torch.Generator().manual_seed(0)
    ckpt = env.tmp / "lora.pt"
    torch.save({"encoder.layer.0.attention.self.query.lora_A": torch.randn(2, 32, generator=g),
                "encoder.layer.0.attention.self.query.lora_B": torch.randn(32, 2, generator=g)}, ckpt)
    return ["--adapter", str(ckpt), "--out", str(env.tmp / "merged"), "--quiet", *extra]


MERGE_ROWS: dict[str, Callable[[Env], tuple[list[str], list[str]]]] = {
    # 1. adapter_config.json: valid JSON, wrong types; the line names the file and the key
    "rank_pattern_str": lambda e: _expect(_edit(e, rank_pattern={"query": "x"}), "rank_pattern['query']", "'x'"),
    "alpha_pattern_str": lambda e: _expect(_edit(e, alpha_pattern="abc"), "alpha_pattern must be"),
    "target_modules_int": lambda e: _expect(_edit(e, target_modules=5), "target_modules must be"),
    "target_modules_ints": lambda e: _expect(_edit(e, target_modules=[5, 6]), "target_modules[0] must be a string"),
    "fused_list": lambda e: _expect(_edit(e, lora_toolkit={"fused": [1]}), "lora_toolkit.fused must be"),
    "base_model_class_int": lambda e: _expect(_edit(e, lora_toolkit={"base_model_class": 5}),
                                           "lora_toolkit.base_model_class must be a string"),
    "task_type_list": lambda e: _expect(_edit(e, task_type=["SEQ_CLS"]), "task_type must be"),
    "lora_dropout_str": lambda e: _expect(_edit(e, lora_dropout="abc"), "lora_dropout must be"),
    "r_str": lambda e: _expect(_edit(e, r="8"), "r must be a positive integer, got '8'"),
    "lora_alpha_str": lambda e: _expect(_edit(e, lora_alpha="x"), "lora_alpha must be a finite number"),
    "use_rslora_str": lambda e: _expect(_edit(e, use_rslora="yes"), "use_rslora must be true or false"),
    "fan_in_fan_out_int": lambda e: _expect(_edit(e, fan_in_fan_out=1), "fan_in_fan_out must be true or false"),
    "layers_to_transform_str": lambda e: _expect(_edit(e, layers_to_transform=["0"]), "layers_to_transform[0]"),
    # 2. values that used to merge into NaN / Inf weights with exit 0
    "alpha_pattern_nan": lambda e: _expect(_edit(e, alpha_pattern={"query": float("nan")}),
                                        "alpha_pattern['query'] must be a finite number, got nan"),
    "lora_alpha_overflows": lambda e: (_edit(e, lora_alpha=1e308)[0],
                                       [str(e.adapter), "merging module encoder.layer.0.attention.self.query",
                                        "NaN or Inf"]),
    # 4. --out problems, found before the merge runs
    "out_is_a_file": lambda e: _out_first(e, _merge(e, out=e.write("out.txt", "keep")),
                                          ["--out", "out.txt: is a file, not a directory"]),
    "out_is_a_file_overwrite": lambda e: _out_first(e, _merge(e, "--overwrite", out=e.write("out.txt", "keep")),
                                                    ["--out", "out.txt: is a file, not a directory"]),
    "out_symlink_overwrite": _out_symlink_overwrite,
    "out_dangling_symlink": lambda e: _out_first(e, _merge(e, out=_symlink(e, "dangling", "nowhere")),
                                                 ["--out", "dangling symbolic link"]),
    "out_under_a_file": lambda e: _out_first(e, _merge(e, out=e.write("f.txt", "keep") / "m"),
                                             ["--out", "f.txt is a file, not a directory"]),
    "out_is_the_adapter": lambda e: _out_first(e, _merge(e, "--overwrite", out=e.adapter),
                                               ["--out", "would replace --adapter"]),
    "out_parent_not_writable": _out_parent_not_writable,
    # 5. the environment: an unreadable adapter, a full or read-only disk while writing
    "adapter_unreadable": _adapter_unreadable,
    "disk_full_while_saving": _merge_write_fails(errno.ENOSPC, "no space left on device", existing=True),
    "read_only_while_saving": _merge_write_fails(errno.EROFS, "read-only file system", existing=False),
    # 8. a pickled base
    "pickled_base": lambda e: (_merge(e, "--base", str(e.inputs / "pickled"), "--no-fingerprint-check"),
                               [f"{e.inputs / 'pickled'}/pytorch_model.bin: pickled weights are refused "
                                "(weights_only); convert the base to safetensors"]),
    "argparse_missing_out": lambda e: (["--adapter", str(e.adapter)], ["lora-merge: error:", "--out"]),
    # 9. an init peft re-runs on load whose base change cannot be rebuilt; DoRA without its magnitudes
    "init_pissa_niter": lambda e: _init_row(e, "pissa_niter_4", "path_initial_model_for_weight_conversion"),
    "init_corda": lambda e: _init_row(e, "corda", "path_initial_model_for_weight_conversion"),
    "init_lora_ga": lambda e: _init_row(e, "lora_ga", "path_initial_model_for_weight_conversion"),
    "init_loftq": lambda e: _init_row(e, "loftq", "--base"),
    "init_unknown": lambda e: _init_row(e, "bogus", "not an init peft knows"),
    "use_dora_without_magnitudes": lambda e: (_edit(e, use_dora=True)[0],
                                              [str(e.adapter / "adapter_model.safetensors"), "use_dora is true",
                                               "has no lora_magnitude_vector"]),
    # 10. our sidecar lora_toolkit.json, named adapters, loralib checkpoints (issue 11)
    "sidecar_seed_str": lambda e: (_merge(_sidecar(e, seed="0")), [str(e.adapter / "lora_toolkit.json"),
                                                                     "seed must be an integer"]),
    "named_adapters_parent": _named_parent,
    "alpha_with_a_directory": lambda e: (_merge(e, "--alpha", "8"), ["--alpha", "only for a loralib .pt"]),
    "enable_lora_with_a_directory": lambda e: (_merge(e, "--enable-lora", "q,v"), ["--enable-lora", "only for"]),
    "loralib_without_alpha": lambda e: (_loralib(e, "--base", str(e.inputs / "base")),
                                        ["--alpha", "loralib checkpoint, which stores no alpha"]),
    "loralib_alpha_nan": lambda e: (_loralib(e, "--base", str(e.inputs / "base"), "--alpha", "nan"),
                                    ["--alpha", "positive"]),
    "loralib_without_base": lambda e: (_loralib(e, "--alpha", "8"), ["--base", "records no base model"]),
    "loralib_bad_enable_lora": lambda e: (_loralib(e, "--alpha", "8", "--base", str(e.inputs / "base"),
                                                   "--enable-lora", "q,x"), ["--enable-lora q,x", "q,k,v"]),
}

# These also run as real processes: "no traceback" end to end, not just in-process.
SUBPROCESS_ROWS = {("train", "config_lr_str"), ("merge", "rank_pattern_str")}
TOOLS = {"train": (train.main, TRAIN_ROWS), "merge": (merge.main, MERGE_ROWS)}
CASES = [pytest.param(tool, row, False, id=f"{tool}-{row}") for tool, (_, rows) in TOOLS.items() for row in rows]
CASES += [pytest.param(tool, row, True, id=f"{tool}-{row}-subprocess") for tool, row in sorted(SUBPROCESS_ROWS)]


@pytest.mark.parametrize("tool, row, as_process", CASES)
def test_bad_input_exits_2_with_one_line_and_changes_nothing(tool, row, as_process, inputs, tmp_path, monkeypatch,
                                                             capsys):
    main, rows = TOOLS[tool]
    env = Env(tmp_path, inputs, monkeypatch)
    try:
        argv, words = rows[row](env)
        before, shared = _snapshot(tmp_path), _snapshot(inputs)
        capsys.readouterr()
        if as_process:
            proc = subprocess.run([sys.executable, "-m", f"lora.{tool}", *argv], cwd=REPO, capture_output=True,
                                  text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            code, err = proc.returncode, proc.stderr
            assert proc.stdout == ""
        else:
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse exits from inside parse_args
                code = exc.code
            err = capsys.readouterr().err
        after = _snapshot(tmp_path)
    finally:
        monkeypatch.undo()
        for fn in env.cleanup:
            fn()
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(("error: ", f"lora-{tool}: error: ")), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert after == before  # nothing written, nothing left behind (no .tmp-*), nothing removed
    assert _snapshot(inputs) == shared


# ---------------------------------------------------------------------------------------------- what must still work
def test_merge_removes_stale_temporaries_but_not_a_live_writers(inputs, tmp_path, capsys):
    """A killed merge leaves .merged.tmp-*; the next merge to that --out removes them, except one whose writer
    still holds its lock (another merge in progress)."""
    (tmp_path / ".merged.tmp-dead1").mkdir()
    (tmp_path / ".merged.tmp-dead1" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".merged.tmp-dead2").write_bytes(b"partial")
    (tmp_path / ".other.tmp-x").write_bytes(b"not ours")
    live = tmp_path / ".merged.tmp-live"
    live.write_bytes(b"writing")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        argv = ["--adapter", str(inputs / "adapter"), "--out", str(tmp_path / "merged"), "--quiet"]
        assert merge.main(argv) == 0, capsys.readouterr().err
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".merged.tmp-live", ".other.tmp-x", "merged"]


def test_finished_run_resumes_without_writing(inputs, tmp_path, monkeypatch, capsys):
    """A no-op resume writes nothing (so it works on a read-only mount): every atomic write fails here."""
    from lora import fsio

    run = tmp_path / "run"
    shutil.copytree(inputs / "run", run, symlinks=True)
    before = _snapshot(run)
    mtime = (run / "summary.csv").stat().st_mtime_ns

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(fsio, "_tmp_sibling", read_only)
    assert train.main([*_flags(inputs), "--out", str(run)]) == 0, capsys.readouterr().err
    assert _snapshot(run) == before and (run / "summary.csv").stat().st_mtime_ns == mtime


def _chmod_is_effective(path: Path) -> bool:
    os.chmod(path, 0o500)
    effective = not os.access(path, os.W_OK)
    os.chmod(path, 0o700)
    return effective


def test_real_permissions_unreadable_adapter_and_read_only_run_dir(inputs, tmp_path, capsys):
    """The same faults through real chmod (skipped as root, where chmod stops nothing: the rows above simulate
    them)."""
    if not _chmod_is_effective(tmp_path):
        pytest.skip("running as root: chmod does not restrict access (simulated in the table instead)")
    ad, run = tmp_path / "ad", tmp_path / "run"
    shutil.copytree(inputs / "adapter", ad)
    shutil.copytree(inputs / "run", run, symlinks=True)
    try:
        os.chmod(ad, 0o000)
        assert merge.main(["--adapter", str(ad), "--out", str(tmp_path / "m"), "--quiet"]) == 2
        assert capsys.readouterr().err == f"error: {ad}: permission denied\n"
        os.chmod(ad, 0o700)
        os.chmod(run, 0o500)  # read-only: a finished run resumes (nothing to write) ...
        assert train.main([*_flags(inputs), "--out", str(run)]) == 0
        os.chmod(run, 0o700)
        shutil.rmtree(run / "qv_r2_s0")
        os.chmod(run, 0o500)  # ... and an unfinished one is refused before training
        assert train.main([*_flags(inputs), "--out", str(run)]) == 2
        assert capsys.readouterr().err == f"error: --out {run}: cannot write there: permission denied\n"
    finally:
        os.chmod(ad, 0o700)
        os.chmod(run, 0o700)

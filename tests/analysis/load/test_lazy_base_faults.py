"""``projection --lazy-base`` on a broken sharded checkpoint (issue 21): every fault is one line
``error: <file>: <problem>`` naming the shard (and the tensor), exit status 2, no traceback.

The checkpoint is a tiny LLaMA's, in the hub's layout for a large model (two shards and
``model.safetensors.index.json``, keys ``model.layers.N.self_attn.q_proj.weight``), adapted on q_proj and v_proj
(v_proj is 16 x 32: grouped-query attention, so a transposed W is a wrong shape). Each case breaks one thing the
way a failed download, a bad conversion or a hand-edited index does; the healthy checkpoint, one with a bf16 W, and
one with an integer tensor the adapter never touches pass.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import make_adapter

from lora.errors import UserError
from lora_analysis import projection
from lora_analysis.load.adapters import load_adapter_dir
from lora_analysis.load.base import CheckpointWeights

REPO = Path(__file__).resolve().parents[3]
Q = "model.layers.1.self_attn.q_proj.weight"  # adapted, in the second shard
V = "model.layers.0.self_attn.v_proj.weight"  # adapted, (16, 32), in the first shard
K = "model.layers.0.self_attn.k_proj.weight"  # not adapted
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """``(adapter dir, base state dict)``: a tiny LlamaForCausalLM and a q_proj,v_proj adapter on it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(root / "base")
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    make_adapter(root / "base", root / "adapter", r=4, seed=0, targets=("q_proj", "v_proj"), model=model)
    return root / "adapter", state


def _write(ckpt: Path, tensors: dict[str, torch.Tensor], index: dict[str, str] | None = None) -> Path:
    """``tensors`` as two shards (layer 0 and the rest in the first, layer 1 in the second) and their index."""
    ckpt.mkdir(parents=True, exist_ok=True)
    where = index or {name: SHARDS[".layers.1." in name] for name in tensors}
    for shard in SHARDS:
        save_file({n: t for n, t in tensors.items() if where.get(n) == shard}, str(ckpt / shard))
    (ckpt / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": where}), encoding="utf-8")
    return ckpt


def _truncated(ckpt: Path, state: dict) -> list[str]:
    _write(ckpt, state)
    shard = ckpt / SHARDS[1]
    shard.write_bytes(shard.read_bytes()[:-100])  # a download cut short
    return [f"{shard}: not a readable safetensors file, truncated or damaged"]


def _zero_bytes(ckpt: Path, state: dict) -> list[str]:
    _write(ckpt, state)
    (ckpt / SHARDS[0]).write_bytes(b"")
    return [f"{ckpt / SHARDS[0]}: is empty (0 bytes)"]


def _shard_is_a_directory(ckpt: Path, state: dict) -> list[str]:
    _write(ckpt, state)
    (ckpt / SHARDS[1]).unlink()
    (ckpt / SHARDS[1]).mkdir()
    return [f"{ckpt / SHARDS[1]}: is a directory, not a safetensors file", INDEX]


def _shard_missing(ckpt: Path, state: dict) -> list[str]:
    _write(ckpt, state)
    (ckpt / SHARDS[1]).unlink()
    return [f"{ckpt / SHARDS[1]}: no such file", INDEX]


def _index_names_a_tensor_its_shard_lacks(ckpt: Path, state: dict) -> list[str]:
    where = {name: SHARDS[".layers.1." in name] for name in state}
    _write(ckpt, state, where)
    index = json.loads((ckpt / INDEX).read_text())
    index["weight_map"][Q] = SHARDS[0]  # the index says shard 1, the tensor is in shard 2
    (ckpt / INDEX).write_text(json.dumps(index))
    return [f"{ckpt / SHARDS[0]}: holds no tensor {Q}", INDEX]


def _fp16_overflow(state: dict) -> torch.Tensor:
    W = state[Q].clone()
    W[0, 0] = 1e5  # beyond float16's largest finite value, 65504: becomes Inf when exported in fp16
    return W.to(torch.float16)


def _nan(state: dict) -> torch.Tensor:
    W = state[V].clone()
    W[3, 5] = float("nan")
    return W


def _inf(state: dict) -> torch.Tensor:
    W = state[Q].clone()
    W[1, 2] = -float("inf")
    return W


# (case id, setup(ckpt, state) -> words the error line must hold)
CASES: dict[str, Callable[[Path, dict], list[str]]] = {
    "truncated shard": _truncated,
    "zero-byte shard": _zero_bytes,
    "shard path is a directory": _shard_is_a_directory,
    "shard missing": _shard_missing,
    "index names a tensor its shard lacks": _index_names_a_tensor_its_shard_lacks,
}
VALUE_CASES: dict[str, tuple[Callable[[dict], torch.Tensor], str, list[str]]] = {
    # (case id): (the broken W, its tensor name, further words)
    "wrong shape (transposed)": (lambda s: s[V].T.contiguous(), V, ["shape (32, 16)", "is (16, 32)", "adapter"]),
    "1-D": (lambda s: s[Q].flatten(), Q, ["shape (1024,) is not a non-empty (d_out, d_in) matrix"]),
    "NaN": (_nan, V, ["1 of 512 entries are NaN or Inf"]),
    "Inf": (_inf, Q, ["1 of 1024 entries are NaN or Inf"]),
    "fp16 overflow": (_fp16_overflow, Q, ["1 of 1024 entries are NaN or Inf", "float16 overflows"]),
    "int8": (lambda s: (s[Q] * 100).round().to(torch.int8), Q, ["dtype I8 is not a floating-point weight"]),
    "bool": (lambda s: s[V] > 0, V, ["dtype BOOL is not a floating-point weight"]),
}


def _projection(adapter: Path, ckpt: Path, tmp_path: Path, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = projection.main(["--adapter", str(adapter), "--base", str(ckpt), "--lazy-base", "--quiet",
                          "--json", str(tmp_path / "t7.json")])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_line(rc: int, err: str, words: list[str], tmp_path: Path) -> None:
    assert rc == 2, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not (tmp_path / "t7.json").exists()  # nothing written


def test_healthy_sharded_checkpoint_bf16_and_an_untouched_int8_tensor_pass(llama, tmp_path, capsys):
    """The healthy checkpoint gives Table 7; a bf16 W (upcast by the analysis) gives the same numbers to bf16's
    precision; an int8 tensor of a module the adapter does not adapt is not read, so not refused."""
    adapter, state = llama
    docs = []
    for name, tensors in (("f32", state), ("bf16", {**state, Q: state[Q].to(torch.bfloat16)}),
                          ("int8_k", {**state, K: (state[K] * 100).round().to(torch.int8)})):
        rc, _, err = _projection(adapter, _write(tmp_path / name, tensors), tmp_path, capsys)
        assert rc == 0, err
        docs.append(json.loads((tmp_path / "t7.json").read_text())["modules"])
        (tmp_path / "t7.json").unlink()
    assert docs[0] == docs[2] and len(docs[0]) == 4
    key = Q[: -len(".weight")]
    # bf16 keeps 8 significant bits: each entry within 2^-8 relative, so ||W||_F within 2^-8 too
    assert docs[1][key]["w_norm"] == pytest.approx(docs[0][key]["w_norm"], rel=2**-8)


@pytest.mark.parametrize("case", list(CASES))
def test_a_broken_shard_or_index_is_one_line_naming_the_file(case, llama, tmp_path, capsys):
    adapter, state = llama
    words = CASES[case](tmp_path / "ckpt", state)
    rc, _, err = _projection(adapter, tmp_path / "ckpt", tmp_path, capsys)
    _assert_one_line(rc, err, words, tmp_path)


@pytest.mark.parametrize("case", list(VALUE_CASES))
def test_a_bad_w_is_one_line_naming_the_shard_and_tensor(case, llama, tmp_path, capsys):
    adapter, state = llama
    make, name, words = VALUE_CASES[case]
    _write(tmp_path / "ckpt", {**state, name: make(state)})
    rc, _, err = _projection(adapter, tmp_path / "ckpt", tmp_path, capsys)
    shard = tmp_path / "ckpt" / SHARDS[".layers.1." in name]
    _assert_one_line(rc, err, [f"error: {shard}: tensor {name}", *words], tmp_path)


def test_checkpoint_weights_checks_what_it_reads(llama, tmp_path):
    """The checks live in the load layer: ``CheckpointWeights`` itself refuses a non-finite or integer W when it is
    read (in Python as on the command line), and a shard that changed on disk after it was opened."""
    adapter, state = llama
    ckpt = CheckpointWeights(_write(tmp_path / "ckpt", {**state, Q: _inf(state), K: state[K].to(torch.int8)}))
    key = V[: -len(".weight")]
    torch.testing.assert_close(ckpt[key], state[V], rtol=0, atol=0)
    with pytest.raises(UserError, match=r"tensor model\.layers\.1\.self_attn\.q_proj\.weight: 1 of 1024 entries"):
        ckpt[Q[: -len(".weight")]]
    with pytest.raises(UserError, match="dtype I8 is not a floating-point weight"):
        ckpt[K[: -len(".weight")]]
    with pytest.raises(UserError, match="adapter and checkpoint do not match"):
        CheckpointWeights(_write(tmp_path / "t", {**state, V: state[V].T.contiguous()})).check_adapter(
            load_adapter_dir(adapter))
    shard = tmp_path / "ckpt" / SHARDS[0]
    shard.write_bytes(shard.read_bytes()[:-64])  # truncated after the header was read
    with pytest.raises(UserError, match=f"{shard}: tensor {V}: cannot read it"):
        ckpt[key]


def test_subprocess_broken_checkpoint_has_no_traceback(llama, tmp_path):
    """End to end, the real ``python -m``: a shard replaced by a directory (was ``error: no such device (os error
    19)``, naming no file) is one line naming the shard."""
    adapter, state = llama
    words = _shard_is_a_directory(tmp_path / "ckpt", state)
    proc = subprocess.run([sys.executable, "-m", "lora_analysis.projection", "--adapter", str(adapter), "--base",
                           str(tmp_path / "ckpt"), "--lazy-base", "--quiet"], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and all(w in proc.stderr for w in words), proc.stderr


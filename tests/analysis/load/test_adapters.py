"""lora_analysis.load (adapters, base): finding and loading adapters (ours, real peft's, loralib's) and their base weights."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import D, make_adapter, peft_named_adapters, tiny_bert_model

from lora.errors import UserError
from lora_analysis.load import adapters as runs
from lora_analysis.load.adapters import index_run, load_adapter_dir, load_all, load_any, load_run_adapter
from lora_analysis.load.base import BaseWeights


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run directory of tiny-BERT adapters: q,v at ranks 2, 4, 8 × seeds 0, 1 (base model saved beside)."""
    root = tmp_path_factory.mktemp("run")
    base = root / "base"
    model = tiny_bert_model()
    model.save_pretrained(base)
    for r in (2, 4, 8):
        for s in (0, 1):
            make_adapter(base, root / f"qv_r{r}_s{s}", r=r, seed=s, model=copy.deepcopy(model))
    return root


# ------------------------------------------------------------------------------------------- module keys
@pytest.mark.parametrize(("key", "expected"), [
    ("encoder.layer.3.attention.self.query", "q"),
    ("bert.encoder.layer.3.attention.self.value", "v"),
    ("encoder.layer.0.attention.output.dense", "o"),
    ("transformer.h.0.attn.c_attn:v", "v"),
    ("transformer.h.0.attn.c_proj", "o"),
    ("model.layers.1.self_attn.q_proj", "q"),
    ("model.layers.1.mlp.up_proj", "up_proj"),
])
def test_weight_type(key, expected):
    assert runs.weight_type(key) == expected


def test_module_layer():
    assert runs.module_layer("transformer.h.11.attn.c_attn:q") == 11
    assert runs.module_layer("embeddings.word_embeddings") == -1


# ------------------------------------------------------------------------------------------- run index
def test_index_run_lists_the_grid(tiny_run):
    idx = index_run(tiny_run)
    assert idx.weight_sets == ["q,v"]
    assert idx.ranks() == [2, 4, 8]
    assert idx.seeds() == [0, 1]
    assert len(idx.entries) == 6  # the saved base model directory is not an adapter
    assert idx.select(rank=4, seed=1).path == tiny_run / "qv_r4_s1"


def test_select_missing_rank_or_seed_lists_available(tiny_run):
    idx = index_run(tiny_run)
    with pytest.raises(UserError, match=r"rank 64.*available ranks: 2, 4, 8"):
        idx.select(rank=64, seed=0)
    with pytest.raises(UserError, match=r"seed 7.*available seeds: 0, 1"):
        idx.select(rank=2, seed=7)
    with pytest.raises(UserError, match=r"weight set 'q'.*available: q,v"):
        idx.select(rank=2, seed=0, weight_set="q")


def test_temporary_dirs_of_a_killed_trainer_are_ignored(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "qv_r2_s0", run / "qv_r2_s0")
    shutil.copytree(tiny_run / "qv_r2_s0", run / ".qv_r4_s0.tmp-abc")
    assert [e.name for e in index_run(run).entries] == ["qv_r2_s0"]


# ------------------------------------------------------------------------------------------- loading
def test_load_upcasts_to_float64_and_keeps_values(tiny_run, tmp_path):
    base = tiny_run / "base"
    saved = make_adapter(base, tmp_path / "a", r=4, seed=3)
    a = load_adapter_dir(tmp_path / "a")
    assert a.rank == 4 and a.seed == 3 and a.weight_set == "q,v" and a.alpha == 8.0
    assert a.module_keys == sorted(saved, key=lambda k: (int(k.split(".")[2]), k))
    for key, f in saved.items():
        got = a.factors[key]
        assert got.A.dtype == got.B.dtype == torch.float64
        torch.testing.assert_close(got.A, f.A.double(), rtol=0, atol=0)
        torch.testing.assert_close(got.B, f.B.double(), rtol=0, atol=0)
        assert got.scaling == f.scaling == 2.0
        assert a.init_A[key].dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_adapter_is_upcast(tiny_run, tmp_path, dtype):
    src = tiny_run / "qv_r4_s0"
    dst = tmp_path / "half"
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "adapter_model.safetensors"))
    half = {k: v.to(dtype) for k, v in tensors.items()}
    save_file(half, str(dst / "adapter_model.safetensors"))
    a = load_adapter_dir(dst)
    key = "encoder.layer.1.attention.self.value"
    stored = half[f"base_model.model.{key}.lora_A.weight"]
    assert a.factors[key].A.dtype == torch.float64
    assert torch.equal(a.factors[key].A, stored.double())  # exact: every half value is a float64


def test_real_peft_adapter(tiny_run, tmp_path):
    """An adapter written by the real peft package loads with the same factors and scale peft uses."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    base_dir = tiny_run / "base"
    model = AutoModel.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=["query", "value"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(tmp_path / "peft")
    a = load_adapter_dir(tmp_path / "peft")
    assert a.rank == 4 and a.weight_set == "q,v" and a.seed is None
    assert Path(a.base_model) == base_dir
    assert len(a.factors) == 4
    lora_layer = peft_model.base_model.model.encoder.layer[1].attention.self.value
    f = a.factors["encoder.layer.1.attention.self.value"]
    torch.testing.assert_close(f.A, lora_layer.lora_A["default"].weight.detach().double())
    torch.testing.assert_close(f.B, lora_layer.lora_B["default"].weight.detach().double())
    assert f.scaling == lora_layer.scaling["default"] == 4.0
    # W0 comes from the recorded base directory and matches the unadapted weight
    W = BaseWeights().weights(a)["encoder.layer.1.attention.self.value"]
    torch.testing.assert_close(W, lora_layer.base_layer.weight.detach().double())
    # in a run directory the unseeded peft adapter is the one at its rank, whatever seed is asked for
    shutil.copytree(tmp_path / "peft", tmp_path / "peft_run" / "lora4")
    assert index_run(tmp_path / "peft_run").select(rank=4, seed=0).name == "lora4"


def test_peft_named_adapters_are_listed_and_loaded(tiny_run, tmp_path):
    """A folder that peft's save_pretrained wrote with several adapters: index_run and load_all find each one
    (the root as 'default' when it holds a config); a single-adapter load of the bare parent names them."""
    peft_named_adapters(tiny_run / "base", tmp_path)
    named, both = tmp_path / "named", tmp_path / "both"
    assert [e.path for e in index_run(named).entries] == [named / "other", named / "third"]
    assert sorted(e.path for e in index_run(both).entries) == [both, both / "other"]
    loaded = load_all(named)
    assert [a.path for a in loaded] == [named / "other", named / "third"] and [a.rank for a in loaded] == [2, 4]
    assert loaded[1].weight_set == "v" and sorted(loaded[0].factors) == [
        f"encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")]
    assert [a.path for a in load_all(both)] == [both, both / "other"]
    assert [a.path for a in load_all(named / "third")] == [named / "third"]  # one adapter: itself
    with pytest.raises(UserError, match=r"holds 2 named adapter\(s\) \(other, third\)"):
        load_any(named)


def test_gpt2_fused_qkv_splits_into_q_and_v(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=D, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    base = GPT2LMHeadModel(cfg).eval()
    base.save_pretrained(tmp_path / "gpt2")
    c_attn_w = base.transformer.h[1].attn.c_attn.weight.detach().clone()  # (d_in, 3 d_out)
    saved = make_adapter(tmp_path / "gpt2", tmp_path / "a", r=2, seed=0,
                         model=GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval())
    a = load_adapter_dir(tmp_path / "a")
    assert sorted(a.factors) == sorted(saved)
    assert "transformer.h.1.attn.c_attn:q" in a.factors and "transformer.h.1.attn.c_attn:v" in a.factors
    assert a.weight_set == "q,v"
    key = "transformer.h.1.attn.c_attn:v"
    torch.testing.assert_close(a.factors[key].B, saved[key].B.double(), rtol=0, atol=0)
    W = BaseWeights().weights(a)
    torch.testing.assert_close(W[key], c_attn_w[:, 2 * D:].T.double(), rtol=0, atol=0)  # (d_out, d_in)
    torch.testing.assert_close(W["transformer.h.1.attn.c_attn:q"], c_attn_w[:, :D].T.double(), rtol=0, atol=0)


def test_loralib_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"transformer.h.0.attn.c_attn.lora_A": torch.randn(2 * 4, D, generator=g),  # MergedLinear q,v at r=4
          "transformer.h.0.attn.c_attn.lora_B": torch.randn(2 * D, 4, generator=g)}
    torch.save(sd, tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match="alpha"):
        load_any(tmp_path / "ckpt.pt")
    a = load_any(tmp_path / "ckpt.pt", alpha=8)
    assert sorted(a.factors) == ["transformer.h.0.attn.c_attn:q", "transformer.h.0.attn.c_attn:v"]
    f = a.factors["transformer.h.0.attn.c_attn:v"]
    assert f.scaling == 2.0 and f.A.dtype == torch.float64
    torch.testing.assert_close(f.A, sd["transformer.h.0.attn.c_attn.lora_A"][4:].double())


# ------------------------------------------------------------------------------------------- base weights
def test_base_weights_loaded_once_and_svd_shared(tiny_run):
    bw = BaseWeights()
    a2, a8 = load_run_adapter(tiny_run, rank=2), load_run_adapter(tiny_run, rank=8, seed=1)
    W2, W8 = bw.weights(a2), bw.weights(a8)
    assert len(bw._models) == 1
    for key in W2:
        assert W2[key] is W8[key]
        assert bw.spectrum(key, W2[key], 2) is bw.spectrum(key, W8[key], 8)  # one SVD per W, every k a slice
    assert bw.computed == len(W2)


def test_base_of_another_shape_is_refused(tiny_run, tmp_path):
    from transformers import BertConfig, BertModel

    other = BertModel(BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=64))
    other.save_pretrained(tmp_path / "other")
    a = load_run_adapter(tiny_run, rank=2)
    with pytest.raises(UserError, match=r"module encoder\.layer\.0\.attention\.self\.query.*do not match"):
        BaseWeights(tmp_path / "other").weights(a)


def test_missing_base_is_a_user_error(tiny_run, tmp_path):
    a = load_run_adapter(tiny_run, rank=2)
    with pytest.raises(UserError, match="no-such-base"):
        BaseWeights(tmp_path / "no-such-base").weights(a)


# ------------------------------------------------------------------------------------------- bad input
def _corrupt(tiny_run: Path, tmp_path: Path, how: str) -> Path:
    d = tmp_path / how
    shutil.copytree(tiny_run / "qv_r2_s0", d)
    weights = d / "adapter_model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif how == "invalid_json":
        (d / "adapter_config.json").write_text("{not json", encoding="utf-8")
    elif how == "nan":
        t = load_file(str(weights))
        k = "base_model.model.encoder.layer.1.attention.self.query.lora_B.weight"
        t[k][0, 0] = float("nan")
        save_file(t, str(weights))
    elif how == "shapes":
        t = load_file(str(weights))
        k = "base_model.model.encoder.layer.0.attention.self.value.lora_B.weight"
        t[k] = torch.zeros(D, 3)
        save_file(t, str(weights))
    elif how == "missing_weights":
        weights.unlink()
    return d


@pytest.mark.parametrize(("how", "pattern"), [
    ("truncated", "adapter_model.safetensors"),
    ("invalid_json", r"adapter_config\.json.*JSON"),
    ("nan", r"encoder\.layer\.1\.attention\.self\.query.*NaN"),
    ("shapes", r"encoder\.layer\.0\.attention\.self\.value"),
    ("missing_weights", "adapter_model.safetensors: missing"),
])
def test_bad_adapter_files(tiny_run, tmp_path, how, pattern):
    d = _corrupt(tiny_run, tmp_path, how)
    with pytest.raises(UserError, match=pattern):
        load_adapter_dir(d)


def test_bad_paths(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        index_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        index_run(tmp_path / "empty")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        index_run(tmp_path / "f.txt")
    with pytest.raises(UserError, match="is a file"):
        load_adapter_dir(tmp_path / "f.txt")
    with pytest.raises(UserError, match="empty"):
        load_adapter_dir(tmp_path / "empty")


def test_invalid_json_in_run_index_names_the_file(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "qv_r2_s0", run / "qv_r2_s0")
    (run / "qv_r2_s0" / "adapter_config.json").write_text('{"r": 2,', encoding="utf-8")
    with pytest.raises(UserError, match=r"qv_r2_s0/adapter_config\.json: invalid JSON"):
        index_run(run)


def test_base_with_other_weights_of_the_same_shape_warns(tiny_run, tmp_path, capsys):
    """base_fingerprint (recorded at save time) catches a base whose shapes fit but whose weights differ."""
    from transformers import AutoModel

    a = load_run_adapter(tiny_run, rank=2)
    BaseWeights().weights(a)
    assert "warning" not in capsys.readouterr().err  # the recorded base matches
    other = AutoModel.from_pretrained(tiny_run / "base")
    with torch.no_grad():
        other.encoder.layer[0].attention.self.query.weight.mul_(1.01)
    other.save_pretrained(tmp_path / "perturbed")
    capsys.readouterr()
    W = BaseWeights(tmp_path / "perturbed").weights(a)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "base_fingerprint" in err and str(tmp_path / "perturbed") in err
    torch.testing.assert_close(W[KEY_Q0], other.encoder.layer[0].attention.self.query.weight.detach().double())


KEY_Q0 = "encoder.layer.0.attention.self.query"

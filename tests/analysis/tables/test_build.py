"""lora_analysis.tables.build: exact schemas (COLUMNS) and values equal to direct metric calls and external references."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch
from tiny_models import D, make_adapter, tiny_bert_model

from lora.errors import UserError
from lora.rundir import read_manifest
from lora_analysis.load.adapters import RunIndex, load_run_adapter
from lora_analysis.load.base import BaseWeights, CheckpointWeights
from lora_analysis.load.run import Run
from lora_analysis.metrics.linalg import factored_svd
from lora_analysis.metrics.projection import table7_row
from lora_analysis.metrics.spectra import intruder_dimensions, spectrum_summary
from lora_analysis.metrics.subspace import init_control, phi_weight_vs_delta, subspace_similarity
from lora_analysis.tables.build import (
    COLUMNS,
    analyse_run,
    fig8_table,
    phi_table,
    quality_table,
    random_phi_table,
    singular_values_table,
    spectra_table,
    table7_table,
    table7_tables,
    write_tables,
)

pytestmark = pytest.mark.float_sensitive  # rerun under forced MKL/ATen kernels by .ci/run

KEY = "encoder.layer.1.attention.self.value"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    model = tiny_bert_model()
    model.save_pretrained(root / "base")
    for r in (2, 4, 8):
        for s in (0, 1):
            make_adapter(root / "base", root / f"qv_r{r}_s{s}", r=r, seed=s, model=copy.deepcopy(model))
    return root


@pytest.fixture(scope="module")
def base(tiny_run):
    return BaseWeights()


def _grid(df: pd.DataFrame, **eq) -> np.ndarray:
    for k, v in eq.items():
        df = df[df[k] == v]
    return df.pivot(index="i", columns="j", values="phi").to_numpy()


def test_phi_table_schema_and_values(tiny_run):
    a1, a2 = load_run_adapter(tiny_run, rank=2), load_run_adapter(tiny_run, rank=8)
    t = phi_table(a1, a2, comparison="rank")
    assert list(t.columns) == COLUMNS["phi"]
    assert set(t["quantity"]) == {"A", "A-A_init", "A_init", "B", "dW", "dW-top", "start_null", "start_null-top",
                                  "expected_random"}
    assert set(t["module"]) == set(a1.factors) and t["phi"].dtype == np.float64
    row = t[(t.module == KEY)].iloc[0]
    assert (row.weight_type, row.layer, row.r1, row.r2, row.seed1, row.seed2) == ("v", 1, 2, 8, 0, 0)
    f1, f2 = a1.factors[KEY], a2.factors[KEY]
    np.testing.assert_allclose(_grid(t, module=KEY, quantity="A"), subspace_similarity(f1.A, f2.A).numpy(), atol=1e-12)
    ctl = init_control(f1.A, a1.init_A[KEY], f2.A, a2.init_A[KEY])
    np.testing.assert_allclose(_grid(t, module=KEY, quantity="A-A_init"), ctl.phi_learned.numpy(), atol=1e-12)
    np.testing.assert_allclose(_grid(t, module=KEY, quantity="A_init"), ctl.phi_init.numpy(), atol=1e-12)
    np.testing.assert_allclose(_grid(t, module=KEY, quantity="B"),
                               subspace_similarity(f1.B, f2.B, side="B").numpy(), atol=1e-12)
    # dW: φ on ΔW's own right singular vectors, against a dense SVD of s·B·A (an external reference)
    V1 = np.linalg.svd(f1.scaling * (f1.B @ f1.A).numpy())[2][:2].T
    V2 = np.linalg.svd(f2.scaling * (f2.B @ f2.A).numpy())[2][:8].T
    cum = ((V1.T @ V2) ** 2).cumsum(0).cumsum(1)
    i, j = np.meshgrid(np.arange(1, 3), np.arange(1, 9), indexing="ij")
    np.testing.assert_allclose(_grid(t, module=KEY, quantity="dW"), cum / np.minimum(i, j), atol=1e-9)
    np.testing.assert_allclose(_grid(t, module=KEY, quantity="expected_random"), np.maximum(i, j) / D)
    # nested init (same seed): A_2's start is the first rows of A_8's, so its row space lies inside A_8's:
    # phi_init(i, j = 8) = 1 for every i
    np.testing.assert_allclose(_grid(t, module=KEY, quantity="A_init")[:, -1], 1.0, atol=1e-9)


def test_phi_against_scipy_principal_angles(tiny_run):
    """φ(i, j) = Σ cos² θ_k / min(i, j) over the principal angles between the top-i and top-j subspaces."""
    a1, a2 = load_run_adapter(tiny_run, rank=4, seed=0), load_run_adapter(tiny_run, rank=8, seed=1)
    t = phi_table(a1, a2, comparison="rank", quantities=("A",))
    _, _, V1 = np.linalg.svd(a1.factors[KEY].A.numpy(), full_matrices=False)
    _, _, V2 = np.linalg.svd(a2.factors[KEY].A.numpy(), full_matrices=False)
    for i, j in [(1, 1), (3, 5), (4, 8)]:
        theta = scipy.linalg.subspace_angles(V1[:i].T, V2[:j].T)
        expected = np.sum(np.cos(theta) ** 2) / min(i, j)
        got = t[(t.module == KEY) & (t.i == i) & (t.j == j)]["phi"].item()
        assert got == pytest.approx(expected, abs=1e-10)


def test_phi_table_without_init_or_shared_modules(tiny_run, tmp_path):
    a1 = load_run_adapter(tiny_run, rank=2)
    make_adapter(tiny_run / "base", tmp_path / "q_only", r=2, seed=0, targets=("q",))
    from lora_analysis.load.adapters import load_adapter_dir

    q_only = load_adapter_dir(tmp_path / "q_only")
    t = phi_table(a1, q_only, comparison="seed")
    assert set(t["module"]) == {k for k in a1.factors if k.endswith("query")}
    make_adapter(tiny_run / "base", tmp_path / "k_only", r=2, seed=0, targets=("k",))
    with pytest.raises(UserError, match="no module in common"):
        phi_table(a1, load_adapter_dir(tmp_path / "k_only"), comparison="seed")


def test_random_phi_table(tiny_run):
    a = load_run_adapter(tiny_run, rank=8)
    t = random_phi_table(a, r1=8, r2=8, seed=1)
    assert list(t.columns) == COLUMNS["phi"]
    assert set(t["comparison"]) == {"random"} and set(t["seed1"]) == set(t["seed2"]) == {-1}
    assert t.equals(random_phi_table(a, r1=8, r2=8, seed=1))  # seeded
    grids = [_grid(t, module=k) for k in a.factors]
    assert not np.allclose(grids[0], grids[1])  # independent draws per module
    i, j = np.meshgrid(np.arange(1, 9), np.arange(1, 9), indexing="ij")
    assert np.mean(grids, axis=0).mean() == pytest.approx((np.maximum(i, j) / D).mean(), abs=0.05)


def test_table7_table_matches_table7_row_and_dense_reference(tiny_run, base):
    a = load_run_adapter(tiny_run, rank=4, seed=1)
    t = table7_table(a, base)
    assert list(t.columns) == COLUMNS["table7"] and len(t) == 4
    W = base.weights(a)[KEY]
    f = a.factors[KEY]
    row = t[t.module == KEY].iloc[0]
    ref = table7_row(W, f.A, f.B, scaling=f.scaling, top=4)
    for col in ("delta", "weight", "w_norm", "dw_norm", "amplification"):
        assert row[col] == pytest.approx(getattr(ref, col), rel=1e-12)
    dense = (f.B @ f.A * f.scaling).numpy()
    assert row.dw_norm == pytest.approx(np.linalg.norm(dense), rel=1e-10)
    U, _, Vt = np.linalg.svd(dense)
    assert row.delta == pytest.approx(np.linalg.norm(U[:, :4].T @ W.numpy() @ Vt[:4].T), rel=1e-8)
    assert row.weight == pytest.approx(np.sqrt(np.sum(np.linalg.svd(W.numpy(), compute_uv=False)[:4] ** 2)), rel=1e-10)
    assert 0 < row.random < row.weight
    assert (row["rank"], row.top, row.seed, row.layer, row.weight_type) == (4, 4, 1, 1, "v")
    assert set(table7_table(a, base, top=2)["top"]) == {2}
    with pytest.raises(UserError, match="top k = "):
        table7_table(a, base, top=5)


def test_table7_tables_batches_every_rank_and_seed_of_a_W(tiny_run, base):
    """All adapters at once (one table7_rows call per W) give each adapter's table7_table, in adapter order."""
    adapters = [load_run_adapter(tiny_run, rank=r, seed=s) for r in (2, 8) for s in (0, 1)]
    keys = [[k for k in a.factors if ".layer.1." in k] for a in adapters]
    t = table7_tables(adapters, base, keys=keys)
    ref = pd.concat([table7_table(a, base, keys=k) for a, k in zip(adapters, keys, strict=True)], ignore_index=True)
    assert list(t.columns) == COLUMNS["table7"] and len(t) == 4 * 2
    pd.testing.assert_frame_equal(t, ref, rtol=1e-12)
    assert list(zip(t["rank"], t["seed"], strict=True))[::2] == [(2, 0), (2, 1), (8, 0), (8, 1)]
    # the null is drawn per module and k: both seeds of a rank share it
    same_k = t[(t.module == KEY) & (t["rank"] == 8)]
    assert same_k["random_sd"].nunique() == 1 and same_k["delta"].nunique() == 2


def test_table7_and_phi_tables_do_not_depend_on_workers(tiny_run, base):
    """Threads over W matrices (table7_tables) and over modules (phi_table) give bitwise the one-thread tables."""
    adapters = [load_run_adapter(tiny_run, rank=r, seed=s) for r in (2, 8) for s in (0, 1)]
    one = table7_tables(adapters, base, workers=1)
    pd.testing.assert_frame_equal(table7_tables(adapters, base, workers=2), one, check_exact=True)
    pd.testing.assert_frame_equal(phi_table(adapters[0], adapters[2], comparison="rank", workers=2),
                                  phi_table(adapters[0], adapters[2], comparison="rank", workers=1), check_exact=True)


def test_table7_tables_on_a_lazy_checkpoint(tiny_run, base, tmp_path, monkeypatch):
    """A safetensors checkpoint read one W at a time (CheckpointWeights, the 7B route) gives the tables of the
    loaded base model; asking which modules it holds reads no tensor; a missing or unreadable path is one error."""
    from safetensors.torch import save_file

    adapters = [load_run_adapter(tiny_run, rank=r, seed=0) for r in (2, 8)]
    Ws = base.weights(adapters[0])
    save_file({f"{k}.weight": W.to(torch.float32).contiguous() for k, W in Ws.items()}, str(tmp_path / "model.safetensors"))
    ckpt = CheckpointWeights(tmp_path)
    assert set(ckpt) == set(Ws) and len(ckpt) == len(Ws) and "nope" not in ckpt
    reads = []
    real = CheckpointWeights.__getitem__
    monkeypatch.setattr(CheckpointWeights, "__getitem__", lambda self, k: reads.append(k) or real(self, k))
    assert all(k in ckpt for k in Ws) and not reads  # membership reads no tensor
    got = table7_tables(adapters, ckpt, workers=2)
    assert sorted(reads) == sorted(Ws)  # each W read once, for every rank that adapts it
    pd.testing.assert_frame_equal(got, table7_tables(adapters, base), rtol=1e-12)
    shards = tmp_path / "sharded"  # the hub layout of a large model: shards and an index naming them
    shards.mkdir()
    names = sorted(Ws)
    for i, part in enumerate((names[::2], names[1::2])):
        save_file({f"{k}.weight": Ws[k].contiguous() for k in part}, str(shards / f"model-0000{i + 1}.safetensors"))
    (shards / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        f"{k}.weight": f"model-0000{1 + j % 2}.safetensors" for j, k in enumerate(names)}}))
    sharded = CheckpointWeights(shards)
    assert sorted(sharded) == names and all(torch.equal(sharded[k], Ws[k]) for k in names)
    (shards / "model.safetensors.index.json").write_text('{"weight_map": [1, 2]}')
    with pytest.raises(UserError, match="index.json: weight_map is not a"):
        CheckpointWeights(shards)
    with pytest.raises(UserError, match="missing: no such checkpoint"):
        CheckpointWeights(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: no model.safetensors or model.safetensors.index.json"):
        CheckpointWeights(tmp_path / "empty")
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="bad.safetensors: not a readable safetensors file"):
        CheckpointWeights(tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match="no base weight given"):
        table7_tables(adapters, {})


def test_fig8_table(tiny_run, base):
    a = load_run_adapter(tiny_run, rank=8)
    t = fig8_table(a, base)
    assert list(t.columns) == COLUMNS["fig8"]
    assert set(t["source"]) == {"delta", "random"}
    W = base.weights(a)[KEY]
    f = a.factors[KEY]
    n_w = round(0.1 * D)
    expected = phi_weight_vs_delta(W, f.A, f.B, scaling=f.scaling, i_max=n_w).numpy()
    np.testing.assert_allclose(_grid(t, module=KEY, source="delta"), expected, atol=1e-12)
    assert _grid(t, module=KEY, source="random").shape == (n_w, 8)


def test_spectra_and_singular_values(tiny_run, base):
    a = load_run_adapter(tiny_run, rank=8, seed=1)
    sp, sv = spectra_table(a, base), singular_values_table(a)
    assert list(sp.columns) == COLUMNS["spectra"] and list(sv.columns) == COLUMNS["singular_values"]
    f = a.factors[KEY]
    sigma = sv[sv.module == KEY].sort_values("index")["sigma"].to_numpy()
    np.testing.assert_allclose(sigma, np.linalg.svd((f.B @ f.A * f.scaling).numpy(), compute_uv=False)[:8], rtol=1e-9)
    row = sp[sp.module == KEY].iloc[0]
    ref = spectrum_summary(f.A, f.B, scaling=f.scaling)
    assert row.stable_rank == pytest.approx(np.sum(sigma**2) / sigma[0] ** 2, rel=1e-10)
    assert (row.entropy_rank, row.energy_rank_90, row.dw_norm) == pytest.approx(
        (ref.effective_rank, ref.energy_rank, ref.frobenius))
    W = base.weights(a)[KEY]
    assert row.n_intruders == intruder_dimensions(W, f.A, f.B, scaling=f.scaling).count
    assert set(spectra_table(a)["n_intruders"]) == {-1}  # no base: not computed


def _write_summary(root, rows):
    from lora.rundir import SUMMARY_COLUMNS

    df = pd.DataFrame(rows)
    for c in SUMMARY_COLUMNS:
        if c not in df:
            df[c] = ""
    df[list(SUMMARY_COLUMNS)].to_csv(root / "summary.csv", index=False)


def _bare_run(root: Path) -> Run:
    """A run directory with training metrics but no adapter directories, opened as Run.open would."""
    return Run(root, RunIndex(root=root, entries=()), read_manifest(root), BaseWeights())


def test_quality_table(tmp_path):
    assert list(quality_table(_bare_run(tmp_path)).columns) == COLUMNS["quality"]  # no training metrics: empty
    _write_summary(tmp_path, [
        {"name": "qv_r8_s0", "weight_set": "q,v", "rank": 8, "seed": 0, "alpha": 8.0, "metric": "accuracy",
         "val_metric": 0.9, "trainable_params": 1234, "wall_time_s": 2.5},
        {"name": "q_r8_s1", "weight_set": "q", "rank": 8, "seed": 1, "alpha": 8.0, "metric": "accuracy",
         "val_metric": 0.8, "trainable_params": 1000, "wall_time_s": 2.0},
    ])
    (tmp_path / "manifest.json").write_text(json.dumps({"linear_probe": {
        "metric": "accuracy", "val_metric": 0.5, "seed": 0, "trainable_params": 700, "wall_time_s": 1.0}}))
    q = quality_table(_bare_run(tmp_path))
    assert list(q.columns) == COLUMNS["quality"]
    assert q["weight_set"].tolist() == ["q,v", "q", "linear probe"]
    assert q["method"].tolist() == ["lora", "lora", "probe"]
    assert q["rank"].tolist() == [8, 8, 0]
    assert q["val_metric"].tolist() == [0.9, 0.8, 0.5]
    assert q.iloc[0].metric_name == "accuracy" and q.iloc[0].wall_s == 2.5
    _write_summary(tmp_path, [{"name": "x", "weight_set": "q,v", "rank": "eight", "seed": 0, "alpha": 8,
                               "metric": "accuracy", "val_metric": 0.9, "trainable_params": 1, "wall_time_s": 1}])
    with pytest.raises(UserError, match=r"summary\.csv: row 2: column rank"):
        quality_table(_bare_run(tmp_path))


def test_analyse_run_all_tables(tiny_run, tmp_path):
    bw = BaseWeights()
    tables = analyse_run(tiny_run, base=bw, progress=False)
    assert set(tables) == set(COLUMNS)
    for name, df in tables.items():
        assert list(df.columns) == COLUMNS[name], name
    phi = tables["phi"]
    # r = 8 and 64 are the paper's pair; this run has 2, 4, 8, so the nearest present ranks are 4 and 8; the
    # paper's r/d (8 and 64 of 12,288) on d = 32 is r = 0.02 and 0.17, nearest 2 and (above it) 4
    rank_rows = phi[phi.comparison == "rank"]
    assert set(zip(rank_rows.r1, rank_rows.r2, rank_rows.seed1, strict=True)) == {(4, 8, 0), (4, 8, 1), (2, 4, 0),
                                                                                (2, 4, 1)}
    seed_rows = phi[phi.comparison == "seed"]
    assert set(zip(seed_rows.r1, seed_rows.seed1, seed_rows.seed2, strict=True)) == {(8, 0, 1)}
    assert set(zip(*[phi[phi.comparison == "random"][c] for c in ("r1", "r2")], strict=True)) == {(4, 8), (8, 8)}
    assert len(tables["table7"]) == 6 * 4 and len(tables["spectra"]) == 6 * 4
    assert set(tables["fig8"]["rank"]) == {4, 8} and set(tables["fig8"]["seed"]) == {0, 1}  # every seed
    assert bw.computed == 4  # W's SVD once per weight matrix, shared by 6 adapters
    assert len(bw._models) == 1
    # values agree with the one-adapter functions
    a = load_run_adapter(tiny_run, rank=4, seed=0)
    pd.testing.assert_frame_equal(
        tables["table7"].query("rank == 4 and seed == 0").reset_index(drop=True), table7_table(a, bw))

    only = analyse_run(tiny_run, base=bw, layers=[1], ranks=[2, 8], seeds=[0], progress=False)
    assert set(only["table7"]["layer"]) == {1} and set(only["table7"]["rank"]) == {2, 8}
    assert set(only["phi"]["comparison"]) == {"rank", "random"}  # one seed: no seed comparison
    with pytest.raises(UserError, match="available: 2, 4, 8"):
        analyse_run(tiny_run, ranks=[64], progress=False)

    paths = write_tables(tables, tmp_path / "tables")
    assert sorted(p.name for p in paths) == sorted(f"{n}.csv" for n in COLUMNS)
    back = pd.read_csv(tmp_path / "tables" / "phi.csv")
    np.testing.assert_array_equal(back["phi"].to_numpy(), phi["phi"].to_numpy())  # full precision
    assert not [p for p in (tmp_path / "tables").iterdir() if p.name.startswith(".")]  # no temp files left
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        write_tables(tables, tmp_path / "afile")


def test_singular_values_fused_keys_are_separate(tmp_path):
    """GPT-2 c_attn q and v slices give separate rows (their own module keys and weight types)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lora_analysis.load.adapters import load_adapter_dir

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=D, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "g")
    make_adapter(tmp_path / "g", tmp_path / "a", r=2, seed=0, model=GPT2LMHeadModel.from_pretrained(tmp_path / "g"))
    a = load_adapter_dir(tmp_path / "a")
    sv = singular_values_table(a)
    assert set(zip(sv.module, sv.weight_type, strict=True)) == {("transformer.h.0.attn.c_attn:q", "q"),
                                                                ("transformer.h.0.attn.c_attn:v", "v")}
    f = a.factors["transformer.h.0.attn.c_attn:v"]
    np.testing.assert_allclose(sv[sv.weight_type == "v"]["sigma"], factored_svd(f.A, f.B, scaling=f.scaling).S)


def test_intruders_per_slice_of_c_attn_and_output_side_of_c_proj(tmp_path):
    """Intruder dimensions on GPT-2: the fused c_attn is counted per slice, W_t = c_attn.weight[:, t-th block]ᵀ
    (d_out, d_in) with its own ΔW_t; a whole Conv1D (attn and mlp c_proj) on Wᵀ (d_out, d_in), so the default side
    is the output space as on a Linear layer (see intruder_dimensions)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lora_analysis.load.adapters import load_adapter_dir

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=D, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "g")
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "g")
    stored = {n: model.transformer.h[0].get_submodule(n).weight.detach().double().clone()
              for n in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")}
    make_adapter(tmp_path / "g", tmp_path / "a", r=2, seed=0, targets=("q", "v", "c_proj"), model=model)
    a = load_adapter_dir(tmp_path / "a")
    sp = spectra_table(a, BaseWeights()).set_index("module")
    expected_W = {"transformer.h.0.attn.c_attn:q": stored["attn.c_attn"][:, :D].T,
                  "transformer.h.0.attn.c_attn:v": stored["attn.c_attn"][:, 2 * D:].T,
                  "transformer.h.0.attn.c_proj": stored["attn.c_proj"].T,
                  "transformer.h.0.mlp.c_proj": stored["mlp.c_proj"].T}  # (32, 128): d_out, d_in
    assert sorted(sp.index) == sorted(expected_W)
    for key, W in expected_W.items():
        f = a.factors[key]
        assert sp.loc[key, "n_intruders"] == intruder_dimensions(W, f.A, f.B, scaling=f.scaling).count, key
    assert sp["n_intruders"].sum() > 0  # not a comparison of zeros


def test_gzipped_tables_are_the_csv_and_byte_stable(tmp_path):
    """The committed φ / Figure 8 tables: the same rows as the CSV, and the same bytes on every write (no name or
    time in the gzip header), so a regenerated run changes them only where the numbers change."""
    df = pd.DataFrame({"i": [1, 2], "phi": [np.pi / 4, 1 / 3]})
    write_tables({"phi": df, "table7": df}, tmp_path / "a", gzipped=("phi",))
    write_tables({"phi": df}, tmp_path / "b", gzipped=("phi",))
    assert not (tmp_path / "a" / "table7.csv.gz").exists()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a" / "phi.csv.gz"), pd.read_csv(tmp_path / "a" / "phi.csv"))
    assert (tmp_path / "a" / "phi.csv.gz").read_bytes() == (tmp_path / "b" / "phi.csv.gz").read_bytes()

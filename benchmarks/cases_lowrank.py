"""Resize and extraction at 7B shape (issue 25): ours against peft's ``convert_to_lora`` and a dense SVD.

Cases (group ``lowrank_7b``):

* ``resize_7b[qv r64->8, <L> layers]``: an r = 64 q/v adapter on a LLaMA-2-7B-shaped model (32 layers, d = 4096,
  :func:`benchmarks.cases_report7b.write_adapters`) truncated to rank 8.

  - ours: :func:`lora.resize.resize` (factored SVD: QR of ``A``, ``B`` and an ``r × r`` SVD, never a dense ΔW),
    every module, ``reps`` times;
  - peft: ``peft.tuners.lora.conversion.convert_to_lora(model, rank=8)`` on the smallest model holding the adapted
    modules: a bare ``model.layers.L.self_attn.{q,v}_proj`` tree of ``nn.Linear(4096, 4096)`` (weights never
    touched: peft forms ``ΔW = s·B·A`` from the LoRA factors, a float32 dense ``torch.linalg.svd``, and truncates),
    the first ``peft_layers`` layers' LoRA factors loaded into it; its time is scaled by
    ``modules / peft modules`` (every module is the same 4096 × 4096 SVD, so the cost is linear in their number);
  - dense: ``ΔW`` formed in float64, ``torch.linalg.svd``, truncated, on ``dense_modules`` modules, extrapolated
    the same way.

  ``ratio`` is ours / peft (extrapolated); ``extra`` holds the dense route, the peak RSS of each side and the
  largest relative difference ``‖ΔW_8(ours) − ΔW_8(peer)‖_F / ‖ΔW_8(peer)‖_F`` on the sampled modules.
* ``extract_7b[qv rank 8, 32 layers]``: from the bulk q/v checkpoint (``W0``) and a "fine-tuned" copy
  (``W0 + a rank-32 perturbation + small full-rank noise``, bf16, the same shards; written once into the cache,
  :func:`write_finetuned`), rank 8. Ours: :func:`lora.extract.model_pair` + :func:`lora.extract.extract`
  (streaming, one module at a time, block Krylov top-K); peer: ``ΔW`` in float64, dense ``torch.linalg.svd``,
  truncated, on sampled modules, extrapolated to every module.

Each side runs in its own child process (``spawn``), so its ``VmHWM`` (peak RSS) is its own; all sides run in
one :func:`lowrank_cases` call, one after another.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from benchmarks.cases_report7b import N_LAYERS, cache_root, module_key, write_adapters, write_checkpoint
from benchmarks.harness import CaseResult, result_from_runs

PROJS = ("q_proj", "v_proj")
RANK_IN, RANK_OUT = 64, 8
FT_RANK = 32  # rank of the fine-tuning perturbation
NOISE = 2e-4  # entry scale of the full-rank noise (W's entries are ~0.02: 1 %)


# ---------------------------------------------------------------------------------------------- child processes
def _status_mib(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def _measured(fn, *args) -> dict:
    """Run ``fn(*args)`` (in the child): its result plus ``peak_rss_mib`` (VmHWM after the run) and
    ``start_rss_mib`` (VmRSS before it, the interpreter and imports)."""
    torch.set_num_threads(1)
    from benchmarks.cases_svd import _reset_peak

    start = _status_mib("VmRSS")
    _reset_peak()
    out = fn(*args)
    out.update(peak_rss_mib=_status_mib("VmHWM"), start_rss_mib=start)
    return out


def _in_child(fn, *args) -> dict:
    """``fn(*args)`` in a fresh process (so its VmHWM is its own)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as ex:
        return ex.submit(_measured, fn, *args).result()


def _delta(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return B.to(torch.float64) @ A.to(torch.float64)


def _max_rel(ours: dict[str, torch.Tensor], peer: dict[str, torch.Tensor]) -> float:
    """Largest ``‖ours − peer‖_F / ‖peer‖_F`` over the modules both hold (ΔW_K's, float64)."""
    return max(float((ours[k] - peer[k]).norm() / peer[k].norm()) for k in peer)


# ---------------------------------------------------------------------------------------------- resize: the sides
def _resize_ours(adapter_dir: str, reps: int, sample: list[str]) -> dict:
    from lora.adapter_io import load_adapter
    from lora.resize import ResizeRule, resize

    t0 = time.perf_counter()
    adapter = load_adapter(adapter_dir)
    t_load = time.perf_counter() - t0
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        _, _, tensors, kept = resize(adapter, ResizeRule(rank=RANK_OUT))
        runs.append(time.perf_counter() - t0)
    p = "base_model.model."
    dws = {k: _delta(tensors[f"{p}{k}.lora_A.weight"], tensors[f"{p}{k}.lora_B.weight"]) for k in sample}
    return {"runs": runs, "load_s": t_load, "modules": len(kept), "dw": dws}


def _resize_peft(adapter_dir: str, n_layers: int) -> dict:
    """peft's ``convert_to_lora`` on a bare tree holding ``n_layers`` layers' q/v (the adapter's first ones)."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.conversion import convert_to_lora
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file
    from torch import nn

    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    stored = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    d = stored[f"base_model.model.{module_key(0, PROJS[0])}.lora_A.weight"].shape[1]
    layers = nn.ModuleList(
        nn.ModuleDict({"self_attn": nn.ModuleDict({p: nn.utils.skip_init(nn.Linear, d, d, bias=False) for p in PROJS})})
        for _ in range(n_layers))
    base = nn.Module()
    base.model = nn.Module()
    base.model.layers = layers
    model = get_peft_model(base, LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=list(PROJS),
                                            lora_dropout=0.0, init_lora_weights=False))
    keys = [module_key(L, p) for L in range(n_layers) for p in PROJS]
    sd = {f"base_model.model.{k}.lora_{x}.weight": stored[f"base_model.model.{k}.lora_{x}.weight"]
          for k in keys for x in "AB"}
    res = set_peft_model_state_dict(model, sd)
    if getattr(res, "unexpected_keys", None):
        raise RuntimeError(f"peft did not take the adapter's keys: {res.unexpected_keys[:2]}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "converting a LoRA to LoRA": that is the point here
        t0 = time.perf_counter()
        _, state = convert_to_lora(model, rank=RANK_OUT)
        t = time.perf_counter() - t0
    pre = "base_model.model."
    dws = {k: _delta(state[f"{pre}{k}.lora_A.weight"], state[f"{pre}{k}.lora_B.weight"]) for k in keys}
    return {"runs": [t], "modules": len(keys), "dw": dws}


def _dense_truncate(dW: torch.Tensor, rank: int) -> torch.Tensor:
    """``U_K Σ_K V_Kᵀ`` from a dense float64 SVD of ``dW``."""
    U, S, Vh = torch.linalg.svd(dW.to(torch.float64), full_matrices=False)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank]


def _resize_dense(adapter_dir: str, sample: list[str]) -> dict:
    from lora.adapter_io import load_adapter

    adapter = load_adapter(adapter_dir)
    runs, dws = [], {}
    for k in sample:
        f = adapter.factors[k]
        t0 = time.perf_counter()
        dws[k] = _dense_truncate(f.scaling * _delta(f.A, f.B), RANK_OUT)
        runs.append(time.perf_counter() - t0)
    return {"runs": runs, "modules": len(sample), "dw": dws}


def resize_case(*, n_layers: int = N_LAYERS, reps: int = 3, peft_layers: int = 1, dense_modules: int = 1) -> CaseResult:
    """Resize r = 64 -> 8 of a q/v adapter on ``n_layers`` layers: ours on every module, peft on ``peft_layers``
    layers and the dense route on ``dense_modules`` modules, both scaled to every module."""
    import peft

    root = cache_root()
    ckpt = write_checkpoint(root, spectrum="bulk", projs=PROJS)
    n_modules = n_layers * len(PROJS)
    sample = [module_key(L, p) for L in range(peft_layers) for p in PROJS]  # peft's modules; dense: the first
    with tempfile.TemporaryDirectory(prefix="bench-lowrank-") as tmp:
        adapter = str(write_adapters(Path(tmp), ckpt, projs=PROJS, ranks=(RANK_IN,), seeds=(0,), n_layers=n_layers)[0])
        ours = _in_child(_resize_ours, adapter, reps, sample)
        pf = _in_child(_resize_peft, adapter, peft_layers)
        dense = _in_child(_resize_dense, adapter, sample[:dense_modules])
    peft_total = pf["runs"][0] * n_modules / pf["modules"]
    dense_total = sum(dense["runs"]) / len(dense["runs"]) * n_modules
    err_peft, err_dense = _max_rel(ours["dw"], pf["dw"]), _max_rel(ours["dw"], dense["dw"])
    ours_med = sorted(ours["runs"])[len(ours["runs"]) // 2]
    extra = {"modules": n_modules, "peft_modules_timed": pf["modules"], "peft_timed_s": pf["runs"][0],
             "dense_modules_timed": dense["modules"], "dense_per_module_s": dense_total / n_modules,
             "dense_extrapolated_s": dense_total, "ratio_vs_dense": ours_med / dense_total,
             "ours_load_s": ours["load_s"], "ours_peak_rss_mib": ours["peak_rss_mib"],
             "ours_start_rss_mib": ours["start_rss_mib"], "peft_peak_rss_mib": pf["peak_rss_mib"],
             "peft_start_rss_mib": pf["start_rss_mib"], "dense_peak_rss_mib": dense["peak_rss_mib"],
             "max_rel_diff_vs_peft": err_peft, "max_rel_diff_vs_dense": err_dense}
    notes = (f"{n_modules} q/v modules 4096x4096, r {RANK_IN} -> {RANK_OUT}. ours: lora.resize.resize, every module, "
             f"median of {reps} (adapter load {ours['load_s']:.2f} s not included), peak RSS "
             f"{ours['peak_rss_mib']:.0f} MiB. peft {peft.__version__} convert_to_lora (float32 dense SVD of the "
             f"formed ΔW) timed on {pf['modules']} modules ({pf['runs'][0]:.1f} s) x {n_modules / pf['modules']:g} "
             f"(each module is the same SVD), peak RSS {pf['peak_rss_mib']:.0f} MiB (a bare q/v tree, base weights "
             f"never touched). dense float64 SVD route: {dense_total / n_modules:.1f} s per module on "
             f"{dense['modules']} x {n_modules} = {dense_total:.0f} s extrapolated (ours {dense_total / ours_med:.0f}x "
             f"faster), peak RSS {dense['peak_rss_mib']:.0f} MiB. max rel. diff of ΔW_{RANK_OUT} ours vs peft "
             f"{err_peft:.1e} (peft's float32), vs dense {err_dense:.1e}; children start at ~"
             f"{ours['start_rss_mib']:.0f} MiB (interpreter + torch)")
    return result_from_runs(f"resize_7b[qv r{RANK_IN}->{RANK_OUT}, {n_layers} layers]", ours["runs"], [peft_total],
                            peer_name=f"peft {peft.__version__} convert_to_lora (extrapolated from {pf['modules']} "
                            "modules, same run)", notes=notes, extra=extra)


# ---------------------------------------------------------------------------------------------- extraction
def write_finetuned(base: Path) -> Path:
    """``<base>-ft-r32``: every tensor ``W0 + P + N`` in bf16, the same shards and index as ``base``; ``P`` a rank-32
    perturbation ``Σ_i σ_i u_i v_iᵀ`` (``σ_i = 0.5 · 0.8^(i-1)``: W's bulk edge is ~2.6, so a visible but not
    dominant change with a clear gap at every K), ``N`` Gaussian noise of entry scale :data:`NOISE` (full rank,
    spectral norm ≈ 2·NOISE·√d ≈ 0.026: below σ_8 ≈ 0.10, above σ_14, so the top 8 are the perturbation's).
    Reused when it exists."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = base.parent / f"{base.name}-ft-r{FT_RANK}"
    if (out / "model.safetensors.index.json").is_file():
        return out
    tmp = base.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sigma = 0.5 * 0.8 ** torch.arange(FT_RANK, dtype=torch.float32)
    for shard in sorted(base.glob("model-*.safetensors")):
        tensors = {}
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                W = f.get_tensor(name).to(torch.float32)
                g = torch.Generator().manual_seed(sum(map(ord, name)) * 7 + 1)  # per tensor, stable across runs
                d_out, d_in = W.shape
                U = torch.linalg.qr(torch.randn(d_out, FT_RANK, generator=g))[0]
                V = torch.linalg.qr(torch.randn(d_in, FT_RANK, generator=g))[0]
                W.addmm_(U * sigma, V.T).add_(torch.randn(d_out, d_in, generator=g), alpha=NOISE)
                tensors[name] = W.to(torch.bfloat16).contiguous()
        save_file(tensors, str(tmp / shard.name))
    for f in ("model.safetensors.index.json", "config.json"):
        shutil.copy(base / f, tmp / f)
    tmp.rename(out)
    return out


def _extract_ours(base: str, finetuned: str, sample: list[str]) -> dict:
    from lora.extract import extract, model_pair

    t0 = time.perf_counter()
    x = extract(model_pair(base, Path(finetuned)), rank=RANK_OUT, energy=None)
    t = time.perf_counter() - t0
    # the model's module paths (AutoModel: ``layers.L...``, without the checkpoint's ``model.`` prefix)
    paths = {k: next(m for m in x.config["target_modules"] if k == m or k.endswith("." + m)) for k in sample}
    p = "base_model.model."
    dws = {k: _delta(x.tensors[f"{p}{m}.lora_A.weight"], x.tensors[f"{p}{m}.lora_B.weight"]) for k, m in paths.items()}
    methods = sorted({k.method for k in x.kept})
    return {"runs": [t], "modules": len(x.kept), "dw": dws, "methods": ",".join(methods)}


def _extract_dense(base: str, finetuned: str, sample: list[str]) -> dict:
    from lora.extract import Checkpoint

    b, f = Checkpoint(base, "--base"), Checkpoint(finetuned, "--finetuned")
    runs, dws = [], {}
    for k in sample:
        t0 = time.perf_counter()
        dW = f.get(k + ".weight").to(torch.float64) - b.get(k + ".weight").to(torch.float64)
        dws[k] = _dense_truncate(dW, RANK_OUT)
        runs.append(time.perf_counter() - t0)
    return {"runs": runs, "modules": len(sample), "dw": dws}


def extract_case(*, dense_modules: int = 1) -> CaseResult:
    """Extract rank 8 from the bulk q/v checkpoint and its fine-tuned copy (every module, 32 layers); the dense
    route on ``dense_modules`` modules, extrapolated."""
    root = cache_root()
    base = write_checkpoint(root, spectrum="bulk", projs=PROJS)
    t0 = time.perf_counter()
    ft = write_finetuned(base)
    t_setup = time.perf_counter() - t0
    sample = [module_key(N_LAYERS - 1 - i, PROJS[i % 2]) for i in range(dense_modules)]
    ours = _in_child(_extract_ours, str(base), str(ft), sample)
    dense = _in_child(_extract_dense, str(base), str(ft), sample)
    n = ours["modules"]
    per = sum(dense["runs"]) / len(dense["runs"])
    err = _max_rel(ours["dw"], dense["dw"])
    extra = {"modules": n, "dense_modules_timed": dense["modules"], "dense_per_module_s": per,
             "ours_per_module_s": ours["runs"][0] / n, "ours_peak_rss_mib": ours["peak_rss_mib"],
             "ours_start_rss_mib": ours["start_rss_mib"], "dense_peak_rss_mib": dense["peak_rss_mib"],
             "max_rel_diff_vs_dense": err, "finetuned_setup_s": t_setup, "method": ours["methods"]}
    notes = (f"{n} q/v modules 4096x4096 from two bf16 sharded checkpoints (2 GB each), rank {RANK_OUT}; ΔW = rank-"
             f"{FT_RANK} perturbation + full-rank noise (entries {NOISE:g}) + bf16 rounding. ours: lora.extract "
             f"(model_pair + extract, streaming, top-K by {ours['methods']}, base fingerprint included) "
             f"{ours['runs'][0]:.0f} s = {ours['runs'][0] / n:.2f} s per module, peak RSS "
             f"{ours['peak_rss_mib']:.0f} MiB (child starts at {ours['start_rss_mib']:.0f}). dense float64 SVD of "
             f"ΔW: {per:.1f} s per module on {dense['modules']} x {n} = {per * n:.0f} s extrapolated, peak RSS "
             f"{dense['peak_rss_mib']:.0f} MiB. max rel. diff of ΔW_{RANK_OUT} ours vs dense {err:.1e} "
             f"(ours written in float32)")
    return result_from_runs(f"extract_7b[qv rank {RANK_OUT}, {N_LAYERS} layers]", ours["runs"], [per * n],
                            peer_name=f"dense float64 torch.linalg.svd of ΔW (torch {torch.__version__}; extrapolated "
                            f"from {dense['modules']} modules, same run)", notes=notes, extra=extra)


def lowrank_cases(*, quick: bool = False) -> list[CaseResult]:
    """Both cases; ``quick``: resize on 2 layers only (extraction needs the whole checkpoint)."""
    if quick:
        return [resize_case(n_layers=2, reps=1)]
    return [resize_case(), extract_case()]


if __name__ == "__main__":  # python -m benchmarks.cases_lowrank [resize|extract]: the JSON of each case
    import sys

    for case in {"resize": [resize_case], "extract": [extract_case]}.get(sys.argv[1:2][0] if sys.argv[1:] else "",
                                                                       [resize_case, extract_case]):
        c = case()
        print(json.dumps({"name": c.name, **c.to_json()}, indent=1, default=str), flush=True)

"""Linear-algebra cases: factored SVD of ΔW against a dense SVD, and a 7B-shaped Section 7 analysis.

* ``svd_factored_vs_dense[...]``: singular triplets of ``ΔW = s·B·A`` from the factors
  (:func:`lora_analysis.metrics.linalg.factored_svd`, QR of ``B`` and ``Aᵀ`` and an ``r × r`` SVD) against
  ``torch.linalg.svd`` of the formed ``ΔW``, both float64. The error column is the largest difference of the
  top-r singular values relative to σ_1 and ``1 − min |cos|`` between matching singular vectors.
  Goal: speed-up >= 300x at 4096², r = 64.
* ``section7_7b_shaped``: the whole Section 7 analysis of a 7B-shaped adapter set (see :func:`section7_case`).
"""

from __future__ import annotations

import json
import math
import resource
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import CaseResult, result_from_runs
from lora.adapter_io import TOOLKIT_FILE
from lora_analysis.metrics.linalg import SVD


def _factors(d_out: int, d_in: int, r: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, d_in, generator=g, dtype=torch.float64) / math.sqrt(d_in)
    B = torch.randn(d_out, r, generator=g, dtype=torch.float64) * 0.01
    return A, B


def svd_case(d_out: int, d_in: int, r: int, *, reps: int, dense_reps: int = 1) -> CaseResult:
    """Factored SVD against a dense SVD of the formed ΔW (float64). The dense side runs ``dense_reps`` times
    (seconds to minutes each); the factored side ``reps`` times, interleaved with the dense runs."""
    from lora.layers import delta_weight
    from lora_analysis.metrics.linalg import factored_svd

    A, B = _factors(d_out, d_in, r, seed=d_out + d_in + r)
    s = 2.0
    factored_svd(A, B, scaling=s)  # warm-up (LAPACK workspace, thread pool)
    ours, peer = [], []
    dense = None
    per_dense = max(1, reps // dense_reps)
    for _ in range(dense_reps):
        for _ in range(per_dense):
            t0 = time.perf_counter()
            fac = factored_svd(A, B, scaling=s)
            ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dW = delta_weight(A, B, s)  # forming ΔW is part of the dense route
        dense = torch.linalg.svd(dW, full_matrices=False)
        peer.append(time.perf_counter() - t0)
        del dW
    U, S, Vh = dense
    sv_err = float((fac.S - S[:r]).abs().max() / S[0])
    cos_u = (fac.U * U[:, :r]).sum(0).abs().min()
    cos_v = (fac.V * Vh[:r].T).sum(0).abs().min()
    vec_err = float(1 - min(cos_u, cos_v))
    return result_from_runs(
        f"svd_factored_vs_dense[{d_out}x{d_in},r={r}]", ours, peer,
        peer_name=f"dense torch.linalg.svd of the formed ΔW, float64 (torch {torch.__version__})",
        goal_min_speedup=300.0 if (d_out, d_in, r) == (4096, 4096, 64) else None,
        notes=f"float64; error: max |Δσ|/σ1 = {sv_err:.1e}, 1 - min|cos| of singular vectors = {vec_err:.1e}; "
              f"dense runs: {len(peer)}",
        extra={"sv_rel_err": sv_err, "vec_err": vec_err},
    )


# ---------------------------------------------------------------------------------------------- Section 7 at 7B

def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return _peak_rss_mib()


def base_weight(layer: int, kind: str, d: int, *, seed: int = 0) -> torch.Tensor:
    """A seeded 7B-shaped stand-in for a pretrained ``W (d, d)``, drawn in float32 and upcast to float64: a Gaussian bulk (σ = 0.02, the usual
    init scale) plus 32 spikes with decaying strengths up to 6x the bulk edge. Pretrained weights have a few
    large singular values above a random-looking bulk; the spikes give W top directions that exist, like those
    Table 7 projects on. ``u_i, v_i`` are Gaussian (nearly orthonormal at d = 4096)."""
    g = torch.Generator().manual_seed(seed * 1000 + 2 * layer + (kind == "v"))
    sigma = 0.02
    W = torch.randn(d, d, generator=g) * sigma  # float32, as checkpoints store it; upcast like a loaded W
    n_spike = 32
    strength = 2 * sigma * math.sqrt(d) * (1 + 5 * (torch.arange(n_spike, dtype=torch.float32) + 1) ** -0.7)
    U = torch.randn(d, n_spike, generator=g) / math.sqrt(d)
    V = torch.randn(d, n_spike, generator=g) / math.sqrt(d)
    W.addmm_(U * strength, V.T)
    return W.to(torch.float64)


def _write_adapters(root: Path, *, n_layers: int, d: int, ranks, seeds) -> list[Path]:
    """PEFT-layout adapter directories for a LLaMA-7B-shaped model (``model.layers.L.self_attn.{q,v}_proj``).
    The factors look trained: ``A`` Gaussian and ``B`` non-zero with a few shared directions across seeds and
    ranks (so φ has structure to find), seeded."""
    from safetensors.torch import save_file

    dirs = []
    for r in ranks:
        for s in seeds:
            tensors = {}
            for layer in range(n_layers):
                for proj in ("q_proj", "v_proj"):
                    key = f"model.layers.{layer}.self_attn.{proj}"
                    shared = torch.Generator().manual_seed(10_000 + 2 * layer + (proj == "v_proj"))
                    common = torch.randn(4, d, generator=shared)  # directions every adapter of this module learns
                    g = torch.Generator().manual_seed(s * 100_000 + r * 1_000 + 2 * layer + (proj == "v_proj"))
                    A = torch.randn(r, d, generator=g) / math.sqrt(d)
                    A[: min(4, r)] += common[: min(4, r)] / math.sqrt(d)
                    B = torch.randn(d, r, generator=g) * 1e-3
                    tensors[f"base_model.model.{key}.lora_A.weight"] = A.contiguous()
                    tensors[f"base_model.model.{key}.lora_B.weight"] = B.contiguous()
            out = root / f"qv-r{r}-s{s}"
            out.mkdir(parents=True)
            save_file(tensors, str(out / "adapter_model.safetensors"))
            cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"],
                   "fan_in_fan_out": False, "use_rslora": False, "lora_dropout": 0.0, "bias": "none",
                   "base_model_name_or_path": "synthetic/llama-7b-shaped", "task_type": "CAUSAL_LM"}
            (out / "adapter_config.json").write_text(json.dumps(cfg), encoding="utf-8")
            ours = {"seed": s, "lora_toolkit": {"weight_set": "q,v"}}  # our keys: the sidecar, as save_adapter writes
            (out / TOOLKIT_FILE).write_text(json.dumps(ours), encoding="utf-8")
            dirs.append(out)
    return dirs


def _write_base(path: Path, *, n_layers: int, d: int) -> None:
    """The seeded W_q, W_v of every layer (:func:`base_weight`) as one bf16 safetensors checkpoint, named as in
    LLaMA's (``model.layers.L.self_attn.{q,v}_proj.weight``) and stored in bf16 as LLaMA-7B's are."""
    from safetensors.torch import save_file

    tensors = {f"model.layers.{layer}.self_attn.{kind}_proj.weight": base_weight(layer, kind, d).to(torch.bfloat16)
               for layer in range(n_layers) for kind in ("q", "v")}
    save_file(tensors, str(path))


def section7_case(
    *, n_layers: int = 32, d: int = 4096, ranks=(8, 64), seeds=(0, 1), check_exact: bool = True, budget_s: float = 30.0,
    workers: int | None = None,
) -> CaseResult:
    """Full Section 7 analysis of a 7B-shaped adapter set, timed end to end (wall time and peak RSS).

    Untimed setup: four PEFT-layout adapters (``ranks`` × ``seeds``, q and v of ``n_layers`` layers, d × d) and a
    bf16 safetensors checkpoint of the seeded W_q, W_v (:func:`base_weight`) in a temporary directory. The timed
    part is what a user runs: load the adapters (:func:`lora_analysis.load.adapters.load_adapter_dir`); Table 7 of
    all four (:func:`lora_analysis.tables.build.table7_tables` on a
    :class:`~lora_analysis.load.base.CheckpointWeights` base, which reads each W from the checkpoint when its turn
    comes; every rank and seed that adapts one W in one :func:`~lora_analysis.metrics.projection.table7_rows`
    call: one float64 GEMM ``W @ [V_1 … V_4, V_rand]`` and W's top-64 singular *values* by block Krylov; the
    analytic random null, the sampled null off: 32 pairs at k = 64 would be 2,048 more columns per W; ``workers``
    W matrices at once, default the cores available); then the φ grids r8 vs r64 (each seed) and seed 0 vs
    seed 1 at r64 per layer (:func:`lora_analysis.tables.build.phi_table`, A and B sides and the random
    expectation).

    The peer is the goal itself (``budget_s``): ``ratio = wall / budget``. With ``check_exact``, layer 0's W_q
    also goes the dense route (untimed): a full float64 ``torch.linalg.svd`` of W and one
    :func:`~lora_analysis.metrics.projection.table7_row` per adapter with it; ``accuracy`` holds the largest
    relative error of each Table 7 column against it (``table7_w_rel_err``: W's column) and of W's top-64
    singular values.
    """
    from lora.threads import analysis_workers
    from lora_analysis.load.adapters import load_adapter_dir
    from lora_analysis.load.base import CheckpointWeights
    from lora_analysis.metrics.linalg import top_singular_values
    from lora_analysis.metrics.projection import table7_row
    from lora_analysis.tables.build import module_seed, phi_table, table7_tables

    k = max(ranks)
    n_workers = analysis_workers(workers)
    with tempfile.TemporaryDirectory(prefix="bench-s7-") as tmp:
        t1 = time.perf_counter()
        dirs = _write_adapters(Path(tmp), n_layers=n_layers, d=d, ranks=ranks, seeds=seeds)
        ckpt = Path(tmp) / "model.safetensors"
        _write_base(ckpt, n_layers=n_layers, d=d)
        t_setup = time.perf_counter() - t1
        rss0 = _rss_mib()
        exact_hwm = _reset_peak()
        t0, c0 = time.perf_counter(), time.process_time()
        adapters = {}
        for p in dirs:
            a = load_adapter_dir(p)
            adapters[(a.rank, a.seed)] = a
        base = CheckpointWeights(tmp)
        t_load = time.perf_counter() - t0
        t1 = time.perf_counter()
        table = table7_tables(list(adapters.values()), base, null_draws=0, workers=n_workers)
        t_t7 = time.perf_counter() - t1
        t1 = time.perf_counter()
        r_small, r_large = min(ranks), max(ranks)
        pairs = [(adapters[(r_small, s)], adapters[(r_large, s)], "rank") for s in seeds]
        pairs.append((adapters[(r_large, seeds[0])], adapters[(r_large, seeds[1])], "seed"))
        for a1, a2, comparison in pairs:  # every module of the pair: a layer comparison per layer
            phi_table(a1, a2, comparison=comparison, quantities=("A", "B", "expected_random"), workers=n_workers)
        phis = len(pairs) * n_layers
        t_phi = time.perf_counter() - t1
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0  # CPU seconds of all threads: with the wall time, how loaded the machine was
        peak = _hwm_mib() if exact_hwm else _peak_rss_mib()
        rows = len(table)
        extra = {"cpu_s": cpu, "peak_rss_mib": peak, "rss_before_mib": rss0, "load_s": t_load, "table7_s": t_t7,
                 "phi_s": t_phi, "setup_s": t_setup, "table7_rows": rows, "phi_layer_comparisons": phis,
                 "torch_threads": torch.get_num_threads(), "workers": n_workers}
        notes = (f"{n_layers} layers x {{q,v}}, d={d}, r in {list(ranks)}, seeds {list(seeds)}: {rows} Table 7 rows "
                 f"({t_t7:.1f} s, {n_workers} W at once x {torch.get_num_threads()} torch thread(s): per W read "
                 f"from the bf16 checkpoint, one float64 GEMM for every rank and seed, and W's top-{k} singular "
                 f"values by block Krylov; sampled null off), {phis} layer comparisons ({t_phi:.1f} s: phi on A "
                 f"and B + random expectation); loading the {len(dirs)} adapters: {t_load:.1f} s; peak RSS "
                 f"{peak:.0f} MiB (process, incl. {rss0:.0f} MiB before); process CPU time {cpu:.0f} s; untimed "
                 f"setup (writing the adapters and the {2 * n_layers}-matrix checkpoint): {t_setup:.0f} s")
        if check_exact:
            key = "model.layers.0.self_attn.q_proj"
            W = base[key].to(torch.float64)
            t1 = time.perf_counter()
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            t_exact = time.perf_counter() - t1
            dense = SVD(U, S, Vh.T)
            fast_sv = top_singular_values(W, k, rtol=1e-7)
            cols = ("delta", "weight", "random", "w_norm", "dw_norm", "amplification", "random_expected",
                    "delta_over_random", "amplification_random")
            errs = dict.fromkeys(cols, 0.0)
            for a in adapters.values():
                f = a.factors[key]
                fast = table[(table["module"] == key) & (table["rank"] == a.rank) & (table["seed"] == a.seed)]
                ref = table7_row(W, f.A, f.B, scaling=f.scaling, top=f.rank, w_svd=dense,
                                 random_seed=module_seed(key, 0))
                for c in cols:
                    errs[c] = max(errs[c], abs(float(fast[c].iloc[0]) - getattr(ref, c)) / abs(getattr(ref, c)))
            accuracy = {"layer": key, "table7_w_rel_err": errs["weight"], "table7_max_rel_err": max(errs.values()),
                        "table7_rel_err_by_column": errs,
                        "w_top_sv_max_rel_err": float(((fast_sv - S[:k]).abs() / S[:k]).max()),
                        "dense_svd_one_W_s": t_exact}
            extra["accuracy"] = accuracy
            notes += (f"; accuracy vs the dense route on layer 0 W_q (full float64 SVD of W, one table7_row per "
                      f"adapter): max rel. error of every Table 7 column {accuracy['table7_max_rel_err']:.1e}, W "
                      f"column {errs['weight']:.1e}, W's top-{k} sigma {accuracy['w_top_sv_max_rel_err']:.1e}; one "
                      f"dense SVD took {t_exact:.1f} s (x{2 * n_layers} = {t_exact * 2 * n_layers:.0f} s for all W, "
                      "extrapolated)")
    full = (n_layers, d) == (32, 4096)
    # a reduced run (--quick) is named as such and claims no goal: the goal is for the full 7B shape
    name = "section7_7b_shaped" if full else f"section7_7b_shaped[reduced: {n_layers} layers, d={d}]"
    return result_from_runs(
        name, [wall], [budget_s], peer_name=f"goal budget {budget_s:g} s (no other tool computes this)",
        goal_max=1.0 if full else None, notes=notes, extra=extra,
    )

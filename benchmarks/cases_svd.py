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


def top_svd_subspace(
    W: torch.Tensor, k: int, *, oversample: int = 32, iters: int = 3, seed: int = 0,
    power_dtype: torch.dtype = torch.float32,
):
    """W's top-``k`` SVD by block subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4).

    ``Q ← orth(W Ω)``, then ``iters`` times ``Q ← orth(W orth(Wᵀ Q))`` with ``k + oversample`` columns, in
    ``power_dtype`` (float32 halves the cost: it only has to find the subspace); then a float64 Rayleigh–Ritz
    step: re-orthonormalise ``Q`` in float64 and take the exact SVD of the small ``Qᵀ W`` (``(k + p) × n``), so
    the singular values and vectors are float64 within that subspace. Cost ``O(mn(k + p)(2·iters + 2))``
    instead of ``O(mn·min(m, n))``. The error decays like ``(σ_{k+p+1}/σ_j)^(2·iters+1)``: accurate for W's
    dominant directions, loose where singular values cluster (a random bulk edge), measured by
    :func:`section7_case` against a dense SVD.
    """
    from lora_analysis.metrics.linalg import SVD

    g = torch.Generator().manual_seed(seed)
    m, n = W.shape
    b = min(k + oversample, m, n)
    Wp = W.to(power_dtype)
    Q, _ = torch.linalg.qr(Wp @ torch.randn(n, b, generator=g, dtype=power_dtype))
    for _ in range(iters):
        Z, _ = torch.linalg.qr(Wp.T @ Q)
        Q, _ = torch.linalg.qr(Wp @ Z)
    del Wp
    Q, _ = torch.linalg.qr(Q.to(torch.float64))
    Ub, S, Vh = torch.linalg.svd(Q.T @ W.to(torch.float64), full_matrices=False)
    return SVD((Q @ Ub[:, :k]).contiguous(), S[:k].contiguous(), Vh[:k].T.contiguous())


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


def section7_case(
    *, n_layers: int = 32, d: int = 4096, ranks=(8, 64), seeds=(0, 1), check_exact: bool = True, budget_s: float = 60.0
) -> CaseResult:
    """Full Section 7 analysis of a 7B-shaped adapter set, timed end to end (wall time and peak RSS).

    Four PEFT-layout adapters (``ranks`` × ``seeds``, q and v of ``n_layers`` layers, d × d) are written to a
    temporary directory; the timed part loads them through the analysis loader
    (:func:`lora_analysis.load.adapters.load_adapter_dir`), then layer by layer: W_q, W_v (seeded, generated in memory:
    a 7B base does not fit beside the rest on this machine), W's top-64 SVD once per matrix, shared by every rank
    and seed (:func:`top_svd_subspace`), Table 7 rows (:func:`lora_analysis.metrics.projection.table7_row` with that SVD)
    for all four adapters, and the φ grids r8 vs r64 (each seed) and seed 0 vs seed 1 at r64
    (:func:`lora_analysis.tables.build.phi_table`, A and B sides and the random expectation).

    The peer is the goal itself (``budget_s``): ``ratio = wall / budget``. With ``check_exact``, layer 0's W_q is
    also decomposed by a dense ``torch.linalg.svd`` (untimed) to measure the subspace iteration's error.
    """
    from lora_analysis.load.adapters import load_adapter_dir
    from lora_analysis.metrics.projection import table7_row
    from lora_analysis.tables.build import phi_table

    k = max(ranks)
    with tempfile.TemporaryDirectory(prefix="bench-s7-") as tmp:
        dirs = _write_adapters(Path(tmp), n_layers=n_layers, d=d, ranks=ranks, seeds=seeds)
        rss0 = _rss_mib()
        exact_hwm = _reset_peak()
        t0 = time.perf_counter()
        adapters = {}
        for p in dirs:
            a = load_adapter_dir(p)
            adapters[(a.rank, a.seed)] = a
        t_load = time.perf_counter() - t0
        r_small, r_large = min(ranks), max(ranks)
        rows, phis = 0, 0
        t_wsvd = t_gen = 0.0
        for layer in range(n_layers):
            keys = [f"model.layers.{layer}.self_attn.q_proj", f"model.layers.{layer}.self_attn.v_proj"]
            for key in keys:
                t1 = time.perf_counter()
                W = base_weight(layer, "q" if "q_proj" in key else "v", d)  # stands in for loading W
                t_gen += time.perf_counter() - t1
                t1 = time.perf_counter()
                wsvd = top_svd_subspace(W, k)  # once per W, shared by every rank and seed
                t_wsvd += time.perf_counter() - t1
                for a in adapters.values():
                    f = a.factors[key]
                    table7_row(W, f.A, f.B, scaling=f.scaling, top=f.rank, w_svd=wsvd)
                    rows += 1
                del W
            for s in seeds:
                phi_table(adapters[(r_small, s)], adapters[(r_large, s)], comparison="rank", keys=keys,
                          quantities=("A", "B", "expected_random"))
                phis += 1
            phi_table(adapters[(r_large, seeds[0])], adapters[(r_large, seeds[1])], comparison="seed", keys=keys,
                      quantities=("A", "B", "expected_random"))
            phis += 1
        wall = time.perf_counter() - t0
        peak = _hwm_mib() if exact_hwm else _peak_rss_mib()
    extra = {"peak_rss_mib": peak, "rss_before_mib": rss0, "load_s": t_load, "w_top_svd_s": t_wsvd, "w_generate_s": t_gen,
             "table7_rows": rows, "phi_layer_comparisons": phis}
    notes = (f"{n_layers} layers x {{q,v}}, d={d}, r in {list(ranks)}, seeds {list(seeds)}: {rows} Table 7 rows, "
             f"{phis} layer comparisons (phi on A and B + random expectation); W's top-{k} by subspace iteration "
             f"({t_wsvd:.1f} s of the total; generating the seeded W in memory, standing in for loading it: "
             f"{t_gen:.1f} s; loading the 4 adapters: {t_load:.1f} s); peak RSS {peak:.0f} MiB (process, incl. {rss0:.0f} MiB before)")
    if check_exact:
        W = base_weight(0, "q", d)
        t1 = time.perf_counter()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        t_exact = time.perf_counter() - t1
        approx = top_svd_subspace(W, k)
        sv_err = float(((approx.S - S[:k]).abs() / S[:k]).max())
        h = k // 2
        sv_err_h = float(((approx.S[:h] - S[:h]).abs() / S[:h]).max())
        # φ between the exact and approximate top-k right subspaces (1 = identical), and Table 7's W column
        phi = float((Vh[:k] @ approx.V).pow(2).sum() / k)
        phi_h = float((Vh[:h] @ approx.V[:, :h]).pow(2).sum() / h)
        w_exact = float(S[:k].pow(2).sum().sqrt())
        w_approx = float(approx.S.pow(2).sum().sqrt())
        extra.update({"exact_svd_one_W_s": t_exact, "exact_svd_all_W_s_extrapolated": t_exact * 2 * n_layers,
                      "w_top_sv_max_rel_err": sv_err, "w_top_subspace_phi": phi,
                      "w_tophalf_sv_max_rel_err": sv_err_h, "w_tophalf_subspace_phi": phi_h,
                      "table7_weight_rel_err": abs(w_approx - w_exact) / w_exact})
        notes += (f"; accuracy vs dense SVD of layer 0 W_q: max rel. error of top-{k} sigma {sv_err:.1e}, "
                  f"phi(exact, approx top-{k}) = {phi:.4f} (the bulk-edge directions {h + 1}..{k} have clustered "
                  f"singular values and are not resolved; top-{h}: sigma error {sv_err_h:.1e}, phi {phi_h:.6f}), "
                  f"Table 7 'W' column rel. error "
                  f"{abs(w_approx - w_exact) / w_exact:.1e}; one dense SVD took {t_exact:.1f} s "
                  f"(x{2 * n_layers} = {t_exact * 2 * n_layers:.0f} s for all W, extrapolated)")
    full = (n_layers, d) == (32, 4096)
    # a reduced run (--quick) is named as such and claims no goal: the goal is for the full 7B shape
    name = "section7_7b_shaped" if full else f"section7_7b_shaped[reduced: {n_layers} layers, d={d}]"
    return result_from_runs(
        name, [wall], [budget_s], peer_name=f"goal budget {budget_s:g} s (no other tool computes this)",
        goal_max=1.0 if full else None, notes=notes, extra=extra,
    )

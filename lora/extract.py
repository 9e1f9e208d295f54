"""Extract a LoRA adapter from a fine-tuned model: per Linear / Conv1D module, the best rank-K approximation of
``ΔW = W_ft − W0``, written as a PEFT adapter.

    python -m lora.extract --base minilm --finetuned RUN/qv_full_s0 --rank 8 --out x8/ --eval
    python -m lora.extract --base ./llama-7b --finetuned ./llama-7b-ft --energy 0.5 --out x/ --others save

``--finetuned`` is a transformers model directory (safetensors, one file or shards with
``model.safetensors.index.json``) of the same architecture as ``--base``, or a full fine-tuning directory of this
toolkit (``delta_weights.safetensors``, ``head.safetensors``, ``full_finetune.json``: :mod:`lora.full_ft`), whose
task head comes along as ``modules_to_save`` and whose recorded base must be ``--base`` (its fingerprint is checked).

Two model directories are read one tensor at a time from their safetensors files (memory-mapped), so at most one
``W0``, one ``W_ft`` and one float64 ``ΔW`` are in memory at once; which tensors belong to Linear / Conv1D modules
comes from the fine-tuned model's class built on the meta device (no weights). Per module the top-K SVD is a dense
float64 SVD when the smaller side is at most 1024, else block Krylov iteration with a float64 Rayleigh–Ritz
(:func:`lora.lowrank.top_svd`). The factors are balanced, with scale 1 (``lora_alpha`` = rank), written in
float32; a Conv1D's ΔW is taken in the Linear layout ``(d_out, d_in)``, as peft stores its A and B.

Modules whose weight did not change (bitwise) are skipped and listed. Other tensors that changed (embeddings,
norms, biases, a new task head) are named; ``--others`` says what to do with them: ``refuse`` (default: one line
naming them), ``save`` (their modules go into ``modules_to_save``, stored in full; a changed bias of a module that
gets LoRA cannot be carried and is refused), or ``drop`` (left out, listed). ``<out>/extract.json`` holds what each
module keeps and the skipped and changed tensors; ``--eval`` adds the validation metrics of the fine-tuned model
and of the extracted adapter. Bad input (mismatched models, a module missing from one side, ``--rank`` above a
matrix's smaller side, ``--energy`` outside (0, 1], an existing ``--out``, a full disk) is one line and exit 2
with nothing written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lora.adapter_io import FORMAT_VERSION, PREFIX, TOOLKIT_KEY, quiet_transformers, resolve_base_name
from lora.errors import ArgumentParser, UserError, run_cli
from lora.fsio import check_output_path
from lora.full_ft import DELTA_NAME, DESCRIPTION_NAME, HEAD_NAME
from lora.lowrank import (
    DENSE_MAX,
    Kept,
    check_rank_option,
    dense_truncation,
    evaluate_adapter,
    evaluate_model,
    format_table,
    rank_fields,
    totals,
    write_outputs,
)

__all__ = ["REPORT_NAME", "Checkpoint", "Extraction", "extract", "streamed_fingerprint"]

REPORT_NAME = "extract.json"
OTHERS = ("refuse", "save", "drop")


# ------------------------------------------------------------------------------------------------ lazy checkpoints
class Checkpoint:
    """The tensors of a safetensors checkpoint, read one at a time: ``model.safetensors``, the shards of
    ``model.safetensors.index.json``, or one ``.safetensors`` file. ``specs[name] = (dtype, shape)`` from the
    headers; :meth:`get` memory-maps one tensor."""

    def __init__(self, path: str | Path, option: str) -> None:
        from safetensors import safe_open

        root = Path(path)
        if root.is_dir() and (root / "model.safetensors.index.json").is_file():
            index = root / "model.safetensors.index.json"
            try:
                files = {n: root / f for n, f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise UserError(f"{option} {index}: not a safetensors index ({exc})") from None
        elif root.is_dir() and (root / "model.safetensors").is_file():
            files = None
            single = root / "model.safetensors"
        elif root.is_file() and root.suffix == ".safetensors":
            files, single = None, root
        elif root.is_dir() and any(root.glob("*.bin")):
            raise UserError(f"{option} {root}: pickled weights (*.bin) are refused; convert it to safetensors")
        else:
            raise UserError(f"{option} {root}: no model.safetensors, shard index or .safetensors file")
        self.files: dict[str, Path] = {}
        self.specs: dict[str, tuple[str, tuple[int, ...]]] = {}
        for file in sorted(set(files.values())) if files is not None else [single]:
            try:
                with safe_open(str(file), "pt") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        self.files[name] = file
                        self.specs[name] = (sl.get_dtype(), tuple(sl.get_shape()))
            except Exception as exc:  # a missing, truncated or corrupt shard
                raise UserError(f"{option} {file}: not a readable safetensors file ({' '.join(str(exc).split())})") \
                    from None
        if files is not None:
            lost = sorted(n for n in files if n not in self.files)
            if lost:
                raise UserError(f"{option} {files[lost[0]]}: holds no tensor {lost[0]}, which the index places there")
        self.path, self.option = root, option

    def get(self, name: str) -> Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[name]), "pt") as f:
            t = f.get_tensor(name)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"{self.option} {self.files[name]}: tensor {name} contains NaN or Inf")
        return t


def _model_class(model_dir: Path, option: str):
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise UserError(f"{option} {model_dir}: no readable config.json ({' '.join(str(exc).split())[:200]})") from None
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    return config, cls


def meta_model(model_dir: Path, option: str) -> nn.Module:
    """The model class of ``model_dir`` (``config.architectures``, else ``AutoModel``) built on the meta device:
    its module types and parameter names, no weights."""
    import transformers

    config, cls = _model_class(model_dir, option)
    with warnings.catch_warnings(), quiet_transformers(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return cls(config) if cls is not None else transformers.AutoModel.from_config(config)


def _names_in_model(ckpt: Checkpoint, params: set[str], prefix: str) -> dict[str, str]:
    """``{model parameter name: checkpoint tensor name}``, allowing for a task model's ``base_model_prefix``."""
    out = {}
    for name in ckpt.specs:
        for cand in (name, f"{prefix}.{name}", name[len(prefix) + 1:] if name.startswith(prefix + ".") else None):
            if cand in params:
                out[cand] = name
                break
    return out


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def streamed_fingerprint(ckpt: Checkpoint, names: Mapping[str, str], model: nn.Module, paths: Sequence[str]) -> str:
    """:func:`lora.adapter_io.base_fingerprint` ``(model, module_paths=paths)`` of the checkpoint's weights, read one
    tensor at a time: sha256 over ``"<path>.<param>:<shape>\\n"`` and the float32 bytes, modules and their
    parameters in name order (the same bytes as the in-memory function, which the tests check)."""
    h = hashlib.sha256()
    for path in sorted(paths):
        for pname, _ in sorted(model.get_submodule(path).named_parameters(recurse=False), key=lambda kv: kv[0]):
            full = f"{path}.{pname}"
            t = ckpt.get(names[full]).to(torch.float32).contiguous()
            h.update(f"{full}:{tuple(t.shape)}\n".encode())
            h.update(t.numpy().tobytes())
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------------------------------------------- the sources
@dataclass
class Source:
    """What the fine-tuned side offers: per LoRA module path a ``delta()`` (float64, Linear layout), the tensors
    that changed elsewhere, and what an adapter records about its base."""

    deltas: dict[str, Callable[[], Tensor | None]]  # path -> ΔW (d_out, d_in) float64, or None if unchanged
    conv1d: set[str]
    others: dict[str, str]  # changed parameters LoRA cannot carry (model names) -> their module path
    module_tensors: Callable[[str], dict[str, Tensor]]  # a module's fine-tuned parameters, for --others save
    heads: dict[str, Tensor]  # modules_to_save tensors that always come along (a full fine-tuning's head)
    head_modules: list[str]
    base_name: str
    model_class: str | None
    task_type: str | None
    num_labels: int | None
    fingerprint: Callable[[Sequence[str]], str]  # the base fingerprint of the adapted modules
    task: str | None
    original_model: Callable[[], nn.Module]  # the fine-tuned model, for --eval


def _task_type(arch: str | None) -> str | None:
    if not arch:
        return None
    for suffix, tt in (("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                       ("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                       ("ForQuestionAnswering", "QUESTION_ANS")):
        if arch.endswith(suffix):
            return tt
    return None


def model_pair(base: str, finetuned: Path) -> Source:
    """Two model directories of one architecture: ΔW of every changed Linear / Conv1D weight, read lazily."""
    from lora.adapter_io import load_base_model

    base_path, base_name = resolve_base_name(base)
    b = Checkpoint(base_path, "--base")
    f = Checkpoint(finetuned, "--finetuned")
    model = meta_model(finetuned, "--finetuned")
    prefix = getattr(model, "base_model_prefix", "") or ""
    params = {n for n, _ in model.named_parameters()}
    bn, fn = _names_in_model(b, params, prefix), _names_in_model(f, params, prefix)
    if not set(bn) & set(fn):
        raise UserError(f"--base {base} and --finetuned {finetuned}: no tensor in common (mismatched models)")
    only_b, only_f = sorted(set(bn) - set(fn)), sorted(set(fn) - set(bn))
    if only_b:
        raise UserError(f"--finetuned {finetuned}: lacks {only_b[0]}, which --base {base} has "
                        f"({len(only_b)} missing; mismatched models?)")
    for n in sorted(set(bn) & set(fn)):
        if b.specs[bn[n]][1] != f.specs[fn[n]][1]:
            raise UserError(f"--base {base} and --finetuned {finetuned}: {n} is {b.specs[bn[n]][1]} in one and "
                            f"{f.specs[fn[n]][1]} in the other (mismatched models)")
    deltas: dict[str, Callable[[], Tensor | None]] = {}
    conv1d: set[str] = set()
    others: dict[str, str] = {}
    modules = dict(model.named_modules())
    for n in sorted(fn):
        path, _, pname = n.rpartition(".")
        mod = modules[path]
        lora_weight = pname == "weight" and (isinstance(mod, nn.Linear) or _is_conv1d(mod))
        if n in only_f:  # a new module (a task head) on the fine-tuned side only
            others[n] = path
            continue
        if lora_weight:
            is_conv = _is_conv1d(mod)

            def delta(n=n, conv=is_conv) -> Tensor | None:
                w0, w1 = b.get(bn[n]), f.get(fn[n])
                if torch.equal(w0, w1):
                    return None
                d = w1.to(torch.float64) - w0.to(torch.float64)
                return d.T if conv else d  # Conv1D stores (d_in, d_out)

            deltas[path] = delta
            if _is_conv1d(mod):
                conv1d.add(path)
        elif not torch.equal(b.get(bn[n]), f.get(fn[n])):
            others[n] = path
    arch = type(model).__name__

    def module_tensors(path: str) -> dict[str, Tensor]:
        return {f"{path}.{p}": f.get(fn[f"{path}.{p}"]) for p, _ in modules[path].named_parameters(recurse=False)
                if f"{path}.{p}" in fn}

    def original() -> nn.Module:
        return load_base_model(finetuned, model_class=arch, option="--finetuned")

    labels = getattr(model.config, "num_labels", None) if _task_type(arch) in ("SEQ_CLS", "TOKEN_CLS") else None
    return Source(deltas, conv1d, others, module_tensors, {}, [], base_name, arch, _task_type(arch), labels,
                  lambda paths: streamed_fingerprint(b, bn, model, paths), None, original)


def full_finetune(base: str | None, finetuned: Path) -> Source:
    """A full fine-tuning directory of this toolkit: ΔW stored per module, the head beside it; its base is loaded
    (these are models the trainer loads whole) to check the recorded fingerprint and fingerprint the adapter."""
    from lora.adapter_io import base_fingerprint, load_base_model
    from lora.rundir import read_json_object

    desc = read_json_object(finetuned / DESCRIPTION_NAME)
    recorded = str(desc.get("base_model_name_or_path") or "")
    name = base or recorded
    if not name:
        raise UserError(f"--finetuned {finetuned}: {DESCRIPTION_NAME} records no base model; pass --base")
    path, canonical = resolve_base_name(name)
    deltas_ck = Checkpoint(finetuned / DELTA_NAME, "--finetuned")
    heads_ck = Checkpoint(finetuned / HEAD_NAME, "--finetuned") if (finetuned / HEAD_NAME).is_file() else None
    heads = {n: heads_ck.get(n) for n in heads_ck.specs} if heads_ck else {}
    labels = next((int(t.shape[0]) for n, t in heads.items() if n.endswith("classifier.weight")), None)
    task_type = "SEQ_CLS" if labels else "CAUSAL_LM"
    model = load_base_model(path, task_type=task_type, num_labels=labels, option="--base")
    prefix = getattr(model, "base_model_prefix", "") or ""
    want = desc.get("base_fingerprint")
    if want and base_fingerprint(model, module_paths=[prefix] if prefix else None) != want:
        raise UserError(f"--base {name}: its weights differ from the base {finetuned} was fine-tuned from "
                        f"({recorded}; fingerprint mismatch)")
    modules = dict(model.named_modules())
    deltas: dict[str, Callable[[], Tensor | None]] = {}
    for key, (_, shape) in deltas_ck.specs.items():
        mod = modules.get(key)
        if mod is None:
            raise UserError(f"--finetuned {finetuned}: module {key} of {DELTA_NAME} is missing from --base {name}")
        if not isinstance(mod, nn.Linear) or tuple(mod.weight.shape) != tuple(shape):
            raise UserError(f"--finetuned {finetuned}: ΔW of {key} is {tuple(shape)} but --base {name} has "
                            f"{type(mod).__name__} {tuple(getattr(mod, 'weight', torch.empty(0)).shape)} "
                            "(mismatched models)")

        def delta(key=key) -> Tensor | None:
            d = deltas_ck.get(key)
            return None if not bool(d.any()) else d.to(torch.float64)

        deltas[key] = delta
    params = dict(model.named_parameters())
    for n, t in heads.items():
        if n not in params or tuple(params[n].shape) != tuple(t.shape):
            raise UserError(f"--finetuned {finetuned}: head tensor {n} {tuple(t.shape)} has no place in --base {name}")

    def original() -> nn.Module:
        with torch.no_grad():
            for key in deltas:
                modules[key].weight.add_(deltas_ck.get(key).to(modules[key].weight.dtype))
            for n, t in heads.items():
                params[n].copy_(t)
        return model

    return Source(deltas, set(), {}, dict, heads, list(desc.get("modules_to_save") or []), canonical,
                  type(model).__name__, task_type, labels, lambda paths: base_fingerprint(model, module_paths=paths),
                  desc.get("task"), original)


# ----------------------------------------------------------------------------------------------------- extraction
@dataclass
class Extraction:
    """The extracted adapter before it is written: peft's config, our sidecar, the tensors, what each module
    keeps, the modules skipped as unchanged, and the other changed tensors with what was done with them."""

    config: dict[str, Any]
    sidecar: dict[str, Any]
    tensors: dict[str, Tensor]
    kept: list[Kept]
    unchanged: list[str]
    others: dict[str, str]


def _iter_deltas(src: Source, progress: bool) -> Iterator[tuple[str, Tensor | None]]:
    from tqdm.auto import tqdm

    for path in tqdm(list(src.deltas), desc="extract", unit="module", leave=False, disable=None if progress else True):
        yield path, src.deltas[path]()


def extract(src: Source, *, rank: int | None, energy: float | None, others: str = "refuse",
            dense_max: int = DENSE_MAX, progress: bool = False) -> Extraction:
    """Truncate every changed module's ΔW of ``src`` (one at a time) and assemble the adapter."""
    if others not in OTHERS:
        raise ValueError(f"extract: others must be one of {OTHERS}")
    changed_lora_bias = [n for n, p in src.others.items() if p in src.deltas and n.endswith(".bias")]
    if src.others and others == "refuse":
        names = sorted(src.others)
        raise UserError(f"--finetuned: {len(names)} tensor(s) other than Linear/Conv1D weights changed ({', '.join(names[:4])}"
                        f"{', ...' if len(names) > 4 else ''}); LoRA cannot carry them: pass --others save (keep "
                        "their modules in full as modules_to_save) or --others drop")
    if others == "save" and changed_lora_bias:
        raise UserError(f"--others save: the bias {changed_lora_bias[0]} changed, and its module gets LoRA, which "
                        "carries no bias; pass --others drop to leave bias changes out")
    tensors: dict[str, Tensor] = {}
    kept: list[Kept] = []
    ranks: dict[str, int] = {}
    unchanged: list[str] = []
    for path, dW in _iter_deltas(src, progress):
        if dW is None:
            unchanged.append(path)
            continue
        if rank is not None and rank > min(dW.shape):
            raise UserError(f"--rank {rank}: above {min(dW.shape)}, the smaller side of {path} {tuple(dW.shape)}")
        A, B, k = dense_truncation(dW, rank, energy, module=path, dense_max=dense_max)
        del dW
        tensors[f"{PREFIX}{path}.lora_A.weight"], tensors[f"{PREFIX}{path}.lora_B.weight"] = A, B
        ranks[path] = k.rank
        kept.append(k)
    if not ranks:
        raise UserError("--finetuned: no Linear/Conv1D weight differs from --base: nothing to extract")
    saved_modules = list(src.head_modules)
    for n, t in src.heads.items():
        tensors[f"{PREFIX}{n}"] = t.contiguous()
    fate = {n: "saved" if others == "save" else "dropped" for n in src.others}
    if others == "save":  # whole modules, every parameter, as peft's modules_to_save stores them
        for mod in dict.fromkeys(src.others.values()):
            saved_modules.append(mod)
            tensors.update({f"{PREFIX}{n}": t.contiguous() for n, t in src.module_tensors(mod).items()})
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": src.task_type, "base_model_name_or_path": src.base_name,
        **rank_fields(ranks, False), "lora_dropout": 0.0, "target_modules": list(ranks),
        "fan_in_fan_out": bool(src.conv1d & set(ranks)), "use_rslora": False, "bias": "none",
        "modules_to_save": saved_modules or None, "init_lora_weights": True, "inference_mode": True,
    }
    toolkit: dict[str, Any] = {"format_version": FORMAT_VERSION, "fused": {}}
    if src.model_class:
        toolkit["base_model_class"] = src.model_class
    if src.num_labels and saved_modules:
        toolkit["num_labels"] = int(src.num_labels)
    if src.task:
        toolkit["task"] = src.task
    sidecar = {"seed": None, "base_fingerprint": src.fingerprint(list(ranks)), "init": None, TOOLKIT_KEY: toolkit}
    return Extraction(config, sidecar, tensors, kept, unchanged, fate)


# ------------------------------------------------------------------------------------------------------------ CLI
def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m lora.extract",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Extract a LoRA adapter from a fine-tuned model: per Linear/Conv1D module the best rank-K "
                    "approximation of W_ft − W0 (Eckart–Young), written as a PEFT adapter with balanced factors and "
                    "scale 1. Prints, per module and in total, the kept fraction of ‖ΔW‖_F², the relative error and φ "
                    "between the kept and the original top right singular directions (also in OUT/extract.json).",
        epilog="example: python -m lora.extract --base minilm --finetuned RUN/qv_full_s0 --rank 8 --out x8 "
               "--eval",
    )
    p.add_argument("--base", default=None, help="the base model: a model directory or the embedded default "
                   "(minilm); default for a toolkit full fine-tuning: the base it records")
    p.add_argument("--finetuned", required=True, help="the fine-tuned model directory (same architecture as --base; "
                   "safetensors, sharded or not), or a full fine-tuning directory of this toolkit (its head comes along)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="the rank K of every module")
    how.add_argument("--energy", type=float, metavar="F",
                     help="per module, the smallest rank keeping a fraction F in (0, 1] of ‖ΔW‖_F²")
    p.add_argument("--others", choices=OTHERS, default="refuse",
                   help="what to do with changed tensors LoRA cannot carry (embeddings, norms, biases, a new head): "
                        "refuse (default), save (their modules in full, as modules_to_save) or drop")
    p.add_argument("--dense-max", type=int, default=DENSE_MAX, help="largest smaller side for a dense float64 SVD; "
                   f"larger matrices use block Krylov iteration (default {DENSE_MAX})")
    p.add_argument("--out", required=True, help="the adapter directory to write (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new one is complete")
    p.add_argument("--eval", action="store_true", help="evaluate the fine-tuned model and the extracted adapter on "
                   "the task's validation set (the recorded task, or --task), 1 torch thread")
    p.add_argument("--task", default=None, help="the task for --eval (default: the one a full fine-tuning records)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per example for --eval (default 32)")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    check_rank_option(args.rank, args.energy)
    out = check_output_path(args.out, option="--out", kind="dir", existing="replace" if args.overwrite else "refuse")
    fin = Path(args.finetuned)
    if not fin.exists():
        raise UserError(f"--finetuned {fin}: does not exist")
    for option, given in (("--finetuned", args.finetuned), ("--base", args.base)):
        if given and (out.absolute() == Path(given).absolute() or out.absolute() in Path(given).absolute().parents):
            raise UserError(f"--out {out}: would replace {option} {given}, which extract reads")
    t0 = time.perf_counter()
    if (fin / DESCRIPTION_NAME).is_file():
        src = full_finetune(args.base, fin)
    else:
        if not args.base:
            raise UserError("--base: required unless --finetuned is a full fine-tuning directory of this toolkit")
        src = model_pair(args.base, fin)
    ex = extract(src, rank=args.rank, energy=args.energy, others=args.others, dense_max=args.dense_max,
                 progress=not args.quiet)
    seconds = time.perf_counter() - t0
    report: dict[str, Any] = {
        "base": args.base or src.base_name, "finetuned": str(fin.resolve()),
        "rule": f"rank {args.rank}" if args.rank is not None else f"energy {args.energy:g}",
        "seconds": round(seconds, 3), "total": totals(ex.kept), "modules": [k.to_dict() for k in ex.kept],
        "unchanged_modules": ex.unchanged, "other_changed_tensors": ex.others,
    }
    def evaluate(tmp: Path) -> dict[str, Any]:
        task = args.task or src.task
        original = src.original_model()
        return {"finetuned": evaluate_model(original, ex.config | {TOOLKIT_KEY: {"task": task}}, task=task,
                                            max_length=args.max_length, base=None),
                "extracted": evaluate_adapter(tmp, task=task, max_length=args.max_length)}

    write_outputs(out, overwrite=args.overwrite, config=ex.config, sidecar=ex.sidecar, tensors=ex.tensors,
                  report_name=REPORT_NAME, report=report, evaluate=evaluate if args.eval else None)
    if not args.quiet:
        extra = [f"extracted {len(ex.kept)} modules from {fin} ({report['rule']}) -> {out} in {seconds:.2f} s"]
        if ex.unchanged:
            extra.append(f"unchanged, skipped: {', '.join(ex.unchanged)}")
        for n, what in ex.others.items():
            extra.append(f"changed, not a Linear/Conv1D weight: {n} ({what})")
        for name, m in (report.get("eval") or {}).items():
            extra.append(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
        print(format_table(ex.kept, extra))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())

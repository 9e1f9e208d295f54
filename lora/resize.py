"""Resize a LoRA adapter: each module's ``ΔW = s·B·A`` truncated to its best rank-K approximation.

    python -m lora.resize --adapter RUN/qv_r64_s0 --rank 8 --out r8/            # one rank for all
    python -m lora.resize --adapter RUN/qv_r64_s0 --energy 0.9 --out e90/       # smallest K keeping 90 %
    python -m lora.resize --adapter DIR --rank-pattern ranks.json --out small/ --eval    # a rank per module

The truncation is Eckart–Young's, from the factored SVD (:mod:`lora.lowrank`: QR of A and B, SVD of the r × r
core, never a dense ΔW). The new adapter is in the PEFT layout with balanced factors and scale 1 (``lora_alpha`` =
rank, or √rank with rsLoRA; ``rank_pattern`` / ``alpha_pattern`` where ranks differ), its ``modules_to_save`` (task
head) copied, so peft loads it without a warning and ``python -m lora.merge`` merges it; ``<out>/resize.json`` holds
what each module keeps (kept fraction of ‖ΔW‖_F², relative error, φ; see :mod:`lora.lowrank`) and, with ``--eval``,
the validation metrics of the original and the resized adapter.

Layouts: a GPT-2 ``Conv1D`` (``fan_in_fan_out``) keeps its A, B orientation (peft stores them as for a Linear);
this toolkit's fused ``c_attn`` (q and v slices, block-structured B) is resized per slice and written block-wise
at the larger slice rank (the other slice padded with zero rows and columns: the same ΔW); a genuine peft LoRA on
``c_attn`` (one A shared by q, k, v) is resized as the one matrix ``(3·d_out, d_in)`` it is; an embedding LoRA
keeps its ``lora_embedding_A`` / ``lora_embedding_B`` names.

Refused, one line each: DoRA (truncating ``s·B·A`` is not the best approximation of ``W′ = m ⊙ (W0 + ΔW) /
‖W0 + ΔW‖_c``); PiSSA and OLoRA (peft rebuilds the residual base at load time from the adapter's rank, ``W − W_r``,
so a rank-K adapter would run on another base ``W − W_K``: the same model cannot be written at rank K; convert it
to plain LoRA with peft first); ``--rank`` above a module's rank; ``--energy`` outside (0, 1]; a ``--rank-pattern``
key that matches no module. ``--out`` must not exist unless ``--overwrite``; it is written atomically, so on any
failure (a full disk included) nothing is left there.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lora import init_residual
from lora.adapter_io import (
    LEGACY_WEIGHTS_NAME,
    PREFIX,
    TOOLKIT_CONFIG_KEYS,
    TOOLKIT_KEY,
    WEIGHTS_NAME,
    Adapter,
    load_adapter,
)
from lora.errors import ArgumentParser, UserError, run_cli
from lora.fsio import check_output_path
from lora.layers import FUSED_SLICES, LoRAFactors
from lora.lowrank import (
    Kept,
    check_rank_option,
    evaluate_adapter,
    format_table,
    peft_alpha,
    rank_fields,
    resize_factors,
    totals,
    write_outputs,
)

__all__ = ["REPORT_NAME", "ResizeRule", "Unit", "resize", "units"]

REPORT_NAME = "resize.json"


class ResizeRule:
    """How each module's rank is chosen: one ``rank``, an ``energy`` fraction, or a ``pattern``
    ``{module key or peft pattern: rank}`` (modules it does not name keep their rank)."""

    def __init__(self, *, rank: int | None = None, energy: float | None = None,
                 pattern: Mapping[str, int] | None = None, source: str = "--rank-pattern") -> None:
        if sum(x is not None for x in (rank, energy, pattern)) != 1:
            raise ValueError("ResizeRule: exactly one of rank, energy, pattern")
        check_rank_option(rank, energy)
        self.rank, self.energy, self.pattern, self.source = rank, energy, pattern, source
        self.used: set[str] = set()

    def describe(self) -> str:
        if self.rank is not None:
            return f"rank {self.rank}"
        if self.energy is not None:
            return f"energy {self.energy:g}"
        return f"rank pattern {self.source}"

    def rank_for(self, key: str, r: int) -> int | None:
        """The rank of module ``key`` (adapter rank ``r``); ``None``: choose by energy."""
        if self.rank is not None:
            if self.rank > r:
                raise UserError(f"--rank {self.rank}: above the adapter's rank {r} of module {key} (resizing only "
                                f"truncates; give at most {r})")
            return self.rank
        if self.pattern is None:
            return None
        import re

        path = key.partition(":")[0]
        for pat, k in self.pattern.items():
            try:
                hit = pat == key or bool(re.match(rf"(.*\.)?({pat})$", path))
            except re.error:
                hit = False
            if hit:
                self.used.add(pat)
                if k > r:
                    raise UserError(f"{self.source}: {pat!r}: rank {k} above the adapter's rank {r} of module {key}")
                return k
        return r


def read_rank_pattern(path: str) -> dict[str, int]:
    """``--rank-pattern FILE``: a JSON object ``{module key or peft pattern: positive integer rank}``."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"--rank-pattern {path}: cannot read ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--rank-pattern {path}: invalid JSON ({exc})") from None
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"--rank-pattern {path}: expected a non-empty JSON object {{module or pattern: rank}}")
    for k, v in obj.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"--rank-pattern {path}: {k!r}: rank must be a positive integer, got {v!r}")
    return obj


class Unit:
    """One PEFT LoRA module of the adapter: ``path``, its slices' factors ``{key: LoRAFactors}`` (one entry ``{path:
    ...}`` unless a fused ``c_attn``), ``fused`` (this toolkit's block layout, resized per slice) and ``embedding``."""

    def __init__(self, path: str, factors: dict[str, LoRAFactors], *, fused: Mapping[str, Any] | None,
                 embedding: bool) -> None:
        self.path, self.factors, self.fused, self.embedding = path, factors, fused, embedding


def _stored_keys(adapter: Adapter) -> list[str]:
    """The tensor names of the adapter's weights file (to tell an embedding LoRA's names)."""
    root = Path(adapter.path)
    if (root / WEIGHTS_NAME).is_file():
        from safetensors import safe_open

        with safe_open(str(root / WEIGHTS_NAME), "pt") as f:
            return list(f.keys())
    return list(torch.load(str(root / LEGACY_WEIGHTS_NAME), map_location="cpu", weights_only=True))


def units(adapter: Adapter) -> list[Unit]:
    """The adapter's PEFT modules, in file order (see :class:`Unit`). A genuine peft ``c_attn`` loaded as slices
    that share A is put back together: ``B = [B_q; B_k; B_v]``, ``A`` shared."""
    fused_meta = (adapter.config.get(TOOLKIT_KEY) or {}).get("fused") or {}
    embedded = {k[len(PREFIX):].rpartition(".lora_embedding_A")[0] for k in _stored_keys(adapter)
                if k.endswith(".lora_embedding_A")}
    grouped: dict[str, dict[str, LoRAFactors]] = {}
    for key, f in adapter.factors.items():
        grouped.setdefault(key.partition(":")[0], {})[key] = f
    out = []
    for path, facs in grouped.items():
        if ":" in next(iter(facs)) and path not in fused_meta:  # shared A (peft's own c_attn LoRA)
            parts = [facs[f"{path}:{s}"] for s in FUSED_SLICES]
            facs = {path: LoRAFactors(parts[0].A, torch.cat([p.B for p in parts], 0), parts[0].scaling)}
        out.append(Unit(path, facs, fused=fused_meta.get(path), embedding=path in embedded))
    return out


def _refuse_variants(adapter: Adapter) -> None:
    where = str(adapter.path)
    if adapter.magnitudes or adapter.config.get("use_dora"):
        raise UserError(f"{where}: a DoRA adapter cannot be resized: truncating s·B·A is not the best approximation "
                        "of its W' = m·(W0 + ΔW)/‖W0 + ΔW‖_c")
    init = init_residual.base_changing_init(adapter.config, where)
    if init is not None:
        raise UserError(f"{where}: init_lora_weights {init!r}: peft rebuilds the residual base from the adapter's "
                        f"rank at load time (W − W_r), so a rank-K adapter would run on another base; resize is "
                        f"refused. First {init_residual.CONVERSION_ROUTE}, then resize that plain LoRA")


def resize(adapter: Adapter, rule: ResizeRule) -> tuple[dict[str, Any], dict[str, Any], dict[str, Tensor], list[Kept]]:
    """Resize every module of ``adapter`` by ``rule``.

    Returns:
        ``(adapter_config, sidecar, tensors, kept)``: peft's config, our ``lora_toolkit.json``, the weights (LoRA
        factors and the unchanged ``modules_to_save`` tensors, PEFT-keyed) and one :class:`~lora.lowrank.Kept` per
        module key, in the adapter's order. Pure: reads nothing beyond ``adapter``'s weight names.
    """
    from tqdm.auto import tqdm

    _refuse_variants(adapter)
    rslora = adapter.use_rslora
    tensors: dict[str, Tensor] = {}
    peft_ranks: dict[str, int] = {}
    fused_out: dict[str, dict[str, Any]] = {}
    kept: list[Kept] = []
    todo = units(adapter)
    for unit in tqdm(todo, desc="resize", unit="module", leave=False, disable=None):
        new: dict[str, tuple[Tensor, Tensor]] = {}
        for key, f in unit.factors.items():
            A2, B2, k = resize_factors(f.A, f.B, f.scaling, rule.rank_for(key, f.rank), energy=rule.energy,
                                       module=key)
            new[key] = (A2, B2)
            kept.append(k)
        if unit.fused is not None:  # block layout at the larger slice rank, the smaller padded with zeros
            slices = list(unit.fused["slices"])
            K = max(a.shape[0] for a, _ in new.values())
            d_out = next(iter(new.values()))[1].shape[0]
            first = next(iter(new.values()))[0]
            A = first.new_zeros(len(slices) * K, first.shape[1])
            B = first.new_zeros(3 * d_out, len(slices) * K)
            for i, s in enumerate(slices):
                a, b = new[f"{unit.path}:{s}"]
                t = FUSED_SLICES.index(s)
                A[i * K : i * K + a.shape[0]] = a
                B[t * d_out : (t + 1) * d_out, i * K : i * K + b.shape[1]] = b
            peft_ranks[unit.path] = len(slices) * K
            fused_out[unit.path] = {**unit.fused, "r": K, "alpha": peft_alpha(K, rslora), "scaling": 1.0}
        else:
            A, B = new[unit.path]
            peft_ranks[unit.path] = A.shape[0]
        names = ("lora_embedding_A", "lora_embedding_B") if unit.embedding else ("lora_A.weight", "lora_B.weight")
        tensors[f"{PREFIX}{unit.path}.{names[0]}"] = A
        tensors[f"{PREFIX}{unit.path}.{names[1]}"] = B
    if rule.pattern is not None:
        unused = [p for p in rule.pattern if p not in rule.used]
        if unused:
            raise UserError(f"{rule.source}: {unused[0]!r} matches no module of {adapter.path} (its modules: "
                            f"{', '.join(list(adapter.factors)[:3])}, ...)")
    for name, t in adapter.extra_tensors.items():
        tensors[f"{PREFIX}{name}"] = t

    config = {k: v for k, v in adapter.config.items() if k not in TOOLKIT_CONFIG_KEYS}
    config.update(rank_fields(peft_ranks, rslora))
    config["init_lora_weights"] = True
    toolkit = dict(adapter.config.get(TOOLKIT_KEY) or {})
    toolkit.pop("grid_point", None)  # a grid point of the run it came from; this one is not
    toolkit["fused"] = fused_out
    toolkit["resized_from"] = str(adapter.path)
    toolkit["resize_rule"] = rule.describe()
    sidecar = {"seed": adapter.seed, "base_fingerprint": adapter.base_fingerprint, "init": None, TOOLKIT_KEY: toolkit}
    return config, sidecar, tensors, kept


# ------------------------------------------------------------------------------------------------------------ CLI
def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m lora.resize",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Resize a LoRA adapter: each module's ΔW = s·B·A truncated to its best rank-K approximation "
                    "(Eckart–Young, from the factored SVD), written as a PEFT adapter with balanced factors and "
                    "scale 1 (lora_alpha = rank), its task head kept. Prints, per module and in total, the kept "
                    "fraction of ‖ΔW‖_F², the relative error ‖ΔW − ΔW_K‖_F/‖ΔW‖_F and φ between the kept and the "
                    "original top right singular directions; the same goes to OUT/resize.json.",
        epilog="DoRA, PiSSA and OLoRA adapters are refused (the reason is printed).\n"
               "example: python -m lora.resize --adapter RUN/qv_r64_s0 --rank 8 --out r8 --eval",
    )
    p.add_argument("--adapter", required=True, help="the adapter directory (PEFT layout) to resize")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="the new rank K of every module (at most the adapter's rank)")
    how.add_argument("--energy", type=float, metavar="F",
                     help="per module, the smallest rank keeping a fraction F in (0, 1] of ‖ΔW‖_F² (peft's "
                          "convert_to_lora threshold rule)")
    how.add_argument("--rank-pattern", metavar="FILE",
                     help="a JSON object {module key or peft pattern: rank}; modules it names no rank for keep "
                          "theirs; a key matching no module is an error")
    p.add_argument("--out", required=True, help="the new adapter directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new one is complete")
    p.add_argument("--eval", action="store_true",
                   help="evaluate the original and the resized adapter on the validation set of the task the "
                        "adapter records (or --task), with the task head it carries (1 torch thread)")
    p.add_argument("--task", default=None, help="the task for --eval (default: the adapter's, e.g. chatterbot)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per example for --eval (default: the "
                   "trainer's, 32)")
    p.add_argument("--base", default=None, help="base model for --eval (default: the adapter's)")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    return p


def _check_out(args: argparse.Namespace) -> Path:
    out = check_output_path(args.out, option="--out", kind="dir", existing="replace" if args.overwrite else "refuse")
    src = Path(args.adapter).absolute()
    if out.absolute() == src or out.absolute() in src.parents:
        raise UserError(f"--out {out}: would replace --adapter {args.adapter}, which resize reads")
    return out


def _main(argv: Sequence[str] | None) -> int:
    import time

    args = build_parser().parse_args(argv)
    pattern = read_rank_pattern(args.rank_pattern) if args.rank_pattern else None
    rule = ResizeRule(rank=args.rank, energy=args.energy, pattern=pattern,
                      source=f"--rank-pattern {args.rank_pattern}")
    out = _check_out(args)
    adapter = load_adapter(args.adapter)
    t0 = time.perf_counter()
    config, sidecar, tensors, kept = resize(adapter, rule)
    seconds = time.perf_counter() - t0
    report: dict[str, Any] = {
        "adapter": str(Path(args.adapter).resolve()), "rule": rule.describe(), "seconds": round(seconds, 3),
        "total": totals(kept), "modules": [k.to_dict() for k in kept],
    }
    def evaluate(tmp: Path) -> dict[str, Any]:
        kw = {"task": args.task, "max_length": args.max_length, "base": args.base}
        return {"original": evaluate_adapter(Path(args.adapter), **kw), "resized": evaluate_adapter(tmp, **kw)}

    write_outputs(out, overwrite=args.overwrite, config=config, sidecar=sidecar, tensors=tensors,
                  report_name=REPORT_NAME, report=report, evaluate=evaluate if args.eval else None)
    if not args.quiet:
        extra = [f"resized {args.adapter} ({rule.describe()}) -> {out} in {seconds:.2f} s"]
        for name, m in (report.get("eval") or {}).items():
            extra.append(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
        print(format_table(kept, extra))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())


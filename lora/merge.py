"""Merge a LoRA adapter into its base model: ``W <- W0 + s·B·A`` for every adapted matrix, then save.

    python -m lora.merge --adapter runs/x/r8_seed0 --out merged/            # base from the adapter's config
    python -m lora.merge --adapter peft_dir --base ./my-model --out merged/
    python -m lora.merge --adapter peft_parent/other --out merged/          # a named adapter (save_pretrained)
    python -m lora.merge --adapter lora.pt --alpha 32 --base ./gpt2 --out merged/   # a loralib checkpoint

The merged directory is a plain transformers model (``AutoModel.from_pretrained`` loads it; no LoRA code
needed), the zero-latency deployment of the paper's Section 4.2. ΔW comes from the one ΔW function
(:func:`lora.layers.delta_weight`) through :meth:`LoRAModule.merge`, the same one analysis uses. The output is
written to a temporary sibling and renamed into place, so on any failure nothing is left at ``--out``.
The result equals peft's ``merge_and_unload``: a PiSSA/OLoRA adapter merges into the residual base peft
rebuilds on load (:mod:`lora.init_residual`), a DoRA adapter as ``diag(m / ‖W0 + ΔW‖_c)(W0 + ΔW)``
(:mod:`lora.dora`); inits that cannot be rebuilt are refused with peft's conversion route.

Bad input exits 2 with one line and leaves ``--out`` as it was: ``--out`` is checked before the merge runs (not a
file, not under a file, not a dangling or, with ``--overwrite``, any symbolic link, writable parent, and not the
``--adapter``/``--base`` it would destroy), and merged weights that are not finite (an overflowing
``lora_alpha``) are refused before anything is written. Temporaries a killed merge left beside ``--out`` are
removed by the next merge to that ``--out``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lora.adapter_io import (
    CONFIG_NAME,
    ENABLE_LORA_HELP,
    apply_adapter,
    base_model_for,
    copy_tokenizer_files,
    load_adapter,
    load_loralib_checkpoint,
    named_adapter_dirs,
    parse_enable_lora,
)
from lora.dora import merge_layers
from lora.errors import ArgumentParser, UserError, run_cli
from lora.fsio import atomic_dir, check_output_path, remove_stale_temps
from lora.layers import LoRAModule


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="lora-merge",
        description="Merge a PEFT-layout LoRA adapter into its base model and save a plain transformers model.",
    )
    p.add_argument("--adapter", required=True,
                   help="adapter directory (adapter_config.json + adapter_model.safetensors; one named adapter of a "
                        "peft save_pretrained folder is PARENT/NAME), or a loralib .pt checkpoint (with --alpha, --base)")
    p.add_argument("--alpha", type=float, default=None,
                   help="lora_alpha of a loralib .pt checkpoint (loralib stores none; the scale is alpha / r)")
    p.add_argument("--enable-lora", default=None, metavar="SLICES", help=ENABLE_LORA_HELP)
    p.add_argument(
        "--base",
        default=None,
        help="base model directory or hub id (default: the adapter's base_model_name_or_path, the model it was "
        "trained on)",
    )
    p.add_argument("--out", required=True, help="output directory for the merged model (must not exist, unless "
                   "--overwrite; a symbolic link is refused with --overwrite: give its target)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new one is complete")
    p.add_argument(
        "--no-fingerprint-check",
        action="store_true",
        help="merge even if the base weights differ from the ones the adapter was trained on (default: refuse, "
        "because ΔW is only meaningful on its own base)",
    )
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    return p


def _check_finite_merge(model: nn.Module, layers: dict[str, LoRAModule], where: str) -> None:
    """Refuse a merge whose weights are not finite (a huge lora_alpha overflows float32), before anything is
    written. ``layers`` are the LoRA layers as injected, ``model`` the model after merging them."""
    for path, layer in layers.items():
        weight = model.get_submodule(path).weight
        if not bool(torch.isfinite(weight).all()):
            raise UserError(f"{where}: merging module {path} gives NaN or Inf weights (scale {layer.scaling:g}); "
                            f"check lora_alpha / alpha_pattern in {CONFIG_NAME}")


def _check_paths(args: argparse.Namespace) -> Path:
    """Every path problem before the merge runs: --out (see check_output_path), and an --out that --overwrite
    would replace together with the --adapter or --base it reads."""
    out = check_output_path(args.out, option="--out", kind="dir", existing="replace" if args.overwrite else "refuse")
    inputs = [("--adapter", args.adapter)] + ([("--base", args.base)] if args.base else [])
    for option, given in inputs:
        src = Path(given).absolute()
        if out.absolute() == src or out.absolute() in src.parents:
            raise UserError(f"--out {out}: would replace {option} {given}, which the merge reads")
    return out


def _load(args: argparse.Namespace):
    """The adapter --adapter names: a PEFT-layout directory, or a loralib checkpoint file with --alpha and --base."""
    if not Path(args.adapter).is_file():
        for option, given in (("--alpha", args.alpha), ("--enable-lora", args.enable_lora)):
            if given is not None:
                raise UserError(f"{option}: only for a loralib .pt checkpoint; {args.adapter} is an adapter directory "
                                f"(its {CONFIG_NAME} records the rest)")
        return load_adapter(args.adapter)
    if args.alpha is None or not args.alpha > 0 or args.alpha == float("inf"):
        raise UserError(f"--alpha: {args.adapter} is a loralib checkpoint, which stores no alpha; pass its lora_alpha "
                        f"as a positive --alpha (got {args.alpha})")
    if args.base is None:
        raise UserError(f"--base: {args.adapter} is a loralib checkpoint, which records no base model; pass --base PATH")
    enable = parse_enable_lora(args.enable_lora) if args.enable_lora is not None else None
    return load_loralib_checkpoint(args.adapter, alpha=args.alpha, base_model_name_or_path=args.base,
                                   enable_lora=enable)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    out = _check_paths(args)
    adapter = _load(args)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    model = base_model_for(adapter, args.base)
    layers = apply_adapter(model, adapter, check_fingerprint=not args.no_fingerprint_check, allow_dora=True)
    merge_layers(model, layers, adapter.magnitudes)  # W0 + ΔW (DoRA: rescaled rows) in place, wrappers removed
    _check_finite_merge(model, layers, args.adapter)
    base_dir = args.base or adapter.base_model_name_or_path
    remove_stale_temps(out.absolute().parent, out.name)  # left by a killed merge; a live one's are locked
    with atomic_dir(out, overwrite=args.overwrite) as tmp:
        model.save_pretrained(tmp)
        copied = copy_tokenizer_files(base_dir, tmp)
        info = {
            "adapter": str(Path(args.adapter).resolve()),
            "base_model_name_or_path": str(base_dir),
            "base_fingerprint": adapter.base_fingerprint,
            "merged_modules": sorted(adapter.factors),
        }
        (tmp / "lora_merge.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    if not args.quiet:
        tok = f", tokenizer files: {len(copied)}" if copied else ""
        print(f"merged {len(adapter.factors)} LoRA matrices into {type(model).__name__} -> {out}{tok}")
        others = [p.name for p in named_adapter_dirs(args.adapter)[1:]]
        if others:  # peft's 'default' adapter in the folder itself, others beside it: say which one was merged
            print(f"merged the adapter in {args.adapter} itself ('default'); it also holds named adapters "
                  f"{', '.join(others)} (merge one with --adapter {Path(args.adapter) / others[0]})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())

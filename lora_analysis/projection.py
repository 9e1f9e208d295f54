"""``python -m lora_analysis.projection``: Table 7 for one adapter (Section 7.3): how ΔW relates to W.

A thin command: options -> (train missing default adapters with :func:`lora.train.ensure_adapters`) -> load
(:mod:`lora_analysis.load`) -> :func:`lora_analysis.tables.build.table7_table` -> print / JSON. The maths is in
:mod:`lora_analysis.metrics.projection`.
"""

from __future__ import annotations

import math

from lora import rundir
from lora.adapter_io import ENABLE_LORA_HELP
from lora.errors import UserError
from lora.fsio import write_json
from lora.threads import torch_threads
from lora_analysis.cli import check_output_file, entry_point, new_parser, select_modules
from lora_analysis.load import adapters
from lora_analysis.load.base import BaseWeights, CheckpointWeights
from lora_analysis.tables.build import dora_table, table7_table

__all__ = ["build_parser", "main"]

CLI_DESCRIPTION = f"""\
How the LoRA update dW relates to the frozen weight W (Hu et al., 2021, Section 7.3, Table 7), per module:

    delta  = ||U^T W V||_F with U, V the top-k left/right singular vectors of dW = s * B A   (paper r=4: 0.32)
    weight = the same with W's own top-k singular vectors                                     (paper: 21.67)
    random = the same with a random orthonormal k-dimensional pair                             (paper: 0.02)
    w_norm = ||W||_F, dw_norm = ||dW||_F including the scale s = alpha/r                       (paper: 61.95, 6.91)
    amplification = dw_norm / delta                                                           (paper: 21.5)

A DoRA adapter (W' = m * (W + dW) / ||W + dW||_c, per output row) gets this table on its directional update dW
and, beside it, its magnitude change m / ||W||_c - 1 (mean, mean |.|, min, max, relative norm) and the effective
update W' - W (dw_eff_norm; for matrices up to 1024^2 entries its delta_eff and amplification_eff). For a PiSSA
or OLoRA adapter saved without conversion, W is the residual peft adapts, W - s * B0 A0.

k is the adapter's rank unless --top is given. delta >> random but << weight: dW amplifies directions W
already has but does not emphasise. dW's singular vectors come from the factors (exact, never the dense dW).

The adapter is one directory (--adapter: ours or written by peft; a loralib .pt with --alpha and --base, and
--enable-lora for a fused c_attn whose slices its shapes do not tell), every adapter of a folder that peft's
save_pretrained wrote with several named adapters (--adapter PARENT: each gets its table), or a grid point of a run (--runs DIR --rank R [--seed S]). --rank without --runs uses the default run directory
(${rundir.RUNS_ENV} or ./{rundir.DEFAULT_RUN_DIR}), training the adapter first on the embedded default if it is missing. W comes
from the adapter's base_model_name_or_path (the embedded default id loads offline; a hub id needs a hub) or --base."""


def build_parser():
    """The ``python -m lora_analysis.projection`` options (argparse errors: one line, exit 2)."""
    p = new_parser("python -m lora_analysis.projection", CLI_DESCRIPTION)
    p.add_argument("--adapter", metavar="DIR", help="adapter directory (PEFT layout), or a loralib .pt with --alpha")
    p.add_argument("--runs", metavar="DIR", help="run directory written by `python -m lora.train` (with --rank)")
    p.add_argument("--rank", type=int, metavar="R", help="rank of the run's adapter to analyse (paper: 4 and 64)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the run's adapter (default 0)")
    p.add_argument("--weight-set", metavar="SET", help="weight set of the run, e.g. q,v (default: q,v if present)")
    p.add_argument("--base", metavar="PATH",
                   help="base model directory (or hub id) to read W from, instead of the adapter's "
                        "base_model_name_or_path (needed for loralib checkpoints, or a moved base)")
    p.add_argument("--lazy-base", action="store_true",
                   help="read each W from --base's safetensors file(s) when its turn comes (a .safetensors file, or "
                        "a directory with model.safetensors or model.safetensors.index.json), instead of loading "
                        "the model: for bases too big for memory, such as 7B. Linear layers as stored; GPT-2 "
                        "Conv1D, fused c_attn slices and PiSSA/OLoRA need the model loaded")
    p.add_argument("--alpha", type=float, metavar="A", help="LoRA alpha of a loralib checkpoint (loralib does not store it)")
    p.add_argument("--enable-lora", metavar="SLICES", help=ENABLE_LORA_HELP)
    p.add_argument("--top", type=int, metavar="K",
                   help="subspace dimension k (default: the adapter's rank, as the paper)")
    p.add_argument("--modules", metavar="REGEX",
                   help="only module keys matching this regular expression (re.search) (default: all)")
    p.add_argument("--json", metavar="FILE",
                   help="write the table as JSON (atomically: a failed run leaves an existing file as it was); "
                        "an amplification that is undefined (delta = 0) is written as null; for a folder of named "
                        "adapters, {\"adapters\": {path: table}}")
    p.add_argument("--quiet", action="store_true", help="no progress bar or printed table")
    return p


def _adapters(args) -> list:
    """The adapters to analyse: one, or each named adapter of a peft save_pretrained folder."""
    if args.adapter is not None:
        for opt, val in (("--runs", args.runs), ("--rank", args.rank), ("--weight-set", args.weight_set)):
            if val is not None:
                raise UserError(f"{opt}: not used with --adapter (give either --adapter DIR or --runs DIR --rank R)")
        return adapters.load_all(args.adapter, alpha=args.alpha, base_model=args.base, enable_lora=args.enable_lora)
    if args.enable_lora is not None:
        raise UserError("--enable-lora: only for a loralib .pt checkpoint given with --adapter")
    if args.rank is None:
        raise UserError("--rank: missing; give --adapter DIR, or --rank R (with --runs DIR, or the default run)")
    if args.rank < 1:
        raise UserError(f"--rank: must be >= 1, got {args.rank}")
    if args.runs is None:
        from lora.train import ensure_adapters

        root = ensure_adapters(rundir.default_run_dir(), (args.rank,), (args.seed,), progress=not args.quiet)
    else:
        root = args.runs
    return [adapters.load_run_adapter(root, rank=args.rank, seed=args.seed, weight_set=args.weight_set)]


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _run(argv=None) -> int:
    """Table 7 for one adapter"""
    args = build_parser().parse_args(argv)
    if args.json is not None:
        check_output_file("--json", args.json)
    if args.top is not None and args.top < 1:
        raise UserError(f"--top: must be >= 1, got {args.top}")
    found = _adapters(args)
    if len(found) > 1 and not args.quiet:
        print(f"{args.adapter}: {len(found)} named adapters: {', '.join(a.path.name for a in found)}")
    if args.lazy_base and args.base is None:
        raise UserError("--lazy-base: needs --base (the checkpoint's safetensors file or directory)")
    # shared: W (and, loaded, its SVD) is read once for adapters on one base
    base = CheckpointWeights(args.base) if args.lazy_base else BaseWeights(args.base)
    docs = {}
    for adapter in found:
        keys = select_modules(adapter.module_keys, args.modules, where=str(adapter.path))
        for key in keys if args.top is not None else ():  # the flag is checked here: the tables name no option
            f = adapter.factors[key]
            most = min(f.rank, f.B.shape[0], f.A.shape[1])
            if args.top > most:
                raise UserError(f"--top: {args.top} must be in 1..{most} for module {key} of {adapter.path}")
        with torch_threads(1):  # small matrices: one thread is fastest
            table = table7_table(adapter, base, keys=keys, top=args.top)
            dora = dora_table(adapter, base, keys=keys, top=args.top)  # empty unless DoRA
        if not args.quiet:
            shown = table.drop(columns=["seed"]).rename(columns={"weight_type": "type"})
            print(f"Table 7 for {adapter.path} (r={adapter.rank}, seed {adapter.seed}): ||U^T W V||_F for the top-k "
                  f"subspaces of dW (delta), of W (weight) and random; amplification = dw_norm / delta")
            print(shown.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
            if len(dora):
                print("DoRA: Table 7 above is on the directional update dW = s*B*A; magnitude change m/||W||_c - 1 "
                      "and the effective update W' - W:")
                cols = ["module", "mag_rel_mean", "mag_rel_abs_mean", "mag_rel_min", "mag_rel_max", "mag_rel_norm",
                        "dw_norm", "dw_eff_norm", "delta_eff", "amplification_eff"]
                print(dora[cols].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
        docs[str(adapter.path)] = _json_doc(args, adapter, table, dora)
    if args.json is not None:
        write_json(args.json, next(iter(docs.values())) if len(docs) == 1 else {"adapters": docs})
    return 0


def _json_doc(args, adapter, table, dora) -> dict:
    """The --json document of one adapter's table (DoRA: each module also gets its magnitude change and
    effective update under ``"dora"``)."""
    doc = {
        "metric": "||U^T W V||_F for the top-k singular subspaces of dW (delta), W (weight) and a random pair",
        "adapter": str(adapter.path), "rank": adapter.rank, "seed": adapter.seed,
        "base": str(args.base) if args.base is not None else adapter.base_model,
        "modules": {
            row.module: {"delta": row.delta, "weight": row.weight, "random": row.random, "w_norm": row.w_norm,
                         "dw_norm": row.dw_norm, "amplification": _finite_or_none(row.amplification),
                         "top": int(row.top), "rank": int(row.rank), "weight_type": row.weight_type,
                         "layer": int(row.layer)}
            for row in table.itertuples(index=False)
        },
    }
    for row in dora.to_dict("records"):
        doc["modules"][row["module"]]["dora"] = {
            c: _finite_or_none(float(row[c])) for c in dora.columns if c.startswith(("mag_", "dw_", "delta_", "ampl"))
        }
    return doc


main = entry_point(_run)

if __name__ == "__main__":
    raise SystemExit(main())

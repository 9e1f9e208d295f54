"""``python -m lora_analysis.figures``: re-render every Section 7 figure, table, REPORT.md and report.json from an
existing run, without training.

A thin command: parse, open the run once (:class:`lora_analysis.load.run.Run`), call the pipeline
(:func:`lora_analysis.pipeline.analyse_and_render`: analyse -> judge -> render), print. Any folder of PEFT
adapters works; claims that need training metrics say "not measured". ``--base CKPT --lazy-base`` reads a big
base (a 7B LLaMA/Mistral/Qwen checkpoint) one W at a time from its safetensors shards; W's SVDs are kept in a
spectral cache (:mod:`lora_analysis.load.spectral_cache`) for the next report on the same base.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lora import rundir
from lora.errors import UserError
from lora.threads import process_group
from lora_analysis.cli import check_output_dir, entry_point, new_parser
from lora_analysis.load.base import BaseWeights
from lora_analysis.load.run import Run, check_run_dir
from lora_analysis.load.spectral_cache import SPECTRA_SUBDIR, SpectralCache
from lora_analysis.pipeline import analyse_and_render
from lora_analysis.tables.build import adapted_layers

__all__ = ["analyse_and_render", "build_parser", "main"]


def build_parser():
    p = new_parser(
        "python -m lora_analysis.figures",
        "Re-render every Section 7 figure, the tables, REPORT.md and report.json from an existing run, without\n"
        "training: analyse the run's adapters (tables CSV), draw the figures, judge each claim, write the report.\n"
        "Works on any folder of PEFT adapter directories too.",
    )
    p.add_argument("--runs", default=None, metavar="DIR",
                   help=f"run directory written by lora.train, or any folder of adapter directories (default: "
                        f"${rundir.RUNS_ENV} or {rundir.DEFAULT_RUN_DIR}, the reproduce run)")
    p.add_argument("--out", default="figures", metavar="DIR",
                   help="output folder for figures, tables, REPORT.md and report.json (default: %(default)s, the "
                        "folder the README links to)")
    p.add_argument("--base", default=None, metavar="PATH",
                   help="base model to read W from instead of each adapter's base_model_name_or_path: a "
                        "transformers model directory (or hub id), or with --lazy-base a safetensors checkpoint")
    p.add_argument("--lazy-base", action="store_true",
                   help="read each W from --base's safetensors file(s) when its module's turn comes (a .safetensors "
                        "file, or a directory with model.safetensors or model.safetensors.index.json: a LLaMA, "
                        "Mistral or Qwen checkpoint), never loading the model: for bases too big for memory, such as "
                        "7B. Linear layers as stored; GPT-2 Conv1D, fused c_attn slices and PiSSA/OLoRA need the "
                        "model loaded")
    p.add_argument("--spectral-cache", default=None, metavar="DIR",
                   help=f"keep W's singular vectors here, so a second report on the same base computes no SVD of W "
                        f"(default: <runs>/{SPECTRA_SUBDIR} where the run directory is writable)")
    p.add_argument("--fig8-layers", default="auto", metavar="auto|all|L,L,...",
                   help="the layers whose W gets Figure 8 (W's top 10 %% of singular directions, the report's largest "
                        "cost at 7B): auto (default) is every layer up to d = 1024 and 5 evenly spaced layers above "
                        "(first and last included; the paper's Figure 8 shows one layer), all, or a comma list")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse_fig8_layers(text: str) -> str | list[int]:
    """``--fig8-layers``: ``auto``, ``all`` or a comma list of layer indices (one-line error otherwise)."""
    if text in ("auto", "all"):
        return text
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        layers = []
    if not layers or any(x < 0 for x in layers):
        raise UserError(f"--fig8-layers {text!r}: expected auto, all or a comma list of layer indices (e.g. 0,15,31)")
    return layers


def spectral_cache_for(run_dir: Path, directory: str | None, *, quiet: bool) -> SpectralCache | None:
    """``--spectral-cache DIR``, else ``<run>/analysis/spectra`` where the run directory is writable (else none,
    with a note)."""
    if directory is not None:
        path = Path(directory)
        if path.exists() and not path.is_dir():
            raise UserError(f"--spectral-cache {directory}: is a file; expected a directory")
        return SpectralCache(path)
    if os.access(run_dir, os.W_OK):
        return SpectralCache(run_dir / SPECTRA_SUBDIR)
    if not quiet:
        print(f"note: {run_dir} is read-only: W's spectra are not cached (--spectral-cache DIR keeps them)",
              file=sys.stderr)
    return None


def _run(argv: Sequence[str] | None = None) -> int:
    """re-render figures and the report"""
    import matplotlib.pyplot as plt

    args = build_parser().parse_args(argv)
    plt.switch_backend("Agg")  # the command only writes files
    fig8_layers = parse_fig8_layers(args.fig8_layers)  # before any work
    run_dir = Path(args.runs) if args.runs is not None else rundir.default_run_dir()
    check_run_dir(run_dir, option="--runs")
    out = check_output_dir("--out", args.out)
    if args.lazy_base and args.base is None:
        raise UserError("--lazy-base: needs --base (the checkpoint's safetensors file or directory)")
    cache = spectral_cache_for(run_dir, args.spectral_cache, quiet=args.quiet)
    base = BaseWeights(args.base, lazy=args.lazy_base, spectral_cache=cache)  # a broken checkpoint: one line here
    run = Run.open(run_dir, base=base, option="--runs")
    if not args.quiet and run.manifest is None:  # adapters from elsewhere: say which were found
        entries = run.index.entries
        print(f"{run_dir}: {len(entries)} adapter(s): "
              + ", ".join(f"{e.path.relative_to(run_dir) if e.path != run_dir else '.'} ({e.weight_set}, r={e.rank})"
                          for e in entries))
    if isinstance(fig8_layers, list):  # every layer named must be adapted (loads the adapters, once, for the run)
        adapted = adapted_layers([run.adapter(e) for e in run.index.entries])
        missing = [x for x in fig8_layers if x not in adapted]
        if missing:
            raise UserError(f"--fig8-layers: layer(s) {', '.join(map(str, missing))} not adapted in {run_dir}; "
                            f"adapted layers: {', '.join(map(str, adapted))}")
    written = analyse_and_render(run, out, quiet=args.quiet, fig8_layers=fig8_layers)
    if not args.quiet and process_group()[0] == 0:
        print(f"wrote {len(written)} files into {args.out}")
    return 0


main = entry_point(_run)

if __name__ == "__main__":
    raise SystemExit(main())

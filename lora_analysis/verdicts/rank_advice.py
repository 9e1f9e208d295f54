"""Per-layer rank advice for any adapter folder, from the spectra alone (no task, no forward pass).

The rule (``preregistration.toml``, ``[rank_advice]``): per module, the 90 % energy rank of ``ΔW`` (the smallest
``K`` with ``Σ_{i≤K} σ_i² ≥ 0.9 ‖ΔW‖_F²``, the ``spectra`` table's ``energy_rank_90``), maximised over seeds (the
rank every seed's update needs), rounded up to a power of 2, capped at the adapter's rank. It is advice for the
folder's largest-rank adapters (the ones worth resizing): :func:`rank_pattern` writes it as the JSON object
``python -m lora.resize --rank-pattern FILE`` takes (``{module key: rank}``), so one command turns it into a
smaller adapter whose every module keeps at least 90 % of its ``‖ΔW‖_F²`` (``lora.resize`` prints what each keeps).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from lora.errors import UserError
from lora_analysis.verdicts.claims import PRE

__all__ = ["ADVICE_COLUMNS", "RULE", "rank_advice", "rank_pattern", "round_up_pow2", "write_rank_advice"]

RULE = PRE["rank_advice"]["rule"]
ADVICE_COLUMNS = ("module", "weight_type", "layer", "rank", "seed", "energy_rank_90", "entropy_rank", "stable_rank",
                  "suggested_rank")
PATTERN_FILE = "rank_pattern.json"


def round_up_pow2(k: int | float, cap: int) -> int:
    """The smallest power of 2 at least ``k`` (at least 1), capped at ``cap``."""
    p = 1 << max(0, math.ceil(math.log2(max(float(k), 1.0))))
    return int(min(p, cap))


def rank_advice(spectra: pd.DataFrame | None) -> pd.DataFrame:
    """One row per module and seed of the largest-rank adapters (:data:`ADVICE_COLUMNS`): their spectral ranks and
    the module's ``suggested_rank`` (the rule above). Empty without spectra."""
    if spectra is None or len(spectra) == 0:
        return pd.DataFrame(columns=list(ADVICE_COLUMNS))
    missing = [c for c in ADVICE_COLUMNS[:-1] if c not in spectra.columns]
    if missing:
        raise UserError(f"spectra: lacks columns {missing}")
    r = int(spectra["rank"].max())
    rows = spectra[spectra["rank"] == r][list(ADVICE_COLUMNS[:-1])].copy()
    need = rows.groupby("module")["energy_rank_90"].max()
    rows["suggested_rank"] = rows["module"].map({m: round_up_pow2(k, r) for m, k in need.items()})
    return rows.sort_values(["layer", "weight_type", "module", "seed"]).reset_index(drop=True)


def rank_pattern(advice: pd.DataFrame) -> dict[str, int]:
    """``{module key: suggested rank}``, in layer order: ``lora.resize --rank-pattern``'s input."""
    return {str(m): int(k) for m, k in advice.drop_duplicates("module")[["module", "suggested_rank"]].itertuples(
        index=False)}


def write_rank_advice(spectra: pd.DataFrame | None, out_dir: str | os.PathLike) -> list[Path]:
    """``<out>/tables/rank_advice.csv`` and ``<out>/rank_pattern.json``, atomically (none without spectra)."""
    from lora.fsio import atomic_path, write_json

    advice = rank_advice(spectra)
    if not len(advice):
        return []
    out = Path(out_dir)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    csv = out / "tables" / "rank_advice.csv"
    with atomic_path(csv) as tmp:
        advice.to_csv(tmp, index=False)
    return [csv, write_json(out / PATTERN_FILE, rank_pattern(advice))]

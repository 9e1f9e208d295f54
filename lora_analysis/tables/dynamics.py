"""How the Section 7 quantities form during training: the tables of each training snapshot, and one tidy table.

For every step that all LoRA adapters of the weight set have a snapshot of (:mod:`lora.snapshots`), the adapters
*as they were at that step* go through the same table functions as the finished ones
(:mod:`lora_analysis.tables.build`): φ between the ranks nearest 8 and 64 (and those nearest the paper's r/d) at
each seed, φ between every pair of seeds at the largest rank, Table 7 with its random null and ΔW's spectrum.
Step 0 (A = A_init, B = 0) has φ on A only: ΔW = 0 has no subspace, so its ΔW quantities are absent.

``dynamics`` (tidy, one row per step × quantity × module × rank or pair × seed):
step, quantity, comparison, module, weight_type, layer, r1, r2, seed1, seed2, value, null. Quantities:

* ``phi11`` / ``phikk`` with ``comparison`` ``rank`` or ``seed`` and ``on`` ``A`` or ``dW`` (in the name:
  ``phi11_A``, ``phikk_dW``, ...): φ(1, 1) and φ(k, k), k = min(r1, 8); null: the random baseline k/d
  (1/d for φ(1, 1));
* ``proj_ratio``: ‖UᵀWV‖_F / E_random at k = r (Table 7's margin); null 1;
* ``amplification``: ‖ΔW‖_F / ‖UᵀWV‖_F; null: the same-norm ΔW in a random subspace;
* ``entropy_rank``: ΔW's entropy effective rank; null: the rank r (a ΔW using all its r directions evenly).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from lora_analysis.load.adapters import LoadedAdapter
from lora_analysis.load.base import BaseWeights
from lora_analysis.load.run import Run
from lora_analysis.load.snapshots import load_snapshot, snapshot_steps
from lora_analysis.tables.build import (
    PAPER_RANK_PAIR,
    compared_rank_pairs,
    concat_table,
    phi_table,
    spectra_table,
    table7_table,
)

__all__ = ["DYNAMICS_COLUMNS", "PHI_K", "common_steps", "dynamics_table", "snapshot_tables", "step_tables"]

DYNAMICS_COLUMNS = ["step", "quantity", "comparison", "module", "weight_type", "layer", "r1", "r2", "seed1", "seed2",
                    "value", "null"]
PHI_K = 8  # φ(k, k) at k = min(r, 8): Figure 4's "leading directions" (verdicts.claims.SHARED_K)
NULL_DRAWS = 8  # random pairs per Table 7 row and step: the analytic null decides, the draws only show the spread


def _trained(a: LoadedAdapter) -> bool:
    return all(bool(f.B.abs().max() > 0) for f in a.factors.values())


def step_tables(adapters: Mapping[tuple[int, int], LoadedAdapter], base: BaseWeights | None, *,
                ranks_compared: tuple[int, int] = PAPER_RANK_PAIR) -> dict[str, pd.DataFrame]:
    """The ``phi``, ``table7`` and ``spectra`` tables of one step's adapters (``{(rank, seed): adapter}``).

    φ uses the quantities ``A``, ``dW`` (whole and without its top direction), the start-only null and
    ``expected_random``; Table 7 and the spectra skip adapters whose ΔW
    is still 0 (step 0). ``base`` may be ``None`` (no Table 7).
    """
    out: dict[str, list[pd.DataFrame]] = {"phi": [], "table7": [], "spectra": []}
    quantities = ("A", "dW", "dW-top", "start_null", "start_null-top", "expected_random")
    present_r = sorted({r for r, _ in adapters})
    present_s = sorted({s for _, s in adapters})
    if len(present_r) >= 2:
        for (r1, r2), s in itertools.product(compared_rank_pairs(adapters, ranks_compared), present_s):
            if (r1, s) in adapters and (r2, s) in adapters:
                out["phi"].append(phi_table(adapters[(r1, s)], adapters[(r2, s)], comparison="rank",
                                            quantities=quantities))
    r_max = present_r[-1]
    for s1, s2 in itertools.combinations(sorted(s for r, s in adapters if r == r_max), 2):
        out["phi"].append(phi_table(adapters[(r_max, s1)], adapters[(r_max, s2)], comparison="seed",
                                    quantities=quantities))
    for a in adapters.values():
        if not _trained(a):
            continue
        if base is not None:
            out["table7"].append(table7_table(a, base, null_draws=NULL_DRAWS))
        out["spectra"].append(spectra_table(a, None))
    return {name: concat_table(name, frames) for name, frames in out.items()}


def common_steps(adapter_dirs: Sequence[os.PathLike]) -> list[int]:
    """The steps every directory has a snapshot of (empty if any has none)."""
    steps = None
    for d in adapter_dirs:
        s = set(snapshot_steps(d))
        steps = s if steps is None else steps & s
    return sorted(steps or ())


def snapshot_tables(run: Run, *, weight_set: str | None = None,
                    progress: bool = False) -> dict[int, dict[str, pd.DataFrame]]:
    """``{step: step_tables(...)}`` for the weight set's LoRA adapters at every common snapshot step (``{}`` for a
    run without snapshots), with the run's one base-weight source."""
    from tqdm import tqdm

    index = run.index
    ws = index.default_weight_set() if weight_set is None else weight_set
    entries = index.find(weight_set=ws)
    steps = common_steps([e.path for e in entries])
    if not steps:
        return {}
    finals = {}
    for e in entries:
        a = run.adapter(e)
        if a.seed is not None:
            finals[(e.rank, int(a.seed))] = a
    bw = run.base
    out = {}
    for step in tqdm(steps, desc="snapshots", disable=not progress, dynamic_ncols=True):
        at = {key: load_snapshot(a, step) for key, a in finals.items()}
        out[step] = step_tables(at, bw)
    return out


def _phi_rows(step: int, phi: pd.DataFrame) -> list[dict]:
    rows = []
    if len(phi) == 0:
        return rows
    for (comparison, quantity, module, r1, r2, s1, s2), g in phi.groupby(
            ["comparison", "quantity", "module", "r1", "r2", "seed1", "seed2"], sort=True):
        if quantity not in ("A", "dW"):
            continue
        k = min(int(r1), int(r2), PHI_K)
        base = phi[(phi["quantity"] == "expected_random") & (phi["module"] == module) & (phi["r1"] == r1)
                   & (phi["r2"] == r2) & (phi["seed1"] == s1) & (phi["seed2"] == s2)]
        first = g.iloc[0]
        for name, i in (("phi11", 1), ("phikk", k)):
            cell = g[(g["i"] == i) & (g["j"] == i)]["phi"]
            null = base[(base["i"] == i) & (base["j"] == i)]["phi"]
            if len(cell):
                rows.append({"step": step, "quantity": f"{name}_{quantity}", "comparison": comparison,
                             "module": module, "weight_type": first["weight_type"], "layer": int(first["layer"]),
                             "r1": int(r1), "r2": int(r2), "seed1": int(s1), "seed2": int(s2),
                             "value": float(cell.iloc[0]), "null": float(null.iloc[0]) if len(null) else np.nan})
    return rows


def dynamics_table(per_step: Mapping[int, Mapping[str, pd.DataFrame]]) -> pd.DataFrame:
    """The tidy ``dynamics`` table (:data:`DYNAMICS_COLUMNS`) from :func:`snapshot_tables`'s output."""
    rows: list[dict] = []
    for step in sorted(per_step):
        t = per_step[step]
        rows += _phi_rows(step, t.get("phi", pd.DataFrame()))
        t7 = t.get("table7")
        if t7 is not None and len(t7):
            for r in t7.itertuples(index=False):
                ids = {"step": step, "comparison": "adapter", "module": r.module, "weight_type": r.weight_type,
                       "layer": int(r.layer), "r1": int(r.rank), "r2": int(r.rank), "seed1": int(r.seed),
                       "seed2": int(r.seed)}
                rows.append({**ids, "quantity": "proj_ratio", "value": r.delta_over_random, "null": 1.0})
                rows.append({**ids, "quantity": "amplification", "value": r.amplification,
                             "null": r.amplification_random})
        sp = t.get("spectra")
        if sp is not None and len(sp):
            for r in sp.itertuples(index=False):
                rows.append({"step": step, "quantity": "entropy_rank", "comparison": "adapter", "module": r.module,
                             "weight_type": r.weight_type, "layer": int(r.layer), "r1": int(r.rank),
                             "r2": int(r.rank), "seed1": int(r.seed), "seed2": int(r.seed),
                             "value": r.entropy_rank, "null": float(r.rank)})
    return pd.DataFrame(rows, columns=DYNAMICS_COLUMNS)

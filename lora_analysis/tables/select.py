"""One rule for every choice of slice: which rows, which rank pair, which layer. Tables, figures and verdicts call
these, so changing how r_small or the layer is chosen touches this file only.

The paper (Hu et al., 2021, Section 7) compares r = 8 with r = 64 (Figure 3), reports Table 7 at r = 4 and 64,
draws Figure 8 at r = 4, 8, 64, and shows layer 48 of GPT-3's 96 (the middle one). A run may have other ranks:
"nearest" is measured on a log₂ scale (ranks are multiplicative: 4 is as far from 8 as 16 is), ties going to the
smaller rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from lora.errors import UserError

__all__ = [
    "PAPER_D",
    "PAPER_FIG8_RANKS",
    "PAPER_RANK_LARGE",
    "PAPER_RANK_SMALL",
    "PAPER_TABLE7_RANKS",
    "MissingRows",
    "first_middle_last",
    "middle_layer",
    "modules_at",
    "nearest_rank",
    "phi_rank_pair",
    "rank_pair",
    "require",
    "rows_where",
]

PAPER_RANK_SMALL = 8  # Figure 3 compares r = 8 ...
PAPER_RANK_LARGE = 64  # ... with r = 64; Figure 4 compares seeds at r = 64
PAPER_TABLE7_RANKS = (4, 64)  # Table 7 reports r = 4 and r = 64
PAPER_FIG8_RANKS = (4, 8, 64)  # Figure 8 panels
PAPER_D = 12288  # GPT-3 175B's d_model: the paper's r = 4 and 64 are 0.03 % and 0.5 % of it


class MissingRows(UserError):
    """A table holds no rows a selection needs (e.g. a run with one seed has no seed comparison)."""


def require(table: pd.DataFrame | None, what: str, columns: Sequence[str]) -> pd.DataFrame:
    """``table`` if it has rows and ``columns``; :class:`MissingRows` if empty, :class:`UserError` if columns lack."""
    if table is None or len(table) == 0:
        raise MissingRows(f"{what}: table is empty")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise UserError(f"{what}: table lacks columns {missing}")
    return table


def rows_where(table: pd.DataFrame, **equal) -> pd.DataFrame:
    """Rows whose columns equal the given values (a value of None is not filtered on)."""
    mask = np.ones(len(table), dtype=bool)
    for col, value in equal.items():
        if value is not None:
            mask &= (table[col] == value).to_numpy()
    return table[mask]


def nearest_rank(ranks: Sequence[int], target: float) -> int:
    """The present rank nearest ``target`` on a log₂ scale (ties go to the smaller rank).

    ``nearest_rank([1, 12], 4) == 12``: log₂ distances 2 and 1.58 (a linear rule would pick 1). The rule is
    multiplicative because rank is: 4 → 8 is the same step as 32 → 64.
    """
    present = sorted({int(x) for x in ranks})
    if not present:
        raise MissingRows("no ranks to choose from")
    if target <= 0:
        raise ValueError(f"target rank must be positive, got {target}")
    return min(present, key=lambda r: (abs(math.log2(r) - math.log2(target)) if r > 0 else math.inf, r))


def rank_pair(ranks: Sequence[int], *, small: float = PAPER_RANK_SMALL, large: float | None = None) -> tuple[int, int]:
    """``(r_small, r_large)`` to compare, ``r_small < r_large``: ``r_small`` the rank nearest ``small`` among all but
    the largest, ``r_large`` the rank nearest ``large`` (default: the largest) among those above ``r_small``.
    Needs two distinct ranks. Targets may be fractional (the paper's r/d scaled to a small model)."""
    present = sorted({int(x) for x in ranks})
    if len(present) < 2:
        raise MissingRows(f"a rank comparison needs two ranks; present: {present}")
    r_small = nearest_rank(present[:-1], small)
    above = [r for r in present if r > r_small]
    return r_small, above[-1] if large is None else nearest_rank(above, large)


def phi_rank_pair(phi: pd.DataFrame, *, small: int = PAPER_RANK_SMALL, large: int | None = None) -> tuple[int, int]:
    """``(r1, r2)`` of the rank comparison rows of a φ table to show: r2 nearest ``large`` (default the largest r2
    present), r1 the rank nearest ``small`` among those compared with it."""
    rows = rows_where(phi, comparison="rank") if "comparison" in phi.columns else phi
    pairs = rows[["r1", "r2"]].drop_duplicates()
    if len(pairs) == 0:
        raise MissingRows("phi: no rank comparison rows")
    r2 = int(pairs["r2"].max()) if large is None else nearest_rank(pairs["r2"].tolist(), large)
    return nearest_rank(pairs[pairs["r2"] == r2]["r1"].tolist(), small), r2


def middle_layer(layers: Sequence[int], layer: int | None = None) -> int:
    """The layer to show: ``layer`` if given (and present), else the middle one.

    The paper shows layer 48 of GPT-3's 96, i.e. the ``n/2``-th (1-based) of ``n`` layers; we take
    ``sorted(layers)[(n - 1) // 2]``, which is that layer when the run adapts all of them.
    """
    present = sorted({int(x) for x in layers})
    if not present:
        raise MissingRows("no layers in the table")
    if layer is None:
        return present[(len(present) - 1) // 2]
    if int(layer) not in present:
        raise UserError(f"layer {layer}: not in the table (layers present: {present})")
    return int(layer)


def first_middle_last(layers: Sequence[int]) -> list[int]:
    """First, middle and last layer (Figures 6 and 7 show layers 1, 32, 64, 96 of 96), without repeats."""
    present = sorted({int(x) for x in layers})
    if not present:
        raise MissingRows("no layers in the table")
    return sorted({present[0], middle_layer(present), present[-1]})


def modules_at(table: pd.DataFrame, layer: int, weight_types: Sequence[str] = ("q", "v")) -> dict[str, str]:
    """Module key per weight type at ``layer`` (the first key in sort order if a layer has several)."""
    at = rows_where(table, layer=layer)
    out = {}
    for wt in weight_types:
        keys = sorted(set(rows_where(at, weight_type=wt)["module"]))
        if keys:
            out[wt] = keys[0]
    return out

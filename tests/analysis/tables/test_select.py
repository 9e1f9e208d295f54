"""lora_analysis.tables.select: the one rule for the nearest rank, the rank pair and the middle layer."""

from __future__ import annotations

import pandas as pd
import pytest

from lora.errors import UserError
from lora_analysis.tables.select import (
    MissingRows,
    first_middle_last,
    middle_layer,
    nearest_rank,
    phi_rank_pair,
    rank_pair,
    rows_where,
)


def test_middle_layer_and_nearest_rank():
    assert middle_layer([0, 1, 2, 3, 4, 5]) == 2  # the n/2-th (1-based) layer, as the paper's 48th of 96
    assert middle_layer([3]) == 3
    assert middle_layer([0, 5], 5) == 5
    with pytest.raises(UserError, match="layer 7"):
        middle_layer([0, 1], 7)
    assert first_middle_last(range(6)) == [0, 2, 5]
    assert nearest_rank([1, 2, 4, 8, 64], 8) == 8
    assert nearest_rank([2, 4], 8) == 4
    assert nearest_rank([2, 16], 4) == 2  # equal log-distance: the smaller rank


def test_nearest_rank_is_logarithmic():
    # ranks {1, 12}, target 4: log2 distances 2 and 1.58, so 12 (the old linear rule of runs.nearest picked 1)
    assert nearest_rank([1, 12], 4) == 12
    assert nearest_rank([4, 64], 16) == 4  # |2 - 4| = 2 = |6 - 4|: a tie goes to the smaller rank
    with pytest.raises(MissingRows):
        nearest_rank([], 4)


def test_rank_pair_and_phi_rank_pair():
    assert rank_pair([1, 2, 4, 8, 64]) == (8, 64)
    assert rank_pair([2, 4]) == (2, 4)  # r_large is the largest, r_small the nearest 8 among the rest
    # r_small among all but the largest ranks (log2 distance to 4: 1 -> 2, 12 -> 1.58), r_large above it
    assert rank_pair([1, 12, 32], small=4, large=12) == (12, 32)
    assert rank_pair([1, 2, 4, 8, 64], small=0.25, large=2) == (1, 2)  # the paper's r/d on d = 384
    assert rank_pair([2, 4, 8], small=0.02, large=0.17) == (2, 4)  # r_small < r_large whatever the targets
    with pytest.raises(MissingRows):
        rank_pair([8])
    phi = pd.DataFrame({"comparison": ["rank", "rank", "seed"], "r1": [2, 8, 64], "r2": [64, 64, 64]})
    assert phi_rank_pair(phi) == (8, 64)
    assert phi_rank_pair(phi, small=1) == (2, 64)
    assert len(rows_where(phi, comparison="rank", r1=None)) == 2

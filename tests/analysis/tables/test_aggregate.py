"""lora_analysis.tables.aggregate: intervals against known cases, and the seed-aggregated paper tables."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from lora_analysis.tables.aggregate import Interval, binomial_ci, bootstrap_ci


def test_bootstrap_interval_covers_the_mean_at_its_level():
    """For i.i.d. N(μ, 1) samples of 30, the 95 % bootstrap interval of the mean covers μ in about 95 % of datasets
    (a percentile bootstrap runs a little short at n = 30: about 93 %) and has about the width of the t interval."""
    rng = np.random.default_rng(0)
    covered, widths = 0, []
    for trial in range(300):
        x = rng.normal(2.0, 1.0, size=30)
        iv = bootstrap_ci(x, n_boot=1000, seed=trial)
        covered += iv.lo <= 2.0 <= iv.hi
        widths.append(iv.hi - iv.lo)
    assert 0.88 <= covered / 300 <= 0.99
    t_width = 2 * stats.t.ppf(0.975, 29) / np.sqrt(30)
    assert np.mean(widths) == pytest.approx(t_width, rel=0.1)


def test_bootstrap_resamples_whole_units():
    # two units: one all 0, one all 1; a resample draws whole units, so the mean is 0, 0.5 or 1
    x = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    iv = bootstrap_ci(x, units=[0, 0, 0, 1, 1, 1], n_boot=2000)
    assert iv.estimate == 0.5 and iv.lo == 0.0 and iv.hi == 1.0
    one = bootstrap_ci(x, units=[5] * 6)
    assert one.lo == one.hi == one.estimate and "one unit" in one.method
    med = bootstrap_ci(x, statistic=np.median, n_boot=500)  # any statistic, by the general path
    assert 0.0 <= med.lo <= med.hi <= 1.0
    with pytest.raises(ValueError):
        bootstrap_ci([], n_boot=10)
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, 2.0], units=[0])


def test_binomial_interval_is_clopper_pearson():
    iv = binomial_ci(8, 36)
    assert iv.estimate == pytest.approx(8 / 36)
    # reference values: scipy's exact binomial test interval
    ref = stats.binomtest(8, 36).proportion_ci(confidence_level=0.95, method="exact")
    assert (iv.lo, iv.hi) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert binomial_ci(0, 10).lo == 0.0 and binomial_ci(10, 10).hi == 1.0
    with pytest.raises(ValueError):
        binomial_ci(3, 2)


def test_interval_helpers():
    iv = Interval(1.0, 0.5, 1.5, 0.95, "m")
    assert iv.excludes(2.0) and not iv.excludes(1.2)
    assert iv.text(".1f") == "1.0 [0.5, 1.5]" and iv.as_dict()["method"] == "m"

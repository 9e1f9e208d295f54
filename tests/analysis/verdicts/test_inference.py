"""lora_analysis.verdicts.inference: intervals with the seed as unit, their simulated coverage and power, the
two-question rule, Holm / BH, and the sampled small-k nulls, against hand-computed and closed-form cases.

Monte Carlo checks use fixed RNG seeds; their tolerances are a few Monte Carlo standard errors (or the exact
Clopper–Pearson 99 % bounds a simulation returns), so they say how far chance alone could move the number.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special, stats

from lora.errors import UserError
from lora_analysis.tables.aggregate import Interval, bootstrap_ci
from lora_analysis.verdicts import inference as I

DESIGN = (3, 6, 2)  # the default run: 3 seeds × MiniLM's 6 layers × ΔW_q, ΔW_v
# Variance components of f (fraction of the way from a random subspace to W's top one) at r=4 in the default
# run's figures/tables/table7.csv, estimated by I.variance_components (seed and seed×module clip at ~0).
DEFAULT_R4 = I.Components(seed=0.0, layer=2.52e-05, module=8.08e-05, seed_layer=1.93e-05,
                          seed_module=2.83e-06, layer_module=5.14e-05, residual=4.28e-05)
REPS = 20000  # Clopper–Pearson 99 % bounds about ±0.004 at a coverage of 0.95, ±0.008 at 0.75


def _cube(seed: int = 0, comps: I.Components = DEFAULT_R4, design=DESIGN, mean: float = 0.011) -> np.ndarray:
    y, _ = I._draw(design, comps, 1, np.random.default_rng(seed), np.ones(design, bool), "design")
    return y[0] + mean


# --------------------------------------------------------------------------------------------- geo_mean
def test_geo_mean_and_its_refusals():
    assert I.geo_mean([1.0, 4.0, 16.0]) == pytest.approx(4.0, rel=1e-15)
    rows = np.array([[1.0, 100.0], [2.0, 8.0]])
    np.testing.assert_allclose(I.geo_mean(rows, axis=1), [10.0, 4.0], rtol=1e-15)
    for bad in ([1.0, 0.0], [2.0, -1.0], [1.0, np.nan], [1.0, np.inf], []):
        with pytest.raises(UserError, match="geo_mean"):
            I.geo_mean(bad)


# --------------------------------------------------------------------------------------------- intervals
def test_t_interval_on_seed_means_by_hand():
    x = np.zeros((3, 2, 2))
    x[0], x[1], x[2] = 1.0, 2.0, 6.0  # seed means 1, 2, 6: mean 3, sd √7
    x[2, 0, 0] = np.nan  # a missing cell: seed 2's mean is over its 3 other cells, still 6
    iv = I.t_interval_seed_means(x)
    half = stats.t.ppf(0.975, 2) * math.sqrt(7) / math.sqrt(3)
    assert (iv.estimate, iv.lo, iv.hi) == pytest.approx((3.0, 3 - half, 3 + half), rel=1e-14)
    assert isinstance(iv, Interval) and iv.method == "t-interval on 3 seed means (2 df)"
    assert iv.as_dict()["coverage"] is None and iv.level == 0.95
    one = I.t_interval_seed_means(x[:1])  # one seed: no interval, and a rule sees "one unit"
    assert one.lo == -math.inf and one.hi == math.inf and one.method.startswith("one unit")
    with pytest.raises(UserError, match="seeds, layers, modules"):
        I.t_interval_seed_means(x[0])
    with pytest.raises(UserError, match="level"):
        I.interval(x, level=95)
    with pytest.raises(UserError, match="method"):
        I.interval(x, "jackknife")
    x[1] = np.nan  # a seed without cells: the t-interval uses the two others, a bootstrap over seeds refuses
    assert I.t_interval_seed_means(x).estimate == pytest.approx(3.5, rel=1e-15)
    with pytest.raises(UserError, match="every resampled unit"):
        I.interval(x, "bootstrap_seeds")


def test_seed_bootstrap_is_the_range_of_three_seed_means():
    """The issue's Claim 4 finding: a percentile bootstrap over 3 seeds returns the min and max of the seed
    means. Our vectorised ideal bootstrap gives what tables.aggregate.bootstrap_ci gives with 4000 draws."""
    x = _cube(1)
    means = x.mean(axis=(1, 2))
    ours = I.interval(x, "bootstrap_seeds")
    theirs = bootstrap_ci(x.ravel(), units=np.repeat([0, 1, 2], 12))
    assert (ours.lo, ours.hi) == pytest.approx((means.min(), means.max()), rel=1e-14)
    assert (theirs.lo, theirs.hi) == pytest.approx((means.min(), means.max()), rel=1e-14)
    t = I.t_interval_seed_means(x)
    assert t.lo < ours.lo and ours.hi < t.hi  # the honest interval is much wider


# --------------------------------------------------------------------------------------------- ANOVA
def test_mean_squares_have_the_expected_values_of_the_random_model():
    """E[MS] of every term (the identities the method-of-moments components solve), averaged over 4000 draws
    of a 4 × 5 × 3 design with every component nonzero, within 4 standard errors of the average."""
    comps = I.Components(seed=0.7, layer=0.5, module=0.9, seed_layer=0.3, seed_module=0.2, layer_module=0.4,
                         residual=1.0)
    S, L, M = 4, 5, 3
    y, _ = I._draw((S, L, M), comps, 4000, np.random.default_rng(3), np.ones((S, L, M), bool), "design")
    ms, df, _ = I._mean_squares(y, 0)
    c = comps
    expected = {"residual": c.residual, "seed_layer": c.residual + M * c.seed_layer,
                "seed_module": c.residual + L * c.seed_module,
                "layer_module": c.residual + S * c.layer_module,
                "seed": c.residual + M * c.seed_layer + L * c.seed_module + L * M * c.seed,
                "layer": c.residual + M * c.seed_layer + S * c.layer_module + S * M * c.layer,
                "module": c.residual + L * c.seed_module + S * c.layer_module + S * L * c.module}
    for t in I.TERMS:
        se = ms[t].std(ddof=1) / math.sqrt(len(ms[t]))
        assert abs(ms[t].mean() - expected[t]) < 4 * se, t
    assert df == {"seed": 3, "layer": 4, "module": 2, "seed_layer": 12, "seed_module": 6, "layer_module": 8,
                  "residual": 24}
    # the sums of squares add up to the total: each MS × df, summed, is Σ (y − ȳ)²
    total = ((y - y.mean(axis=(1, 2, 3), keepdims=True)) ** 2).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(sum(ms[t] * df[t] for t in I.TERMS), total, rtol=1e-12)


def test_variance_components_recover_a_large_design_and_fill_a_missing_cell():
    comps = I.Components(seed=2.0, layer=1.0, seed_layer=0.5, residual=0.25)
    est = I.variance_components(_cube(0, comps, (30, 20, 4), 0.0))
    # SE of a component ≈ √(2/df) × its E[MS] / multiplier: 0.53 for seed (29 df), 0.18 for layer, 0.07 for
    # seed × layer, 0.02 for the residual; we allow 4 SE
    assert est.seed == pytest.approx(2.0, abs=2.1) and est.layer == pytest.approx(1.0, abs=0.7)
    assert est.seed_layer == pytest.approx(0.5, abs=0.3) and est.residual == pytest.approx(0.25, abs=0.08)
    assert min(est.as_dict().values()) >= 0  # clipped
    # exactly additive data (two-way model, no residual): the filled cell is its least-squares value, exactly
    rng = np.random.default_rng(5)
    a, b, c = rng.normal(size=(3, 1, 1)), rng.normal(size=(1, 6, 1)), rng.normal(size=(1, 1, 2))
    ab, bc = rng.normal(size=(3, 6, 1)), rng.normal(size=(1, 6, 2))
    y = a + b + c + ab + bc
    gap = y.copy()
    gap[1, 2, 0] = np.nan
    out = I.anova(gap)
    assert out.n_missing == 1 and out.df["residual"] == 9
    assert out.mean_squares["residual"] == pytest.approx(0.0, abs=1e-24)
    assert out.grand_mean == pytest.approx(y.mean(), abs=1e-12)
    with pytest.raises(UserError, match="at least 2"):
        I.anova(y[:, :, :1])
    gap[:, 3, 1] = np.nan
    with pytest.raises(UserError, match=r"\(layer, module\) margin"):
        I.anova(gap)
    with pytest.raises(UserError, match="components.seed"):
        I.Components(seed=-1.0)


# --------------------------------------------------------------------------------------------- coverage
def test_coverage_at_the_default_design():
    """The issue's bar: simulated coverage at nominal 0.95 whose upper 99 % bound is below 0.93 is a defect.
    The percentile bootstrap over 3 seeds covers 1 − 2/8 = 75 % (the issue measured 74 %) and fails it; the
    t-interval on the seed means passes, with and without two missing cells."""
    boot = I.simulate_coverage("bootstrap_seeds", DESIGN, DEFAULT_R4, reps=REPS, rng_seed=0)
    assert boot.lo <= 0.75 <= boot.hi and boot.hi < 0.93
    assert abs(boot.rate - 0.74) < 0.02  # the issue's figure, within its own Monte Carlo error
    t = I.simulate_coverage("t_seed_means", DESIGN, DEFAULT_R4, reps=REPS, rng_seed=0)
    assert t.hi >= 0.93 and t.lo <= 0.95 <= t.hi
    present = np.ones(DESIGN, bool)
    present[0, 2, 1] = present[1, 4, 0] = False
    gaps = I.simulate_coverage("t_seed_means", DESIGN, DEFAULT_R4, reps=REPS, rng_seed=0, present=present)
    assert gaps.hi >= 0.93


def test_coverage_depends_on_the_estimand():
    """Layers and modules as a population (target θ): the seed-mean t-interval ignores their spread and covers
    far too little; the variance-components (Satterthwaite) interval covers at least its level."""
    pop = dict(reps=4000, rng_seed=1, target="population")
    assert I.simulate_coverage("t_seed_means", DESIGN, DEFAULT_R4, **pop).hi < 0.93
    assert I.simulate_coverage("satterthwaite", DESIGN, DEFAULT_R4, **pop).lo >= 0.93
    # the issue: 6 layers as units with seed effects covers ~68 %
    seeded = I.Components(seed=0.5, layer=1.0, residual=1.0)
    assert I.simulate_coverage("bootstrap_layers", DESIGN, seeded, **pop).hi < 0.93
    with pytest.raises(UserError, match="target"):
        I.simulate_coverage("t_seed_means", DESIGN, target="layers")
    with pytest.raises(UserError, match="design"):
        I.simulate_coverage("t_seed_means", (3, 6))


def test_calibrated_interval_carries_its_coverage():
    iv, cov = I.calibrated_interval(_cube(2), reps=4000)
    assert iv.coverage == cov.rate and cov.hi >= 0.93
    assert set(iv.as_dict()) == {"estimate", "lo", "hi", "level", "method", "coverage"}


# --------------------------------------------------------------------------------------------- power
def test_power_matches_the_noncentral_t():
    """P(lower bound > threshold) for the seed-mean t-interval is P(T' > t_{0.975, 2}) with T' noncentral t,
    2 df, noncentrality (effect − threshold) / (σ_seed-mean / √3)."""
    effect, threshold = 0.0139, 0.0
    sim = I.simulate_power(lambda iv: iv.lo > threshold, effect, DESIGN, DEFAULT_R4, reps=REPS, rng_seed=0)
    sd = math.sqrt(DEFAULT_R4.seed_mean_variance(6, 2))
    exact = stats.nct.sf(stats.t.ppf(0.975, 2), 2, (effect - threshold) / (sd / math.sqrt(3)))
    assert sim.lo <= exact <= sim.hi
    at_null = I.simulate_power(lambda iv: iv.lo > threshold, 0.0, DESIGN, DEFAULT_R4, reps=REPS, rng_seed=0)
    assert at_null.lo <= 0.025 <= at_null.hi  # the one-sided error rate
    with pytest.raises(UserError, match="rule"):
        I.simulate_power(lambda iv: iv.lo[:1] > 0, effect, DESIGN, DEFAULT_R4, reps=100)


# --------------------------------------------------------------------------------------------- two questions
def test_fraction_of_way_and_the_papers_effect():
    assert I.PAPER_F[4] == pytest.approx(0.0139, abs=5e-5)
    assert I.PAPER_F[64] == pytest.approx(0.0420, abs=5e-5)
    x = I.from_fraction(I.PAPER_F[4], 0.02, 21.67)
    assert x == pytest.approx(0.32, rel=1e-12)
    assert I.fraction_of_way(x, 0.02, 21.67) == pytest.approx(I.PAPER_F[4], rel=1e-12)
    np.testing.assert_allclose(I.fraction_of_way([1.0, 3.0], [1.0, 1.0], [5.0, 3.0]), [0.0, 1.0])
    with pytest.raises(UserError, match="x_top > x_random"):
        I.fraction_of_way(1.0, 2.0, 2.0)


def test_two_question_outcomes_by_hand():
    star = 0.014

    def v(lo, hi, **kw):
        return I.two_question(Interval(0.5 * (lo + hi), lo, hi, 0.95, "t"), star, **kw)

    assert v(-0.002, 0.01) == I.NOISE and v(-0.01, -0.001) == I.NOISE
    assert v(0.001, 0.01) == I.MODEST
    assert v(0.001, 0.02) == I.PAPER_SIZED and v(0.02, 0.03) == I.PAPER_SIZED
    assert v(-0.001, 0.02) == I.INCONCLUSIVE
    assert v(0.3, 0.6, f_max=0.25) == I.W_ALIGNED and v(0.3, 0.6) == I.PAPER_SIZED
    assert v(0.01, 0.6, f_max=0.25) == I.INCONCLUSIVE
    assert v(0.001, 0.01, paper_fraction=0.5) == I.PAPER_SIZED  # f★ = 0.007 is reached
    many = I.Intervals(np.zeros(2), np.array([-1.0, 0.001]), np.array([0.01, 0.01]), 0.95, "t")
    many = I.two_question(many, star)
    assert many.tolist() == [I.NOISE, I.MODEST]
    with pytest.raises(UserError, match="f_max"):
        v(0.0, 0.1, f_max=0.01)


def test_noise_modest_and_paper_sized_get_three_verdicts():
    """At the default run's r=4 components a null, half the paper's and the paper's own f get their own
    verdict in most simulated runs once there are 5 seeds; at 3 seeds noise and the paper are told apart, but
    a modest effect of half the paper's is called "modest" in under half the runs (power, stated)."""
    star = I.PAPER_F[4]

    def share(effect, seeds, verdict):
        out = I.simulate_outcomes(lambda iv: I.two_question(iv, star), effect, (seeds, 6, 2), DEFAULT_R4,
                                  reps=4000, rng_seed=0)
        return out[verdict].rate if verdict in out else 0.0

    assert share(0.0, 5, I.NOISE) > 0.93 and share(star / 2, 5, I.MODEST) > 0.9
    assert share(star, 5, I.PAPER_SIZED) > 0.93
    assert share(0.0, 3, I.NOISE) > 0.9 and share(star, 3, I.PAPER_SIZED) > 0.9
    assert share(star / 2, 3, I.MODEST) < 0.5


# --------------------------------------------------------------------------------------------- multiplicity
P = [0.01, 0.04, 0.03, 0.005]


def test_holm_and_bh_by_hand():
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max
    np.testing.assert_allclose(I.holm(P), [0.03, 0.06, 0.06, 0.02], rtol=1e-15)
    # BH: sorted times 4/1, 4/2, 4/3, 4/4 = 0.02, 0.02, 0.04, 0.04 -> running min from the top
    np.testing.assert_allclose(I.benjamini_hochberg(P), [0.02, 0.04, 0.04, 0.02], rtol=1e-15)
    # where the step-up matters: 0.04, 0.04, 0.028, 0.5 -> the third's 0.028 carries down to the first two
    np.testing.assert_allclose(I.benjamini_hochberg([0.01, 0.02, 0.021, 0.5]), [0.028, 0.028, 0.028, 0.5],
                               rtol=1e-14)
    assert sum(p <= 0.05 for p in P) == 4 and int((I.holm(P) <= 0.05).sum()) == 2  # Holm keeps 2 of 4
    assert I.holm([0.02, 0.3]).tolist() == [0.04, 0.3] and I.holm([0.6, 0.7]).max() == 1.0  # capped at 1
    with pytest.raises(UserError, match="p-values"):
        I.holm([0.1, np.nan])
    p = I.p_value_seed_means(_cube(4, mean=0.011))
    assert 0 < p < 0.05  # the same data whose t-interval excludes 0
    assert I.t_interval_seed_means(_cube(4, mean=0.011)).lo > 0


def test_holm_and_bh_agree_with_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    p = np.random.default_rng(0).uniform(0, 0.2, size=12)
    np.testing.assert_allclose(I.holm(p), multitest.multipletests(p, method="holm")[1], rtol=1e-12)
    bh = multitest.multipletests(p, method="fdr_bh")[1]
    np.testing.assert_allclose(I.benjamini_hochberg(p), bh, rtol=1e-12)


# --------------------------------------------------------------------------------------------- sampled nulls
D = 384  # MiniLM's d


@pytest.fixture(scope="module")
def projection_nulls():
    # draws sized so that the Monte Carlo SE of geo-mean / RMS is about 0.002-0.003 at each k
    return {k: I.sampled_projection_null(np.ones(D), k, d_out=D, d_in=D, n=n, rng_seed=k)
            for k, n in ((1, 40000), (2, 16000), (4, 8000))}


def test_small_k_projection_null_is_below_the_rms(projection_nulls):
    """The issue: the geometric mean of sampled random pairs is 0.53×, 0.87×, 0.96× the analytic RMS at
    k = 1, 2, 4 (d = 384). The d → ∞ limit is √chi2_geo_ratio(k²) = 0.530, 0.874, 0.969: the issue's 0.96 is
    0.969 truncated (or from few draws). k = 1 is exact: (uᵀv)² ~ Beta(½, (d−1)/2), so
    geo / RMS = √d exp(½(ψ(½) − ψ(d/2)))."""
    exact_k1 = math.sqrt(D) * math.exp(0.5 * (special.digamma(0.5) - special.digamma(D / 2)))
    assert abs(projection_nulls[1].ratio - exact_k1) < 4 * projection_nulls[1].ratio_se
    for k, issue in ((1, 0.53), (2, 0.87), (4, 0.96)):
        s = projection_nulls[k]
        limit = math.sqrt(I.chi2_geo_ratio(k * k))
        # 4 MC SE, plus the O(1/d) finite-d correction (exactly a factor 1 + 1/(2d) at k = 1)
        assert abs(s.ratio - limit) < 4 * s.ratio_se + limit / D, k
        # the issue's two-decimal figures: rounding (0.005) + k = 4's truncation (0.01) + 3 MC SE
        assert abs(s.ratio - issue) < (0.005 if k < 4 else 0.01) + 3 * s.ratio_se, k
        # the mean of squares is the RMS², exactly in expectation (SE from the squares' spread)
        sq = I.projection_null_draws(np.ones(D), k, d_out=D, d_in=D, n=4000, rng_seed=k + 10) ** 2
        assert abs(sq.mean() - s.analytic ** 2) < 4 * sq.std(ddof=1) / math.sqrt(len(sq)), k
    assert projection_nulls[1].ratio < 0.6  # the RMS null overstates a typical random pair by > 1.6× at k = 1
    assert projection_nulls[1].quantiles[0.5] < projection_nulls[1].analytic


def test_projection_null_agrees_with_the_torch_sampler():
    """The spectrum-only numpy sampler against metrics.projection.sampled_random_projection (U, V formed by
    QR) on an anisotropic 40 × 30 W: means within 4 combined standard errors."""
    import torch

    from lora_analysis.metrics.projection import sampled_random_projection

    g = torch.Generator().manual_seed(1)
    W = torch.randn(40, 30, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, 30)
    sv = torch.linalg.svdvals(W).numpy()
    ours = I.projection_null_draws(sv, 3, d_out=40, d_in=30, n=8000, rng_seed=0)
    theirs = sampled_random_projection(W, 3, n=1000, seed=0)
    se = math.hypot(ours.std(ddof=1) / math.sqrt(len(ours)), theirs.sd / math.sqrt(theirs.n))
    assert abs(ours.mean() - theirs.mean) < 4 * se
    both = I.projection_null_draws(np.stack([sv, 2 * sv]), 3, d_out=40, d_in=30, n=50)
    np.testing.assert_allclose(both[1], 2 * both[0], rtol=1e-13)  # a batch of W's shares the draws
    with pytest.raises(UserError, match="singular_values"):
        I.projection_null_draws(np.ones(41), 3, d_out=40, d_in=30)


def test_small_k_phi_null():
    """φ(1, 1) of random directions is Beta(½, (d−1)/2): mean 1/d (random_phi_expected), geometric mean
    exp(ψ(½) − ψ(d/2)) ≈ 0.28/d; at (4, 4) the mean is still 4/d and the geo-mean 0.94× of it."""
    from lora_analysis.metrics.subspace import random_phi_expected

    s = I.sampled_phi_null(1, 1, d=D, n=20000, rng_seed=0)
    assert s.analytic == float(random_phi_expected(1, 1, d=D)[0, 0])
    draws = I.phi_null_draws(1, 1, d=D, n=20000, rng_seed=0)
    assert abs(s.mean - 1 / D) < 4 * draws.std(ddof=1) / math.sqrt(len(draws))
    exact = math.exp(special.digamma(0.5) - special.digamma(D / 2))
    assert abs(s.geo_mean - exact) < 4 * s.geo_mean * s.sd_log / math.sqrt(s.n)
    assert s.ratio < 0.3
    s4 = I.sampled_phi_null(4, 4, d=D, n=4000, rng_seed=1)
    assert abs(s4.ratio - I.chi2_geo_ratio(16)) < 4 * s4.ratio_se + s4.ratio * 16 / D
    with pytest.raises(UserError, match="i:"):
        I.phi_null_draws(0, 1, d=D)

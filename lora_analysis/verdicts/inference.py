"""The statistics verdicts call: intervals with the training run as the unit, their simulated coverage and
power, a two-question rule for positive claims, multiplicity control and sampled small-k nulls.

Pure numpy/scipy on plain arrays: no I/O, no tables. Data for one statistic are shaped ``(S, L, M)`` =
(seeds, layers, modules), e.g. 3 × 6 × 2 for MiniLM's six layers and ΔW_q, ΔW_v; NaN marks a missing cell.

**The model** every simulation draws from (all terms independent, zero-mean normal, variances in
:class:`Components`)::

    y[s, l, m] = θ + a_s + b_l + c_m + (ab)_sl + (ac)_sm + (bc)_lm + e_slm

**What an interval is for.** The default *estimand* (``target="design"``) is this model's mean over its own
layers and modules, in expectation over training runs: ``θ + mean_l b_l + mean_m c_m + mean_lm (bc)_lm``. The
layers and weight types are fixed features of the model being judged; only the training run is replicated, so
layer, module and layer × module effects are part of the truth, not noise. With ``target="population"`` the
estimand is θ (layers and modules as draws from a population): only a variance-components interval
(:func:`satterthwaite_interval`) is built for that.

**Why seeds.** Cells of one training run share its randomness, so a seed is the unit of replication. A
percentile bootstrap over 3 seeds returns the range of the 3 seed means (each "same seed three times" resample
has probability 1/27 > 2.5 %) and covers 1 − 2·(1/2)³ = 75 % at nominal 95 %; the t-interval on the seed means
(:func:`t_interval_seed_means`) is exact for normal seed means. In a balanced design it equals the
variance-components interval for the design estimand: ``Var(ȳ) = E[MS_seed] / (S L M)`` with S − 1 df.

Everything vectorises over leading axes: a simulation draws ``(reps, S, L, M)`` at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from itertools import combinations_with_replacement
from typing import Literal

import numpy as np
from scipy import special, stats

from lora.errors import UserError
from lora_analysis.tables.aggregate import Interval, binomial_ci

__all__ = [
    "INCONCLUSIVE",
    "METHODS",
    "MODEST",
    "NOISE",
    "PAPER_F",
    "PAPER_SIZED",
    "W_ALIGNED",
    "Anova",
    "CalibratedInterval",
    "Components",
    "Intervals",
    "SampledNull",
    "Simulated",
    "anova",
    "benjamini_hochberg",
    "calibrated_interval",
    "chi2_geo_ratio",
    "fraction_of_way",
    "from_fraction",
    "geo_mean",
    "holm",
    "interval",
    "null_summary",
    "p_value_seed_means",
    "phi_null_draws",
    "projection_null_draws",
    "sampled_phi_null",
    "sampled_projection_null",
    "satterthwaite_interval",
    "simulate_coverage",
    "simulate_outcomes",
    "simulate_power",
    "t_interval_seed_means",
    "two_question",
    "variance_components",
]

Target = Literal["design", "population"]
Design = tuple[int, int, int]
CHUNK = 4096  # simulated datasets per batch: bounds memory (the layer bootstrap holds CHUNK × 462 statistics)
BOUNDS_LEVEL = 0.99  # Clopper–Pearson level of a simulated coverage or power
EXACT_BOOTSTRAP_MAX = 5000  # enumerate every resample up to this many distinct ones, else draw N_BOOT of them
N_BOOT = 4000  # as lora_analysis.tables.aggregate.bootstrap_ci


# --------------------------------------------------------------------------------------------- small helpers
def geo_mean(x: Sequence[float] | np.ndarray, axis: int | None = None) -> float | np.ndarray:
    """Geometric mean ``exp(mean(log x))`` (over ``axis``, default all values), in float64.

    Raises :class:`~lora.errors.UserError` naming the first bad value when any value is ≤ 0 or not finite (a
    log of 0 would silently give 0, of a negative NaN), or when there is nothing to average.
    """
    a = np.asarray(x, dtype=np.float64)
    if a.size == 0:
        raise UserError("geo_mean: no values to average")
    bad = ~(np.isfinite(a) & (a > 0))
    if bad.any():
        raise UserError(f"geo_mean: needs positive finite values, got {int(bad.sum())} that are not "
                        f"(first: {a[bad].flat[0]!r})")
    out = np.exp(np.log(a).mean(axis=axis))
    return float(out) if np.ndim(out) == 0 else out


def _as_cube(x: Sequence | np.ndarray, name: str) -> np.ndarray:
    y = np.asarray(x, dtype=np.float64)
    if y.ndim != 3:
        raise UserError(f"{name}: needs an array shaped (seeds, layers, modules), got shape {y.shape}")
    if np.isinf(y).any():
        raise UserError(f"{name}: infinite values (NaN marks a missing cell; inf is not one)")
    if not np.isfinite(y).any():
        raise UserError(f"{name}: no finite cell")
    return y


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise UserError(f"level: needs 0 < level < 1, got {level!r}")


# --------------------------------------------------------------------------------------------- intervals
@dataclass(frozen=True)
class CalibratedInterval(Interval):
    """An :class:`~lora_analysis.tables.aggregate.Interval` that also carries ``coverage``: the simulated
    coverage of its method at the design it was computed on (``None`` until simulated)."""

    coverage: float | None = None

    def as_dict(self) -> dict:
        return {**super().as_dict(), "coverage": self.coverage}


@dataclass(frozen=True)
class Intervals:
    """Many intervals at once (one per simulated dataset): arrays of one shape, as a decision rule receives
    them. A rule written with numpy operations on ``lo``/``hi`` works on an :class:`Interval` as well."""

    estimate: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    level: float
    method: str


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def _seed_means(y: np.ndarray) -> np.ndarray:
    """Mean over layer × module within each seed, ``(..., S)``; NaN for a seed without cells."""
    ok = np.isfinite(y)
    return _safe_div(np.where(ok, y, 0.0).sum(axis=(-2, -1)), ok.sum(axis=(-2, -1)))


def _t_seed_means(y: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """t-interval on the seed means: ``m̄ ± t_{1−α/2, n−1} · sd(m) / √n`` with n the seeds that have cells.
    Fewer than two seeds: ``(−inf, inf)``."""
    m = _seed_means(y)
    ok = np.isfinite(m)
    n = ok.sum(axis=-1)
    est = _safe_div(np.where(ok, m, 0.0).sum(axis=-1), n)
    dev = np.where(ok, m - est[..., None], 0.0)
    sd = np.sqrt(_safe_div((dev * dev).sum(axis=-1), n - 1))
    half = stats.t.ppf(0.5 + level / 2, np.maximum(n - 1, 1)) * sd / np.sqrt(np.maximum(n, 1))
    half = np.where(n >= 2, half, np.inf)
    return est, est - half, est + half


@lru_cache(maxsize=16)
def _resamples(units: int) -> tuple[np.ndarray, np.ndarray]:
    """Every distinct bootstrap resample of ``units`` units as counts ``(C, units)`` with its multinomial
    probability ``units! / ∏ c_i! / units^units`` (the ideal bootstrap, n_boot → ∞); beyond
    ``EXACT_BOOTSTRAP_MAX`` resamples, ``N_BOOT`` seeded draws of weight ``1 / N_BOOT``."""
    if math.comb(2 * units - 1, units) <= EXACT_BOOTSTRAP_MAX:
        draws = combinations_with_replacement(range(units), units)
        counts = np.array([np.bincount(c, minlength=units) for c in draws], dtype=np.float64)
        logp = special.gammaln(units + 1) - special.gammaln(counts + 1).sum(axis=1) - units * math.log(units)
        return counts, np.exp(logp)
    counts = np.random.default_rng(0).multinomial(units, np.full(units, 1.0 / units), size=N_BOOT)
    return counts.astype(np.float64), np.full(N_BOOT, 1.0 / N_BOOT)


def _weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs: Sequence[float]) -> list[np.ndarray]:
    """Inverse-CDF quantiles along the last axis of ``values``, whose columns carry ``weights`` (sum 1)."""
    order = np.argsort(values, axis=-1)
    v = np.take_along_axis(values, order, axis=-1)
    cdf = np.cumsum(weights[order], axis=-1)
    # 1e-12: the weights sum to 1 within ~C ulps; a quantile exactly at a step must take that step
    at = [np.argmax(cdf >= q - 1e-12, axis=-1)[..., None] for q in qs]
    return [np.take_along_axis(v, i, axis=-1)[..., 0] for i in at]


def _ideal_bootstrap(sums: np.ndarray, counts: np.ndarray, level: float) -> tuple[np.ndarray, ...]:
    """Percentile interval of the pooled mean ``Σ sums / Σ counts`` when units (last axis) are resampled, as
    :func:`~lora_analysis.tables.aggregate.bootstrap_ci` does with ``units``, in its n_boot → ∞ limit."""
    comp, w = _resamples(sums.shape[-1])
    boot = _safe_div(sums @ comp.T, counts @ comp.T)
    alpha = (1 - level) / 2
    lo, hi = _weighted_quantiles(boot, w, (alpha, 1 - alpha))
    return _safe_div(sums.sum(-1), counts.sum(-1)), lo, hi


def _bootstrap_over(axis: int) -> Callable[[np.ndarray, float], tuple[np.ndarray, ...]]:
    keep = {-3: (-2, -1), -2: (-3, -1)}[axis]

    def method(y: np.ndarray, level: float) -> tuple[np.ndarray, ...]:
        ok = np.isfinite(y)
        sums, counts = np.where(ok, y, 0.0).sum(axis=keep), ok.sum(axis=keep).astype(np.float64)
        return _ideal_bootstrap(sums, counts, level)

    return method


# --------------------------------------------------------------------------- ANOVA and variance components
@dataclass(frozen=True)
class Components:
    """Variance components (variances, not SDs) of the seed × layer × module model in the module docstring."""

    seed: float = 0.0
    layer: float = 0.0
    module: float = 0.0
    seed_layer: float = 0.0
    seed_module: float = 0.0
    layer_module: float = 0.0
    residual: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not (math.isfinite(v) and v >= 0):
                raise UserError(f"components.{f.name}: a variance must be finite and >= 0, got {v!r}")

    def seed_mean_variance(self, n_layers: int, n_modules: int) -> float:
        """Variance of one seed's mean over L × M cells about the design estimand:
        ``σ²_seed + σ²_seed×layer / L + σ²_seed×module / M + σ²_residual / (L M)``."""
        return (self.seed + self.seed_layer / n_layers + self.seed_module / n_modules
                + self.residual / (n_layers * n_modules))

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


TERMS = ("seed", "layer", "module", "seed_layer", "seed_module", "layer_module", "residual")


@dataclass(frozen=True)
class Anova:
    """The three-way ANOVA of one ``(S, L, M)`` array (one observation per cell, so the residual is the
    three-way interaction): mean squares and degrees of freedom per term of :data:`TERMS`, the
    method-of-moments components (clipped at 0), the grand mean and how many missing cells were filled."""

    mean_squares: dict[str, float]
    df: dict[str, int]
    components: Components
    grand_mean: float
    n_missing: int


def _two_way_fit(z: np.ndarray) -> tuple[np.ndarray, ...]:
    """Fitted values of the all-two-way-interactions model and the marginal means it is built from."""
    g = z.mean(axis=(-3, -2, -1), keepdims=True)
    ms, ml, mm = (z.mean(axis=a, keepdims=True) for a in ((-2, -1), (-3, -1), (-3, -2)))
    msl, msm, mlm = (z.mean(axis=a, keepdims=True) for a in (-1, -2, -3))
    return msl + msm + mlm - ms - ml - mm + g, g, ms, ml, mm, msl, msm, mlm


def _impute(y: np.ndarray) -> np.ndarray:
    """Missing cells filled with their least-squares values under the all-two-way model (Yates's missing-plot
    technique): the filled cells then add nothing to the residual sum of squares, and the residual loses one
    degree of freedom per filled cell.

    The fill ``z`` is the fixed point ``z = (H ỹ)_miss`` of the model's hat matrix H (``ỹ``: the data with
    ``z`` in the gaps), solved directly: ``(I − H_mm) z = H_mo y_obs``, one small system per pattern of gaps
    (a simulation has one pattern for every dataset).
    """
    miss = np.isnan(y)
    if not miss.any():
        return y
    S, L, M = y.shape[-3:]
    n = S * L * M
    hat = _two_way_fit(np.eye(n).reshape(n, S, L, M))[0].reshape(n, n)  # row j: fit of unit cell j; symmetric
    flat_y, flat_m = y.reshape(-1, n), miss.reshape(-1, n)
    out = np.where(flat_m, 0.0, flat_y)
    patterns, which = np.unique(flat_m, axis=0, return_inverse=True)
    for p, pattern in enumerate(patterns):
        rows, gaps = np.flatnonzero(which.ravel() == p), np.flatnonzero(pattern)
        if len(gaps) == 0:
            continue
        system = np.eye(len(gaps)) - hat[np.ix_(gaps, gaps)]
        try:
            fill = np.linalg.solve(system, hat[gaps] @ out[rows].T)  # gaps are 0 in out: H_mo y_obs
        except np.linalg.LinAlgError as exc:
            raise UserError("missing cells: their least-squares values are not determined (too many gaps)") \
                from exc
        out[np.ix_(rows, gaps)] = fill.T
    return out.reshape(y.shape)


def _mean_squares(y: np.ndarray, n_missing: int | np.ndarray) -> tuple[dict, dict, np.ndarray]:
    """Mean squares and df of every term of :data:`TERMS`, and the data with gaps filled (:func:`_impute`)."""
    S, L, M = y.shape[-3:]
    z = _impute(y)
    fit, g, ms, ml, mm, msl, msm, mlm = _two_way_fit(z)

    def ss(a: np.ndarray, k: int) -> np.ndarray:
        return k * (a * a).sum(axis=(-3, -2, -1))

    sums = {"seed": ss(ms - g, L * M), "layer": ss(ml - g, S * M), "module": ss(mm - g, S * L),
            "seed_layer": ss(msl - ms - ml + g, M), "seed_module": ss(msm - ms - mm + g, L),
            "layer_module": ss(mlm - ml - mm + g, S), "residual": ss(z - fit, 1)}
    df = {"seed": S - 1, "layer": L - 1, "module": M - 1, "seed_layer": (S - 1) * (L - 1),
          "seed_module": (S - 1) * (M - 1), "layer_module": (L - 1) * (M - 1),
          "residual": (S - 1) * (L - 1) * (M - 1) - n_missing}
    return {t: sums[t] / df[t] for t in TERMS}, df, z


def _components(ms: dict[str, np.ndarray], S: int, L: int, M: int) -> dict[str, np.ndarray]:
    """Method-of-moments (ANOVA) estimators from ``E[MS]`` of the random model, clipped at 0::

        E MS_res = σ²_e                E MS_sl = σ²_e + M σ²_sl     E MS_sm = σ²_e + L σ²_sm
        E MS_lm  = σ²_e + S σ²_lm      E MS_s  = σ²_e + M σ²_sl + L σ²_sm + L M σ²_s
        E MS_l   = σ²_e + M σ²_sl + S σ²_lm + S M σ²_l
        E MS_m   = σ²_e + L σ²_sm + S σ²_lm + S L σ²_m
    """
    e = ms["residual"]
    raw = {"seed": (ms["seed"] - ms["seed_layer"] - ms["seed_module"] + e) / (L * M),
           "layer": (ms["layer"] - ms["seed_layer"] - ms["layer_module"] + e) / (S * M),
           "module": (ms["module"] - ms["seed_module"] - ms["layer_module"] + e) / (S * L),
           "seed_layer": (ms["seed_layer"] - e) / M, "seed_module": (ms["seed_module"] - e) / L,
           "layer_module": (ms["layer_module"] - e) / S, "residual": e}
    return {t: np.maximum(v, 0.0) for t, v in raw.items()}


def _check_anova_design(y: np.ndarray, name: str) -> int:
    S, L, M = y.shape[-3:]
    if min(S, L, M) < 2:
        raise UserError(f"{name}: variance components need at least 2 seeds, layers and modules, "
                        f"got {S}×{L}×{M}")
    present = np.isfinite(y)
    for axes, what in (((-1,), "(seed, layer)"), ((-2,), "(seed, module)"), ((-3,), "(layer, module)")):
        if not present.any(axis=axes).all():
            raise UserError(f"{name}: a {what} margin has no cell at all: its effect cannot be estimated")
    n_missing = int((~present).sum(axis=(-3, -2, -1)).max())
    if (S - 1) * (L - 1) * (M - 1) - n_missing < 1:
        raise UserError(f"{name}: {n_missing} missing cells leave no degree of freedom for the residual")
    return n_missing


def anova(x: Sequence | np.ndarray) -> Anova:
    """Three-way random-effects ANOVA of ``x`` ``(S, L, M)`` (each of S, L, M at least 2); missing cells (NaN)
    are filled by :func:`_impute`, each costing the residual one degree of freedom. Components: see
    :func:`_components`."""
    y = _as_cube(x, "anova")
    n_missing = _check_anova_design(y, "anova")
    ms, df, z = _mean_squares(y, n_missing)
    comp = _components(ms, *y.shape)
    components = Components(**{t: float(v) for t, v in comp.items()})
    return Anova({t: float(v) for t, v in ms.items()}, df, components, float(z.mean()), n_missing)


def variance_components(x: Sequence | np.ndarray) -> Components:
    """The estimated seed, layer, module, two-way interaction and residual variances of ``x`` ``(S, L, M)``
    (method of moments, clipped at 0): ``anova(x).components``."""
    return anova(x).components


def _satterthwaite(y: np.ndarray, level: float) -> tuple[np.ndarray, ...]:
    """Interval for the population mean θ: ``ȳ ± t_{ν} √V̂`` with
    ``V̂ = σ̂²_s/S + σ̂²_l/L + σ̂²_m/M + σ̂²_sl/(SL) + σ̂²_sm/(SM) + σ̂²_lm/(LM) + σ̂²_e/(SLM)`` from the
    clipped components (never below the unclipped
    ``(MS_s + MS_l + MS_m − MS_sl − MS_sm − MS_lm + MS_e)/(SLM)``) and Satterthwaite's
    ``ν = (Σ c_i MS_i)² / Σ (c_i MS_i)² / df_i`` for that linear combination (at least 1)."""
    S, L, M = y.shape[-3:]
    ms, df, z = _mean_squares(y, np.isnan(y).sum(axis=(-3, -2, -1)))
    c = _components(ms, S, L, M)
    v = (c["seed"] / S + c["layer"] / L + c["module"] / M + c["seed_layer"] / (S * L)
         + c["seed_module"] / (S * M) + c["layer_module"] / (L * M) + c["residual"] / (S * L * M))
    sign = {"seed": 1, "layer": 1, "module": 1, "seed_layer": -1, "seed_module": -1, "layer_module": -1,
            "residual": 1}
    lin = sum(sign[t] * ms[t] for t in TERMS)
    nu = np.maximum(_safe_div(lin * lin, sum(ms[t] ** 2 / df[t] for t in TERMS)), 1.0)
    half = stats.t.ppf(0.5 + level / 2, nu) * np.sqrt(v)
    est = z.mean(axis=(-3, -2, -1))
    return est, est - half, est + half


METHODS: dict[str, Callable[[np.ndarray, float], tuple[np.ndarray, ...]]] = {
    "t_seed_means": _t_seed_means,
    "bootstrap_seeds": _bootstrap_over(-3),
    "bootstrap_layers": _bootstrap_over(-2),
    "satterthwaite": _satterthwaite,
}
DESCRIPTIONS = {
    "t_seed_means": "t-interval on {S} seed means ({df} df)",
    "bootstrap_seeds": "percentile bootstrap over {S} seeds",
    "bootstrap_layers": "percentile bootstrap over {L} layers",
    "satterthwaite": "variance components (seed, layer, module, interactions), Satterthwaite df",
}
"""Interval methods by name: ``f(y (..., S, L, M), level) -> (estimate, lo, hi)``, each shaped ``(...)``."""


def _method(method: str | Callable) -> tuple[Callable, str]:
    if callable(method):
        return method, getattr(method, "__name__", "custom")
    if method not in METHODS:
        raise UserError(f"method: {method!r} is not one of {sorted(METHODS)}")
    return METHODS[method], method


def _describe(name: str, y: np.ndarray) -> str:
    S, L, M = y.shape[-3:]
    n = int(np.isfinite(_seed_means(y)).sum())
    return DESCRIPTIONS.get(name, name).format(S=n if name == "t_seed_means" else S, L=L, M=M, df=n - 1)


def interval(x: Sequence | np.ndarray, method: str | Callable = "t_seed_means", *, level: float = 0.95,
             coverage: float | None = None) -> CalibratedInterval:
    """One interval of the mean of ``x`` ``(S, L, M)`` by ``method`` (a name in :data:`METHODS`).

    With fewer than two seeds that have cells the t-interval is ``(−inf, inf)`` and its method starts with
    ``"one unit:"`` (as :func:`~lora_analysis.tables.aggregate.bootstrap_ci` says it), so a rule can only call
    it inconclusive. ``coverage``: the simulated coverage to record (see :func:`calibrated_interval`).
    """
    _check_level(level)
    y = _as_cube(x, "interval")
    f, name = _method(method)
    if name in ("bootstrap_seeds", "bootstrap_layers") and not np.isfinite(y).any(
            axis=(-2, -1) if name == "bootstrap_seeds" else (-3, -1)).all():
        raise UserError(f"interval: {name} needs a cell in every resampled unit")
    if name == "satterthwaite":
        _check_anova_design(y, "interval")
    est, lo, hi = (float(v) for v in f(y, level))
    what = _describe(name, y)
    if not math.isfinite(hi - lo) and name == "t_seed_means":
        what = "one unit: a t-interval needs two seeds"
    return CalibratedInterval(est, lo, hi, level, what, coverage)


def t_interval_seed_means(x: Sequence | np.ndarray, *, level: float = 0.95) -> CalibratedInterval:
    """t-interval on per-seed means: ``m_s = mean over layer × module of x[s]`` (NaN cells skipped), then
    ``m̄ ± t_{1−α/2, n−1} · sd(m_s) / √n``. Exact when the seed means are i.i.d. normal; for the design
    estimand and balanced data it is the variance-components interval (``Var ȳ = E[MS_seed] / (S L M)``,
    S − 1 df)."""
    return interval(x, "t_seed_means", level=level)


def satterthwaite_interval(x: Sequence | np.ndarray, *, level: float = 0.95) -> CalibratedInterval:
    """Variance-components interval for the *population* mean θ (layers and modules drawn from a population),
    see :func:`_satterthwaite`. With 2 modules its df are few (the module term has 1 df) and it is wide."""
    return interval(x, "satterthwaite", level=level)


def p_value_seed_means(x: Sequence | np.ndarray, null: float = 0.0, *,
                       alternative: Literal["greater", "less", "two-sided"] = "greater") -> float:
    """p-value of the one-sample t-test on the seed means against ``null`` (the test dual to
    :func:`t_interval_seed_means`), for :func:`holm` / :func:`benjamini_hochberg`. NaN below two seeds."""
    m = _seed_means(_as_cube(x, "p_value_seed_means"))
    m = m[np.isfinite(m)]
    if len(m) < 2:
        return math.nan
    return float(stats.ttest_1samp(m, null, alternative=alternative).pvalue)


# --------------------------------------------------------------------------------------------- simulation
@dataclass(frozen=True)
class Simulated:
    """A simulated rate (coverage, power, or the share of one verdict) with its Clopper–Pearson bounds.

    Attributes:
        rate: hits / reps.
        lo, hi: the exact ``BOUNDS_LEVEL`` (99 %) interval of the true rate.
        reps: simulated datasets.
        what: what was simulated (method, design, target or effect).
    """

    rate: float
    lo: float
    hi: float
    reps: int
    what: str

    def as_dict(self) -> dict:
        return {"rate": self.rate, "lo": self.lo, "hi": self.hi, "level": BOUNDS_LEVEL, "reps": self.reps,
                "what": self.what}


def _simulated(hits: int, reps: int, what: str) -> Simulated:
    ci = binomial_ci(hits, reps, level=BOUNDS_LEVEL)
    return Simulated(hits / reps, ci.lo, ci.hi, reps, what)


def _check_design(design: Sequence[int], present: np.ndarray | None) -> tuple[Design, np.ndarray]:
    if len(design) != 3 or not all(isinstance(n, int | np.integer) and n >= 1 for n in design):
        raise UserError(f"design: needs (n_seeds, n_layers, n_modules), positive ints, got {tuple(design)!r}")
    d = (int(design[0]), int(design[1]), int(design[2]))
    mask = np.ones(d, dtype=bool) if present is None else np.asarray(present, dtype=bool)
    if mask.shape != d:
        raise UserError(f"present: shape {mask.shape} is not the design {d}")
    if not mask.any():
        raise UserError("present: no cell is present")
    return d, mask


def _draw(design: Design, comp: Components, n: int, rng: np.random.Generator, mask: np.ndarray,
          target: Target) -> tuple[np.ndarray, np.ndarray]:
    """``n`` datasets ``(n, S, L, M)`` from the model (θ = 0), NaN outside ``mask``, and their estimands."""
    S, L, M = design
    shapes = {"seed": (S, 1, 1), "layer": (1, L, 1), "module": (1, 1, M), "seed_layer": (S, L, 1),
              "seed_module": (S, 1, M), "layer_module": (1, L, M), "residual": (S, L, M)}
    y = np.zeros((n, S, L, M))
    fixed = np.zeros((n, 1, L, M))  # the layer, module and layer × module part: fixed features of the model
    for t in TERMS:  # drawn in TERMS order, zero components skipped: the same seed gives the same data
        var = getattr(comp, t)
        if var > 0:
            e = math.sqrt(var) * rng.standard_normal((n, *shapes[t]))
            y = y + e
            if t in ("layer", "module", "layer_module"):
                fixed = fixed + e
    cells = mask.any(axis=0)  # (L, M) cells of the design
    truth = fixed[:, 0][:, cells].mean(axis=-1) if target == "design" else np.zeros(n)
    return np.where(mask, y, np.nan), truth


def _simulate(method: str | Callable, design: Sequence[int], components: Components, level: float, reps: int,
              rng_seed: int, present: np.ndarray | None, target: Target, effect: float | None):
    """Yield ``(Intervals, truth)`` chunk by chunk (at most :data:`CHUNK` datasets each); with ``effect`` the
    data are shifted so that the estimand is exactly ``effect``."""
    _check_level(level)
    if target not in ("design", "population"):
        raise UserError(f"target: 'design' or 'population', got {target!r}")
    if not (isinstance(reps, int) and reps >= 1):
        raise UserError(f"reps: a positive int, got {reps!r}")
    d, mask = _check_design(design, present)
    f, name = _method(method)
    if name == "satterthwaite":
        _check_anova_design(np.where(mask, 0.0, np.nan), "design")
    rng = np.random.default_rng(rng_seed)
    done = 0
    while done < reps:
        n = min(CHUNK, reps - done)
        y, truth = _draw(d, components, n, rng, mask, target)
        if effect is not None:
            y, truth = y - truth[:, None, None, None] + effect, np.full(n, float(effect))
        est, lo, hi = f(y, level)
        yield Intervals(est, lo, hi, level, name), truth
        done += n


def simulate_coverage(method: str | Callable, design: Sequence[int] = (3, 6, 2),
                      components: Components = Components(), *, level: float = 0.95, reps: int = 20000,
                      rng_seed: int = 0, present: np.ndarray | None = None,
                      target: Target = "design") -> Simulated:
    """The share of ``reps`` datasets from the seed × layer × module model whose ``method`` interval contains
    the estimand (``target``, see the module docstring), with its Clopper–Pearson 99 % bounds.

    Args:
        method: a name in :data:`METHODS` or ``f(y (..., S, L, M), level) -> (estimate, lo, hi)``.
        design: ``(n_seeds, n_layers, n_modules)``.
        components: the variance components to draw from (e.g. :func:`variance_components` of the run).
        present: boolean ``design``-shaped mask of the cells the run has (default all).
        rng_seed: seeds the draws: the same arguments give the same result.

    Example: percentile bootstrap over 3 seeds about 0.75; t on seed means 0.95 (``tests/analysis/verdicts/
    test_inference.py``). 20,000 reps give 99 % bounds about ±0.004 at 0.95.
    """
    hits = 0
    for iv, truth in _simulate(method, design, components, level, reps, rng_seed, present, target, None):
        hits += int(((iv.lo <= truth) & (truth <= iv.hi)).sum())
    return _simulated(hits, reps, f"coverage of {_method(method)[1]} at {tuple(design)}, target {target}")


def simulate_outcomes(rule: Callable[[Intervals], np.ndarray], effect: float,
                      design: Sequence[int] = (3, 6, 2), components: Components = Components(), *,
                      method: str | Callable = "t_seed_means",
                      level: float = 0.95, reps: int = 20000, rng_seed: int = 0,
                      present: np.ndarray | None = None) -> dict[str, Simulated]:
    """How often each outcome of ``rule`` occurs when the design estimand is ``effect``.

    ``rule`` maps :class:`Intervals` (arrays, one per dataset) to an array of outcomes: strings (verdicts) or
    booleans (reported as ``"True"`` / ``"False"``). Returns ``{outcome: Simulated}`` for every outcome seen.
    """
    counts: dict[str, int] = {}
    for iv, _ in _simulate(method, design, components, level, reps, rng_seed, present, "design", effect):
        out = np.asarray(rule(iv))
        if out.shape != iv.lo.shape:
            raise UserError(f"rule: returned shape {out.shape}, needs one outcome per interval {iv.lo.shape}")
        for k, c in zip(*np.unique(out.astype(str), return_counts=True), strict=True):
            counts[str(k)] = counts.get(str(k), 0) + int(c)
    what = f"{_method(method)[1]} at {tuple(design)}, effect {effect:g}"
    return {k: _simulated(c, reps, f"'{k}' by {what}") for k, c in sorted(counts.items())}


def simulate_power(rule: Callable[[Intervals], np.ndarray], effect: float, design: Sequence[int] = (3, 6, 2),
                   components: Components = Components(), *, outcome: str | bool = True,
                   method: str | Callable = "t_seed_means", level: float = 0.95, reps: int = 20000,
                   rng_seed: int = 0, present: np.ndarray | None = None) -> Simulated:
    """The probability that ``rule`` returns ``outcome`` (``True`` for a boolean rule such as
    ``lambda iv: iv.lo > threshold``, or a verdict such as ``"paper-sized"``) when the design estimand is
    ``effect``: the power of a positive claim at the paper's effect, or of a negative claim against a stated
    departure. Same arguments as :func:`simulate_outcomes`."""
    out = simulate_outcomes(rule, effect, design, components, method=method, level=level, reps=reps,
                            rng_seed=rng_seed, present=present)
    key = str(outcome)
    if key in out:
        return out[key]
    return _simulated(0, reps, f"'{key}' by {_method(method)[1]} at {tuple(design)}, effect {effect:g}")


def calibrated_interval(x: Sequence | np.ndarray, method: str = "t_seed_means", *, level: float = 0.95,
                        reps: int = 20000, rng_seed: int = 0,
                        components: Components | None = None) -> tuple[CalibratedInterval, Simulated]:
    """The interval of ``x`` ``(S, L, M)`` with ``coverage`` simulated at x's own design and missing cells,
    from ``components`` (default: :func:`variance_components` of ``x``; residual only where x is too small for
    them). The estimand is the design mean, or θ for ``"satterthwaite"`` (the population mean it is built for).
    Returns the interval and the :class:`Simulated` coverage behind it (with its 99 % bounds)."""
    y = _as_cube(x, "calibrated_interval")
    if components is None:
        try:
            components = variance_components(y)
        except UserError:  # under 2 layers or modules: t on seed means needs no components (normal model)
            components = Components()
    present = np.isfinite(y)
    cov = simulate_coverage(method, y.shape, components, level=level, reps=reps, rng_seed=rng_seed,
                            present=present, target="population" if method == "satterthwaite" else "design")
    iv = interval(y, method, level=level, coverage=cov.rate)
    return iv, cov


# --------------------------------------------------------------------------------------------- two questions
NOISE, MODEST, PAPER_SIZED = "noise", "modest", "paper-sized"
W_ALIGNED, INCONCLUSIVE = "W-aligned", "inconclusive"
PAPER_F = {4: (0.32 - 0.02) / (21.67 - 0.02), 64: (1.90 - 0.33) / (37.71 - 0.33)}
"""The paper's ΔW_q as a fraction of the way from a random subspace to W_q's own top one (Table 7, GPT-3
layer 48: random 0.02, ΔW 0.32, W 21.67 at r=4; 0.33, 1.90, 37.71 at r=64): 0.0139 and 0.0420."""


def fraction_of_way(x, x_random, x_top):
    """``f = (x − x_random) / (x_top − x_random)``, elementwise: where ``x`` lies from a random subspace's
    value (f = 0) to W's own top subspace's (f = 1), a scale that does not depend on d.

    For Table 7 ``x = ‖UᵀWV‖_F`` with ΔW's top-k ``U, V``; ``x_random`` should be the *mean* of the sampled
    null (:func:`sampled_projection_null`), so that a random ΔW has E f = 0: the analytic root-mean-square
    sits above that mean (by Jensen, 20 % at k = 1), which would put a random ΔW below 0. Raises
    :class:`~lora.errors.UserError` where ``x_top <= x_random`` (no room between the two references).
    """
    x, lo, top = (np.asarray(v, dtype=np.float64) for v in (x, x_random, x_top))
    room = top - lo
    if not np.all(room > 0):
        raise UserError("fraction_of_way: W's own top subspace must project more than a random one "
                        "(x_top > x_random)")
    f = (x - lo) / room
    return float(f) if f.ndim == 0 else f


def from_fraction(f, x_random, x_top):
    """The inverse of :func:`fraction_of_way`: ``x = x_random + f (x_top − x_random)``, e.g. the paper's
    effect moved to this model's d and r (``f = PAPER_F[4]``); its margin over random is ``x / x_random``."""
    x = np.asarray(x_random, dtype=np.float64) + np.asarray(f, dtype=np.float64) * (
        np.asarray(x_top, dtype=np.float64) - np.asarray(x_random, dtype=np.float64))
    return float(x) if x.ndim == 0 else x


def two_question(iv: Interval | Intervals, f_paper: float, *, paper_fraction: float = 1.0,
                 f_max: float | None = None):
    """The two questions of a positive claim on the f scale (:func:`fraction_of_way`), asked of the interval
    ``[lo, hi]`` of mean f: *above the null (f = 0)?* and *as large as the paper
    (f★ = paper_fraction · f_paper)?*

    ============================================================  ==================
    interval                                                       verdict
    ============================================================  ==================
    ``lo > f_max``  (with ``f_max`` given)                          ``"W-aligned"``
    ``lo > 0``  and  ``hi < f★``                                    ``"modest"``
    ``lo > 0``  and  ``f★ <= hi``  (and ``hi <= f_max``, if given)  ``"paper-sized"``
    ``lo <= 0``  and  ``hi < f★``                                   ``"noise"``
    otherwise (``lo <= 0 < f★ <= hi``, or ``lo <= f_max < hi``)     ``"inconclusive"``
    ============================================================  ==================

    * ``noise``: the null is inside the interval (or the interval is below it) and the paper's effect is
      excluded: "does not hold".
    * ``modest``: above the null, and the whole interval below the paper's effect: a real effect weaker than
      the paper's (the "weaker" verdict, with both numbers).
    * ``paper-sized``: above the null and the interval reaches f★: consistent with the paper ("holds"). Its
      power at a true f★ is P(lo > 0) · ~0.975.
    * ``W-aligned``: the whole interval beyond ``f_max``: ΔW lies near W's *own* top subspace, the opposite of
      the paper's "directions W does not emphasise" (f = 1 is W's top subspace, the paper's ΔW 0.014–0.042):
      "does not hold".
    * ``inconclusive``: the interval straddles the null and f★ (noise and the paper are both possible), or
      ``f_max``.

    The outcomes are disjoint and exhaustive, and a noise (f = 0), a modest (0 < f ≪ f★) and a paper-sized
    (f ≈ f★) effect get three different verdicts once the interval is narrower than f★ / 2; how often, at a
    design, is :func:`simulate_outcomes` with this rule. Works elementwise on :class:`Intervals`: returns an
    array of verdicts there, a string for one interval.
    """
    star = paper_fraction * f_paper
    if not star > 0:
        raise UserError(f"two_question: the paper's effect f★ = {star!r} must be > 0")
    if f_max is not None and not f_max > star:
        raise UserError(f"two_question: f_max = {f_max!r} must exceed the paper's effect f★ = {star:g}")
    lo, hi = np.asarray(iv.lo, dtype=np.float64), np.asarray(iv.hi, dtype=np.float64)
    cap = np.inf if f_max is None else f_max
    cases = [lo > cap, (lo > 0) & (hi < star), (lo > 0) & (hi >= star) & (hi <= cap), (lo <= 0) & (hi < star)]
    out = np.select(cases, [W_ALIGNED, MODEST, PAPER_SIZED, NOISE], default=INCONCLUSIVE)
    return str(out) if out.ndim == 0 else out


# --------------------------------------------------------------------------------------------- multiplicity
def _pvalues(p: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.asarray(p, dtype=np.float64)
    if a.ndim != 1 or not np.all((a >= 0) & (a <= 1)):
        raise UserError("p-values: need a 1-D sequence of numbers in [0, 1] (no NaN)")
    return a


def holm(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control): with ``p_(1) <= … <= p_(m)``,
    ``p̃_(i) = max_{j <= i} min(1, (m − j + 1) p_(j))``, returned in the input order. Reject where
    ``p̃ <= α``."""
    a = _pvalues(p)
    m, order = len(a), np.argsort(a, kind="stable")
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * a[order]))
    out = np.empty(m)
    out[order] = adj
    return out


def benjamini_hochberg(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (false-discovery-rate control): ``p̃_(i) = min_{j >= i} min(1, m
    p_(j) / j)``, in the input order."""
    a = _pvalues(p)
    m, order = len(a), np.argsort(a, kind="stable")
    scaled = m * a[order] / np.arange(1, m + 1)
    adj = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    out = np.empty(m)
    out[order] = adj
    return out


# --------------------------------------------------------------------------------------------- sampled nulls
@dataclass(frozen=True)
class SampledNull:
    """The sampled distribution of a null statistic (``n`` independent random subspaces).

    Attributes:
        statistic: what was sampled, e.g. ``"phi(1, 1), d=384"`` or ``"projection k=4, 384x384"``.
        n: draws.
        mean, geo_mean: arithmetic mean and ``exp(mean_log)``.
        mean_log, sd_log: mean and SD (ddof=1) of the log of the draws.
        quantiles: ``{q: value}``.
        analytic: the analytic reference (E φ = max(i, j)/d; the projection's RMS k‖W‖_F/√(d_out d_in)).
    """

    statistic: str
    n: int
    mean: float
    geo_mean: float
    mean_log: float
    sd_log: float
    quantiles: dict[float, float]
    analytic: float

    @property
    def ratio(self) -> float:
        """``geo_mean / analytic``: how far the analytic reference is from a typical random draw."""
        return self.geo_mean / self.analytic

    @property
    def ratio_se(self) -> float:
        """Monte Carlo standard error of :attr:`ratio` (delta method: ``ratio · sd_log / √n``)."""
        return self.ratio * self.sd_log / math.sqrt(self.n)


QUANTILES = (0.025, 0.05, 0.5, 0.95, 0.975)


def chi2_geo_ratio(dof: float) -> float:
    """Geometric mean over mean of ``χ²_ν``: ``exp(E log χ²_ν) / ν = exp(ψ(ν/2) + ln 2) / ν``.

    The small-k nulls in the limit d ≫ k: ``d·‖U₁ᵀU₂‖_F²`` tends to ``χ²_{ij}``, so φ(i, j)'s geometric mean
    is ``chi2_geo_ratio(i·j)`` × its mean ``max(i, j)/d`` (0.281, 0.763, 0.938 at i = j = 1, 2, 4), and the
    Table 7 projection's is ``√chi2_geo_ratio(k²)`` × its RMS (0.530, 0.874, 0.969, 0.992 at k = 1, 2, 4,
    8). At d = 384 the sampled values agree within their Monte Carlo error; use :func:`sampled_phi_null` /
    :func:`sampled_projection_null` where k is not small against d.
    """
    if not dof > 0:
        raise UserError(f"chi2_geo_ratio: degrees of freedom must be > 0, got {dof!r}")
    return math.exp(float(special.digamma(dof / 2)) + math.log(2)) / dof


def null_summary(draws: np.ndarray, analytic: float, statistic: str,
                 quantiles: Sequence[float] = QUANTILES) -> SampledNull:
    """Summarise 1-D positive ``draws`` of a null statistic (see :class:`SampledNull`)."""
    x = np.asarray(draws, dtype=np.float64)
    if x.ndim != 1 or len(x) < 2:
        raise UserError(f"null_summary: needs a 1-D array of at least 2 draws, got shape {x.shape}")
    lg = np.log(x)
    qs = {float(q): float(v) for q, v in zip(quantiles, np.quantile(x, quantiles), strict=True)}
    return SampledNull(statistic, len(x), float(x.mean()), geo_mean(x), float(lg.mean()),
                       float(lg.std(ddof=1)), qs, float(analytic))


def _frames(n: int, d: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` Gaussian ``(d, k)`` matrices G, returned transposed ``(n, k, d)`` (contiguous for the products),
    and the Cholesky factors ``L`` of ``GᵀG``: ``Q = G L⁻ᵀ`` is a uniformly (Haar) random k-frame, used
    without forming it."""
    Gt = rng.standard_normal((n, k, d))
    return Gt, np.linalg.cholesky(Gt @ np.swapaxes(Gt, -1, -2))


def _sandwich(L1: np.ndarray, C: np.ndarray, L2: np.ndarray) -> np.ndarray:
    """``L1⁻¹ C L2⁻ᵀ`` for batches of lower-triangular ``L1``, ``L2``."""
    left = np.linalg.solve(L1, C)
    return np.swapaxes(np.linalg.solve(L2, np.swapaxes(left, -1, -2)), -1, -2)


def _chunks(n: int, size: int = 1024):
    """``range``-like batches of at most ``size`` draws: bounds memory (a (1024, 4, 384) block is 12 MB)."""
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _check_k(k: int, limit: int, name: str) -> None:
    if not (isinstance(k, int | np.integer) and 0 < k <= limit):
        raise UserError(f"{name}: needs an int in 1..{limit}, got {k!r}")


def projection_null_draws(singular_values: np.ndarray, k: int, *, d_out: int, d_in: int, n: int = 4000,
                          rng_seed: int = 0) -> np.ndarray:
    """``n`` draws of ``‖Uᵀ W V‖_F`` for independent Haar-random ``U (d_out, k)``, ``V (d_in, k)``, for W
    given by its singular values ``(..., m)``, ``m <= min(d_out, d_in)`` (a batch of W's shares the draws).

    Only the spectrum matters: with ``W = P Σ Qᵀ``, ``PᵀU`` and ``QᵀV`` are again Haar, so ``‖UᵀWV‖_F =
    ‖U'ᵀ Σ V'‖_F``. With ``U' = G₁ L₁⁻ᵀ`` (``L₁ L₁ᵀ = G₁ᵀG₁``, G Gaussian) this is
    ``‖L₁⁻¹ (G₁[:m]ᵀ diag σ G₂[:m]) L₂⁻ᵀ‖_F``: k × k work per draw after the Gaussian draws. Returns
    ``(..., n)``; the mean of squares is ``k² ‖W‖_F² / (d_out d_in)``
    (:func:`~lora_analysis.metrics.projection.expected_random_projection` squared).
    """
    s = np.asarray(singular_values, dtype=np.float64)
    if s.ndim < 1 or s.shape[-1] > min(d_out, d_in) or not np.all(np.isfinite(s) & (s >= 0)):
        raise UserError(f"singular_values: needs finite values >= 0, at most min(d_out, d_in) = "
                        f"{min(d_out, d_in)} per W, got shape {s.shape}")
    _check_k(k, min(d_out, d_in), "k")
    rng = np.random.default_rng(rng_seed)
    m = s.shape[-1]
    flat = s.reshape(-1, m)
    out = np.empty((len(flat), n))
    for a, b in _chunks(n):
        G1, L1 = _frames(b - a, d_out, k, rng)
        G2, L2 = _frames(b - a, d_in, k, rng)
        B = np.swapaxes(G2[..., :m], -1, -2)  # (n, m, k)
        for c, sc in enumerate(flat):  # one pass per W (a handful per claim), vectorised over the draws
            out[c, a:b] = np.sqrt((_sandwich(L1, (G1[..., :m] * sc) @ B, L2) ** 2).sum(axis=(-2, -1)))
    return out.reshape(*s.shape[:-1], n)


def sampled_projection_null(singular_values: np.ndarray, k: int, *, d_out: int, d_in: int, n: int = 4000,
                            rng_seed: int = 0) -> SampledNull:
    """The sampled null of Table 7's ``‖UᵀWV‖_F`` for one W (its singular values ``(m,)``) at rank ``k``,
    against the analytic root-mean-square ``k ‖W‖_F / √(d_out d_in)``.

    At small k the RMS is no typical value: ``‖UᵀWV‖²`` is close to ``σ² χ²_{k²}``, so its geometric mean over
    the RMS tends (d → ∞) to ``exp(½ (ψ(k²/2) + ln 2)) / k`` = 0.530, 0.874, 0.969 at k = 1, 2, 4
    (:func:`chi2_geo_ratio`). A margin ``x / RMS`` of 0.76 at k = 1 is therefore 1.4× what a typical random
    pair gives. Cost grows as n·k²·(d_out + d_in) plus n k×k solves: about 0.1 s per W at k = 4, n = 4000,
    d = 384 (one core; a batch shares the draws); minutes at k = 64, where the RMS is within 0.02 % of the
    geometric mean anyway.
    """
    s = np.asarray(singular_values, dtype=np.float64)
    if s.ndim != 1:
        raise UserError(f"singular_values: one W's, shape (m,), got {s.shape}")
    draws = projection_null_draws(s, k, d_out=d_out, d_in=d_in, n=n, rng_seed=rng_seed)
    rms = k * math.sqrt(float((s * s).sum())) / math.sqrt(d_out * d_in)
    return null_summary(draws, rms, f"projection k={k}, {d_out}x{d_in}")


def phi_null_draws(i: int, j: int, *, d: int, n: int = 4000, rng_seed: int = 0) -> np.ndarray:
    """``n`` draws of φ(i, j) = ‖U₁ᵀU₂‖_F² / min(i, j) for independent Haar-random ``U₁ (d, i)``,
    ``U₂ (d, j)``.

    By invariance U₁ may be the first i coordinate axes, so φ = ‖(G L⁻ᵀ)[:i]‖_F² / min(i, j) for one Gaussian
    ``G (d, j)`` with ``L Lᵀ = GᵀG``. φ(1, 1) is ``Beta(½, (d−1)/2)``; the mean is ``max(i, j)/d``
    (:func:`~lora_analysis.metrics.subspace.random_phi_expected`)."""
    _check_k(d, 10**9, "d")
    _check_k(i, d, "i")
    _check_k(j, d, "j")
    rng, out = np.random.default_rng(rng_seed), np.empty(n)
    for a, b in _chunks(n):
        Gt, L = _frames(b - a, d, j, rng)
        top = np.linalg.solve(L, Gt[..., :i])  # (n, j, i) = (G[:i] L⁻ᵀ)ᵀ
        out[a:b] = (top * top).sum(axis=(-2, -1)) / min(i, j)
    return out


def sampled_phi_null(i: int, j: int, *, d: int, n: int = 4000, rng_seed: int = 0) -> SampledNull:
    """The sampled null of φ(i, j) in dimension d against the analytic mean ``max(i, j)/d``. At small k the
    mean is far from a typical draw: for φ(1, 1) the geometric mean is ``exp(ψ(½) − ψ(d/2))`` ≈ 0.28 / d."""
    draws = phi_null_draws(i, j, d=d, n=n, rng_seed=rng_seed)
    return null_summary(draws, max(i, j) / d, f"phi({i}, {j}), d={d}")

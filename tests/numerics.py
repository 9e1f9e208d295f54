"""Tolerances that follow from the arithmetic, not from one CPU (plain helpers for the float comparisons).

MKL and ATen choose their kernels by CPU (SSE4.2, AVX2, AVX-512) and by ``MKL_CBWR`` /
``ATEN_CPU_CAPABILITY``; each kernel sums in its own order, so a float32 result moves by some ulps from one
machine to the next (one element of 1,440 in the loralib test was 1.34e-5 off on an Intel AVX-512 machine,
against an atol/rtol of 1e-5 that passed on AMD). Two rules follow, and ``.ci/run`` checks them by rerunning
the ``float_sensitive`` tests under each forced kernel choice:

* Where the reference can be computed in float64, it is: :func:`forward64` runs a model on a float64 copy. A
  float32 weight widens exactly, so two models holding the same float32 weights agree to float64 rounding
  whatever kernels run, and the only float32 error left is the one the comparison is about.
* Otherwise the float32 error is bounded by what *any* summation order can produce. A dot product of ``n``
  terms summed in any order (blocked, SIMD, FMA or not) satisfies ``|fl(Σ aᵢbᵢ) − Σ aᵢbᵢ| ≤ γₙ Σ|aᵢbᵢ|``, with
  ``γₙ = n·u / (1 − n·u)`` and ``u = 2⁻²⁴`` (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd
  ed., §3.1); a chain of products and sums is bounded, to first order, by ``γ_N`` times the same expression
  evaluated on absolute values, ``N`` the roundings along its longest path (§3.5: inner dimensions plus the
  additions and scalings). Comparing two float32 computations, ``N`` counts both (``γ_a + γ_b ≤ γ_(a+b)``).
  This is the worst case, about √N (2-12x here) above the typical random-walk error ``√N·u``, so it holds on
  every CPU, while a real mistake (a wrong slice, scale, transpose or weight) is O(1) relative, far above it.

The bound is per element: an output that is small because its terms cancel keeps the absolute error of its
terms, which a relative tolerance on the result misses (the loralib failure was such an element).
"""

from __future__ import annotations

import copy

import torch

U32 = 2.0**-24  # float32 unit roundoff: half an ulp at 1.0
U64 = 2.0**-53  # float64 unit roundoff


def gamma(n: int, u: float = U32) -> float:
    """Higham's ``γₙ = n·u / (1 − n·u)``: the relative bound on ``n`` roundings in any order."""
    assert n * u < 0.5, (n, u)
    return n * u / (1 - n * u)


def assert_within(got: torch.Tensor, ref: torch.Tensor, bound, what: str = "") -> None:
    """``|got − ref| ≤ bound`` element by element, in float64 (``bound`` a number or a broadcastable tensor).

    The message names the worst element, its error and its bound."""
    got, ref = got.detach().to(torch.float64), ref.detach().to(torch.float64)
    assert got.shape == ref.shape, (what, tuple(got.shape), tuple(ref.shape))
    err = (got - ref).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(err)
    bad = err > bound
    if bool(bad.any()):
        i = int(torch.argmax(torch.where(bad, err / bound.clamp_min(1e-300), torch.zeros_like(err))))
        idx = tuple(int(k) for k in torch.unravel_index(torch.tensor(i), err.shape))
        raise AssertionError(f"{what}: {int(bad.sum())} of {err.numel()} elements beyond the bound; worst at "
                             f"{idx}: |diff| {err[idx].item():.3g} > bound {bound[idx].item():.3g}")


def assert_f32_close(got: torch.Tensor, ref: torch.Tensor, magnitude, rounds: int, what: str = "") -> None:
    """``|got − ref| ≤ γ_rounds · magnitude`` element by element: ``magnitude`` is the computation evaluated
    on absolute values (``|x| @ |W|ᵀ + |b|``, say) and ``rounds`` the float32 roundings along its longest
    path, counted over both sides when ``ref`` is float32 too (see the module docstring)."""
    assert_within(got, ref, gamma(rounds) * torch.as_tensor(magnitude, dtype=torch.float64), what)


def forward64(model: torch.nn.Module, **inputs) -> torch.Tensor:
    """The model's output (``logits``, else ``last_hidden_state``) computed on a float64 copy of it.

    Float32 parameters widen exactly, so the only differences left between two models are in their weights and
    their structure, not in the kernels' summation order: float64 rounding through a few layers of width ≤ 400
    is below 1e-12 of the O(1-10) outputs (u = 1.1e-16, √n·depth·magnitudes < 1e4)."""
    m = copy.deepcopy(model).to(torch.float64).eval()
    with torch.no_grad():
        out = m(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# Two float64 forwards of models holding the same float32 weights differ by float64 rounding, below 1e-12
# (forward64); 1e-9 leaves 1000x, and stays 30x below one float32 ulp (3e-8) of an O(0.3) weight on an O(1)
# activation, the smallest real difference between two models' weights.
F64_MODEL_ATOL = 1e-9

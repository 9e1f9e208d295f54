"""top_singular_triplets' check schedule: the residual trend gives up early on a flat bulk (for the dense SVD),
keeps a power law iterative, and the last check's eigendecomposition of T gives the Ritz vectors."""

from __future__ import annotations

import math

import pytest
import torch

import lora_analysis.metrics.linalg as la
from lora_analysis.metrics.linalg import _predicted_dim, top_singular_triplets

pytestmark = pytest.mark.float_sensitive  # rerun under forced MKL/ATen kernels by .ci/run
F64 = torch.float64


def _record_krylov(monkeypatch) -> list[tuple[int, bool]]:
    """(final Krylov dimension, converged) of each _block_krylov run."""
    runs: list[tuple[int, bool]] = []
    inner = la._block_krylov

    def wrapped(*args, **kwargs):
        K, T, done = inner(*args, **kwargs)
        runs.append((K.shape[0], done))
        return K, T, done

    monkeypatch.setattr(la, "_block_krylov", wrapped)
    return runs


def test_flat_bulk_gives_up_before_the_limit(monkeypatch):
    """benchmarks/cases_svd.py's spiked bulk at d = 1536: the top 100 lie in the bulk, the residuals fall too
    slowly to converge by d/2 = 768: the Krylov stops before 768 and the dense SVD answers (no certificate)."""
    from benchmarks.cases_svd import base_weight

    W = base_weight(0, "q", 1536)
    runs = _record_krylov(monkeypatch)
    got = top_singular_triplets(W, 100, dense_max=0)
    assert got.certificate is None and len(runs) == 1
    dim, done = runs[0]
    assert not done and dim < 768
    torch.testing.assert_close(got.S, torch.linalg.svdvals(W.double())[:100], rtol=1e-13, atol=0)


def test_power_law_stays_iterative_and_reuses_the_last_eigh(monkeypatch):
    """σ_i = i^-0.4 (the benchmark's decay) at d = 1536, top 100: its residuals fall slowly at first, then by
    decades, and it converges near the limit (dimension ~736 of 768); it must not be given up. T's
    eigendecomposition runs once per check, none after."""
    g = torch.Generator().manual_seed(0)
    n = 1536
    s = torch.arange(1, n + 1, dtype=F64) ** -0.4
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    W = (U * s) @ V.T
    runs = _record_krylov(monkeypatch)
    sizes: list[int] = []
    eigh = torch.linalg.eigh

    def counting(A, *args, **kwargs):
        sizes.append(A.shape[-1])
        return eigh(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", counting)
    got = top_singular_triplets(W, 100, dense_max=0)
    assert got.certificate is not None and runs[0][1]
    torch.testing.assert_close(got.S, s[:100], rtol=1e-12, atol=0)
    krylov = [m for m in sizes if m > 100]  # the Krylov checks (the tail bound's eigvalsh is not eigh)
    assert krylov[-1] == runs[0][0] and krylov.count(runs[0][0]) == 1  # the last one reused, not redone


def test_predicted_dim():
    assert _predicted_dim([(100, 5.0)]) == 0.0  # one check: no prediction
    assert math.isclose(_predicted_dim([(100, 5.0), (200, 3.0)]), 350.0)  # falls 2 per 100: 0 at 350
    assert _predicted_dim([(100, 5.0), (200, 5.5)]) == math.inf  # no progress

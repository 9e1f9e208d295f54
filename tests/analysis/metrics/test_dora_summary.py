"""lora_analysis.metrics.dora: DoRA's magnitude change and effective update, on analytic cases and against the
weight peft's merge_and_unload writes."""

from __future__ import annotations

import math

import pytest
import torch

from lora_analysis.metrics.dora import dora_summary
from lora_analysis.metrics.linalg import top_singular

pytestmark = pytest.mark.float_sensitive  # rerun under forced MKL/ATen kernels by .ci/run

F64 = torch.float64


def _w(d_out=12, d_in=9, seed=0):
    return torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_at_initialisation_everything_is_zero():
    W0 = _w()
    A, B = _w(3, 9, 1), torch.zeros(12, 3, dtype=F64)
    d = dora_summary(W0, A, B, torch.linalg.vector_norm(W0, dim=1), scaling=2.0)
    assert (d.mag_rel_mean, d.mag_rel_abs_mean, d.mag_rel_min, d.mag_rel_max, d.mag_rel_norm) == (0, 0, 0, 0, 0)
    assert d.dw_norm == 0 and d.dw_eff_norm == pytest.approx(0, abs=1e-12)
    assert math.isnan(d.delta_eff) and math.isnan(d.amplification_eff)


def test_magnitude_only_update_doubles_w0():
    """B = 0 and m = 2‖W0‖_c: W' = 2 W0, so the effective update is W0 itself and its Table 7 projection is W's
    own top-k energy sqrt(σ_1² + … + σ_k²)."""
    W0 = _w()
    A, B = _w(3, 9, 1), torch.zeros(12, 3, dtype=F64)
    d = dora_summary(W0, A, B, 2 * torch.linalg.vector_norm(W0, dim=1), scaling=1.0)
    assert d.mag_rel_mean == pytest.approx(1) and d.mag_rel_min == pytest.approx(1) and d.mag_rel_norm == pytest.approx(1)
    assert d.dw_eff_norm == pytest.approx(float(torch.linalg.matrix_norm(W0)), rel=1e-12)
    S = top_singular(W0).S
    assert d.delta_eff == pytest.approx(float(S[:3].norm()), rel=1e-10)
    assert d.amplification_eff == pytest.approx(float(S.norm() / S[:3].norm()), rel=1e-10)


def test_reference_norms_and_dense_limit_and_bad_shapes():
    W0 = _w()
    A, B = _w(3, 9, 1), _w(12, 3, 2)
    n = torch.linalg.vector_norm(W0, dim=1)
    d = dora_summary(W0, A, B, 1.5 * n, scaling=0.5, reference_norms=1.5 * n, dense_limit=10)
    assert d.mag_rel_abs_mean == pytest.approx(0, abs=1e-15)  # compared with the norms m started from
    assert math.isnan(d.delta_eff) and d.dw_eff_norm > 0  # above dense_limit: norm only
    with pytest.raises(ValueError, match=r"magnitude \(11,\) must be \(d_out,\)"):
        dora_summary(W0, A, B, n[:11], scaling=1.0)
    with pytest.raises(ValueError, match="do not fit W0"):
        dora_summary(W0, A.T, B, n, scaling=1.0)


def test_against_peft_merge_and_unload():
    """The effective update is what peft's merge writes minus W0; the magnitude change is m / ‖W0‖_c − 1."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from peft_adapters import BERT_KW, train_like
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    pm = get_peft_model(BertModel(BertConfig(**BERT_KW)).eval(),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["query"], use_dora=True))
    train_like(pm)
    layer = pm.base_model.model.encoder.layer[1].attention.self.query
    W0 = layer.base_layer.weight.detach().double().clone()
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    m = layer.lora_magnitude_vector["default"].weight.detach()
    d = dora_summary(W0, A, B, m, scaling=layer.scaling["default"])
    merged = pm.merge_and_unload().encoder.layer[1].attention.self.query.weight.detach().double()
    eff = merged - W0
    assert d.dw_eff_norm == pytest.approx(float(torch.linalg.matrix_norm(eff)), rel=1e-5)
    U, _, Vh = torch.linalg.svd(eff)
    assert d.delta_eff == pytest.approx(float(torch.linalg.matrix_norm(U[:, :4].T @ W0 @ Vh[:4].T)), rel=1e-4)
    rel = m.double() / torch.linalg.vector_norm(W0, dim=1) - 1
    assert d.mag_rel_abs_mean == pytest.approx(float(rel.abs().mean()), rel=1e-6) and d.mag_rel_abs_mean > 1e-3
    assert d.dw_norm == pytest.approx(float(torch.linalg.matrix_norm(layer.scaling["default"] * B.double() @ A.double())))

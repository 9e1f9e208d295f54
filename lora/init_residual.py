"""Inits that change the base: the weight ``peft`` adapts when it loads a PiSSA or OLoRA adapter.

``peft`` reads ``init_lora_weights`` from ``adapter_config.json`` and *re-runs that init* on the base model every
time it loads the adapter (``LoraLayer.update_layer``), before it loads the saved A, B over the initial ones. For
two inits the init also rewrites the frozen weight, so the model peft runs is ``W_res + s·B·A``, not
``W + s·B·A``:

* ``"pissa"`` (``pissa_init``, full SVD): ``s·B₀A₀ = W_r``, the best rank-r approximation of ``W``
  (``U_r Σ_r V_rᵀ``; the scale cancels), so ``W_res = W − W_r``. The same in either orientation, so a
  ``Conv1D`` (``fan_in_fan_out``) gives the same ``W_res``, and a fused GPT-2 ``c_attn`` is decomposed whole.
* ``"olora"`` (``olora_init``): ``Q R`` is the QR of the weight in the ``nn.Linear`` layout ``(d_out, d_in)``,
  ``B₀ = Q[:, :r]``, ``A₀ = R[:r]`` and ``W_res = W − s·Q[:, :r] R[:r]``. ``Q_r R_r = Q_r Q_rᵀ W`` is the projection
  of ``W`` onto the span of its first ``r`` columns: unique, whatever signs the QR routine picks. peft before 0.22
  factorized a ``Conv1D`` weight as stored, ``(d_in, d_out)``, which projects onto other columns; since peft re-runs
  the init at load time, the layout follows the installed peft (:func:`olora_in_linear_layout`), and without peft
  installed, the current one.

Both are deterministic given ``W``, ``r`` and ``s``. They are computed here in float64 (peft uses float32, about
1e-7 relative apart) and rounded once to the weight's dtype, as peft stores the residual. peft's ``Embedding``
layer runs neither init, so an embedding keeps its weight.

Inits whose base change cannot be rebuilt from the adapter and the base alone are refused with the way out,
peft's own conversion to plain LoRA, ``save_pretrained(out, path_initial_model_for_weight_conversion=INIT_DIR)``
(it saves ``A' = [A; A₀]``, ``B' = [B, −B₀]``, rank 2r, on the original ``W``):

* ``"pissa_niter_<n>"``: a randomized SVD (``torch.svd_lowrank``) draws from the global RNG on every load;
* ``"corda"``: needs the covariance of activations on data (``preprocess_corda``); peft itself cannot reload it;
* ``"lora_ga"``: needs gradients on data; on reload peft falls back to the plain init and leaves ``W`` unchanged,
  which is not the model that was trained;
* ``"loftq"``: re-quantizes the base with bitsandbytes on a GPU (peft's LoftQ route saves that base and sets
  ``init_lora_weights`` to true).

``True``, ``False``, ``"gaussian"``, ``"eva"`` (data-driven A, ``B₀ = 0``), ``"orthogonal"`` and ``"mica"`` leave
``W`` unchanged. Any other value is refused: peft itself rejects unknown inits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lora.errors import UserError, short_repr

__all__ = ["BASE_CHANGING", "CONVERSION_ROUTE", "base_changing_init", "residual_weight", "truncated_svd_residual"]

BASE_CHANGING = ("pissa", "olora")  # deterministic: rebuilt here exactly as peft rebuilds them on load
CONVERSION_ROUTE = (
    "convert it to plain LoRA with peft: model.save_pretrained(OUT, "
    "path_initial_model_for_weight_conversion=INIT_DIR), INIT_DIR holding the adapter saved before training"
)


def base_changing_init(config: Mapping[str, Any], where: str) -> str | None:
    """``"pissa"`` or ``"olora"`` if loading the adapter in peft rewrites the base weight, ``None`` if it does not.

    Args:
        config: the parsed ``adapter_config.json``.
        where: the adapter (file or directory) for messages.

    Raises:
        UserError: one line naming the init and the conversion route, for an init whose base change cannot be
            rebuilt from the adapter and the base (see the module docstring), or an init peft does not know.
    """
    init = config.get("init_lora_weights", True)
    if isinstance(init, bool):
        return None
    if not isinstance(init, str):
        raise UserError(f"{where}: init_lora_weights must be true, false or a string, got {short_repr(init)}")
    # peft's own tests: "pissa*" and "corda*" by prefix, "olora" and "mica" case-blind, the rest exactly.
    if init == "pissa":
        return "pissa"
    if init.lower() == "olora":
        return "olora"
    if init in ("eva", "orthogonal") or init.lower() in ("gaussian", "mica"):
        return None
    why = {
        "pissa_niter_": "PiSSA with a randomized SVD (it draws new random numbers on every load)",
        "corda": "CorDA (its base change needs activations on data)",
        "lora_ga": "LoRA-GA (its base change needs gradients on data)",
        "loftq": "LoftQ (peft re-quantizes the base with bitsandbytes)",
    }
    for prefix, what in why.items():
        if init.startswith(prefix):
            route = CONVERSION_ROUTE
            if prefix == "loftq":
                route = ("save the LoftQ-initialised base model, pass it with --base and set init_lora_weights to "
                         "true (peft's LoftQ example)")
            raise UserError(f"{where}: init_lora_weights {init!r}: {what} changes the base weight in a way that "
                            f"cannot be rebuilt from the adapter and the base; {route}")
    raise UserError(f"{where}: init_lora_weights {init!r} is not an init peft knows (true, false, 'gaussian', "
                    f"'pissa', 'olora', 'eva', 'orthogonal', 'mica', ...); cannot tell which base weight it adapts")


def truncated_svd_residual(W: Tensor, r: int) -> Tensor:
    """``W − W_r`` for ``W (m, n)``: ``W`` minus its best rank-``r`` approximation ``U_r Σ_r V_rᵀ`` (PiSSA's
    residual, computed in float64). Example: a rank-``r`` ``W`` gives zero."""
    W = W.to(torch.float64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return W - (U[:, :r] * S[:r]) @ Vh[:r]


def _qr_residual(W: Tensor, r: int, scaling: float) -> Tensor:
    """``W − s·Q[:, :r] R[:r]`` with ``Q R`` the reduced QR of ``W`` as given (OLoRA's residual, float64)."""
    W = W.to(torch.float64)
    Q, R = torch.linalg.qr(W)
    return W - scaling * (Q[:, :r] @ R[:r])


def olora_in_linear_layout() -> bool:
    """Whether the installed peft's ``olora_init`` factorizes a ``fan_in_fan_out`` (GPT-2 ``Conv1D``) weight in the
    ``nn.Linear`` layout, as peft 0.22 and later do (earlier versions used the stored ``(d_in, d_out)`` layout).
    Without peft: ``True``, the current behaviour."""
    try:
        import inspect

        from peft.tuners.lora.layer import LoraLayer
    except ImportError:
        return True
    try:
        return "fan_in_fan_out" in inspect.getsource(LoraLayer.olora_init)
    except (OSError, TypeError, AttributeError):  # no source (a frozen install): assume the current behaviour
        return True


def residual_weight(module: nn.Module, *, init: str, r: int, scaling: float, where: str, path: str) -> Tensor | None:
    """The weight peft leaves in ``module`` after it re-runs ``init`` at load time, or ``None`` if it leaves it.

    Args:
        module: the plain base module (``nn.Linear``, ``transformers``' ``Conv1D`` or ``nn.Embedding``).
        init: ``"pissa"`` or ``"olora"`` (from :func:`base_changing_init`).
        r: the module's rank (``rank_pattern`` or ``r``); scaling: its ``s`` (``alpha_pattern``/``lora_alpha``).
        where, path: the adapter and module, for messages.

    Returns:
        ``W_res`` in the layout and dtype of ``module.weight`` (a ``Conv1D`` keeps ``(d_in, d_out)``), computed in
        float64 and rounded once; ``None`` for an ``nn.Embedding`` (peft runs these inits on linear layers only).
    """
    if isinstance(module, nn.Embedding):
        return None
    weight = getattr(module, "weight", None)
    conv1d = type(module).__name__ == "Conv1D"  # transformers' GPT-2 layer: y = x @ W, W stored (d_in, d_out)
    if not (isinstance(module, nn.Linear) or conv1d) or weight is None or weight.ndim != 2:
        raise UserError(f"{where}: module {path}: init_lora_weights {init!r} on a {type(module).__name__} is not "
                        f"supported; {CONVERSION_ROUTE}")
    stored = weight.detach()
    if init == "pissa":
        res = truncated_svd_residual(stored, r)  # W − W_r is the same in either orientation
    elif init == "olora" and conv1d and olora_in_linear_layout():
        res = _qr_residual(stored.T, r, scaling).T  # peft >= 0.22: the QR of the Linear layout (d_out, d_in)
    elif init == "olora":
        res = _qr_residual(stored, r, scaling)  # a Linear, or peft < 0.22's QR of the stored (d_in, d_out)
    else:
        raise ValueError(f"residual_weight: unknown base-changing init {init!r}")
    return res.to(stored.dtype)

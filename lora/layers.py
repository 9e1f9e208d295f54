"""LoRA layers (Hu et al., 2021, Section 4.1).

A frozen weight ``W0`` of shape ``(d_out, d_in)`` (``nn.Linear`` orientation) gets a trainable low-rank update::

    h = W0 x + s · B (A x),      A: (r, d_in),  B: (d_out, r),  s = alpha / r   (rsLoRA: alpha / sqrt(r))

``A`` starts random (Gaussian as in the paper, or Kaiming-uniform as loralib and PEFT do) and ``B`` starts at
zero, so ``ΔW = s·B·A = 0`` at step 0. Three layer types share one protocol (:class:`LoRAModule`):

* :class:`LoRALinear` wraps ``nn.Linear`` (BERT ``query``/``value``, LLaMA ``q_proj``/``v_proj``, ...).
* :class:`LoRAFusedQKV` wraps GPT-2's fused ``Conv1D`` ``c_attn`` and adapts only chosen slices (q and v in the
  paper, like loralib's ``MergedLinear(enable_lora=[True, False, True])``). Each slice has its own A and B, so
  analysis sees ΔW_q and ΔW_v as separate matrices.
* :class:`LoRAConv1D` wraps any other GPT-2 ``Conv1D`` (``c_proj``, ``c_fc``): one update of the whole weight, as
  PEFT adapts it (``fan_in_fan_out``).
* :class:`LoRAEmbedding` wraps ``nn.Embedding``.

Nothing here changes ``W0`` except the explicit :meth:`merge` / :meth:`unmerge` calls: ``eval()``, ``train()``
and ``forward`` never touch weights (loralib merges on ``eval()``, which silently breaks ΔW-vs-W analysis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

InitScheme = Literal["gaussian", "kaiming"]
FUSED_SLICES = ("q", "k", "v")
FUSED_MODULE_NAMES = ("c_attn",)  # GPT-2's fused [q | k | v] Conv1D; every other Conv1D is one matrix


def lora_scaling(r: int, alpha: float, *, use_rslora: bool = False) -> float:
    """The LoRA scale ``s``: ``alpha / r`` (the paper), or ``alpha / sqrt(r)`` (rsLoRA, Kalajdzievski 2023)."""
    if r <= 0:
        raise ValueError(f"rank r must be positive, got {r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def delta_weight(lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """The one ΔW function: ``ΔW = s · B @ A`` of shape ``(d_out, d_in)``.

    Merge, export and analysis all call this (or :meth:`LoRAFactors.delta_weight`), so they cannot disagree.

    Args:
        lora_A: ``(r, d_in)``.
        lora_B: ``(d_out, r)``.
        scaling: ``s``.
    """
    if lora_A.ndim != 2 or lora_B.ndim != 2 or lora_A.shape[0] != lora_B.shape[1]:
        raise ValueError(f"lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} do not form B @ A")
    return (lora_B @ lora_A) * scaling


@dataclass(frozen=True)
class LoRAFactors:
    """The factors of one low-rank update, detached: ``ΔW = scaling · B @ A``.

    Attributes:
        A: ``(r, d_in)``.
        B: ``(d_out, r)``.
        scaling: ``s = alpha/r`` (or ``alpha/sqrt(r)``).
    """

    A: Tensor
    B: Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta_weight(self) -> Tensor:
        return delta_weight(self.A, self.B, self.scaling)


def init_lora_A_(A: Tensor, scheme: InitScheme, *, generator: torch.Generator | None = None) -> Tensor:
    """Fill ``A`` of shape ``(r, d_in)`` in place, row by row from ``generator``.

    * ``"gaussian"`` (the paper): ``N(0, 1/d_in)``.
    * ``"kaiming"`` (loralib and PEFT): ``U(-1/sqrt(d_in), 1/sqrt(d_in))``, i.e. ``kaiming_uniform_(a=sqrt(5))``.

    Neither scale depends on ``r`` and the draw is row-major, so with the same generator seed the start of a
    rank-8 ``A`` is exactly the first 8 rows of a rank-64 ``A`` ("nested draws"). The trainer exposes the
    other choice (an independent draw per rank) as ``--init-seed-per-rank``.
    """
    d_in = A.shape[1]
    with torch.no_grad():
        if scheme == "gaussian":
            draw = torch.randn(A.shape, generator=generator, dtype=torch.float32) / math.sqrt(d_in)
        elif scheme == "kaiming":
            bound = 1.0 / math.sqrt(d_in)
            draw = torch.rand(A.shape, generator=generator, dtype=torch.float32) * (2 * bound) - bound
        else:
            raise ValueError(f"unknown init scheme {scheme!r}; expected 'gaussian' or 'kaiming'")
        A.copy_(draw.to(A.dtype))
    return A


def _dropout(p: float) -> nn.Module:
    # Identity when p == 0 saves a kernel call per layer per step (see benchmarks/).
    return nn.Dropout(p) if p > 0 else nn.Identity()


class LoRAModule(nn.Module):
    """Protocol for every LoRA layer: adapters are found by this type, never by matching names.

    Subclasses provide :meth:`factors` (one :class:`LoRAFactors` per adapted matrix, keyed by slice name,
    ``""`` for an unfused layer), :meth:`merge`, :meth:`unmerge` and ``base`` (the wrapped frozen module).
    """

    base: nn.Module
    merged: bool

    def factors(self) -> dict[str, LoRAFactors]:
        raise NotImplementedError

    def base_weights(self) -> dict[str, Tensor]:
        """The frozen ``W0`` of each adapted matrix in ``nn.Linear`` orientation ``(d_out, d_in)``, keyed like
        :meth:`factors`. If the layer is merged this subtracts ΔW, so it always returns the true ``W0``."""
        raise NotImplementedError

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if name.startswith("lora_")]

    def _init_factors(self, base: nn.Module, weight: Tensor, *, d_out: int, d_in: int, r: int, alpha: float,
                      init: InitScheme, use_rslora: bool, generator: torch.Generator | None) -> None:
        """One adapted matrix: ``base``, ``r``, ``alpha``, ``scaling``, ``lora_A (r, d_in)`` drawn by ``init`` and
        ``lora_B (d_out, r) = 0`` on ``weight``'s device and dtype, not merged."""
        self.base = base
        self.r, self.alpha, self.use_rslora = r, float(alpha), use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora=use_rslora)
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, d_in, **factory))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, **factory))
        init_lora_A_(self.lora_A, init, generator=generator)
        self.merged = False

    def merge(self) -> None:
        raise NotImplementedError

    def unmerge(self) -> None:
        raise NotImplementedError


@torch.no_grad()
def _add_rounded_once(weight: Tensor, delta: Tensor, sign: float) -> None:
    """``weight += sign · delta`` in place, summed in at least float32 and rounded to ``weight``'s dtype once.

    Rounding ΔW to a bf16/fp16 weight's dtype before adding would round twice and, for bf16, double the error
    against an exact ``W0 + ΔW`` (7.3e-4 against peft's 4.4e-4 max abs on a bf16 base). For a float32 or float64
    weight this is the plain in-place sum.
    """
    wide = torch.promote_types(weight.dtype, torch.float32)
    if wide == weight.dtype:
        weight.add_(delta.to(weight.dtype), alpha=sign)
    else:
        weight.copy_(weight.to(wide).add_(delta.to(wide), alpha=sign))


class LoRALinear(LoRAModule):
    """LoRA on ``nn.Linear``: ``y = W0 x + b + s · B (A dropout(x))``.

    Args:
        base: the frozen ``nn.Linear`` (``weight`` is ``(d_out, d_in)``).
        r: rank.
        alpha: LoRA alpha; ``s = alpha / r`` (or ``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: dropout probability on the LoRA branch input.
        init: ``"gaussian"`` or ``"kaiming"`` for ``A``; ``B`` is always zero.
        generator: random source for ``A`` (the injector seeds one per module for reproducibility).
    """

    def __init__(
        self,
        base: nn.Linear,
        *,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        init: InitScheme = "kaiming",
        use_rslora: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        d_out, d_in = base.weight.shape
        if not 0 < r <= min(d_out, d_in):
            raise ValueError(f"rank {r} must be in 1..{min(d_out, d_in)} for a ({d_out}, {d_in}) weight")
        self._init_factors(base, base.weight, d_out=d_out, d_in=d_in, r=r, alpha=alpha, init=init,
                           use_rslora=use_rslora, generator=generator)
        self.lora_dropout = _dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.merged:
            return y
        # (..., d_in) -> (..., r) -> (..., d_out); never forms the (d_out, d_in) ΔW. addmm folds the scale and
        # the sum into the B product (y + s·h Bᵀ in one kernel): bit-identical, ~4% faster per layer (benchmarks/).
        h = F.linear(self.lora_dropout(x), self.lora_A)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B.t(), alpha=self.scaling)
        return out.view(y.shape)

    def factors(self) -> dict[str, LoRAFactors]:
        return {"": LoRAFactors(self.lora_A.detach(), self.lora_B.detach(), self.scaling)}

    def base_weights(self) -> dict[str, Tensor]:
        w = self.base.weight.detach()
        return {"": w - self._delta().to(w.dtype) if self.merged else w}

    def _delta(self) -> Tensor:
        return delta_weight(self.lora_A.detach(), self.lora_B.detach(), self.scaling)

    @torch.no_grad()
    def merge(self) -> None:
        """``W0 <- W0 + ΔW``; the forward then skips the LoRA branch (the paper's zero-latency deployment)."""
        if not self.merged:
            _add_rounded_once(self.base.weight, self._delta(), +1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W0 <- W0 - ΔW``: undo :meth:`merge`."""
        if self.merged:
            _add_rounded_once(self.base.weight, self._delta(), -1.0)
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, merged={self.merged}"


class LoRAFusedQKV(LoRAModule):
    """LoRA on GPT-2's fused ``Conv1D`` ``c_attn``, adapting only the chosen slices of ``[q | k | v]``.

    ``Conv1D`` stores its weight as ``(d_in, 3·d_out)`` and computes ``y = x @ W + b``. Slice ``t`` of the output
    (``t`` in q, k, v) is ``W[:, t·d_out:(t+1)·d_out]``, i.e. ``W_t = W[:, slice].T`` of shape ``(d_out, d_in)``
    in ``nn.Linear`` orientation. Each adapted slice has its own ``lora_A_<t>`` ``(r, d_in)`` and ``lora_B_<t>``
    ``(d_out, r)``, so ΔW_q and ΔW_v stay separate matrices (the paper adapts q and v; loralib's
    ``MergedLinear(enable_lora=[True, False, True])``).

    Args:
        base: a ``transformers.pytorch_utils.Conv1D`` (or any module with ``weight (d_in, 3·d_out)`` and ``bias``).
        slices: which of ``("q", "k", "v")`` to adapt.
        r, alpha, dropout, init, use_rslora, generator: as :class:`LoRALinear`.
    """

    def __init__(
        self,
        base: nn.Module,
        *,
        slices: tuple[str, ...] = ("q", "v"),
        r: int,
        alpha: float,
        dropout: float = 0.0,
        init: InitScheme = "kaiming",
        use_rslora: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        weight = getattr(base, "weight", None)
        if weight is None or weight.ndim != 2 or weight.shape[1] % 3:
            raise TypeError("LoRAFusedQKV wraps a fused Conv1D with weight (d_in, 3*d_out)")
        unknown = [s for s in slices if s not in FUSED_SLICES]
        if unknown or not slices or len(set(slices)) != len(slices):
            raise ValueError(f"slices must be distinct names from {FUSED_SLICES}, got {slices}")
        d_in, d_out = weight.shape[0], weight.shape[1] // 3
        if not 0 < r <= min(d_out, d_in):
            raise ValueError(f"rank {r} must be in 1..{min(d_out, d_in)} for a ({d_out}, {d_in}) slice")
        self.base = base
        self.slices = tuple(s for s in FUSED_SLICES if s in slices)  # canonical q, k, v order
        self.d_in, self.d_out = d_in, d_out
        self.r, self.alpha, self.use_rslora = r, float(alpha), use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora=use_rslora)
        factory = {"device": weight.device, "dtype": weight.dtype}
        for s in self.slices:
            A = nn.Parameter(torch.empty(r, d_in, **factory))
            init_lora_A_(A, init, generator=generator)
            self.register_parameter(f"lora_A_{s}", A)
            self.register_parameter(f"lora_B_{s}", nn.Parameter(torch.zeros(d_out, r, **factory)))
        self.lora_dropout = _dropout(dropout)
        self.merged = False

    def _cols(self, s: str) -> slice:
        t = FUSED_SLICES.index(s)
        return slice(t * self.d_out, (t + 1) * self.d_out)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.merged:
            return y
        h = self.lora_dropout(x)
        parts = []
        for s in FUSED_SLICES:
            if s in self.slices:
                A, B = getattr(self, f"lora_A_{s}"), getattr(self, f"lora_B_{s}")
                parts.append(F.linear(F.linear(h, A), B) * self.scaling)
            else:
                parts.append(y.new_zeros(*y.shape[:-1], self.d_out))
        return y + torch.cat(parts, dim=-1)

    def factors(self) -> dict[str, LoRAFactors]:
        return {
            s: LoRAFactors(getattr(self, f"lora_A_{s}").detach(), getattr(self, f"lora_B_{s}").detach(), self.scaling)
            for s in self.slices
        }

    def base_weights(self) -> dict[str, Tensor]:
        w = self.base.weight.detach()
        out = {}
        for s, f in self.factors().items():
            w_s = w[:, self._cols(s)].T
            out[s] = w_s - f.delta_weight().to(w.dtype) if self.merged else w_s
        return out

    @torch.no_grad()
    def _apply_delta(self, sign: float) -> None:
        for s, f in self.factors().items():
            _add_rounded_once(self.base.weight[:, self._cols(s)], f.delta_weight().T, sign)

    def merge(self) -> None:
        if not self.merged:
            self._apply_delta(+1.0)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._apply_delta(-1.0)
            self.merged = False

    def extra_repr(self) -> str:
        return f"slices={self.slices}, r={self.r}, alpha={self.alpha:g}, merged={self.merged}"


class _LoRAOnStoredTranspose(LoRAModule):
    """One LoRA on a module that stores its frozen weight transposed, ``base.weight = W0ᵀ`` of shape
    ``(d_in, d_out)`` (GPT-2's ``Conv1D``, ``nn.Embedding``): ``A`` ``(r, d_in)`` and ``B`` ``(d_out, r)`` as for
    :class:`LoRALinear`; :meth:`merge` adds ``ΔWᵀ`` to the stored weight. Subclasses set ``base``, ``lora_A``,
    ``lora_B``, ``scaling`` and ``merged`` (:meth:`LoRAModule._init_factors`), and define ``forward``."""

    def factors(self) -> dict[str, LoRAFactors]:
        return {"": LoRAFactors(self.lora_A.detach(), self.lora_B.detach(), self.scaling)}

    def base_weights(self) -> dict[str, Tensor]:
        w = self.base.weight.detach().T  # (d_out, d_in), a view of the stored weight
        return {"": w - self.factors()[""].delta_weight().to(w.dtype) if self.merged else w}

    @torch.no_grad()
    def merge(self) -> None:
        """``W0 <- W0 + ΔW`` (the stored ``(d_in, d_out)`` weight gets ``ΔWᵀ``)."""
        if not self.merged:
            _add_rounded_once(self.base.weight, self.factors()[""].delta_weight().T, +1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            _add_rounded_once(self.base.weight, self.factors()[""].delta_weight().T, -1.0)
            self.merged = False


class LoRAConv1D(_LoRAOnStoredTranspose):
    """LoRA on a whole GPT-2 ``Conv1D`` (``c_proj``, ``c_fc``): ``y = x W + b + s · B (A dropout(x))``.

    ``Conv1D`` stores ``W`` as ``(d_in, d_out)`` and computes ``y = x @ W + b``, so in ``nn.Linear`` orientation the
    frozen weight is ``W0 = Wᵀ`` of shape ``(d_out, d_in)``. ``A`` is ``(r, d_in)`` and ``B`` ``(d_out, r)`` as for
    :class:`LoRALinear` (and as PEFT stores them with ``fan_in_fan_out: true``); :meth:`merge` adds ``ΔWᵀ`` to the
    stored weight. For the fused ``c_attn`` use :class:`LoRAFusedQKV`, which keeps ΔW_q and ΔW_v apart.

    Args:
        base: a ``transformers.pytorch_utils.Conv1D`` (any module with ``weight (d_in, d_out)``, ``bias`` and
            ``y = x @ weight + bias``).
        r, alpha, dropout, init, use_rslora, generator: as :class:`LoRALinear`.
    """

    def __init__(
        self,
        base: nn.Module,
        *,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        init: InitScheme = "kaiming",
        use_rslora: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        weight = getattr(base, "weight", None)
        if weight is None or weight.ndim != 2:
            raise TypeError(f"LoRAConv1D wraps a Conv1D with a 2-D weight (d_in, d_out), got {type(base).__name__}")
        d_in, d_out = weight.shape
        if not 0 < r <= min(d_out, d_in):
            raise ValueError(f"rank {r} must be in 1..{min(d_out, d_in)} for a ({d_out}, {d_in}) weight")
        self._init_factors(base, weight, d_out=d_out, d_in=d_in, r=r, alpha=alpha, init=init,
                           use_rslora=use_rslora, generator=generator)
        self.lora_dropout = _dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.merged:
            return y
        # (..., d_in) -> (..., r) -> (..., d_out); the same branch as LoRALinear's, never the dense ΔW.
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, merged={self.merged}"


class LoRAEmbedding(_LoRAOnStoredTranspose):
    """LoRA on ``nn.Embedding``: ``E[x] + s · (B A)ᵀ[x]``.

    The embedding table ``E`` is ``(num_embeddings, dim)``; as a map from one-hot ``x`` it is ``W0 = Eᵀ`` of
    shape ``(dim, num_embeddings)`` in ``nn.Linear`` orientation, so ``A`` is ``(r, num_embeddings)`` and ``B``
    is ``(dim, r)`` (PEFT's ``lora_embedding_A`` / ``lora_embedding_B``).
    """

    def __init__(
        self,
        base: nn.Embedding,
        *,
        r: int,
        alpha: float,
        dropout: float = 0.0,  # accepted for a uniform signature; dropout on token ids is meaningless
        init: InitScheme = "kaiming",
        use_rslora: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Embedding):
            raise TypeError(f"LoRAEmbedding wraps nn.Embedding, got {type(base).__name__}")
        num, dim = base.weight.shape
        if not 0 < r <= min(num, dim):
            raise ValueError(f"rank {r} must be in 1..{min(num, dim)} for a ({num}, {dim}) embedding")
        # as a map from one-hot ids, W0 = Eᵀ is (dim, num): A (r, num), B (dim, r)
        self._init_factors(base, base.weight, d_out=dim, d_in=num, r=r, alpha=alpha, init=init,
                           use_rslora=use_rslora, generator=generator)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.merged:
            return y
        b = self.base
        after_A = F.embedding(x, self.lora_A.T, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)
        return y + F.linear(after_A, self.lora_B) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, merged={self.merged}"

"""Packed multi-adapter training: K LoRA adapters (any ranks, seeds, alphas) trained in one forward and backward.

A sweep trains a grid of adapters (ranks × seeds) on one frozen base. Trained one after another, each adapter
pays for its own small forward and backward. Packed, the K batches are concatenated along the batch axis and
run through the base *once*; each example is routed to its own adapter only::

    x = [x_1; x_2; ...; x_K]                       (N = Σ n_k examples, group k is rows n_1+..+n_{k-1} ...)
    y[g_k] = W0 x[g_k] + b + s_k · B_k (A_k x[g_k])  (every adapted layer; A_k (r_k, d_in), B_k (d_out, r_k))
    L = Σ_k L_k,   L_k = the mean loss of group k   (exactly the loss adapter k would see alone)

Because group k's outputs depend only on ``(A_k, B_k)`` (and the frozen base), ``∂L/∂A_k = ∂L_k/∂A_k``: the sum of
per-adapter mean losses separates exactly. Each adapter has its own parameters, hence its own AdamW moments,
so one packed step equals K sequential steps up to float rounding (same data order, same init, dropout 0; with
dropout the random masks differ, not the maths). A task head trained with the adapter (``modules_to_save``)
is packed the same way: K full copies, each applied to its own group (:class:`PackedCopies`).

The speed comes from running the frozen base as one large batch: fewer, larger matrix products and one pass
of Python/autograd overhead instead of K. Exact packing shares no frozen product past the embeddings when every
layer is adapted, so on a CPU the packed step does the arithmetic of the K steps it replaces and gains only
their overhead: ``--pack auto`` (:func:`packing_pays`) packs only where that pays (see ``benchmarks/``).

Typical use::

    specs = [AdapterSpec(r=8, alpha=8, seed=0), AdapterSpec(r=64, alpha=64, seed=0), ...]
    result = train_packed(model, specs, batches, targets=["q", "v"], kind="classification", lr=5e-4)
    single = unpack_adapter(result.model, 1)    # an ordinary model with LoRALinear layers: save_adapter works
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora.errors import UserError
from lora.inject import _set_submodule, module_generator, resolve_targets
from lora.layers import InitScheme, LoRALinear, init_lora_A_, lora_scaling

__all__ = [
    "AdapterSpec",
    "PackedCopies",
    "PackedLoRALinear",
    "PackedResult",
    "concat_batches",
    "group_losses",
    "pack_lora",
    "packed_modules",
    "packing_pays",
    "route",
    "train_packed",
    "unpack_adapter",
]

IGNORE_INDEX = -100

# ``--pack auto`` on a CPU packs only when one adapter's step holds at most this many tokens (batch × max length).
# Exact packing shares no frozen product past the embeddings (q and v are adapted in every layer), so a packed
# step does the arithmetic of K steps; what it saves is per-step overhead (Python, autograd, kernel launches),
# which is a visible share of a step only when the step is small. Measured with benchmarks/cases_packed.py on
# all-MiniLM-L6-v2 at 1 thread on a shared 2-core machine, K = 6 adapters (tokens per adapter step: packed speed
# over sequential): 128: 1.17x; 256: 1.00-1.14x; 512: 1.00x; 1024: 0.84-0.94x (and 0.85x for a pack of only 2).
CPU_PACK_MAX_TOKENS = 256


def packing_pays(*, batch_size: int, max_length: int, workers: int = 1, dropout: float = 0.0,
                 device: str | torch.device = "cpu") -> tuple[bool, str]:
    """The ``--pack auto`` rule: whether packing a process's grid points beats training them one by one.

    * LoRA dropout > 0: never (packed adapters would draw other masks than alone: not the same adapters).
    * CUDA: always (a small step leaves the device mostly idle; one K-times larger step fills it).
    * CPU: only with one worker process (packing runs in one process, so against ``workers`` > 1 processes it
      gives up the other cores) and at most :data:`CPU_PACK_MAX_TOKENS` tokens per adapter step
      (``batch_size · max_length``; above it the packed step is the same arithmetic, done no faster).

    Returns:
        ``(pack, reason)``: the decision and a one-line reason for the log.
    """
    if dropout > 0:
        return False, f"LoRA dropout {dropout} > 0: packed adapters would not equal sequential ones"
    if torch.device(device).type == "cuda":
        return True, "CUDA: one packed step fills the device better than K small ones"
    tokens = batch_size * max_length
    if workers > 1:
        return False, f"{workers} worker processes use {workers} cores; a pack trains in one"
    if tokens > CPU_PACK_MAX_TOKENS:
        return False, (f"{tokens} tokens per adapter step > {CPU_PACK_MAX_TOKENS}: on a CPU a packed step is no "
                       "faster than the steps it packs")
    return True, f"{tokens} tokens per adapter step <= {CPU_PACK_MAX_TOKENS}: packing saves per-step overhead"


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter of a pack.

    Attributes:
        r: rank.
        alpha: LoRA alpha (``s = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).
        seed: seeds ``A``'s init exactly as :func:`lora.inject.inject_lora` does with ``seed=seed``.
        lr: learning rate of this adapter (``None``: the ``lr`` given to :func:`train_packed`).
    """

    r: int
    alpha: float
    seed: int = 0
    lr: float | None = None

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"rank r must be positive, got {self.r}")


class _Routed(nn.Module):
    """Base of the packed modules: holds the group sizes of the current batch (set by :func:`route`)."""

    sizes: tuple[int, ...] | None = None

    def _groups(self, x: Tensor) -> tuple[int, ...]:
        sizes = self.sizes
        if sizes is None:
            raise RuntimeError(f"{type(self).__name__}: no routing set; run the model inside `with route(model, sizes)`")
        if len(sizes) != self.num_adapters or sum(sizes) != x.shape[0]:
            raise ValueError(
                f"routing sizes {sizes} (for {self.num_adapters} adapters) do not split a batch of {x.shape[0]} rows"
            )
        return sizes

    num_adapters: int


class PackedLoRALinear(_Routed):
    """``K`` LoRA adapters of possibly different ranks on one frozen ``nn.Linear``; rows routed by group.

    For group ``k`` (rows ``g_k`` of the batch, contiguous, in adapter order)::

        y[g_k] = W0 x[g_k] + b + s_k · B_k (A_k dropout(x[g_k]))

    The base product runs once over all rows; each adapter's two small products run over its own rows only, so
    no row ever touches another adapter's factors (exact routing, no masks, no wasted products).

    Args:
        base: the frozen ``nn.Linear`` (``weight (d_out, d_in)``).
        specs: one :class:`AdapterSpec` per adapter.
        dropout: dropout on each adapter's input.
        init: ``A``'s init scheme (``B`` starts at zero).
        use_rslora: ``s_k = alpha_k / sqrt(r_k)``.
        generators: one generator per adapter for ``A``'s init (``None``: torch's global stream).

    Parameters ``lora_A.k`` ``(r_k, d_in)`` and ``lora_B.k`` ``(d_out, r_k)`` are separate tensors per adapter, so
    an optimizer keeps separate state for each.
    """

    def __init__(
        self,
        base: nn.Linear,
        specs: Sequence[AdapterSpec],
        *,
        dropout: float = 0.0,
        init: InitScheme = "kaiming",
        use_rslora: bool = False,
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"PackedLoRALinear wraps nn.Linear, got {type(base).__name__}")
        if not specs:
            raise ValueError("a pack needs at least one adapter")
        d_out, d_in = base.weight.shape
        for s in specs:
            if not 0 < s.r <= min(d_out, d_in):
                raise ValueError(f"rank {s.r} must be in 1..{min(d_out, d_in)} for a ({d_out}, {d_in}) weight")
        gens = list(generators) if generators is not None else [None] * len(specs)
        if len(gens) != len(specs):
            raise ValueError(f"{len(gens)} generators for {len(specs)} adapters")
        self.base = base
        self.specs = tuple(specs)
        self.num_adapters = len(specs)
        self.use_rslora = use_rslora
        self.scalings = tuple(lora_scaling(s.r, s.alpha, use_rslora=use_rslora) for s in specs)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        for s, g in zip(specs, gens, strict=True):
            A = nn.Parameter(torch.empty(s.r, d_in, **factory))
            init_lora_A_(A, init, generator=g)
            self.lora_A.append(A)
            self.lora_B.append(nn.Parameter(torch.zeros(d_out, s.r, **factory)))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        sizes = self._groups(x)
        y = self.base(x)  # one frozen product over every row of every group
        # Each adapter's term is added in place into its own rows of y (F.linear's backward never reads its
        # output, so autograd allows it): no (N, ..., d_out) concatenation and no second full-size sum. A run of
        # consecutive adapters with one rank, one scale and one group size (the seeds of a rank in a sweep) is
        # one pair of batched products: (K, n·T, d_in) @ (K, d_in, r) -> (K, n·T, r) @ (K, r, d_out).
        start = 0
        for k0, k1 in self._runs(sizes):
            rows = sum(sizes[k0:k1])
            if rows == 0:
                continue
            xk = self.lora_dropout(x.narrow(0, start, rows))
            yk = y.narrow(0, start, rows)
            s = self.scalings[k0]
            if k1 - k0 == 1:
                h = F.linear(xk, self.lora_A[k0])  # (n, ..., r)
                yk.view(-1, yk.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), self.lora_B[k0].t(), alpha=s)
            else:
                K = k1 - k0
                A = torch.stack(list(self.lora_A[k0:k1]))  # (K, r, d_in)
                B = torch.stack(list(self.lora_B[k0:k1]))  # (K, d_out, r)
                h = torch.bmm(xk.reshape(K, -1, xk.shape[-1]), A.transpose(1, 2))  # (K, n·T, r)
                yk.view(K, -1, yk.shape[-1]).baddbmm_(h, B.transpose(1, 2), alpha=s)
            start += rows
        return y

    def _runs(self, sizes: Sequence[int]) -> list[tuple[int, int]]:
        """Split adapters ``0..K-1`` into maximal runs ``[k0, k1)`` of consecutive adapters sharing rank, scale
        and group size (each run is one batched product in :meth:`forward`)."""
        runs: list[tuple[int, int]] = []
        key = [(s.r, sc, n) for s, sc, n in zip(self.specs, self.scalings, sizes, strict=True)]
        for k in range(len(key)):
            if runs and key[k] == key[runs[-1][0]]:
                runs[-1] = (runs[-1][0], k + 1)
            else:
                runs.append((k, k + 1))
        return runs

    def adapter_parameters(self, k: int) -> list[nn.Parameter]:
        return [self.lora_A[k], self.lora_B[k]]

    def extra_repr(self) -> str:
        return f"ranks={[s.r for s in self.specs]}, scalings={[round(s, 4) for s in self.scalings]}"


class PackedCopies(_Routed):
    """``K`` trainable copies of a whole module (e.g. a task head, PEFT's ``modules_to_save``); group ``k`` of
    the batch goes through copy ``k``. The copies start equal to ``module`` unless ``init`` re-initialises them."""

    def __init__(self, module: nn.Module, num_adapters: int) -> None:
        super().__init__()
        self.num_adapters = num_adapters
        self.copies = nn.ModuleList(copy.deepcopy(module) for _ in range(num_adapters))

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        sizes = self._groups(x)
        outs = [m(xk, *args, **kwargs) for m, xk in zip(self.copies, x.split(sizes, dim=0), strict=True)]
        return torch.cat(outs, dim=0)

    def adapter_parameters(self, k: int) -> list[nn.Parameter]:
        return list(self.copies[k].parameters())


def packed_modules(model: nn.Module) -> dict[str, _Routed]:
    """Every packed module of ``model`` (found by type), by path."""
    return {p: m for p, m in model.named_modules() if isinstance(m, _Routed)}


@contextlib.contextmanager
def route(model: nn.Module, sizes: Sequence[int]) -> Iterator[None]:
    """Route the next forward(s): the batch is ``len(sizes)`` contiguous groups, group ``k`` of ``sizes[k]`` rows
    going to adapter ``k``. Routing is cleared on exit, so a forward outside this block fails loudly."""
    mods = packed_modules(model).values()
    sizes = tuple(int(n) for n in sizes)
    for m in mods:
        m.sizes = sizes
    try:
        yield
    finally:
        for m in mods:
            m.sizes = None


def pack_lora(
    model: nn.Module,
    targets: Sequence[str],
    specs: Sequence[AdapterSpec],
    *,
    dropout: float = 0.0,
    init: InitScheme = "kaiming",
    use_rslora: bool = False,
    layers: Sequence[int] | None = None,
    init_seed_per_rank: bool = False,
    modules_to_save: Sequence[str] = (),
    init_copy: Callable[[int, str, nn.Module], None] | None = None,
) -> dict[str, _Routed]:
    """Replace each target ``nn.Linear`` of ``model`` by a :class:`PackedLoRALinear` holding ``specs``, and each
    ``modules_to_save`` module by :class:`PackedCopies`; freeze everything else.

    Adapter ``k``'s ``A`` starts exactly where :func:`lora.inject.inject_lora` with ``r=specs[k].r`` and
    ``seed=specs[k].seed`` would start it (same per-module generator), so packed and sequential training begin
    from the same point. Fused GPT-2 ``Conv1D`` slices and embeddings are not packed (``UserError``).

    ``init_copy(k, path, module)``, if given, re-initialises adapter ``k``'s copy of a saved module in place
    (e.g. a task head drawn from adapter ``k``'s seed, as a sequential run would draw it).

    Returns:
        ``{module path: packed module}``.
    """
    if not specs:
        raise UserError("--pack: no adapters to pack")
    plan = resolve_targets(model, targets, layers=layers)
    for p in model.parameters():
        p.requires_grad_(False)
    out: dict[str, _Routed] = {}
    for path, slices in plan.items():
        base = model.get_submodule(path)
        if slices or not isinstance(base, nn.Linear):
            raise UserError(f"--pack: {path} is a {type(base).__name__}; packing supports nn.Linear targets only")
        gens = [module_generator(s.seed, path, rank=s.r if init_seed_per_rank else None) for s in specs]
        packed = PackedLoRALinear(base, specs, dropout=dropout, init=init, use_rslora=use_rslora, generators=gens)
        _set_submodule(model, path, packed)
        out[path] = packed
    for name in modules_to_save:
        hits = [p for p, _ in model.named_modules() if p == name or p.endswith("." + name)]
        hits = [p for p in hits if not isinstance(model.get_submodule(p), _Routed)]
        if not hits:
            raise UserError(f"--modules-to-save: {name!r} matches no module of {type(model).__name__}")
        for path in hits:
            packed = PackedCopies(model.get_submodule(path), len(specs))
            if init_copy is not None:
                for k, m in enumerate(packed.copies):
                    init_copy(k, path, m)
            packed.requires_grad_(True)
            _set_submodule(model, path, packed)
            out[path] = packed
    return out


def adapter_parameters(model: nn.Module, k: int) -> list[nn.Parameter]:
    """Every trainable parameter of adapter ``k`` (its LoRA factors and its copies of saved modules)."""
    return [p for m in packed_modules(model).values() for p in m.adapter_parameters(k)]


def concat_batches(batches: Sequence, *, pad_id: int = 0) -> tuple[object, tuple[int, ...]]:
    """Concatenate K batches (objects with ``input_ids``, ``attention_mask`` ``(n_k, T_k)`` and ``labels``
    ``(n_k,)`` or ``(n_k, T_k)``) along the batch axis, right-padding to the longest ``T``.

    Returns the packed batch (same type, built with keyword arguments) and the group sizes.
    """
    T = max(b.input_ids.shape[1] for b in batches)

    def pad(t: Tensor, value: int) -> Tensor:
        return F.pad(t, (0, T - t.shape[1]), value=value) if t.ndim == 2 and t.shape[1] < T else t

    ids = torch.cat([pad(b.input_ids, pad_id) for b in batches])
    mask = torch.cat([pad(b.attention_mask, 0) for b in batches])
    labels = torch.cat([pad(b.labels, IGNORE_INDEX) for b in batches])
    cls = type(batches[0])
    fields = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    extra = getattr(cls, "__dataclass_fields__", {})
    for name in extra:  # keep any other field of the first batch (e.g. a source tag)
        if name not in fields:
            fields[name] = getattr(batches[0], name)
    return cls(**fields), tuple(b.input_ids.shape[0] for b in batches)


def group_losses(logits: Tensor, labels: Tensor, sizes: Sequence[int], *, kind: str) -> Tensor:
    """Per-group mean cross-entropy ``(K,)``: over examples (``classification``, ``logits (N, C)``) or over
    non-ignored next tokens (``causal_lm``, ``logits (N, T, V)``, labels shifted by one as transformers does)."""
    out = []
    for lg, lb in zip(logits.split(list(sizes)), labels.split(list(sizes)), strict=True):
        if kind == "classification":
            out.append(F.cross_entropy(lg.float(), lb))
        elif kind == "causal_lm":
            out.append(F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]).float(), lb[:, 1:].reshape(-1),
                                       ignore_index=IGNORE_INDEX))
        else:
            raise ValueError(f"kind must be 'classification' or 'causal_lm', got {kind!r}")
    return torch.stack(out)


@dataclass(frozen=True)
class PackedResult:
    """The trained pack: ``model`` (still packed), per-step per-adapter losses ``losses[step][k]``, wall time."""

    model: nn.Module
    specs: tuple[AdapterSpec, ...]
    losses: tuple[tuple[float, ...], ...]
    wall_time_s: float


def train_packed(
    model: nn.Module,
    specs: Sequence[AdapterSpec],
    batches: Iterable[Sequence],
    *,
    targets: Sequence[str],
    kind: str = "classification",
    lr: float = 5e-4,
    weight_decay: float = 0.0,
    dropout: float = 0.0,
    init: InitScheme = "kaiming",
    use_rslora: bool = False,
    layers: Sequence[int] | None = None,
    init_seed_per_rank: bool = False,
    modules_to_save: Sequence[str] = (),
    lr_lambda: Callable[[int], float] | None = None,
    pad_id: int = 0,
    loss: Callable[[nn.Module, object, tuple[int, ...]], Tensor] | None = None,
    init_copy: Callable[[int, str, nn.Module], None] | None = None,
) -> PackedResult:
    """Train ``len(specs)`` adapters on ``model`` in one packed forward/backward per step.

    Args:
        model: the base model (changed in place: targets become packed LoRA layers).
        specs: the adapters.
        batches: per step, a sequence of K batches (batch ``k`` feeds adapter ``k``; the same data order a
            sequential run of adapter ``k`` would see).
        targets, dropout, init, use_rslora, layers, init_seed_per_rank, modules_to_save, init_copy: as
            :func:`pack_lora`.
        kind: ``"classification"`` (model returns ``logits (N, C)``) or ``"causal_lm"``.
        lr, weight_decay: AdamW settings (``AdapterSpec.lr`` overrides ``lr``; one parameter group per distinct lr).
        lr_lambda: optional multiplier schedule per step (``torch.optim.lr_scheduler.LambdaLR``).
        pad_id: padding id when batches of different lengths are concatenated.
        loss: optional ``loss(model, packed_batch, sizes) -> (K,)`` per-adapter losses (default: the model's
            ``logits`` through :func:`group_losses`).

    The step minimises ``Σ_k L_k`` (see the module docstring): adapter ``k``'s gradient is exactly its own.
    """
    specs = tuple(specs)
    pack_lora(model, targets, specs, dropout=dropout, init=init, use_rslora=use_rslora, layers=layers,
              init_seed_per_rank=init_seed_per_rank, modules_to_save=modules_to_save, init_copy=init_copy)
    lrs = [s.lr if s.lr is not None else lr for s in specs]
    groups = ([{"params": [p for k in range(len(specs)) for p in adapter_parameters(model, k)], "lr": lr}]
              if len(set(lrs)) == 1 else
              [{"params": adapter_parameters(model, k), "lr": lr_k} for k, lr_k in enumerate(lrs)])
    # foreach: one multi-tensor update per group (bitwise the per-tensor loop's result on CPU)
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) if lr_lambda is not None else None

    def default_loss(m: nn.Module, batch, sizes: tuple[int, ...]) -> Tensor:
        out = m(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        return group_losses(out.logits, batch.labels, sizes, kind=kind)

    loss_fn = loss or default_loss
    history: list[tuple[float, ...]] = []
    start = time.perf_counter()
    model.train()
    for step_batches in batches:
        if len(step_batches) != len(specs):
            raise ValueError(f"step {len(history)}: {len(step_batches)} batches for {len(specs)} adapters")
        batch, sizes = concat_batches(step_batches, pad_id=pad_id)
        with route(model, sizes):
            per_adapter = loss_fn(model, batch, sizes)  # (K,)
        opt.zero_grad(set_to_none=True)
        per_adapter.sum().backward()
        opt.step()
        if sched is not None:
            sched.step()
        history.append(tuple(float(v) for v in per_adapter.detach()))
    return PackedResult(model, specs, tuple(history), time.perf_counter() - start)


def unpack_adapter(model: nn.Module, k: int) -> nn.Module:
    """A copy of the packed ``model`` holding adapter ``k`` alone: each :class:`PackedLoRALinear` becomes a
    :class:`~lora.layers.LoRALinear` with ``A_k``, ``B_k`` (so :func:`lora.adapter_io.save_adapter` and every
    analysis tool work on it) and each :class:`PackedCopies` becomes its copy ``k``."""
    packed = packed_modules(model)
    if not packed:
        raise ValueError("model holds no packed adapters")
    n = next(iter(packed.values())).num_adapters
    if not 0 <= k < n:
        raise ValueError(f"adapter index {k} out of range for a pack of {n}")
    out = copy.deepcopy(model)
    for path, m in packed_modules(out).items():
        if isinstance(m, PackedLoRALinear):
            s = m.specs[k]
            single = LoRALinear(m.base, r=s.r, alpha=s.alpha, dropout=getattr(m.lora_dropout, "p", 0.0),
                                use_rslora=m.use_rslora)
            with torch.no_grad():
                single.lora_A.copy_(m.lora_A[k])
                single.lora_B.copy_(m.lora_B[k])
            _set_submodule(out, path, single)
        else:
            _set_submodule(out, path, m.copies[k])
    return out

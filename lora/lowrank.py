"""Best rank-K approximations of LoRA updates and what each keeps: the maths shared by :mod:`lora.resize` and
:mod:`lora.extract`, and the pieces of their commands that are the same (the "what it keeps" table, the adapter
writer, ``--eval``).

**The truncation** (Eckart–Young). For ``ΔW = U Σ Vᵀ`` (``σ_1 ≥ σ_2 ≥ ...``) the best rank-``K`` approximation in
the Frobenius (and spectral) norm is ``ΔW_K = U_K Σ_K V_Kᵀ``, with error ``‖ΔW − ΔW_K‖_F² = Σ_{i>K} σ_i²``.
A LoRA update ``ΔW = s·B·A`` (``A (r, d_in)``, ``B (d_out, r)``) is truncated from its *factored* SVD
(:func:`factored_svd`: QR of ``B`` and ``Aᵀ``, SVD of the ``r × r`` core), never a dense ``(d_out, d_in)`` one; a
dense ``ΔW`` (:mod:`lora.extract`) goes through :func:`top_svd`.

**The written factors** are balanced and carry the scale: ``B' = U_K Σ_K^{1/2}``, ``A' = Σ_K^{1/2} V_Kᵀ`` and
``s' = 1`` (``lora_alpha = r'``, or ``√r'`` with rsLoRA), as peft's own ``convert_to_lora`` sets ``lora_alpha = r``
(peft puts all of ``Σ`` into ``B``). Why ``s' = 1``: the factors then *are* ``ΔW_K``, with no scale hidden in
``alpha / r`` to keep consistent across modules of different ranks (``rank_pattern`` needs only
``alpha_pattern = rank_pattern``); why balanced: ``‖A'‖ = ‖B'‖``, so neither factor is ``σ_1`` times larger than the
other in a low-precision dtype and further training starts from factors of one scale. Training further changes the
effective learning rate from the original ``alpha / r`` schedule: set ``lora_alpha`` and rescale if that matters.

**What it keeps** (:class:`Kept`, per module): the kept fraction of ``‖ΔW‖_F²`` (``Σ_{i≤K} σ_i² / Σ σ_i²``), the
relative error ``‖ΔW − ΔW_K‖_F / ‖ΔW‖_F`` (``√(Σ_{i>K} σ_i² / Σ σ_i²)``), and φ, the normalized subspace
similarity ``‖Q_Kᵀ V_K‖_F² / K`` between the right singular directions the *written* factors span (``Q_K``, the
row space of the stored ``A'``) and the original top-``K`` ones ``V_K``. By Eckart–Young φ is 1 up to the stored
dtype's rounding when ``σ_K > σ_{K+1}`` by a margin; it falls below 1 where the ``K``-th direction is not
determined (``σ_{K+1} / σ_K`` near 1, reported as ``gap``) or a low-precision dtype blurs it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lora.errors import UserError
from lora.factored import factored_svd

__all__ = ["DENSE_MAX", "Kept", "factored_svd", "energy_rank", "phi", "resize_factors", "top_svd", "totals",
           "truncate"]

DENSE_MAX = 1024  # a dense float64 SVD for matrices whose smaller side is at most this; above, top_svd's Krylov route


# ---------------------------------------------------------------------------------------------------------------- maths
def energy_rank(S: Tensor, fraction: float, total: float | None = None) -> int:
    """The smallest ``K ≥ 1`` with ``Σ_{i≤K} σ_i² ≥ fraction · total`` (``total``: ``Σ σ_i²`` unless given, e.g.
    ``‖ΔW‖_F²`` when ``S`` holds only the top values); ``len(S)`` if none reaches it. peft's ``convert_to_lora``
    with a float rank picks the same ``K`` (``searchsorted`` on the cumulative energy, plus one)."""
    energy = torch.cumsum(S.to(torch.float64) ** 2, 0)
    goal = fraction * (float(energy[-1]) if total is None else total)
    hits = (energy >= goal).nonzero()
    return int(hits[0]) + 1 if len(hits) else len(S)


def truncate(U: Tensor, S: Tensor, V: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Balanced factors of ``U_K Σ_K V_Kᵀ``: ``(A' = Σ_K^{1/2} V_Kᵀ (K, d_in), B' = U_K Σ_K^{1/2} (d_out, K))``."""
    root = S[:rank].clamp_min(0).sqrt()
    return root[:, None] * V[:, :rank].T, U[:, :rank] * root


def phi(Q: Tensor, V: Tensor) -> float:
    """Normalized subspace similarity ``‖Qᵀ V‖_F² / min(q, k)`` of two orthonormal bases ``Q (d, q)``, ``V (d, k)``
    (1: one contains the other; the paper's φ with ``i = q``, ``j = k``)."""
    if Q.shape[1] == 0 or V.shape[1] == 0:
        return float("nan")
    return float((Q.T.to(torch.float64) @ V.to(torch.float64)).pow(2).sum()) / min(Q.shape[1], V.shape[1])


def row_basis(A: Tensor) -> Tensor:
    """An orthonormal basis ``(d_in, K)`` of the row space of ``A (K, d_in)``, in float64 (from its stored dtype)."""
    return torch.linalg.qr(A.detach().to(torch.float64).T)[0]


@dataclass
class Kept:
    """What a rank-``K`` truncation of one module's ``ΔW`` keeps.

    Attributes:
        module: the module key. shape: ``(d_out, d_in)``. rank_in: the rank it had (the adapter's ``r``, or
        ``min(d_out, d_in)`` for a dense ΔW). rank: ``K``. energy: ``‖ΔW‖_F²``. kept: ``‖ΔW_K‖_F² / ‖ΔW‖_F²``.
        rel_error: ``‖ΔW − ΔW_K‖_F / ‖ΔW‖_F``. phi: φ between the written factors' right directions and the original
        top-``K`` ones (``None`` for a zero ΔW). gap: ``σ_{K+1} / σ_K`` (0 if ``K`` is the full rank; ``None`` if
        ``σ_K = 0``). method: ``"factored"``, ``"dense"`` or ``"krylov"``.
    """

    module: str
    shape: tuple[int, int]
    rank_in: int
    rank: int
    energy: float
    kept: float
    rel_error: float
    phi: float | None
    gap: float | None
    method: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def _kept(module: str, shape: tuple[int, int], rank_in: int, S: Tensor, rank: int, total: float, written_A: Tensor,
          V: Tensor, method: str) -> Kept:
    """The :class:`Kept` record of a truncation to ``rank`` of a ΔW with (top) singular values ``S`` and energy
    ``total``, written as ``written_A`` (stored dtype), whose original top directions are ``V[:, :rank]``."""
    S = S.to(torch.float64)
    captured = float((S[:rank] ** 2).sum())
    # The tail: summed directly where all σ are known (no cancellation); otherwise total − captured, exact by
    # Pythagoras for a projection (ΔW_K = U_K U_Kᵀ ΔW) but absolute error ~ eps·total, so rel_error ~ 1e-8 there.
    tail = float((S[rank:] ** 2).sum()) if method != "krylov" else max(total - captured, 0.0)
    if total <= 0.0:
        return Kept(module, shape, rank_in, rank, 0.0, 1.0, 0.0, None, None, method)
    sigma_k = float(S[rank - 1]) if rank <= len(S) else 0.0
    nxt = float(S[rank]) if rank < len(S) else 0.0
    gap = (nxt / sigma_k) if sigma_k > 0 else None
    return Kept(module, shape, rank_in, rank, total, captured / total, math.sqrt(tail / total),
                phi(row_basis(written_A), V[:, :rank]), gap, method)


def resize_factors(A: Tensor, B: Tensor, scaling: float, rank: int | None, *, energy: float | None = None,
                   module: str = "", dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Kept]:
    """The best rank-``K`` approximation of ``ΔW = scaling·B·A`` as balanced factors with scale 1.

    Args:
        A: ``(r, d_in)``; B: ``(d_out, r)``; scaling: ``s``.
        rank: ``K``, ``1 ≤ K ≤ r``; or ``None`` with ``energy``: the smallest ``K`` keeping that fraction of
            ``‖ΔW‖_F²`` (:func:`energy_rank`).
        module: the module key, for the record. dtype: of the returned factors (default: ``A``'s).

    Returns:
        ``(A' (K, d_in), B' (d_out, K), kept)`` with ``B' A' = ΔW_K`` up to rounding to ``dtype``; pure: no I/O.
    """
    r = A.shape[0]
    U, S, V = factored_svd(A, B, scaling)
    if rank is None:
        if energy is None:
            raise ValueError("resize_factors: give rank or energy")
        rank = energy_rank(S, energy)
    if not 1 <= rank <= r:
        raise ValueError(f"resize_factors: rank {rank} outside 1..{r}")
    A2, B2 = truncate(U, S, V, rank)
    dtype = dtype or A.dtype
    A2, B2 = A2.to(dtype).contiguous(), B2.to(dtype).contiguous()
    total = float((S**2).sum())
    return A2, B2, _kept(module, (B.shape[0], A.shape[1]), r, S, rank, total, A2, V, "factored")


def top_svd(dW: Tensor, rank: int | None = None, *, energy: float | None = None, dense_max: int = DENSE_MAX,
            tol: float = 1e-12, max_iter: int = 50, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, float, str]:
    """The top singular triplets of a dense ``dW (d_out, d_in)``, float64: ``(U, S, V, ‖dW‖_F², method)``.

    ``min(d_out, d_in) ≤ dense_max``: the full SVD (``method = "dense"``). Above: block Krylov subspace iteration
    with a float64 Rayleigh–Ritz (``"krylov"``): ``Q`` an orthonormal basis of ``dW Ω`` (``Ω`` Gaussian, ``l = K +
    max(10, K/2)`` columns), refined by ``Q ← qr(dW qr(dWᵀ Q))`` until the Ritz energy of the top ``K`` values,
    ``Σ_{i≤K} σ̃_i²`` from the SVD of ``Qᵀ dW``, changes by less than ``tol`` relative (at most ``max_iter``
    rounds). The Ritz values are lower bounds of the true ones and the truncation ``U_K Σ_K V_Kᵀ = U_K U_Kᵀ dW`` is a
    projection, so what it keeps is measured exactly; the tests compare it with a dense SVD (within 1e-9 relative
    energy on a slowly decaying spectrum). With ``energy`` (a fraction) instead of ``rank``, ``K`` doubles from 16
    until the top values hold that fraction of ``‖dW‖_F²``.
    """
    dW = dW.to(torch.float64)
    total = float(dW.pow(2).sum())
    m, n = dW.shape
    if min(m, n) <= dense_max:
        U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
        return U, S, Vh.T, total, "dense"
    k = rank if rank is not None else 16
    g = torch.Generator().manual_seed(seed)
    while True:
        ell = min(k + max(10, k // 2), min(m, n))
        Q = torch.linalg.qr(dW @ torch.randn(n, ell, generator=g, dtype=torch.float64))[0]
        last = -1.0
        for _ in range(max_iter):
            Q = torch.linalg.qr(dW @ torch.linalg.qr(dW.T @ Q)[0])[0]
            Uc, S, Vh = torch.linalg.svd(Q.T @ dW, full_matrices=False)
            now = float((S[:k] ** 2).sum())
            if abs(now - last) <= tol * max(now, 1e-300):
                break
            last = now
        if energy is None or now >= energy * total or k >= min(m, n):
            return Q @ Uc, S, Vh.T, total, "krylov"
        k = min(2 * k, min(m, n))


def dense_truncation(dW: Tensor, rank: int | None, energy: float | None, *, module: str, dense_max: int = DENSE_MAX,
                     dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Kept]:
    """The best rank-``K`` approximation of a dense ``dW (d_out, d_in)`` as balanced factors with scale 1 (``K``
    = ``rank``, or the smallest keeping ``energy`` of ``‖dW‖_F²``): ``(A' (K, d_in), B' (d_out, K), kept)``."""
    U, S, V, total, method = top_svd(dW, rank, energy=energy, dense_max=dense_max)
    K = rank if rank is not None else energy_rank(S, energy, total)
    A2, B2 = truncate(U, S, V, K)
    A2, B2 = A2.to(dtype).contiguous(), B2.to(dtype).contiguous()
    return A2, B2, _kept(module, tuple(dW.shape), min(dW.shape), S, K, total, A2, V, method)


def totals(records: Iterable[Kept]) -> dict[str, Any]:
    """Over all modules: kept fraction of ``Σ ‖ΔW‖_F²``, the relative error ``√(Σ tail / Σ energy)``, mean φ."""
    recs = list(records)
    energy = sum(k.energy for k in recs)
    kept = sum(k.energy * k.kept for k in recs)
    tail = sum(k.energy * k.rel_error**2 for k in recs)
    phis = [k.phi for k in recs if k.phi is not None]
    return {"modules": len(recs), "energy": energy, "kept": kept / energy if energy > 0 else 1.0,
            "rel_error": math.sqrt(tail / energy) if energy > 0 else 0.0,
            "phi_mean": sum(phis) / len(phis) if phis else None, "phi_min": min(phis) if phis else None}


# ------------------------------------------------------------------------------------------------- shared by the CLIs
def peft_alpha(rank: int, use_rslora: bool) -> float:
    """``lora_alpha`` giving peft's scale 1 at ``rank``: ``rank`` (``alpha / r``), ``√rank`` (rsLoRA)."""
    return math.sqrt(rank) if use_rslora else float(rank)


def rank_fields(ranks: Mapping[str, int], use_rslora: bool) -> dict[str, Any]:
    """``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern`` for peft module paths with ranks ``ranks``, every
    scale 1: ``r`` is the most common rank, the others are patterns (full module paths, which peft's
    ``(.*\\.)?(key)$`` match takes as themselves)."""
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r0 = max(sorted(counts), key=lambda r: counts[r])
    pattern = {p: r for p, r in ranks.items() if r != r0}
    return {"r": r0, "lora_alpha": peft_alpha(r0, use_rslora), "rank_pattern": pattern,
            "alpha_pattern": {p: peft_alpha(r, use_rslora) for p, r in pattern.items()}}


def format_table(records: Sequence[Kept], extra: Sequence[str] = ()) -> str:
    """The per-module and total "what it keeps" table printed by both commands."""
    width = max([len("module")] + [len(k.module) for k in records])
    lines = [f"{'module':<{width}}  {'rank':>9}  {'kept ‖ΔW‖²':>10}  {'rel error':>9}  {'φ':>6}  {'σK+1/σK':>7}"]
    for k in records:
        ph = f"{k.phi:.4f}" if k.phi is not None else "-"
        gap = f"{k.gap:.3f}" if k.gap is not None else "-"
        lines.append(f"{k.module:<{width}}  {f'{k.rank_in}→{k.rank}':>9}  {k.kept:>10.4f}  {k.rel_error:>9.4f}  "
                     f"{ph:>6}  {gap:>7}")
    t = totals(records)
    ph = f"{t['phi_mean']:.4f}" if t["phi_mean"] is not None else "-"
    lines.append(f"{'total (' + str(t['modules']) + ' modules)':<{width}}  {'':>9}  {t['kept']:>10.4f}  "
                 f"{t['rel_error']:>9.4f}  {ph:>6}")
    return "\n".join([*lines, *extra])


def write_adapter_files(tmp: Path, config: Mapping[str, Any], sidecar: Mapping[str, Any],
                        tensors: Mapping[str, Tensor]) -> None:
    """``adapter_config.json`` (peft's fields), ``lora_toolkit.json`` (ours) and ``adapter_model.safetensors`` into
    the temporary directory ``tmp`` of an :func:`lora.fsio.atomic_dir`."""
    from safetensors.torch import save_file

    from lora.adapter_io import CONFIG_NAME, TOOLKIT_FILE, WEIGHTS_NAME

    (tmp / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    (tmp / TOOLKIT_FILE).write_text(json.dumps(dict(sidecar), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME),
              metadata={"format": "pt"})


def write_outputs(out: Path, *, overwrite: bool, config: Mapping[str, Any], sidecar: Mapping[str, Any],
                  tensors: Mapping[str, Tensor], report_name: str, report: dict[str, Any],
                  evaluate: Any = None) -> None:
    """Write the adapter and its report at ``out`` atomically (nothing is left there on any failure, a full disk
    included); ``evaluate(tmp)`` (``--eval``), run on the written adapter before it is renamed into place, adds
    ``report["eval"]``."""
    from lora.fsio import atomic_dir, remove_stale_temps

    remove_stale_temps(out.absolute().parent, out.name)  # left by a killed writer; a live one's are locked
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_adapter_files(tmp, config, sidecar, tensors)
        if evaluate is not None:
            report["eval"] = evaluate(tmp)
        (tmp / report_name).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def check_rank_option(rank: int | None, energy: float | None) -> None:
    """``--rank`` at least 1, ``--energy`` in (0, 1]."""
    if rank is not None and rank < 1:
        raise UserError(f"--rank {rank}: must be at least 1")
    if energy is not None and not 0 < energy <= 1:
        raise UserError(f"--energy {energy:g}: must be in (0, 1] (a fraction of ‖ΔW‖_F² to keep)")


# ------------------------------------------------------------------------------------------------------------ --eval
def evaluate_adapter(adapter_dir: Path, *, task: str | None = None, max_length: int | None = None,
                     base: str | None = None) -> dict[str, float]:
    """Validation metrics (``accuracy``, ``loss``) of the adapter in ``adapter_dir`` on its task, with the task head
    it carries, through the trainer's :func:`lora.train.evaluate` (one torch thread).

    ``task`` and ``max_length`` default to the adapter's recorded task (``lora_toolkit.task``) and the trainer's
    default length; ``base`` to the adapter's own base model."""
    from lora.adapter_io import apply_adapter, base_model_for, load_adapter
    from lora.threads import torch_threads

    adapter = load_adapter(adapter_dir)
    with torch_threads(1):
        model = base_model_for(adapter, base)
        apply_adapter(model, adapter, check_fingerprint=False)
        return evaluate_model(model, adapter.config, task=task, max_length=max_length, base=base)


def evaluate_model(model: torch.nn.Module, config: Mapping[str, Any], *, task: str | None, max_length: int | None,
                   base: str | None) -> dict[str, float]:
    """:func:`lora.train.evaluate` of ``model`` on the validation split of ``task`` (default: ``config``'s
    ``lora_toolkit.task``), tokenized with the base model's tokenizer."""
    from transformers import AutoTokenizer

    from lora.adapter_io import resolve_base_name
    from lora.config import TrainConfig
    from lora.data import load_task, tokenize
    from lora.threads import torch_threads
    from lora.train import evaluate

    toolkit = config.get("lora_toolkit") or {}
    task = task or toolkit.get("task")
    if not task:
        raise UserError("--task: the adapter records no task; name one (e.g. chatterbot, or a CSV file)")
    data = load_task(task)
    labels = toolkit.get("labels")
    if labels and data.kind == "classification" and list(labels) != list(data.labels):
        raise UserError(f"--task {task}: labels {list(data.labels)[:4]}... differ from the adapter's "
                        f"{list(labels)[:4]}...; its head was trained on another label set")
    name = base or config.get("base_model_name_or_path")
    path = resolve_base_name(str(name))[0] if base is None else str(base)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    length = max_length or TrainConfig().max_length
    val = tokenize(data.val, tokenizer, kind=data.kind, max_length=length)
    with torch_threads(1):
        return evaluate(model.float(), val, batch_size=64, pad_id=int(tokenizer.pad_token_id))

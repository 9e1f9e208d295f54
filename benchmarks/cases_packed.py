"""``packed_sweep``: K adapters (ranks × seeds) trained in one packed step against K steps one after another.

One sweep step = every adapter of the grid takes one training step on its own batch (``BATCH`` examples ×
``SEQ_LEN`` tokens of real text, the same loss as :mod:`benchmarks.workload`). Packed (:mod:`lora.packed`), the
K batches run through the frozen base as one batch of ``K · BATCH`` rows, each row routed to its own adapter;
sequentially, each adapter's model takes its own step, by us (:mod:`lora.inject`) and by ``peft``.
The packed loss is the sum of the K per-adapter mean losses, so each adapter gets exactly its own gradient
(``tests/test_packed.py`` checks packed == sequential).

``packed_sweep_auto_vs_sequential[b=...]`` times what ``lora.train --pack auto`` would run
(:func:`lora.packed.packing_pays`: the packed step where the rule packs, a sequential sweep step otherwise)
against a sequential sweep step. Goal: never slower than sequential, i.e. ratio <= 1.05, the spread of two
timings of the same work on this shared machine.

Everything runs on CUDA when it is available (the issue's GPU goal: >= 3x sequential at K = 6), else on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks import workload as W
from benchmarks.harness import CaseResult, compare

RANKS = (4, 8, 64)
SEEDS = (0, 1)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _on_device(batch: W.Batch) -> W.Batch:
    return W.Batch(batch.input_ids.to(DEVICE), batch.attention_mask.to(DEVICE), batch.labels.to(DEVICE), batch.source)


def _packed_step(ranks, seeds, batch: W.Batch, sizes, head) -> Callable[[], float]:
    from lora.packed import AdapterSpec, adapter_parameters, pack_lora, route

    specs = [AdapterSpec(r=r, alpha=r, seed=s) for r in ranks for s in seeds]
    model = W.load_base().to(DEVICE)
    pack_lora(model, ["q", "v"], specs)
    # one foreach AdamW step over every adapter's tensors (elementwise, so each adapter's update is its own)
    opt = torch.optim.AdamW([p for k in range(len(specs)) for p in adapter_parameters(model, k)], lr=1e-4)
    bounds = torch.tensor((0,) + tuple(sizes)).cumsum(0).tolist()

    def step() -> float:
        with route(model, sizes):
            h = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        m = batch.attention_mask.unsqueeze(-1).to(h.dtype)
        logits = head((h * m).sum(1) / m.sum(1).clamp_min(1.0))
        # Σ_k mean CE of group k: each adapter's gradient is that of its own mean loss
        loss = sum(F.cross_entropy(logits[a:b], batch.labels[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _sequential(variant: str, ranks, seeds, batches: list[W.Batch], head) -> Callable[[], None]:
    steps = []
    i = 0
    for r in ranks:
        for s in seeds:
            model, opt = W.build(variant, r=r, seed=s)
            steps.append(W.step_fn(model.to(DEVICE), opt, head, batches[i]))
            i += 1

    def run() -> None:
        for st in steps:
            st()

    return run


def packed_cases(*, ranks=RANKS, seeds=SEEDS, batch: int = W.BATCH, reps: int = 3, warmup: int = 1) -> list[CaseResult]:
    """``packed_sweep_vs_sequential_ours`` and ``packed_sweep_vs_sequential_peft``: goal speed-up >= 1.5."""
    v = W.versions()
    K = len(ranks) * len(seeds)
    batches = [_on_device(W.make_batch(batch, seed=0, offset=k * batch)) for k in range(K)]
    packed_batch = W.Batch(
        torch.cat([b.input_ids for b in batches]), torch.cat([b.attention_mask for b in batches]),
        torch.cat([b.labels for b in batches]), batches[0].source,
    )
    head = W.make_head().to(DEVICE)
    packed = _packed_step(ranks, seeds, packed_batch, [batch] * K, head)
    grid = (f"K={K} adapters (r in {list(ranks)} x seeds {list(seeds)}), q+v, {batch}x{W.SEQ_LEN} tokens per adapter"
            f", on {DEVICE}")
    out = []
    for variant, peer_name in (("ours", "sequential, ours (lora.inject)"), ("peft", f"sequential, peft {v['peft']}")):
        seq = _sequential(variant, ranks, seeds, batches, head)
        out.append(compare(
            f"packed_sweep_vs_sequential_{variant}[b={batch}]", packed, seq, peer_name=peer_name, reps=reps,
            warmup=warmup, goal_min_speedup=1.5,
            notes=f"one sweep step (every adapter one step, forward+backward+AdamW): {grid}",
        ))
        if variant == "ours":
            out.append(_auto_case(ranks, seeds, batches, head, packed, seq, batch=batch, K=K, grid=grid, reps=reps,
                                  warmup=warmup))
        del seq
    return out


def _auto_case(ranks, seeds, batches, head, packed, seq, *, batch: int, K: int, grid: str, reps: int,
               warmup: int) -> CaseResult:
    """What ``--pack auto`` runs (one worker) against a sequential sweep step: the packed step where the rule
    packs, else a second, separately built sequential sweep (so the ratio shows the noise of the same work)."""
    from lora.packed import packing_pays

    pack, why = packing_pays(batch_size=batch, max_length=W.SEQ_LEN, workers=1, device=DEVICE)
    auto = packed if pack else _sequential("ours", ranks, seeds, batches, head)
    return compare(
        f"packed_sweep_auto_vs_sequential[b={batch}]", auto, seq, peer_name="sequential, ours (lora.inject)",
        reps=reps, warmup=warmup, goal_max=1.05, extra={"packed": float(pack)},
        notes=f"--pack auto {'packs' if pack else 'trains one by one'} ({why}); one sweep step: {grid}",
    )

"""Training-step and inference cases on the embedded base model (see :mod:`benchmarks.workload`).

* ``train_step_vs_peft[r=R]``: one LoRA step (forward, backward, AdamW), ours against ``peft``. Goal ratio <= 1.0.
* ``train_step_vs_frozen_base[r=R]``: the same step against the frozen base's forward + backward with no adapter
  and no optimizer (the floor). Goal ratio <= 1.10.
* ``merged_inference_vs_base``: forward (no grad, eval mode) of the merged model against the untouched base:
  the paper's "no added inference latency" (Section 4.1). Goal ratio <= 1.01. The unmerged forward is reported
  as ``unmerged_inference_vs_base`` beside it (no goal).
"""

from __future__ import annotations

import torch

from benchmarks import workload as W
from benchmarks.harness import CaseResult, compare


def train_step_cases(*, ranks: tuple[int, ...] = (8, 64), reps: int = 7, warmup: int = 2) -> list[CaseResult]:
    """``train_step_vs_peft`` and ``train_step_vs_frozen_base`` for each rank.

    For each rank the three variants (ours, peft, frozen) are built once and timed in two interleaved pairs
    (ours/peft, ours/frozen) on the same batch, so both ratios come from the same run of ours.
    """
    v = W.versions()
    batch = W.make_batch()
    head = W.make_head()
    frozen, _ = W.build("frozen")
    frozen_step = W.step_fn(frozen, None, head, batch)
    out: list[CaseResult] = []
    for r in ranks:
        ours = W.step_fn(*W.build("ours", r=r), head, batch)
        peft = W.step_fn(*W.build("peft", r=r), head, batch)
        what = f"one step: forward+backward+AdamW, all-MiniLM-L6-v2, q+v, r={r}, batch {W.BATCH}x{W.SEQ_LEN} ({batch.source})"
        out.append(compare(
            f"train_step_vs_peft[r={r}]", ours, peft, peer_name=f"peft {v['peft']}", reps=reps, warmup=warmup,
            goal_max=1.0, notes=what,
        ))
        out.append(compare(
            f"train_step_vs_frozen_base[r={r}]", ours, frozen_step,
            peer_name=f"frozen base fwd+bwd, no adapter (torch {v['torch']})", reps=reps, warmup=warmup,
            goal_max=1.10, notes=what,
        ))
    return out


def inference_cases(*, r: int = 8, reps: int = 9, warmup: int = 2, inner: int = 3) -> list[CaseResult]:
    """Merged and unmerged LoRA forward against the untouched base (eval mode, no grad, same batch)."""
    from lora.inject import inject_lora, merge_lora

    v = W.versions()
    batch = W.make_batch()
    base = W.load_base().eval()
    unmerged = W.load_base().eval()
    inject_lora(unmerged, ["q", "v"], r=r, alpha=r, seed=0)
    merged = W.load_base().eval()
    inject_lora(merged, ["q", "v"], r=r, alpha=r, seed=0)
    with torch.no_grad():  # give B non-zero values so the merge is a real one
        for m in (unmerged, merged):
            g = torch.Generator().manual_seed(1)
            for p in m.parameters():
                if p.shape[-1] == r and p.ndim == 2:  # lora_B (d_out, r)
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    merge_lora(merged)

    def fwd(model):
        def run():
            with torch.inference_mode():
                return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state

        return run

    what = f"forward, eval, inference_mode, batch {W.BATCH}x{W.SEQ_LEN}, q+v, r={r}"
    peer = f"untouched base (transformers {v['transformers']})"
    return [
        compare("merged_inference_vs_base", fwd(merged), fwd(base), peer_name=peer, reps=reps, warmup=warmup,
                inner=inner, goal_max=1.01,
                notes=what + "; merged = LoRA layers with ΔW folded into W0 (the LoRA wrapper stays in place)"),
        compare("unmerged_inference_vs_base", fwd(unmerged), fwd(base), peer_name=peer, reps=reps, warmup=warmup,
                inner=inner, notes=what + "; unmerged = extra B(Ax) branch per adapted layer"),
    ]

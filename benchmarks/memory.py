"""``peak_memory``: peak resident memory of one training step, ours against peft (and full fine-tuning).

Method: each variant runs in a fresh Python process (``python -m benchmarks.memory VARIANT R``), so allocator
caches and other cases cannot leak into the figure. The child loads the model, builds the batch and the
optimizer, then resets the kernel's peak-RSS counter (Linux ``/proc/self/clear_refs`` = 5, which sets VmHWM to
the current RSS) and runs ``STEPS`` training steps (the first step allocates AdamW's moments). It reports
``step peak = VmHWM after the steps − VmRSS before them``: the memory the training step itself adds on top of
the loaded model (activations kept for backward, gradients, optimizer state). The total peak (VmHWM) is reported
too. Where ``clear_refs`` is not writable the child falls back to ``ru_maxrss`` (which then includes loading).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmarks.harness import CaseResult, result_from_runs

STEPS = 3


def _status(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise KeyError(field)


def _child(variant: str, r: int, threads: int) -> dict:
    import resource

    import torch

    torch.set_num_threads(threads)
    from benchmarks import workload as W

    batch, head = W.make_batch(), W.make_head()
    model, opt = W.build(variant, r=r)
    step = W.step_fn(model, opt, head, batch)
    rss_before = _status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        method = "VmHWM reset via clear_refs"
    except OSError:
        method = "ru_maxrss (includes model loading)"
    for _ in range(STEPS):
        step()
    peak = _status("VmHWM") if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "r": r, "rss_before_mib": rss_before, "peak_mib": peak,
            "step_peak_mib": peak - rss_before, "method": method}


def measure(variant: str, r: int, *, threads: int) -> dict:
    """Run one fresh child process for ``variant`` and return its JSON record."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", variant, str(r), str(threads)],
        capture_output=True, text=True, env=env, check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory child for {variant} r={r} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_cases(*, ranks=(8, 64), threads: int = 2, reps: int = 1) -> list[CaseResult]:
    """``peak_memory[r=R]`` (ours vs peft; goal ratio <= 1.0), with full fine-tuning's figure beside it."""
    from benchmarks.workload import versions

    v = versions()
    full = [measure("full", 8, threads=threads) for _ in range(reps)]
    full_step = sorted(x["step_peak_mib"] for x in full)[len(full) // 2]
    out = []
    for r in ranks:
        ours, peft = [], []
        for _ in range(reps):  # alternate, as the timing cases do
            ours.append(measure("ours", r, threads=threads))
            peft.append(measure("peft", r, threads=threads))
        out.append(result_from_runs(
            f"peak_memory[r={r}]", [x["step_peak_mib"] for x in ours], [x["step_peak_mib"] for x in peft],
            peer_name=f"peft {v['peft']}", unit="MiB", goal_max=1.0,
            notes=(f"step peak = peak RSS during {STEPS} steps minus RSS before them ({ours[0]['method']}), fresh "
                   f"process per variant; full fine-tuning: {full_step:.0f} MiB; total peak ours "
                   f"{ours[0]['peak_mib']:.0f} MiB, peft {peft[0]['peak_mib']:.0f} MiB"),
            extra={"full_ft_step_peak_mib": full_step, "ours_total_peak_mib": ours[0]["peak_mib"],
                   "peft_total_peak_mib": peft[0]["peak_mib"]},
        ))
    return out


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    print(json.dumps(_child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))

"""How much of the machine a process uses: torch threads per process and worker processes per sweep.

The default layout is one worker process per available core and one torch thread in each. Adapters are bitwise
reproducible for a fixed thread count per process, whatever the number of workers (float reductions are ordered
by the thread count, not by the worker count); and on a busy 2-core machine two threads in one process waited for
each other and ran about 5x slower per unit of work than one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

__all__ = ["THREADS_PER_PROCESS", "analysis_workers", "compute_device", "default_workers", "process_group",
           "torch_threads"]

THREADS_PER_PROCESS = 1


def default_workers() -> int:
    """Worker processes for a sweep: the cores this process may use (``os.sched_getaffinity``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def analysis_workers(n: int | None = None) -> int:
    """Threads that analyse independent weight matrices at once: ``n``, or the cores available divided by
    torch's intra-op threads, so that the two together fill the cores without oversubscribing them."""
    if n is not None:
        return max(1, int(n))
    return max(1, default_workers() // max(1, torch.get_num_threads()))


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (``None``: unchanged), restoring the setting after."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def process_group() -> tuple[int, int]:
    """``(rank, world size)``: under ``torchrun --nproc_per_node N`` this process's rank among N, joined to the
    gloo process group on first call; ``(0, 1)`` otherwise. The trainer splits grid points this way, the
    analysis splits weight matrices."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    from datetime import timedelta

    import torch.distributed as dist

    if not dist.is_initialized():
        # long timeout: a collective waits for the slowest process's whole share of the work
        dist.init_process_group("gloo", timeout=timedelta(days=7))
    return dist.get_rank(), dist.get_world_size()


DEVICE_ENV = "LORA_ANALYSIS_DEVICE"  # "cpu" keeps the analysis off a GPU; "cuda" / "cuda:1" picks one


def compute_device() -> torch.device:
    """Where the analysis decomposes big weight matrices: ``$LORA_ANALYSIS_DEVICE`` if set, else the GPU of this
    process (``cuda:$LOCAL_RANK`` under torchrun) when ``torch.cuda.is_available()``, else the CPU."""
    want = os.environ.get(DEVICE_ENV, "").strip()
    if want:
        return torch.device(want)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")

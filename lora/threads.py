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

__all__ = ["THREADS_PER_PROCESS", "analysis_workers", "default_workers", "torch_threads"]

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

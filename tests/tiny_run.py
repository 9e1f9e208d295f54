"""One tiny trained run per test session, shared by tests/test_reproduce.py and tests/test_notebooks.py.

It is ``python -m lora_analysis.reproduce --quick``'s grid (ranks 2 4 × seeds 0 1 on q,v, plus a 3-set Table 5
budget run; a few steps each) trained once into the session's temporary folder; later callers reuse it.
"""

from __future__ import annotations

from pathlib import Path


def tiny_run(tmp_path_factory) -> Path:
    """Train (once per session) and return the tiny run directory."""
    from lora_analysis import reproduce

    root = tmp_path_factory.getbasetemp() / "tiny_run"
    runs = root / "runs"
    marker = root / "trained"
    if not marker.exists():
        reproduce.train_grid(reproduce.quick_plan(), runs, progress=False)
        marker.write_text("ok\n")
    return runs

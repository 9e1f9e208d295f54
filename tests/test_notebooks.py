"""The notebooks: built by notebooks/build_notebooks.py, executed headless against a tiny trained run."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from tiny_run import tiny_run

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))  # the builder is a script in notebooks/, not part of the package
import build_notebooks  # noqa: E402


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    return tiny_run(tmp_path_factory)


def test_committed_notebooks_match_the_builder():
    for name, make in build_notebooks.NOTEBOOKS.items():
        committed = nbformat.read(NOTEBOOKS / name, as_version=4)
        assert [c.source for c in committed.cells] == [c.source for c in make().cells], name


@pytest.mark.parametrize("name", list(build_notebooks.NOTEBOOKS))
def test_notebooks_only_call_the_library(name):
    nb = build_notebooks.NOTEBOOKS[name]()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata["tags"] and "RUN_DIR" in code[0].source
    text = "\n".join(c.source for c in code)
    assert "sys.path" not in text and "import numpy" not in text and "plt." not in text
    assert not re.search(r"\brandom\.|randn|rand\(", text)  # no unseeded randomness
    assert re.search(r"\bdef |\bclass |lambda", text) is None  # no helpers defined in a notebook


# nbclient's per-cell timeout: about 10x the slowest cell on an idle machine. Measured here (2026-12-07, tiny run,
# one torch thread): notebook 04's render_all/report cell 15.5 s wall, 14.3 s CPU, and notebook 06's
# load_beyond cell 14.4 s wall, 13.7 s CPU (the others are < 9 s); the machine was shared (load average ~5),
# so the CPU time, ~15 s, is the idle figure.
CELL_TIMEOUT_S = 150


@pytest.mark.slow
def test_notebooks_execute(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # The kernels inherit this: one torch (OpenMP/MKL) thread, as every test runs (conftest.py). With torch's
    # default of one thread per core, notebook 06's load_beyond cell took 30 s with nothing else running and
    # 121 s beside one CPU-bound process on 2 cores (threads waiting on each other), against 15 s and 27 s
    # with one thread.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    parameters = {"RUN_DIR": str(runs), "ADAPTER_DIR": str(runs), "OUT_DIR": str(tmp_path / "out"),
                  "STEPS": 10, "TEXTS": 24}  # the planted-rank students at a smoke size
    for path in build_notebooks.build(tmp_path):
        build_notebooks.execute(path, timeout=CELL_TIMEOUT_S, parameters=parameters)
        nb = nbformat.read(path, as_version=4)
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        assert not [o for o in outputs if o.output_type == "error"], path.name
        stderr = [o.text for o in outputs if o.output_type == "stream" and o.name == "stderr"]
        assert not [t for t in stderr if "Warning" in t or "Loading weights" in t], (path.name, stderr)
        images = [o for o in outputs if "image/png" in o.get("data", {})]
        assert images, f"{path.name}: no figure shown"
    assert (tmp_path / "out" / "REPORT.md").is_file()  # notebook 04 wrote the report for "your" adapters
    json.loads((runs / "analysis" / "fingerprint.json").read_text())  # notebooks 01-03 share the cached analysis

"""The sweep's worker processes die with their parent, however it ends: ``kill -9`` of
``python -m lora.train`` (a killed terminal, a stopped notebook kernel) and an interrupt (SIGINT to the parent
alone, as a notebook's interrupt button sends it). ``lora_analysis.reproduce`` trains through the same pool
(``lora.train.run_sweep`` -> ``_train_in_workers``), so one test through ``lora.train`` covers both.

Children are found through /proc (Linux): the spawn workers and multiprocessing's resource tracker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes through /proc")


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid = text[text.rindex(")") + 2:].split()[:2]
    return state, int(ppid)


def _children(pid: int) -> dict[int, str]:
    """{pid: command line} of the processes whose parent is ``pid``."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            st = _stat(int(d.name))
            if st and st[1] == pid:
                try:
                    cmdline = (d / "cmdline").read_bytes()
                    out[int(d.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    pass
    return out


def _maps(pid: int, path: str) -> bool:
    """Whether the process has ``path`` mapped (a worker training a point maps the base's safetensors)."""
    try:
        return path in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _alive(pids) -> list[int]:
    """The processes still running (a zombie has ended: only its exit status waits to be collected)."""
    return [p for p in pids if (st := _stat(p)) is not None and st[0] not in ("Z", "X")]


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "interrupt"])
def test_workers_end_with_their_parent(tiny_bert_dir, tmp_path, how):
    out = tmp_path / "run"
    # twelve short points: the signal lands while both workers train and more points are queued
    cmd = [sys.executable, "-m", "lora.train", "--model", tiny_bert_dir,
           "--ranks", "1", "2", "3", "4", "5", "6", "--seeds", "0", "1", "--steps", "40", "--batch-size", "8",
           "--max-length", "12", "--quiet", "--threads", "1", "--no-linear-probe", "--workers", "2",
           "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    # its own session, so that SIGINT reaches the parent alone (as a notebook's interrupt does) and the
    # cleanup below can end whatever it left
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=err, stderr=err, start_new_session=True)
    try:
        weights = str(Path(tiny_bert_dir, "model.safetensors"))
        deadline = time.time() + 180
        workers: dict[int, str] = {}
        while time.time() < deadline and proc.poll() is None:
            workers = {p: c for p, c in _children(proc.pid).items() if "spawn_main" in c}
            if len(workers) >= 2 and all(_maps(p, weights) for p in workers):
                break  # both workers are past their start-up, each training a point
            time.sleep(0.05)
        assert proc.poll() is None and len(workers) >= 2, (proc.poll(), workers, log.read_text()[-2000:])
        tracker = [p for p, c in _children(proc.pid).items() if "resource_tracker" in c]
        proc.send_signal(how)
        if how == signal.SIGINT:  # the parent stops the workers itself, without training the queued points
            assert proc.wait(timeout=30) == 130, log.read_text()[-2000:]
        else:
            proc.wait()
        deadline = time.time() + 10
        while time.time() < deadline and _alive([*workers, *tracker]):
            time.sleep(0.05)
        assert _alive(workers) == [] and _alive(tracker) == []
        finished = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
        assert len(finished) < 12, "the signal should land mid-sweep, and stop it"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # only what this test started (its own process group)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()

"""A full or read-only disk under every writer (issue 21): the trainer, ``lora.merge`` and ``lora_analysis.figures``.

On a required output the command exits 2 with one line ``error: <path>: cannot write: no space left on device``
(or ``read-only file system``, ``disk quota exceeded``), leaves no temporary or partial file, and a run directory
resumes once space is freed; the optional analysis cache is skipped with one ``note:`` line. Writers outside
Python's I/O report the error their own way (safetensors: ``SafetensorError: Error while serializing: I/O error:
No space left on device (os error 28)``), so the writers are patched to fail as each really does (the messages
were taken from a real 1 MiB tmpfs); one test fills a real tmpfs where the test may mount one (root).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import matplotlib.figure
import pytest
import safetensors.torch
import torch
import transformers.modeling_utils
from safetensors import SafetensorError
from safetensors.torch import load_file
from tiny_models import make_adapter, tiny_bert_model

from lora import fsio, merge, train
from lora.errors import UserError, io_error_reason
from lora.threads import torch_threads
from lora_analysis import figures
from lora_analysis.tables.cache import CACHE_SUBDIR

TINY = ["--steps", "3", "--batch-size", "8", "--max-length", "12", "--no-linear-probe", "--seeds", "0", "--quiet",
        "--threads", "1"]
POINTS = ("qv_r1_s0", "qv_r2_s0", "qv_r4_s0")


def _safetensors_error(code: int) -> SafetensorError:
    """What safetensors raises when the OS refuses a write (seen on a full tmpfs: ``os error 28``)."""
    return SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")


def _os_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))  # as Python's own writes raise it: no file name


def _failing(real: Callable, path_arg: int, name: str, exc: Exception, *, occurrence: int = 1) -> Callable:
    """``real`` (a writer taking its path at ``path_arg``), except that its ``occurrence``-th call on a file called
    ``name`` (or on the temporary sibling that becomes it) writes part of the file, as a write cut short by the disk does, and raises ``exc``."""
    calls = []

    def writer(*args, **kwargs):
        path = Path(args[path_arg])
        if path.name == name or path.name.startswith(f".{name}{fsio.TEMP_MARK}"):  # itself, or its temporary
            calls.append(path)
            if len(calls) == occurrence:
                path.write_bytes(b"partial")
                raise exc
        return real(*args, **kwargs)

    return writer


def _temps(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if fsio.TEMP_MARK in p.name]


def _one_line(err: str) -> str:
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _reasons() -> dict[int, str]:
    return {code: os.strerror(code)[:1].lower() + os.strerror(code)[1:] for code in (errno.ENOSPC, errno.EROFS,
                                                                                      errno.EDQUOT)}


# ---------------------------------------------------------------------------------------------- the translation
def test_io_error_reason_reads_oserrors_and_safetensors_wrapped_ones():
    reasons = _reasons()
    for code, reason in reasons.items():
        assert io_error_reason(_os_error(code)) == reason
        assert io_error_reason(_safetensors_error(code)) == reason
    old = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })')
    assert io_error_reason(old) == reasons[errno.ENOSPC]  # the Debug form older safetensors printed
    # not an I/O failure: a bug, which keeps its traceback
    assert io_error_reason(SafetensorError("Error while serializing: tensor 'a' is not contiguous")) is None
    assert io_error_reason(RuntimeError("No space left on device (os error 28)")) is None
    assert io_error_reason(ValueError("x")) is None


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT])
@pytest.mark.parametrize("raiser", [_os_error, _safetensors_error])
def test_atomic_writes_turn_a_refused_write_into_one_line_naming_the_final_path(tmp_path, code, raiser):
    """atomic_path and atomic_dir (nested too, as a grid point holds an adapter): the error names the path the user
    asked for, the temporary sibling is gone, an existing output is untouched."""
    reason = _reasons()[code]
    (tmp_path / "old.json").write_text("old")

    def fail(where: Path):
        where.write_bytes(b"partial")
        raise raiser(code)

    with pytest.raises(UserError, match=f"^{re.escape(str(tmp_path / 'old.json'))}: cannot write: {reason}$"):
        with fsio.atomic_path(tmp_path / "old.json") as tmp:
            fail(tmp)
    with pytest.raises(UserError, match=f"^{re.escape(str(tmp_path / 'point'))}: cannot write: {reason}$"):
        with fsio.atomic_dir(tmp_path / "point") as tmp, fsio.atomic_dir(tmp / "adapter", overwrite=True) as inner:
            fail(inner / "adapter_model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"] and (tmp_path / "old.json").read_text() == "old"


def test_a_writer_bug_is_not_taken_for_a_full_disk(tmp_path):
    bug = SafetensorError("Error while serializing: tensor 'a' is not contiguous")
    with pytest.raises(SafetensorError, match="not contiguous"), fsio.atomic_path(tmp_path / "a.safetensors") as tmp:
        tmp.write_bytes(b"partial")
        raise bug
    assert not list(tmp_path.iterdir())


def test_the_run_lock_holds_when_the_disk_has_no_room_for_its_pid(tmp_path, monkeypatch):
    """The PID in .lock only names the holder for a second process; a full disk must not stop the run there (its
    first real output says so, naming the file): the flock is taken all the same."""
    import fcntl

    def no_room(*args):
        raise _os_error(errno.ENOSPC)

    monkeypatch.setattr(os, "pwrite", no_room)
    with fsio.lock_directory(tmp_path, option="--out"):
        fd = os.open(tmp_path / ".lock", os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held (flock on a second open file description)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------- lora.train
@pytest.fixture(scope="module")
def clean_run(tiny_bert_dir, tmp_path_factory) -> Path:
    """The grid q,v x ranks 1 2 4 x seed 0, trained without a fault (the reference, and the figures' input)."""
    out = tmp_path_factory.mktemp("clean") / "run"
    with torch_threads(1):  # module-scoped: set up before the per-test one-thread fixture
        assert train.main(["--model", tiny_bert_dir, *TINY, "--ranks", "1", "2", "4", "--out", str(out),
                           "--workers", "1"]) == 0
    return out


def _copy_run(run: Path, dst: Path) -> Path:
    """A copy of ``run`` without its analysis cache (a figures run on ``run`` may have written one)."""
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns(CACHE_SUBDIR))
    return dst


def _tensors(run: Path) -> dict[str, torch.Tensor]:
    return {f"{p}/{f}/{k}": v for p in POINTS for f in ("adapter_model.safetensors", "init.safetensors")
            for k, v in load_file(run / p / f).items()}


TRAIN_FAULTS = {  # case: (extra flags, file the fault hits, which of its writes, the error)
    "adapter, ENOSPC (safetensors)": ([], "adapter_model.safetensors", 2, _safetensors_error(errno.ENOSPC)),
    "snapshot, EROFS (safetensors)": (["--snapshot-steps", "0", "2"], "step_000002.safetensors", 1,
                                      _safetensors_error(errno.EROFS)),
    "full fine-tuning deltas, EDQUOT": (["--method", "lora", "full"], "delta_weights.safetensors", 1,
                                        _safetensors_error(errno.EDQUOT)),
    "metrics.json, ENOSPC (Python's write)": ([], "metrics.json", 3, _os_error(errno.ENOSPC)),
}


@pytest.mark.parametrize("case", list(TRAIN_FAULTS))
def test_train_on_a_full_disk_is_one_line_and_resumes_once_space_is_freed(case, clean_run, tiny_bert_dir, tmp_path,
                                                                         monkeypatch, capsys):
    extra, name, occurrence, exc = TRAIN_FAULTS[case]
    out = tmp_path / "run"
    argv = ["--model", tiny_bert_dir, *TINY, "--ranks", "1", "2", "4", *extra, "--out", str(out), "--workers", "1"]
    if name.endswith(".safetensors"):
        monkeypatch.setattr(safetensors.torch, "save_file", _failing(safetensors.torch.save_file, 1, name, exc,
                                                                     occurrence=occurrence))
    else:
        monkeypatch.setattr(Path, "write_text", _failing(Path.write_text, 0, name, exc, occurrence=occurrence))
    capsys.readouterr()
    rc = train.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    line = _one_line(err)
    failed = re.fullmatch(rf"error: {re.escape(str(out))}/(\S+): cannot write: {io_error_reason(exc)}", line)
    assert failed, line
    assert not (out / failed.group(1)).exists() and not _temps(out)  # nothing half-written
    assert not (out / "summary.csv").exists() or failed.group(1) not in (out / "summary.csv").read_text()
    monkeypatch.undo()  # space freed
    assert train.main(argv) == 0, capsys.readouterr().err
    assert all((out / p / "metrics.json").is_file() for p in POINTS) and not _temps(out)
    if not extra:  # resumed = uninterrupted, bit for bit
        got, ref = _tensors(out), _tensors(clean_run)
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


# ---------------------------------------------------------------------------------------------- lora.merge
@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("merge")
    tiny_bert_model().save_pretrained(root / "base")
    make_adapter(root / "base", root / "adapter", r=2, seed=0)
    return root / "adapter"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_merge_on_a_full_disk_is_one_line_and_leaves_no_trace(adapter, tmp_path, monkeypatch, capsys, code, existing):
    """transformers' save_pretrained writes the merged weights with safetensors; a refused write is one line, no
    temporary directory is left, and an --out that --overwrite would replace survives whole."""
    out = tmp_path / "merged"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("keep")
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file",
                        _failing(transformers.modeling_utils.safe_save_file, 1, "model.safetensors",
                                 _safetensors_error(code)))
    capsys.readouterr()
    rc = merge.main(["--adapter", str(adapter), "--out", str(out), "--quiet", *(["--overwrite"] if existing else [])])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert _one_line(err) == f"error: {out}: cannot write: {_reasons()[code]}"
    assert not _temps(tmp_path)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] if existing else not out.exists()
    monkeypatch.undo()
    assert merge.main(["--adapter", str(adapter), "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "lora_merge.json").is_file()


# ---------------------------------------------------------------------------------------------- figures
def test_figures_on_a_full_disk_is_one_line(clean_run, tmp_path, monkeypatch, capsys):
    """matplotlib's savefig into the temporary sibling fails as on a full disk: one line naming the figure."""
    def savefig(self, fname, *args, **kwargs):  # the first figure written, whatever its name
        Path(fname).write_bytes(b"partial")
        raise _os_error(errno.ENOSPC)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    out = tmp_path / "fig"
    capsys.readouterr()
    rc = figures.main(["--runs", str(_copy_run(clean_run, tmp_path / "run")), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    line = _one_line(err)
    assert re.fullmatch(rf"error: {re.escape(str(out))}/\S+\.(png|pdf): cannot write: no space left on device", line)
    assert not _temps(out)


def test_figures_goes_on_when_only_the_analysis_cache_cannot_be_written(clean_run, tmp_path, monkeypatch, capsys):
    """The cache in <run>/analysis is optional: a full disk there is one note line; every output is written."""
    import pandas as pd

    run = _copy_run(clean_run, tmp_path / "run")
    real = pd.DataFrame.to_csv

    def to_csv(self, path=None, *args, **kwargs):
        # write_tables formats into a file object (one pass for the CSV and its gzip copy): only paths are the cache's
        if isinstance(path, (str, os.PathLike)) and CACHE_SUBDIR in Path(path).parent.parts \
                and run in Path(path).parents:
            Path(path).write_bytes(b"partial")
            raise _os_error(errno.ENOSPC)
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", to_csv)
    capsys.readouterr()
    rc = figures.main(["--runs", str(run), "--out", str(tmp_path / "fig"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "analysis cache not written" in notes[0] and "no space left on device" in notes[0]
    assert "error" not in err.lower().replace("no space left", "")
    assert (tmp_path / "fig" / "REPORT.md").is_file() and not _temps(run) and not _temps(tmp_path / "fig")
    assert not (run / CACHE_SUBDIR / "fingerprint.json").exists()  # no cache is taken for complete


# ---------------------------------------------------------------------------------------------- a real tmpfs
@pytest.fixture
def small_tmpfs(tmp_path) -> Iterator[Path]:
    """A 1 MiB tmpfs (mounting needs root and a kernel that lets this process mount: skipped otherwise)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path, leave_kib: int) -> Path:
    """Fill ``mnt`` but ``leave_kib`` KiB."""
    st = os.statvfs(mnt)
    filler = mnt / "filler"
    filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave_kib * 1024))
    return filler


def test_a_real_full_tmpfs(small_tmpfs, clean_run, tiny_bert_dir, capsys):
    """The issue's case for real: lora.train (in worker processes) on a full 1 MiB tmpfs exits 2 with one line,
    leaves no temporary, and resumes once space is freed; a merge into it (the tiny BERT's 30522 x 32 embeddings
    alone are 3.9 MB) exits 2 and leaves nothing. (The analysis cache's real ENOSPC is the ``OSError`` that
    pandas' ``to_csv`` raises, as patched above.)"""
    out = small_tmpfs / "run"
    argv = ["--model", tiny_bert_dir, *TINY, "--ranks", "1", "2", "4", "--out", str(out)]
    filler = _fill(small_tmpfs, 24)  # room for the manifest and about one point
    capsys.readouterr()
    assert train.main([*argv, "--workers", "2"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert re.fullmatch(rf"error: {re.escape(str(out))}/\S+: cannot write: no space left on device", line), line
    assert not _temps(small_tmpfs)
    filler.unlink()
    assert train.main([*argv, "--workers", "1"]) == 0, capsys.readouterr().err
    got, ref = _tensors(out), _tensors(clean_run)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)

    merged = small_tmpfs / "merged"
    assert merge.main(["--adapter", str(clean_run / "qv_r2_s0"), "--out", str(merged), "--quiet"]) == 2
    assert _one_line(capsys.readouterr().err) == f"error: {merged}: cannot write: no space left on device"
    assert not merged.exists() and not _temps(small_tmpfs)

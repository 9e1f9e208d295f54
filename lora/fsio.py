"""Atomic file and directory writes: nothing on disk is ever left half-written.

Every artifact the toolkit writes (adapter directories, manifests, JSON, figures, tables) goes to a
temporary sibling ``.<name>.tmp-<random>`` first and is renamed into place, so a crash or ``kill -9`` at any
moment leaves either the old file or the complete new one, never a partial one. While a temporary sibling is
being written its writer holds an ``fcntl.flock`` on it, so :func:`remove_stale_temps` can tell the leftovers
of a killed writer (unlocked) from a live one's (locked).

An ``OSError`` while writing (a full or read-only disk, a permission), or the same error reported by a writer
outside Python's I/O (safetensors' ``SafetensorError: ... No space left on device (os error 28)``), becomes one
:class:`~lora.errors.UserError` naming the final path, ``<path>: cannot write: no space left on device``, and the
temporary sibling is removed. Output paths are checked before any work starts
with :func:`check_output_path`; a directory that one process at a time may write is held with
:func:`lock_directory`. This module imports nothing from the analysis package, which builds on it.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import glob
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from lora.errors import UserError, io_error_reason, os_error_message, os_error_reason

TEMP_MARK = ".tmp-"  # temporary siblings are named f".{name}{TEMP_MARK}<random>"

# The final path of the outermost atomic write in progress: a nested one (an adapter saved into the temporary
# directory of a grid point) lets its OSError through, so the message names the path the user asked for.
_WRITING: contextvars.ContextVar[Path | None] = contextvars.ContextVar("lora_fsio_writing", default=None)


def _umask() -> int:
    # The only way to read the umask is to set it; put it straight back.
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _is_temp(name: str | os.PathLike) -> bool:
    """Whether a path lies in (or is) one of our temporary siblings."""
    return any(part.startswith(".") and TEMP_MARK in part for part in Path(name).parts)


def _remove(path: Path) -> None:
    """Remove a file, a symbolic link or a directory tree; a missing path is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _tmp_sibling(path: Path, *, directory: bool) -> tuple[Path, int]:
    """A new temporary sibling of ``path`` and an open descriptor of it (flock-ed by :func:`_locked_temp`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = tempfile.mkdtemp(prefix=f".{path.name}{TEMP_MARK}", dir=path.parent)
        fd = os.open(tmp, os.O_RDONLY)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp gives 0700; a finished directory should follow the umask
        return Path(tmp), fd
    fd, name = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", dir=path.parent)
    # mkstemp creates 0600 files; give the final artifact the permissions a plain open() would (umask).
    os.chmod(name, 0o666 & ~_umask())
    return Path(name), fd


@contextlib.contextmanager
def _locked_temp(final: Path, *, directory: bool) -> Iterator[Path]:
    """A temporary sibling of ``final``, flock-ed while the block runs and removed if the block raises.

    An ``OSError`` (including one from creating the sibling), or a writer's error wrapping one
    (:func:`~lora.errors.io_error_reason`), becomes a :class:`UserError` naming ``final`` (or the file it concerns,
    when that is another, non-temporary file), unless this write is nested in another.
    """
    outer = _WRITING.get()
    token = _WRITING.set(final)
    tmp: Path | None = None
    fd = -1
    try:
        tmp, fd = _tmp_sibling(final, directory=directory)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh name: nobody else holds it
        yield tmp
    except BaseException as exc:
        if tmp is not None:
            _remove(tmp)
        reason = io_error_reason(exc) if outer is None else None
        if reason is not None:
            if isinstance(exc, OSError):
                named = exc.filename if exc.filename is not None else exc.filename2
                if named is not None and not _is_temp(named) and Path(named) != final:
                    raise UserError(os_error_message(exc)) from None  # e.g. a file read while writing
            raise UserError(f"{final}: cannot write: {reason}") from None
        raise
    finally:
        if fd >= 0:
            os.close(fd)
        _WRITING.reset(token)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; on success rename it onto ``path`` (atomic on POSIX).

    On any error the temporary file is removed; an ``OSError`` becomes a :class:`UserError` naming ``path``.
    """
    final = Path(path)
    with _locked_temp(final, directory=False) as tmp:
        yield tmp
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it becomes ``path``.

    With ``overwrite=False`` an existing ``path`` raises ``FileExistsError`` before anything is written.
    With ``overwrite=True`` the old ``path`` (a directory, or anything else) is replaced only once the new one is
    complete. On any error the temporary directory is removed; an ``OSError`` becomes a :class:`UserError`
    naming ``path``.
    """
    final = Path(path)
    if os.path.lexists(final) and not overwrite:
        raise FileExistsError(f"{final}: already exists")
    with _locked_temp(final, directory=True) as tmp:
        yield tmp
        if os.path.lexists(final):
            trash, trash_fd = _tmp_sibling(final, directory=True)
            os.close(trash_fd)
            os.rmdir(trash)
            os.replace(final, trash)
            os.replace(tmp, final)
            _remove(trash)
        else:
            os.replace(tmp, final)


def remove_stale_temps(directory: str | os.PathLike, name: str = "*") -> list[Path]:
    """Remove the temporary siblings ``.<name>.tmp-*`` in ``directory`` that a killed writer left behind.

    A temporary sibling whose writer is alive is flock-ed (see :func:`atomic_path`) and is left alone. Returns the
    paths removed. ``name="*"``: every temporary in ``directory``.
    """
    pattern = f".{name if name == '*' else glob.escape(name)}{TEMP_MARK}*"
    removed = []
    for tmp in sorted(Path(directory).glob(pattern)):
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # a link, or already gone: only ours are regular files and directories
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live writer's
        else:
            _remove(tmp)
            removed.append(tmp)
        finally:
            os.close(fd)
    return removed


def write_text(path: str | os.PathLike, text: str, *, if_changed: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically; with ``if_changed`` a file that already holds ``text`` is left
    untouched (no write at all, so it works on a read-only mount)."""
    p = Path(path)
    if if_changed:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if p.read_text(encoding="utf-8") == text:
                return p
    with atomic_path(p) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return p


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (NaN is refused: strict JSON only)."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


# ---------------------------------------------------------------------------------------------- output checks
def _unwritable_reason(directory: Path) -> str | None:
    """Why files cannot be created in ``directory`` (``None`` if they can, as far as the OS says beforehand)."""
    if os.access(directory, os.W_OK | os.X_OK):
        return None
    with contextlib.suppress(OSError):
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return "read-only file system"
    return "permission denied"


def check_writable(directory: str | os.PathLike, *, option: str) -> None:
    """Raise ``UserError("<option> <directory>: cannot write there: <reason>")`` unless files can be created in
    the existing ``directory``."""
    reason = _unwritable_reason(Path(directory))
    if reason:
        raise UserError(f"{option} {directory}: cannot write there: {reason}")


def check_readable(path: str | os.PathLike, *, label: str | None = None) -> None:
    """Raise ``UserError("<label>: permission denied")`` if the existing ``path`` cannot be read (a directory:
    listed and entered), so that an unreadable input is not reported as missing. ``label`` defaults to the
    path."""
    p = Path(path)
    if not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)):
        raise UserError(f"{label or p}: permission denied")


def _file_ancestor(path: Path) -> Path | None:
    for parent in reversed(path.parents):
        if os.path.lexists(parent) and not parent.is_dir():
            return parent
    return None


def check_output_path(
    path: str | os.PathLike,
    *,
    option: str,
    kind: Literal["file", "dir"] = "file",
    existing: Literal["refuse", "replace", "reuse"] = "refuse",
    hint: str = "pass --overwrite to replace it",
) -> Path:
    """Check an output path before any work starts; raise one :class:`UserError` line naming ``option`` and the path.

    It creates and changes nothing. Refused:

    * a path under a file (``out.txt/sub``: "``out.txt`` is a file, not a directory"), a dangling symbolic link,
      or a path whose parent cannot be searched ("permission denied");
    * an existing path of the wrong ``kind``: a file (or other non-directory) for ``kind="dir"``, a directory for
      ``kind="file"``;
    * by ``existing``: ``"refuse"``, any existing path ("already exists (<hint>)"); ``"replace"`` (it will be
      replaced whole, e.g. ``--overwrite``), a symbolic link, since replacing it would swap the link rather than
      write to its target; ``"reuse"`` (written into, e.g. a run directory that is resumed), an existing one
      that cannot be read. A reused directory need not be writable: a run with nothing left to do writes nothing;
      use :func:`check_writable` once it is known that something will be written;
    * a path to be created or replaced whose directory is not writable (permission, read-only file system).

    Args:
        path: the output path as the user gave it.
        option: the option that named it (``"--out"``), the start of the message.
        kind: ``"file"`` or ``"dir"``: what will be written at ``path``.
        existing: what will happen to an existing ``path`` (see above).
        hint: how to allow replacing an existing path, for ``existing="refuse"``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    p = Path(path)
    label = f"{option} {p}"
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise UserError(f"{label}: {_file_ancestor(p)} is a file, not a directory") from None
    except OSError as exc:
        raise UserError(f"{label}: {os_error_reason(exc)}") from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        target = os.readlink(p)
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise UserError(f"{label}: is a dangling symbolic link (to {target})") from None
        except OSError as exc:
            raise UserError(f"{label}: symbolic link to {target}: {os_error_reason(exc)}") from None
        if existing == "replace":
            raise UserError(f"{label}: is a symbolic link (to {target}); give the target itself, since replacing "
                            "the link would not write to its target")
    if st is None:
        ancestor = next((q for q in p.absolute().parents if os.path.lexists(q)), None)
        if ancestor is not None and not ancestor.is_dir():
            raise UserError(f"{label}: {ancestor} is a file, not a directory")
        reason = _unwritable_reason(ancestor) if ancestor is not None else None
        if reason:
            raise UserError(f"{label}: cannot create it in {ancestor}: {reason}")
        return p
    is_dir = stat.S_ISDIR(st.st_mode)
    if kind == "dir" and not is_dir:
        what = "a file" if stat.S_ISREG(st.st_mode) else "not a regular directory"
        raise UserError(f"{label}: is {what}, not a directory")
    if kind == "file" and is_dir:
        raise UserError(f"{label}: is a directory, not a file")
    if existing == "refuse":
        raise UserError(f"{label}: already exists ({hint})")
    if existing == "reuse":
        check_readable(p, label=label)
        return p
    reason = _unwritable_reason(p.absolute().parent)
    if reason:
        raise UserError(f"{label}: cannot replace it: {reason}")
    return p


# ---------------------------------------------------------------------------------------------- one writer
@contextlib.contextmanager
def lock_directory(directory: str | os.PathLike, *, option: str, what: str = "directory") -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` for the block: ``fcntl.flock`` on ``<directory>/.lock``, non-blocking.

    The lock file holds the holder's PID; while another process holds it this raises
    ``UserError("<option> <directory>: <what> in use by PID <pid>")``. The kernel drops the lock when its holder
    exits, however it exits (``kill -9`` included), so a stale ``.lock`` file never blocks anyone; it is left in
    place (removing it would race with the next process opening it). A directory where the lock file can be
    neither created nor opened (a read-only mount of a run made before locks existed) is not locked: nobody can
    write there.
    """
    path = Path(directory) / ".lock"
    writable = True
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise UserError(f"{option} {directory}: cannot create {path.name}: {os_error_reason(exc)}") from None
        writable = False
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            fd = -1
    if fd < 0:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            holder = f"PID {pid}" if pid.isdigit() else "another process"
            raise UserError(f"{option} {directory}: {what} in use by {holder}") from None
        if writable:
            mine = f"{os.getpid()}\n".encode()
            # the PID only names the holder in a second process's message; the flock is the lock, so a full disk
            # (ENOSPC on this one block) does not stop the run here: its first real output says so, naming the file
            with contextlib.suppress(OSError):
                if os.pread(fd, 32, 0) != mine:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, mine, 0)
        yield
    finally:
        os.close(fd)

"""Atomic file and directory writes: nothing on disk is ever left half-written.

Every artifact the toolkit writes (adapter directories, manifests, JSON, figures, tables) goes to a
temporary sibling first and is renamed into place, so a crash or ``kill -9`` at any moment leaves either
the old file or the complete new one, never a partial one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    # The only way to read the umask is to set it; put it straight back.
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _tmp_sibling(path: Path, *, directory: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp gives 0700; a finished directory should follow the umask
        return Path(tmp)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    # mkstemp creates 0600 files; give the final artifact the permissions a plain open() would (umask).
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; on success rename it onto ``path`` (atomic on POSIX)."""
    final = Path(path)
    tmp = _tmp_sibling(final, directory=False)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it becomes ``path``.

    With ``overwrite=False`` an existing ``path`` raises ``FileExistsError`` before anything is written.
    With ``overwrite=True`` the old directory is replaced only once the new one is complete.
    """
    final = Path(path)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final}: already exists")
    tmp = _tmp_sibling(final, directory=True)
    try:
        yield tmp
        if final.exists():
            trash = _tmp_sibling(final, directory=True)
            os.rmdir(trash)
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (NaN is refused: strict JSON only)."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")

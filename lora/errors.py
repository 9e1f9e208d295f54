"""User-facing errors and the command-line contract shared by every tool in the toolkit.

Bad input of any kind (a file, an option, a config value) raises :class:`UserError`. Each CLI's ``main``
runs inside :func:`run_cli`, which turns a ``UserError`` into one line on stderr and exit status 2, with
no traceback. An ``OSError`` that reaches :func:`run_cli` (an unreadable file, a full or read-only disk) is
the environment's fault, not a bug: it too becomes one line naming the file, exit status 2. Other internal
bugs still raise ordinary exceptions, so they keep their tracebacks.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence

EXIT_BAD_INPUT = 2


class UserError(ValueError):
    """Bad input from the user. The message names the file or option and the problem, on one line."""


def one_line(message: str) -> str:
    """Collapse a message onto one line (CLI errors must be exactly one line)."""
    return " ".join(str(message).split())


def short_repr(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for quoting a bad value in a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def os_error_reason(exc: OSError) -> str:
    """The reason of an ``OSError`` without errno noise: ``"permission denied"``, ``"no space left on device"``,
    ``"read-only file system"``..."""
    return _lower_first(exc.strerror or str(exc) or type(exc).__name__)


def _lower_first(reason: str) -> str:
    return reason[:1].lower() + reason[1:]


def os_error_message(exc: OSError) -> str:
    """``"<file>: <reason>"`` for an ``OSError`` (just the reason when it names no file)."""
    where = exc.filename if exc.filename is not None else exc.filename2
    return f"{where}: {os_error_reason(exc)}" if where is not None else os_error_reason(exc)


# A Rust writer (safetensors) reports an I/O error as "... I/O error: No space left on device (os error 28)" (older
# versions: "IoError(Os { code: 28, kind: StorageFull, ... })").
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)|\bOs \{ code: (\d+)")


def io_error_reason(exc: BaseException) -> str | None:
    """Why a write failed, if ``exc`` is the environment's fault: the reason of an ``OSError``, or of the OS error
    that a writer outside Python's I/O (safetensors' ``SafetensorError``, written in Rust) wraps in its message
    as ``(os error N)``; ``None`` for anything else (a bug keeps its traceback)."""
    if isinstance(exc, OSError):
        return os_error_reason(exc)
    found = _RUST_OS_ERROR.search(str(exc))
    if found is None or type(exc).__name__ != "SafetensorError":
        return None
    return _lower_first(os.strerror(int(found.group(1) or found.group(2))))


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line and exit 2 (argparse prints usage + error)."""

    def error(self, message: str):  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {one_line(message)}\n")
        raise SystemExit(EXIT_BAD_INPUT)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a CLI ``main(argv)``; a :class:`UserError` or an ``OSError`` becomes one line on stderr and exit
    status 2."""
    try:
        code = main(argv)
    except UserError as exc:
        sys.stderr.write(f"error: {one_line(exc)}\n")
        return EXIT_BAD_INPUT
    except OSError as exc:  # the environment (permissions, a full or read-only disk), not a bug
        sys.stderr.write(f"error: {one_line(os_error_message(exc))}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    return int(code or 0)

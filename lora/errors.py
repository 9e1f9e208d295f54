"""User-facing errors and the command-line contract shared by every tool in the toolkit.

Bad input of any kind (a file, an option, a config value) raises :class:`UserError`. Each CLI's ``main``
runs inside :func:`run_cli`, which turns a ``UserError`` into one line on stderr and exit status 2, with
no traceback. Internal bugs still raise ordinary exceptions, so they keep their tracebacks.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

EXIT_BAD_INPUT = 2


class UserError(ValueError):
    """Bad input from the user. The message names the file or option and the problem, on one line."""


def one_line(message: str) -> str:
    """Collapse a message onto one line (CLI errors must be exactly one line)."""
    return " ".join(str(message).split())


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line and exit 2 (argparse prints usage + error)."""

    def error(self, message: str):  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {one_line(message)}\n")
        raise SystemExit(EXIT_BAD_INPUT)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a CLI ``main(argv)``; a :class:`UserError` becomes one line on stderr and exit status 2."""
    try:
        code = main(argv)
    except UserError as exc:
        sys.stderr.write(f"error: {one_line(exc)}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    return int(code or 0)

"""The scaffolding every analysis command shares, written once: parser, entry point, output-path checks,
module selection, options generated from a config dataclass.

The contract (README, "Command-line tools"): bad input of any kind prints one line naming the file or option and
exits 2 (:func:`lora.errors.run_cli`); output paths are checked *before* any work starts, and every file is
written atomically (:mod:`lora.fsio`), so a failed run leaves what was on disk as it was.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lora.errors import ArgumentParser, UserError, run_cli
from lora.fsio import check_output_path

__all__ = [
    "add_dataclass_options",
    "check_output_dir",
    "check_output_file",
    "entry_point",
    "new_parser",
    "select_modules",
]


def new_parser(prog: str, description: str) -> ArgumentParser:
    """An :class:`lora.errors.ArgumentParser` (one-line errors, exit 2) that keeps the description's layout."""
    return ArgumentParser(prog=prog, description=description,
                          formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=30))


def entry_point(run: Callable[[Sequence[str] | None], int | None]) -> Callable[[Sequence[str] | None], int]:
    """``main(argv)`` for a command whose body is ``run(argv)``: a UserError becomes one line and exit 2."""

    def main(argv: Sequence[str] | None = None) -> int:
        return run_cli(run, argv)

    main.__doc__ = f"Entry point: {run.__doc__ or 'see --help'}; bad input exits 2 with one line on stderr."
    return main


def check_output_file(option: str, path: str | os.PathLike, suffixes: Sequence[str] | None = None) -> Path:
    """Refuse, before any work, an output file that cannot be written (:func:`lora.fsio.check_output_path`: a
    directory, a path under a file, a dangling link, an unwritable directory), or (with ``suffixes``) an
    unsupported format. An existing file is replaced atomically. Returns the path."""
    p = Path(path)
    if suffixes is not None and p.suffix.lower() not in suffixes:
        raise UserError(f"{option} {p}: unsupported format {p.suffix or '(none)'}; use one of {', '.join(suffixes)}")
    return check_output_path(p, option=option, kind="file", existing="replace")


def check_output_dir(option: str, path: str | os.PathLike) -> Path:
    """Refuse, before any work, an output directory that is a file, lies under a file, or cannot be created; an
    existing one is written into (:func:`lora.fsio.check_output_path`)."""
    return check_output_path(path, option=option, kind="dir", existing="reuse")


def select_modules(keys: Sequence[str], pattern: str | None, *, where: str) -> list[str]:
    """The module keys matching the regular expression ``pattern`` (``re.search``; all for ``None``).

    Raises:
        UserError: naming ``--modules`` for an invalid expression, or one that matches nothing in ``where``.
    """
    keys = list(keys)
    if pattern is None:
        return keys
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise UserError(f"--modules: invalid regular expression {pattern!r}: {exc}") from None
    hits = [k for k in keys if rx.search(k)]
    if not hits:
        raise UserError(f"--modules: {pattern!r} matches none of the {len(keys)} modules of {where}, e.g. {keys[0]}")
    return hits


def add_dataclass_options(
    group: argparse._ActionsContainer,
    cls: type,
    flags: Mapping[str, str],
    *,
    quick: Mapping[str, Any] | None = None,
) -> None:
    """One option per named field of a config dataclass: type, choices, default and help come from the field.

    Args:
        group: a parser or argument group.
        cls: a dataclass whose fields carry ``metadata={"help": ...}``.
        flags: ``{field name: option}``, e.g. ``{"rank": "--planted-rank"}``; only these fields become options.
        quick: ``--quick`` sizes for some fields: their option defaults to ``None`` (so an explicit value wins,
            then the quick size, then the field default) and the help names both.

    The parsed value lands in ``dest = option without dashes`` (``--planted-rank`` -> ``planted_rank``).
    """
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    for name, flag in flags.items():
        f = by_name[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kw: dict[str, Any] = {}
        hint = hints[name]
        if typing.get_origin(hint) is typing.Literal:
            kw["choices"] = typing.get_args(hint)
        elif isinstance(default, tuple):
            kw.update(nargs="+", type=type(default[0]))
        else:
            kw["type"] = type(default)
        help_text = f.metadata.get("help", name)
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        if quick and name in quick:
            q = quick[name]
            help_text += f" (default: {shown}; --quick: {' '.join(map(str, q)) if isinstance(q, tuple) else q})"
            default = None
        else:
            help_text += f" (default: {shown})"
        if isinstance(default, tuple):
            default = list(default)
        group.add_argument(flag, default=default, help=help_text.replace("%", "%%"), **kw)

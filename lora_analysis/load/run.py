"""A run, opened once: the one object every later stage of the analysis takes instead of a path.

:meth:`Run.open` reads a run directory (written by :mod:`lora.train`, or any folder of PEFT adapters) a single
time: ``manifest.json`` once, every ``adapter_config.json`` once (:func:`~lora_analysis.load.adapters.index_run`),
the list of full fine-tuning directories and of the Table 5 budget run. It owns one base-weight source
(:class:`~lora_analysis.load.base.BaseWeights`: the base model loaded once, W0 and its SVD once per matrix), and
loads each adapter's tensors once however many tables use them (:meth:`Run.adapter`).

Nothing after this module opens a run directory: tables, verdicts and renderers receive the :class:`Run` or what
the analysis made from it (:mod:`lora_analysis.pipeline`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora import rundir
from lora.errors import UserError
from lora_analysis.load.adapters import AdapterEntry, LoadedAdapter, RunIndex, index_run, load_adapter_dir
from lora_analysis.load.base import BaseWeights
from lora_analysis.load.full_finetune import find_full_finetunes

__all__ = ["Run", "check_run_dir"]

SETUP_CONFIG_KEYS = ("targets", "ranks", "seeds", "budget", "steps", "lr", "batch_size", "max_length", "alpha",
                     "init", "dropout", "weight_decay")


def check_run_dir(run_dir: Path, *, option: str = "--runs") -> None:
    """Raise :class:`UserError` (one line) unless ``run_dir`` is a readable, non-empty directory."""
    if not run_dir.exists():
        raise UserError(f"{option} {run_dir}: no such directory")
    if not run_dir.is_dir():
        raise UserError(f"{option} {run_dir}: is a file, expected a run directory")
    try:
        empty = not any(run_dir.iterdir())
    except PermissionError:
        raise UserError(f"{option} {run_dir}: cannot read (permission denied)") from None
    if empty:
        raise UserError(f"{option} {run_dir}: run directory is empty (train it with python -m lora.train "
                        f"--out {run_dir}, or python -m lora_analysis.reproduce)")


@dataclass(eq=False)  # holds tensors and a model
class Run:
    """A run directory, read once.

    Attributes:
        root: the directory.
        index: its adapter directories (configs only; :class:`~lora_analysis.load.adapters.RunIndex`).
        manifest: the parsed ``manifest.json``, ``None`` for a folder of adapters from elsewhere.
        base: the one base-weight source of the whole analysis.
        full_dirs: the full fine-tuning directories (``<set>_full_s<seed>``), in natural order.
        table5: the Table 5 budget run in ``<root>/table5``, opened likewise, or ``None``.
    """

    root: Path
    index: RunIndex
    manifest: dict[str, Any] | None
    base: BaseWeights
    full_dirs: tuple[Path, ...] = ()
    table5: Run | None = None
    _adapters: dict[Path, LoadedAdapter] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike, *, base: str | os.PathLike | BaseWeights | None = None,
             option: str = "--runs", table5: bool = True) -> Run:
        """Open a run directory (or a folder of adapter directories, or one adapter directory).

        Args:
            base: the ``--base`` override (a model directory), or a :class:`BaseWeights` to share.
            option: the option that named ``path``, for error messages.
            table5: also open ``<path>/table5`` where it holds adapters.

        Raises:
            UserError: naming ``path`` if it is missing, a file, empty, unreadable, or holds no adapter directory;
                naming the file for an invalid manifest or adapter config, or for a run that fails
                :func:`lora.rundir.verify_run` (a damaged point, files the manifest does not list, ...).
        """
        root = Path(path)
        check_run_dir(root, option=option)
        manifest = rundir.read_manifest(root)
        # verified, not assumed: a damaged point, a snapshot or directory the manifest does not list, a run of
        # full fine-tuning alone is one line (exit 2); points not trained yet are a note (lora.rundir.verify_run)
        rundir.verify_run(root, manifest=manifest, table5=False).raise_or_note()
        full_dirs = tuple(find_full_finetunes(root))
        index = index_run(root, manifest=manifest or {})
        bw = base if isinstance(base, BaseWeights) else BaseWeights(base)
        t5 = None
        sub = root / rundir.TABLE5_SUBDIR
        if table5 and sub.is_dir() and any(sub.iterdir()):
            t5 = cls.open(sub, base=bw, option=option, table5=False)
        return cls(root, index, manifest, bw, full_dirs, t5)

    # ------------------------------------------------------------------------------------------ reading once
    def adapter(self, entry: AdapterEntry | str | os.PathLike) -> LoadedAdapter:
        """The adapter of ``entry`` (or of a directory), loaded once and shared by every table."""
        path = entry.path if isinstance(entry, AdapterEntry) else Path(entry)
        got = self._adapters.get(path)
        if got is None:
            got = self._adapters[path] = load_adapter_dir(path)
        return got

    def quality_rows(self) -> list[dict[str, Any]]:
        """Tables 5 and 6 data of the run (:func:`lora.rundir.quality_rows`), from the manifest already read."""
        return rundir.quality_rows(self.root, manifest=self.manifest or {})

    def setup(self) -> dict[str, str]:
        """Model, task and training config of a :mod:`lora.train` run, from its manifest (empty if none): the
        REPORT.md setup block."""
        m = self.manifest
        if m is None:
            return {}
        cfg = m.get("config") or {}
        task = m.get("task") or {}
        out = {
            "run directory": str(self.root),
            "base model": f"{m.get('base_model', cfg.get('model', '?'))} (fingerprint "
                          f"{str(m.get('base_fingerprint', '?'))[:12]})",
            "task": f"{task.get('name', cfg.get('task', '?'))} ({task.get('kind', '?')}, "
                    f"{len(task.get('labels', []))} labels, {task.get('n_train', '?')} train / "
                    f"{task.get('n_val', '?')} validation examples)",
            "initialisation": "nested (A_r's start is the first r rows of the larger ranks' start)"
            if m.get("nested_init") else "independent per rank",
            "config": ", ".join(f"{k}={cfg[k]}" for k in SETUP_CONFIG_KEYS if k in cfg),
        }
        versions = m.get("versions") or {}
        if versions:
            out["versions"] = ", ".join(f"{k} {v}" for k, v in versions.items())
        return out

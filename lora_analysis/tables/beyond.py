"""Beyond Section 7, in one call: the training snapshots' tables and the full fine-tuning tables of a run.

:func:`load_beyond` shares one :class:`~lora_analysis.load.base.BaseWeights` between both (W0 and its SVD loaded
once). A run without snapshots has an empty ``dynamics`` table and no ``per_step``; a run without full fine-tuning
directories has no ``full`` tables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pandas as pd

from lora_analysis.load.base import BaseWeights
from lora_analysis.tables.dynamics import dynamics_table, snapshot_tables
from lora_analysis.tables.full_finetune import full_finetune_tables

__all__ = ["Beyond", "load_beyond"]


@dataclass(frozen=True)
class Beyond:
    """Attributes:
        per_step: ``{step: {"phi", "table7", "spectra"}}`` of the adapters at each snapshot (empty: no snapshots).
        dynamics: the tidy table of :func:`lora_analysis.tables.dynamics.dynamics_table`.
        full: ``full_spectra``, ``full_singular_values``, ``full_vs_lora``, ``full_table7`` (empty: no full
            fine-tuning).
    """

    per_step: dict[int, dict[str, pd.DataFrame]] = field(default_factory=dict)
    dynamics: pd.DataFrame = field(default_factory=pd.DataFrame)
    full: dict[str, pd.DataFrame] = field(default_factory=dict)

    def tables(self) -> dict[str, pd.DataFrame]:
        """The tidy tables to write (``dynamics`` and the ``full_*`` tables), only those with rows."""
        out = {"dynamics": self.dynamics} if len(self.dynamics) else {}
        return {**out, **{k: v for k, v in self.full.items() if len(v)}}


def load_beyond(run_dir: str | os.PathLike, *, base: BaseWeights | None = None, progress: bool = False) -> Beyond:
    """The snapshot and full fine-tuning tables of ``run_dir`` (see :class:`Beyond`)."""
    bw = base if base is not None else BaseWeights()
    per_step = snapshot_tables(run_dir, base=bw, progress=progress)
    return Beyond(per_step, dynamics_table(per_step), full_finetune_tables(run_dir, base=bw, progress=progress))

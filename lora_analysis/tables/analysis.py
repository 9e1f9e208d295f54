"""What the analysis of one run produced: every tidy table, the snapshots' tables, and the run's setup block.

:func:`lora_analysis.pipeline.analyse` fills an :class:`Analysis`; the verdicts and the renderers read it and
nothing else (no run directory, no base model).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import pandas as pd

from lora_analysis.tables.build import COLUMNS

__all__ = ["Analysis"]


@dataclass(frozen=True)
class Analysis:
    """Attributes:
        tables: ``{name: DataFrame}``: the Section 7 tables (:data:`lora_analysis.tables.build.COLUMNS`, every
            one, possibly empty), then ``dynamics`` and the ``full_*`` tables of
            :mod:`lora_analysis.tables.full_finetune`, each only where it has rows. This is what
            ``<out>/tables/*.csv`` holds.
        per_step: ``{step: {"phi", "table7", "spectra"}}`` of the adapters at each training snapshot (empty: no
            snapshots).
        setup: model, task and training config of the run (:meth:`lora_analysis.load.run.Run.setup`; empty for
            adapters without a manifest).
    """

    tables: Mapping[str, pd.DataFrame]
    per_step: Mapping[int, Mapping[str, pd.DataFrame]] = field(default_factory=dict)
    setup: Mapping[str, str] = field(default_factory=dict)

    @property
    def section7(self) -> dict[str, pd.DataFrame]:
        """The Section 7 tables only."""
        return {k: v for k, v in self.tables.items() if k in COLUMNS}

    @property
    def full(self) -> dict[str, pd.DataFrame]:
        """The full fine-tuning tables (empty without full fine-tuning)."""
        return {k: v for k, v in self.tables.items() if k.startswith("full_")}

    @property
    def dynamics(self) -> pd.DataFrame | None:
        return self.tables.get("dynamics")

"""Every verdict of a run, section by section: what :func:`lora_analysis.pipeline.judge` returns and the
renderers lay out.

Sections, in report order: the Section 7 claims (:data:`~lora_analysis.verdicts.registry.SECTION7`), the training
snapshots (each snapshot claim's verdict per step, and the top-direction trend; :mod:`.dynamics`) and LoRA against
full fine-tuning (:data:`~lora_analysis.verdicts.registry.FULL_FINETUNE`). A section the run has no rows for is
empty.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from lora_analysis.tables.analysis import Analysis
from lora_analysis.verdicts.claims import Context, evaluate_claims, report_json
from lora_analysis.verdicts.dynamics import (
    Trajectory,
    Trend,
    claim_trajectories,
    dynamics_json,
    top_overlap_trend,
)
from lora_analysis.verdicts.full_finetune import evaluate_full_claims, full_json, full_quality
from lora_analysis.verdicts.registry import Claim
from lora_analysis.verdicts.which_rank import WhichRank, judge_which_rank

__all__ = ["Judgement", "judge_analysis"]


@dataclass(frozen=True)
class Judgement:
    """Attributes:
        claims, context: the Section 7 claims and what they were measured on.
        trajectories, trend: the snapshot claims per step and the top-direction trend (empty / ``None``: no
            snapshots).
        full_claims, full_quality: LoRA against full fine-tuning (empty: no full fine-tuning).
        dynamics: the tidy ``dynamics`` table the trend came from (``report.json`` summarises it).
        which_rank: the "Which rank?" section (:mod:`lora_analysis.verdicts.which_rank`); ``None`` when not judged.
    """

    claims: list[Claim]
    context: Context
    trajectories: list[Trajectory] = field(default_factory=list)
    trend: Trend | None = None
    full_claims: list[Claim] = field(default_factory=list)
    full_quality: Mapping[str, Any] = field(default_factory=dict)
    dynamics: pd.DataFrame | None = None
    which_rank: WhichRank | None = None

    def as_json(self, setup: Mapping[str, str]) -> dict[str, Any]:
        """``report.json``: the Section 7 claims, then ``"dynamics"`` and ``"full_finetune"`` where the run has
        them, then the setup."""
        doc = report_json(self.claims, self.context)
        if self.trajectories:
            doc["dynamics"] = dynamics_json(self.trajectories, self.trend, self.dynamics)
        if self.full_claims:
            doc["full_finetune"] = full_json(self.full_claims, self.full_quality)
        return {**doc, "setup": dict(setup)}


def judge_analysis(analysis: Analysis, *, layer: int | None = None) -> Judgement:
    """Every verdict on the tables of one run, section by section."""
    tables = analysis.tables
    claims, context = evaluate_claims(analysis.section7, layer=layer)
    trajectories, trend, dynamics = [], None, None
    if analysis.per_step:
        trajectories = claim_trajectories(analysis.per_step)
        dynamics = analysis.dynamics if analysis.dynamics is not None else pd.DataFrame()
        trend = top_overlap_trend(dynamics)
    full = analysis.full
    full_claims = evaluate_full_claims(full, lora_table7=tables.get("table7")) if full else []
    return Judgement(claims, context, trajectories, trend, full_claims, full_quality(tables.get("quality")), dynamics,
                     judge_which_rank(tables))

"""The claim registry: one declaration per claim, in the section of the report it belongs to.

A claim is declared once, beside the function that measures it::

    @SECTION7.claim("top_direction_shared", title="...", paper="...", figures=("figure3",), snapshot=True,
                    ranks="phi")
    def _top(ev: Evidence) -> Finding: ...

The declaration carries what identifies the claim (id, title, the paper's words and numbers, the figures that show
it) and how it is used (judged at every training snapshot too; judged again at the ranks nearest the paper's r/d).
The function measures, decides and words the outcome (a :class:`Finding`); the registry makes the :class:`Claim`
the report and ``report.json`` show. Nothing refers to a claim by its position: adding a claim is one declaration
(and its test), and it appears in REPORT.md's summary, its own section and ``report.json``.

Sections, in report order: :data:`SECTION7` (the paper's Section 7 claims; the training snapshots follow the
claims declared with ``snapshot=True``) and :data:`FULL_FINETUNE` (LoRA against full fine-tuning).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import pandas as pd

__all__ = ["FAILS", "HOLDS", "INCONCLUSIVE", "NOT_MEASURED", "PARTLY", "VERDICTS", "WEAKER", "FULL_FINETUNE", "SECTION7", "Claim", "ClaimSpec", "Evidence", "Finding", "Section"]

HOLDS, PARTLY, FAILS, INCONCLUSIVE, NOT_MEASURED = "holds", "partly", "does not hold", "inconclusive", "not measured"
WEAKER = "weaker than the paper"  # a positive claim above its null but below the paper's effect (report format 2)
VERDICTS = (HOLDS, WEAKER, PARTLY, FAILS, INCONCLUSIVE, NOT_MEASURED)


@dataclass(frozen=True)
class Finding:
    """What a claim's function returns: the outcome without the claim's identity (see :class:`Claim`).

    Attributes:
        ours: our number(s) with their interval, one line.
        verdict: one of :data:`VERDICTS`.
        rule: the rule that gave the verdict (thresholds on the interval).
        null: the random baseline the statistic is compared with.
        quantity: the φ quantity (``dW``, ``A``, ...) or table the statistic uses.
        measures: machine-readable numbers (``report.json``).
        details: further lines (per weight type, per layer, the paper-scaled ranks, ...).
    """

    ours: str
    verdict: str
    rule: str
    null: str = ""
    quantity: str = ""
    measures: Mapping[str, Any] = field(default_factory=dict)
    details: tuple[str, ...] = ()

    @classmethod
    def not_measured(cls, rule: str, why: str) -> Finding:
        return Finding(f"not measured: {why}", NOT_MEASURED, rule)


@dataclass(frozen=True, kw_only=True)
class Claim(Finding):
    """One claim as the report shows it: a :class:`Finding` with the claim's identity from its declaration.

    Attributes:
        id: the declared id (:class:`ClaimSpec`).
        title, paper: the claim in a few words, and what the paper reports.
        figures: names of the figures that show it.
    """

    id: str
    title: str
    paper: str
    figures: tuple[str, ...] = ()


@dataclass(frozen=True)
class Evidence:
    """What a claim is judged on: the tidy tables and the rank pairs chosen for the run.

    Attributes:
        tables: ``{name: DataFrame}`` (any may be missing; :mod:`lora_analysis.tables.build` names them).
        phi_pair: ``(r_small, r_large)`` of the φ rank comparison (nearest the paper's 8 and 64), or ``(0, 0)``.
        table7_pair: ``(r_small, r_large)`` of Table 7 (nearest the paper's 4, and the largest), or ``(0, 0)``.
        d: the input dimension d_in, if known.
    """

    tables: Mapping[str, pd.DataFrame]
    phi_pair: tuple[int, int] = (0, 0)
    table7_pair: tuple[int, int] = (0, 0)
    d: int | None = None

    def get(self, name: str) -> pd.DataFrame | None:
        return self.tables.get(name)


RankPair = Literal["phi", "table7"]


@dataclass(frozen=True)
class ClaimSpec:
    """One claim's declaration.

    Attributes:
        id, title, paper, figures: as :class:`Claim` shows them.
        evaluate: ``Evidence -> Finding``.
        snapshot: judged at every training snapshot too (needs only φ and Table 7 rows).
        ranks: which rank pair the claim uses (``"phi"`` or ``"table7"``); such a claim is judged again at the
            pair nearest the paper's r/d where that differs, and the result recorded beside it.
    """

    id: str
    title: str
    paper: str
    evaluate: Callable[[Evidence], Finding]
    figures: tuple[str, ...] = ()
    snapshot: bool = False
    ranks: RankPair | None = None

    def judge(self, evidence: Evidence) -> Claim:
        f = self.evaluate(evidence)
        return Claim(f.ours, f.verdict, f.rule, f.null, f.quantity, f.measures, tuple(f.details), id=self.id,
                     title=self.title, paper=self.paper, figures=self.figures)

    def with_scaled(self, claim: Claim, scaled: Claim, ranks: tuple[int, int], d: int) -> Claim:
        """``claim`` with its verdict at the paper-scaled ranks ``ranks`` recorded beside it."""
        if scaled.verdict == NOT_MEASURED:
            return claim
        rd = ", ".join(f"r={r}: r/d = {r / d:.2%}" for r in ranks)
        extra = {"ranks": list(ranks), "r_over_d": [r / d for r in ranks], "verdict": scaled.verdict,
                 "ours": scaled.ours}
        line = f"at the ranks nearest the paper's r/d ({rd}): **{scaled.verdict}**: {scaled.ours}"
        return replace(claim, measures={**claim.measures, "at_scaled_ranks": extra}, details=(*claim.details, line))


@dataclass
class Section:
    """A section of the report and the claims declared in it, in declaration order."""

    id: str
    specs: list[ClaimSpec] = field(default_factory=list)

    def claim(self, cid: str, *, title: str, paper: str, figures: tuple[str, ...] = (), snapshot: bool = False,
              ranks: RankPair | None = None) -> Callable[[Callable[[Evidence], Finding]], Callable]:
        """Decorator: declare the function as claim ``cid`` of this section."""

        def register(fn: Callable[[Evidence], Finding]) -> Callable[[Evidence], Finding]:
            self.add(ClaimSpec(cid, title, paper, fn, tuple(figures), snapshot, ranks))
            return fn

        return register

    def add(self, spec: ClaimSpec) -> None:
        if any(s.id == spec.id for s in self.specs):
            raise ValueError(f"claim {spec.id!r} is declared twice in section {self.id!r}")
        self.specs.append(spec)

    @contextmanager
    def extended(self, spec: ClaimSpec) -> Iterator[ClaimSpec]:
        """``spec`` declared for the duration of a ``with`` block (tests, a notebook's exploratory claim)."""
        self.add(spec)
        try:
            yield spec
        finally:
            self.specs.remove(spec)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(s.id for s in self.specs)

    def spec(self, cid: str) -> ClaimSpec:
        for s in self.specs:
            if s.id == cid:
                return s
        raise KeyError(cid)

    def judge(self, evidence: Evidence) -> list[Claim]:
        """Every claim of the section on ``evidence``, in declaration order."""
        return [s.judge(evidence) for s in self.specs]


SECTION7 = Section("section7")
FULL_FINETUNE = Section("full_finetune")

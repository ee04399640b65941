"""``Shape``: the static shape of a builder flow, checked against a run's history before replay.

A builder flow's every cursor-key base is known before it runs, so a recorded history the code
can no longer replay is found before anything executes (docs/replay.md §6).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .cores.base import StepRecord
from .errors import Code
from .keys import base_of, occurrence_of


@dataclass(frozen=True)
class Shape:
    """Every cursor-key base the flow can produce: its kind, and how often outside loops."""

    kinds: Mapping[str, str]
    counts: Mapping[str, int]
    looped: frozenset[str]

    def check(self, history: Mapping[str, StepRecord]) -> tuple[str, str] | None:
        """(code, message) when the recorded history no longer fits this shape, else None."""
        for key, rec in history.items():
            base = base_of(rec.kind, rec.name)
            occurrence = occurrence_of(key, rec.kind, rec.name)
            if occurrence is None:
                return Code.REPLAY_INCOMPATIBLE_VERSION, f"record {key!r} is not a key of {rec.kind} {rec.name!r}"
            kind = self.kinds.get(base)
            if kind is None:
                return Code.REPLAY_INCOMPATIBLE_VERSION, f"recorded {rec.kind} {base!r} no longer exists in the flow"
            if kind != rec.kind:
                return Code.REPLAY_INCOMPATIBLE_VERSION, f"{base!r} was a {rec.kind}, the flow now has a {kind}"
            if base not in self.looped and occurrence >= self.counts.get(base, 0):
                return (
                    Code.REPLAY_NON_DETERMINISTIC,
                    f"recorded occurrence {occurrence + 1} of {base!r}; the flow now has {self.counts.get(base, 0)}",
                )
        return None

"""Synchronous successive halving within strata, on trial ids and scores only (no Ray here;
trainables.StratifiedASHA applies its decisions to Tune's trials).

A trial that reaches a rung waits there until every live trial of its stratum has reported at
that rung; then the best ceil(n / reduction_factor) go on, ties broken by trial id, and the
others stop. The decisions depend on the results only, never on the order they arrive in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def asha_rungs(grace_period: int, max_t: int, reduction_factor: int) -> list[int]:
    """ASHA's rungs: grace_period * reduction_factor^k below max_t (as Ray's ASHAScheduler)."""
    out, t = [], grace_period
    while t < max_t:
        out.append(t)
        t *= reduction_factor
    return out


@dataclass(frozen=True)
class Decision:
    stratum: tuple
    rung: int
    keep: frozenset   # trial ids that go on
    stop: frozenset   # trial ids that stop


class SuccessiveHalving:
    def __init__(self, rungs: list[int], reduction_factor: int):
        self.rungs, self.reduction_factor = list(rungs), reduction_factor
        self.live: dict[tuple, set[str]] = {}          # stratum -> trial ids still training
        self.at_rung: dict[tuple, dict[str, float]] = {}  # (stratum, rung) -> {trial id: score}
        self.released: set[str] = set()                 # waiting trials that may go on

    def add(self, trial_id: str, stratum: tuple) -> None:
        self.live.setdefault(stratum, set()).add(trial_id)

    def report(self, trial_id: str, stratum: tuple, rung: int, score: float) -> Decision | None:
        """A trial's score (higher is better) at a rung; None while others of its stratum are
        still on their way there (the trial waits)."""
        self.released.discard(trial_id)
        self.at_rung.setdefault((stratum, rung), {})[trial_id] = score
        return self._decide(stratum, rung)

    def leave(self, trial_id: str, stratum: tuple) -> list[Decision]:
        """A trial ended (finished, failed, removed): the rungs that waited only for it decide."""
        if trial_id not in self.live.get(stratum, ()):
            return []
        self.live[stratum].discard(trial_id)
        decided = [self._decide(stratum, rung) for rung in self.rungs if (stratum, rung) in self.at_rung]
        return [d for d in decided if d is not None]

    def _decide(self, stratum: tuple, rung: int) -> Decision | None:
        seen = self.at_rung[(stratum, rung)]
        if self.live[stratum] - set(seen):
            return None
        ranked = sorted(seen.items(), key=lambda kv: (-kv[1], kv[0]))
        keep = frozenset(tid for tid, _ in ranked[:math.ceil(len(ranked) / self.reduction_factor)])
        del self.at_rung[(stratum, rung)]
        return Decision(stratum, rung, keep, frozenset(seen) - keep)

"""Synchronous successive halving within strata, on trial ids and scores only (no Ray here;
scheduling.StratifiedASHA applies its decisions to Tune's trials).

A trial that reaches a rung waits there until every live trial of its stratum has reported at
that rung; then the best ceil(n / reduction_factor) go on, ties broken by trial id, and the
others stop. The decisions depend on the results only, never on the order they arrive in.

The book is total: whatever Tune does to the set of trials, every waiting trial is eventually
released or stopped.
- A decided rung keeps its scores and its cut. A trial arriving after the decision (retried
  after an error, added later by a search algorithm) is judged against them at once: it goes on
  if it would have been among the best ceil((n + 1) / reduction_factor), else it stops. A trial
  reporting again at a rung it already passed (restarted from an older checkpoint) gets the
  verdict it had.
- A trial that ends (finished, stopped, failed) leaves its stratum's live set; the rungs that
  waited only for it decide. A failed trial that Tune retries is added again and is live again.
- After a restore, scores are recorded from the trials' result files (`record`) and `settle`
  decides every rung that can be; a restored trial that was waiting at an undecided rung waits
  again at its next report (`verdict`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CONTINUE, WAIT, STOP = "continue", "wait", "stop"


def asha_rungs(grace_period: int, max_t: int, reduction_factor: int) -> list[int]:
    """ASHA's rungs: grace_period * reduction_factor^k below max_t (as Ray's ASHAScheduler)."""
    out, t = [], grace_period
    while t < max_t:
        out.append(t)
        t *= reduction_factor
    return out


class SweepStalled(RuntimeError):
    """Trials wait at a rung that nothing can decide any more (StratifiedASHA's guard; a bug if
    it happens): the sweep fails naming them instead of waiting forever."""


@dataclass(frozen=True)
class Decision:
    stratum: tuple
    rung: int
    keep: frozenset   # trial ids that go on
    stop: frozenset   # trial ids that stop


class SuccessiveHalving:
    def __init__(self, rungs: list[int], reduction_factor: int):
        self.rungs, self.reduction_factor = list(rungs), reduction_factor
        self.live: dict[tuple, set[str]] = {}                # stratum -> trial ids still training
        self.scores: dict[tuple, dict[str, float]] = {}     # (stratum, rung) -> {trial id: score}
        self.decided: dict[tuple, Decision] = {}            # (stratum, rung) -> its cut
        self.released: set[str] = set()                     # waiting trials that may go on

    # ---------------------------------------------------------------- the set of trials
    def add(self, trial_id: str, stratum: tuple) -> None:
        """A trial that will train (new, retried after an error, or restored unfinished)."""
        self.live.setdefault(stratum, set()).add(trial_id)

    def leave(self, trial_id: str, stratum: tuple) -> list[Decision]:
        """A trial ended (finished, failed, removed): the rungs that waited only for it decide."""
        if trial_id not in self.live.get(stratum, ()):
            return []
        self.live[stratum].discard(trial_id)
        self.released.discard(trial_id)
        return self.settle(stratum)

    # ---------------------------------------------------------------- scores
    def record(self, trial_id: str, stratum: tuple, rung: int, score: float) -> None:
        """A score reported before a restore: remembered, nothing decided (see `settle`)."""
        self.live.setdefault(stratum, set())
        self.scores.setdefault((stratum, rung), {}).setdefault(trial_id, score)

    def report(self, trial_id: str, stratum: tuple, rung: int, score: float) -> Decision | None:
        """A trial's score (higher is better) at a rung: the decision that includes it, or None
        while others of its stratum are still on their way there (the trial waits)."""
        self.released.discard(trial_id)
        key = (stratum, rung)
        if key in self.decided:
            return self._judge_late(trial_id, key, score)
        self.scores.setdefault(key, {})[trial_id] = score
        return self._decide(stratum, rung)

    def verdict(self, trial_id: str, stratum: tuple, t: int) -> str:
        """For a report between rungs: CONTINUE, WAIT (the last rung it reported at is still
        undecided: a trial restored from that rung) or STOP (that rung stopped it)."""
        passed = [r for r in self.rungs if r < t and trial_id in self.scores.get((stratum, r), {})]
        if not passed:
            return CONTINUE
        decision = self.decided.get((stratum, passed[-1]))
        if decision is None:
            return CONTINUE if trial_id in self.released else WAIT
        return STOP if trial_id in decision.stop else CONTINUE

    def settle(self, stratum: tuple | None = None) -> list[Decision]:
        """Decide, lowest rung first, every undecided rung whose live trials have all reported,
        or that some trial has already passed (its decision was made before a restore)."""
        out = []
        for key in sorted((k for k in self.scores if k not in self.decided and (stratum is None or k[0] == stratum)),
                          key=lambda k: (repr(k[0]), k[1])):
            s, rung = key
            passed = {tid for (s2, r2), seen in self.scores.items() if s2 == s and r2 > rung for tid in seen}
            decision = self._decide(s, rung, must_keep=passed & set(self.scores[key]))
            if decision is not None:
                out.append(decision)
        return out

    def waiting(self) -> dict[str, tuple]:
        """Trial id -> (stratum, rung) of every trial waiting at an undecided rung."""
        return {tid: key for key, seen in self.scores.items() if key not in self.decided
                for tid in seen if tid in self.live.get(key[0], ())}

    # ---------------------------------------------------------------- decisions
    def _cut(self, seen: dict[str, float]) -> frozenset:
        ranked = sorted(seen.items(), key=lambda kv: (-kv[1], kv[0]))
        return frozenset(tid for tid, _ in ranked[:math.ceil(len(ranked) / self.reduction_factor)])

    def _decide(self, stratum: tuple, rung: int, must_keep: set = frozenset()) -> Decision | None:
        key = (stratum, rung)
        seen = self.scores[key]
        if not must_keep and self.live.get(stratum, set()) - set(seen):
            return None
        keep = self._cut(seen) | frozenset(must_keep)
        decision = self.decided[key] = Decision(stratum, rung, keep, frozenset(seen) - keep)
        self.live.setdefault(stratum, set()).difference_update(decision.stop)
        return decision

    def _judge_late(self, trial_id: str, key: tuple, score: float) -> Decision:
        """A report at a rung decided without it: the verdict it had, or one against the
        recorded scores. Returns a decision about this trial alone."""
        decided = self.decided[key]
        if trial_id not in decided.keep | decided.stop:
            seen = self.scores[key]
            seen[trial_id] = score
            went_on = trial_id in self._cut(seen)
            decided = self.decided[key] = Decision(key[0], key[1], decided.keep | {trial_id} if went_on else decided.keep,
                                                   decided.stop if went_on else decided.stop | {trial_id})
        went_on = trial_id in decided.keep
        if not went_on:
            self.live.get(key[0], set()).discard(trial_id)
        return Decision(key[0], key[1], frozenset({trial_id}) if went_on else frozenset(),
                        frozenset() if went_on else frozenset({trial_id}))

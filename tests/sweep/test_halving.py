"""Synchronous successive halving under every arrival order, with trials added late, removed,
failed and retried, and the book rebuilt from recorded scores after a restore (halving.py).

A small simulator plays Tune's part: it moves one trial at a time (chosen by a seeded random
generator) to its next rung, applies the book's decisions, and injects faults. Whatever happens,
the simulation must end with no trial waiting; where only the order of events differs, or the
book is rebuilt mid-way, the trials that train to the end are those of a sweep without faults.
"""

import random

import pytest

from tlcore.sweep.halving import CONTINUE, STOP, WAIT, SuccessiveHalving

RUNGS, MAX_T, RF = [1, 3, 9], 27, 3


def make_trials(rng: random.Random, n: int, strata=("S1", "S4")) -> dict:
    """trial id -> (stratum, score at each rung); ties on purpose (scores on a coarse grid)."""
    return {f"t{i:02d}": ((rng.choice(strata),), {r: rng.randint(0, 6) / 6 for r in RUNGS}) for i in range(n)}


class Sim:
    """Tune's side: trial states, and the moves that change them."""

    def __init__(self, trials: dict, book: SuccessiveHalving):
        self.trials, self.book = trials, book
        self.state: dict[str, str] = {}       # running | waiting | stopped | finished
        self.next_rung: dict[str, int] = {}   # index into RUNGS of the next report at a rung

    def start(self, tid: str) -> None:
        self.state[tid], self.next_rung[tid] = "running", 0
        self.book.add(tid, self.trials[tid][0])

    def apply(self, decision, current=None) -> None:
        for tid in decision.keep:
            if tid != current and self.state.get(tid) == "waiting":
                self.state[tid] = "running"
        for tid in decision.stop:
            if tid != current and self.state.get(tid) in ("waiting", "running"):
                self.stop(tid)

    def stop(self, tid: str) -> None:
        self.state[tid] = "stopped"
        for d in self.book.leave(tid, self.trials[tid][0]):
            self.apply(d)

    def step(self, tid: str) -> None:
        """A running trial reaches its next rung (or the end) and reports."""
        stratum, scores = self.trials[tid]
        if self.next_rung[tid] == len(RUNGS):
            self.state[tid] = "finished"
            for d in self.book.leave(tid, stratum):
                self.apply(d)
            return
        rung = RUNGS[self.next_rung[tid]]
        self.next_rung[tid] += 1
        decision = self.book.report(tid, stratum, rung, scores[rung])
        if decision is None:
            self.state[tid] = "waiting"
            return
        self.apply(decision, current=tid)
        if tid in decision.keep:
            return
        self.state[tid] = "stopped"
        for d in self.book.settle(stratum):
            self.apply(d)

    def fail_and_retry(self, tid: str, rng: random.Random) -> None:
        """Tune's recovery path: on_trial_error, then on_trial_add of the same trial, which
        restarts from its last checkpoint (at or before the rung it last reported at)."""
        stratum = self.trials[tid][0]
        for d in self.book.leave(tid, stratum):
            self.apply(d)
        self.book.add(tid, stratum)
        self.state[tid] = "running"
        self.next_rung[tid] = max(0, self.next_rung[tid] - rng.randint(0, 1))

    def movable(self) -> list[str]:
        return sorted(t for t, s in self.state.items()
                      if s == "running" or s == "waiting" and t in self.book.released)

    def restore(self) -> "Sim":
        """The driver dies; --resume builds a fresh book from the recorded scores (what
        StratifiedASHA reads from result files), re-adds unfinished trials and settles."""
        book = SuccessiveHalving(RUNGS, RF)
        new = Sim(self.trials, book)
        for tid, state in self.state.items():
            stratum, scores = self.trials[tid]
            for rung in RUNGS[:self.next_rung[tid]]:
                book.record(tid, stratum, rung, scores[rung])
            new.next_rung[tid] = self.next_rung[tid]
            new.state[tid] = state if state in ("stopped", "finished") else "running"
            if new.state[tid] == "running":
                book.add(tid, stratum)
        for d in book.settle():
            new.apply(d)
        for tid in sorted(new.state):  # a restored trial's first report between rungs: the gate
            if new.state[tid] == "running" and new.next_rung[tid] > 0:
                verdict = book.verdict(tid, self.trials[tid][0], RUNGS[new.next_rung[tid] - 1] + 1)
                if verdict == WAIT:
                    new.state[tid] = "waiting"
                elif verdict == STOP:
                    new.stop(tid)
                else:
                    assert verdict == CONTINUE
        return new


def play(trials, rng, *, late=0, faults=0.0, restores=0, removals=0) -> Sim:
    """Run to the end; `late` trials are added only once the others have started moving."""
    sim = Sim(trials, SuccessiveHalving(RUNGS, RF))
    ids = sorted(trials)
    for tid in ids[:len(ids) - late]:
        sim.start(tid)
    waiting_to_join = ids[len(ids) - late:]
    restore_at = sorted(rng.sample(range(1, 40), restores))
    moves = 0
    while True:
        if waiting_to_join and rng.random() < 0.3:
            sim.start(waiting_to_join.pop(0))
        movable = sim.movable()
        if not movable:
            if waiting_to_join:
                sim.start(waiting_to_join.pop(0))
                continue
            break
        tid = rng.choice(movable)
        if sim.state[tid] == "running" and rng.random() < faults:
            sim.fail_and_retry(tid, rng)
        elif removals and sim.state[tid] == "running" and rng.random() < 0.05:
            removals -= 1
            sim.stop(tid)  # removed by the user / Tune (on_trial_remove)
        else:
            if sim.state[tid] == "waiting":
                sim.state[tid] = "running"
            sim.step(tid)
        moves += 1
        if restore_at and moves == restore_at[0]:
            restore_at.pop(0)
            sim = sim.restore()
        assert moves < 10_000, "the simulation did not end"
    return sim


def finishers(sim: Sim) -> set:
    return {t for t, s in sim.state.items() if s == "finished"}


def assert_ended(sim: Sim) -> None:
    stuck = {t: s for t, s in sim.state.items() if s not in ("stopped", "finished")}
    assert not stuck, f"trials left waiting or running: {stuck}; waiting at {sim.book.waiting()}"
    assert not sim.book.waiting()


@pytest.mark.parametrize("seed", range(40))
def test_any_arrival_order_and_any_restore_make_the_decisions_of_a_quiet_sweep(seed):
    rng = random.Random(seed)
    trials = make_trials(rng, rng.randint(2, 12))
    quiet = play(trials, random.Random(0))
    assert_ended(quiet)
    for k in range(5):
        shuffled = play(trials, random.Random(seed * 100 + k), restores=k % 3)
        assert_ended(shuffled)
        assert finishers(shuffled) == finishers(quiet)


@pytest.mark.parametrize("seed", range(60))
def test_retries_late_trials_and_removals_always_end(seed):
    rng = random.Random(seed)
    trials = make_trials(rng, rng.randint(2, 14))
    removals = rng.randint(0, 2)
    sim = play(trials, rng, late=rng.randint(0, len(trials) - 1), faults=0.3, restores=rng.randint(0, 2),
               removals=removals)
    assert_ended(sim)
    if not removals:  # every rung keeps at least one: each stratum trains someone to the end
        assert {trials[t][0] for t in finishers(sim)} == {s for s, _ in trials.values()}


def test_a_trial_retried_after_its_rung_was_decided_is_judged_against_the_recorded_scores():
    book = SuccessiveHalving(RUNGS, RF)
    for tid in ("a", "b", "c", "d"):
        book.add(tid, ())
    for tid, score in (("a", 0.9), ("b", 0.5), ("c", 0.1)):
        assert book.report(tid, (), 1, score) is None          # waiting for d
    (decision,) = book.leave("d", ())                           # d fails: the rung decides without it
    assert decision.keep == {"a"} and decision.stop == {"b", "c"}
    book.add("d", ())                                           # ... and Tune retries it
    assert book.report("a", (), 3, 0.9) is None                 # a waits at rung 3 for d
    late = book.report("d", (), 1, 0.95)                        # d would have been kept: it goes on
    assert late.keep == {"d"} and not late.stop
    assert book.report("d", (), 1, 0.95).keep == {"d"}          # a repeat gets the verdict it had
    decided = book.report("d", (), 3, 0.2)                      # rung 3 no longer waits for anyone
    assert decided.keep == {"a"} and decided.stop == {"d"}

    book = SuccessiveHalving(RUNGS, RF)                         # a late trial that would have been cut
    for tid in ("a", "b", "c"):
        book.add(tid, ())
        book.report(tid, (), 1, {"a": 0.9, "b": 0.5, "c": 0.1}[tid])
    book.add("e", ())
    assert book.report("a", (), 3, 0.9) is None                 # waits for e
    late = book.report("e", (), 1, 0.3)
    assert late.stop == {"e"} and "e" not in book.live[()]
    (decided,) = book.settle(())                                # rung 3: a alone, it goes on
    assert decided.keep == {"a"}


def test_a_rebuilt_book_decides_what_the_recorded_scores_decided():
    book = SuccessiveHalving(RUNGS, RF)
    # before the driver died: rung 1 decided among a, b, c (a kept); d, added later, was judged
    # against them and kept; a then reported at rung 3 and waited there for d and e
    for tid, score in (("a", 0.9), ("b", 0.5), ("c", 0.1), ("d", 0.95)):
        book.record(tid, (), 1, score)
    book.record("a", (), 3, 0.8)
    for tid in ("a", "d", "e"):  # b and c were stopped: Tune re-adds them TERMINATED, not live
        book.add(tid, ())
    decisions = book.settle()
    assert [(d.rung, d.keep, d.stop) for d in decisions] == [(1, {"a", "d"}, {"b", "c"})]
    assert book.verdict("a", (), 4) == WAIT      # a waits at rung 3 for the others, again
    assert book.verdict("d", (), 2) == CONTINUE
    assert book.verdict("b", (), 2) == STOP
    assert book.verdict("e", (), 1) == CONTINUE  # nothing recorded: it goes on to its rung
    assert book.waiting() == {"a": ((), 3)}

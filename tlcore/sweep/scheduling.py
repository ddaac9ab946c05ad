"""Early stopping and search: ASHA stratified by config keys (asynchronous, or synchronous so that
decisions do not depend on the order results arrive in), and Optuna's TPE with early-stopped
trials told as PRUNED."""

from __future__ import annotations

import time

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from tlcore.config import flatten_config
from tlcore.sweep.callbacks import reported_results
from tlcore.sweep.halving import CONTINUE, STOP, WAIT, SuccessiveHalving, SweepStalled, asha_rungs


class StratifiedASHA(FIFOScheduler):
    """ASHA that compares a trial only with the trials of its stratum: the trials sharing its
    values of the `strata` config keys (e.g. `train_subset`: a trial on 26 subjects is not
    stopped because trials on 105 are ahead). Each stratum gets its own Ray `ASHAScheduler`;
    with no strata this is plain ASHA.

    `synchronous=True`: successive halving on the same rungs, decided only when every live trial
    of the stratum has reported at the rung (the others wait PAUSED, their resources freed); then
    the best ceil(n / reduction_factor) go on, ties broken by trial id. Asynchronous ASHA decides
    on the trials that happen to have reported first, so two runs of one sweep can stop
    different trials; synchronous decisions depend on the results only.

    Total under Tune's changes to the set of trials (halving.py): a trial retried after an error
    or added by a search algorithm after a rung was decided is judged against that rung's
    recorded scores instead of being waited for; on --resume, both modes rebuild their rungs from
    each trial's result file (Tune restores the scheduler as it was when the sweep was built).
    If trials still end up waiting with nothing left to run for `stall_s` seconds, the sweep
    fails naming them (SweepStalled) rather than wait forever.
    """

    def __init__(self, strata=(), *, max_t: int, grace_period: int = 2, reduction_factor: int = 3,
                 synchronous: bool = False, time_attr: str = "training_iteration",
                 metric: str | None = None, mode: str | None = None, stall_s: float = 120.0):
        super().__init__()
        self.strata, self.synchronous, self.time_attr = tuple(strata), synchronous, time_attr
        self.max_t, self.grace_period, self.reduction_factor = max_t, min(grace_period, max_t), reduction_factor
        self._metric, self._mode = metric, mode
        self.stall_s = stall_s
        self._asha: dict[tuple, ASHAScheduler] = {}   # stratum -> its own ASHA (asynchronous)
        self._stratum_of: dict[str, tuple] = {}
        self._trials: dict[str, Trial] = {}
        self._halving = SuccessiveHalving(self.rungs, reduction_factor)  # synchronous decisions
        self._unsettled = False      # trials restored: decide what their recorded scores decide
        self._stalled_since = None

    def set_search_properties(self, metric, mode, **spec) -> bool:
        self._metric, self._mode = self._metric or metric, self._mode or mode
        return True

    def stratum(self, trial: Trial) -> tuple:
        config = flatten_config(trial.config)
        return tuple(config.get(k) for k in self.strata)

    @property
    def rungs(self) -> list[int]:
        return asha_rungs(self.grace_period, self.max_t, self.reduction_factor)

    def _sub(self, stratum: tuple) -> ASHAScheduler:
        if stratum not in self._asha:
            self._asha[stratum] = ASHAScheduler(time_attr=self.time_attr, metric=self._metric, mode=self._mode,
                                                max_t=self.max_t, grace_period=self.grace_period,
                                                reduction_factor=self.reduction_factor)
        return self._asha[stratum]

    def _score(self, result: dict) -> float | None:
        value = result.get(self._metric)
        return None if value is None else (1.0 if self._mode == "max" else -1.0) * float(value)

    # ---------------------------------------------------------------- Tune's scheduler hooks
    def on_trial_add(self, tune_controller, trial):
        known = trial.trial_id in self._stratum_of
        stratum = self._stratum_of[trial.trial_id] = self.stratum(trial)
        self._trials[trial.trial_id] = trial
        if not self.synchronous:
            self._sub(stratum).on_trial_add(tune_controller, trial)
        if not known:
            self._rebuild(trial, stratum)
        if trial.status != Trial.TERMINATED:  # new, retried after an error, or restored unfinished
            self._halving.add(trial.trial_id, stratum)

    def _rebuild(self, trial: Trial, stratum: tuple) -> None:
        """A trial with reports before this scheduler saw it (a restored sweep): record them."""
        history = [r for r in reported_results(trial) if r.get(self.time_attr) is not None]
        if not history:
            return
        self._unsettled = True
        for result in history:
            t, score = int(result[self.time_attr]), self._score(result)
            if score is None:
                continue
            if self.synchronous and t in self.rungs:
                self._halving.record(trial.trial_id, stratum, t, score)
            elif not self.synchronous and t < self.max_t:  # Ray's bracket records each rung's first value
                self._sub(stratum)._trial_info[trial.trial_id].on_result(trial, t, score)

    def on_trial_result(self, tune_controller, trial, result):
        if trial.trial_id not in self._stratum_of:  # e.g. a trial restored into a fresh scheduler
            self.on_trial_add(tune_controller, trial)
        self._settle(tune_controller)
        stratum = self._stratum_of[trial.trial_id]
        if not self.synchronous:
            return self._sub(stratum).on_trial_result(tune_controller, trial, result)
        t, score = result.get(self.time_attr), self._score(result)
        if t is None or score is None:
            return self.CONTINUE
        if t >= self.max_t:
            return self.STOP
        if t not in self.rungs:  # between rungs: a restored trial may still owe a rung its wait
            return {CONTINUE: self.CONTINUE, WAIT: self.PAUSE, STOP: self.STOP}[
                self._halving.verdict(trial.trial_id, stratum, t)]
        decision = self._halving.report(trial.trial_id, stratum, t, score)
        if decision is None:
            return self.PAUSE  # until the rest of its stratum reached the rung
        self._apply(tune_controller, decision, current=trial)
        if trial.trial_id in decision.keep:
            return self.CONTINUE
        for later in self._halving.settle(stratum):  # a late arrival stopped: higher rungs may wait for it no more
            self._apply(tune_controller, later, current=None)
        return self.STOP

    def on_trial_complete(self, tune_controller, trial, result):
        self._leave(tune_controller, trial)
        if not self.synchronous:
            self._sub(self._stratum_of[trial.trial_id]).on_trial_complete(tune_controller, trial, result)

    def on_trial_error(self, tune_controller, trial):
        self._leave(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial):
        self._leave(tune_controller, trial)
        if not self.synchronous:
            self._sub(self._stratum_of[trial.trial_id]).on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller):
        self._settle(tune_controller)
        trials = tune_controller.get_trials()
        for trial in trials:
            if trial.status == Trial.PENDING:
                self._stalled_since = None
                return trial
        for trial in trials:
            if trial.status == Trial.PAUSED and (not self.synchronous or trial.trial_id in self._halving.released):
                self._stalled_since = None
                return trial
        if self.synchronous:
            self._check_stall(trials)
        return None

    def debug_string(self) -> str:
        mode = "synchronous" if self.synchronous else "asynchronous"
        return (f"Using {mode} ASHA per stratum {list(self.strata) or '(one stratum)'}: "
                f"{len(self._halving.live)} strata, rungs {self.rungs}")

    # ---------------------------------------------------------------- synchronous decisions
    def _settle(self, tune_controller) -> None:
        """After a restore, once Tune has added every trial: the rungs their scores decide."""
        if not self._unsettled:
            return
        self._unsettled = False
        for decision in self._halving.settle():
            self._apply(tune_controller, decision, current=None)

    def _leave(self, tune_controller, trial) -> None:
        """A trial ended: the trials of its stratum no longer wait for it."""
        stratum = self._stratum_of.get(trial.trial_id)
        if stratum is None:
            return
        for decision in self._halving.leave(trial.trial_id, stratum):
            if self.synchronous:
                self._apply(tune_controller, decision, current=None)

    def _apply(self, tune_controller, decision, current: Trial | None) -> None:
        """Release the waiting trials that go on; stop the waiting (or restored, not yet started)
        ones that do not. `current` decides for itself through its return value."""
        for tid in decision.keep:
            if current is None or tid != current.trial_id:
                self._halving.released.add(tid)
        for tid in decision.stop:
            trial = self._trials.get(tid)
            if trial is None or current is not None and tid == current.trial_id:
                continue
            if trial.status in (Trial.PAUSED, Trial.PENDING) or trial.is_saving:
                tune_controller.stop_trial(trial)
                _record_in_experiment_state(tune_controller, trial)

    def _check_stall(self, trials) -> None:
        """Trials wait, none runs, none may start: after `stall_s` seconds of that, fail."""
        busy = any(t.status in (Trial.RUNNING, Trial.PENDING) or t.is_saving for t in trials)
        waiting = [t for t in trials if t.status == Trial.PAUSED]
        if busy or not waiting:
            self._stalled_since = None
            return
        self._stalled_since = self._stalled_since or time.monotonic()
        if time.monotonic() - self._stalled_since < self.stall_s:
            return
        at = self._halving.waiting()
        names = ", ".join(f"{t.trial_id} (rung {at[t.trial_id][1]})" if t.trial_id in at else t.trial_id
                          for t in waiting)
        raise SweepStalled(f"{len(waiting)} trial(s) wait at a rung of --scheduler asha-sync with nothing left to "
                           f"run for {self.stall_s:.0f} s: {names}. Rerun with --resume (the rungs are rebuilt "
                           "from the results), or use --scheduler asha; please report this as a tlcore bug.")


def _record_in_experiment_state(tune_controller, trial: Trial) -> None:
    """Tune (2.60) saves a trial's new status in its experiment state only when it stops the
    trial's actor; a loser that waited PAUSED has none, so a state saved while it waited would
    keep it PAUSED to the end: `tlcore.tracking.sync` then left its run RUNNING. The scheduler's
    view of the controller does not expose the call; tests/sweep/test_scheduling.py guards it."""
    controller = getattr(tune_controller, "_tune_controller", tune_controller)
    controller._mark_trial_to_checkpoint(trial)


class OptunaPruned(OptunaSearch):
    """Ray's OptunaSearch, except that a trial early stopping ended before `max_t` reports is told
    to Optuna as PRUNED (Optuna's own state for it), not as COMPLETE with its value at the rung:
    a value after 2 reports is not comparable with one after 40. Its intermediate values (one per
    report, which Ray's OptunaSearch already sends) stay, and TPE ranks pruned trials by them
    below the complete ones."""

    max_t: int | None = None  # reports per trial: run_sweep sets the sweep's

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if result and not error and self.max_t and int(result.get("training_iteration", self.max_t)) < self.max_t:
            result = None  # Ray's OptunaSearch tells a trial without a value as PRUNED
        super().on_trial_complete(trial_id, result, error)


def optuna_search(space, *, metric: str, mode: str, seed: int, max_concurrent: int = 4):
    """Optuna's TPE over a define-by-run `space`, `max_concurrent` trials at a time."""
    return ConcurrencyLimiter(OptunaPruned(space, metric=metric, mode=mode, seed=seed), max_concurrent=max_concurrent)


SCHEDULERS = ("asha", "asha-sync", "none")


def asha(reports: int, grace_period: int = 2, reduction_factor: int = 3, strata=(),
         synchronous: bool = False) -> StratifiedASHA:
    """The early-stopping rule of every sweep (bench/ replays it on recorded learning curves)."""
    return StratifiedASHA(strata, max_t=reports, grace_period=min(grace_period, reports),
                          reduction_factor=reduction_factor, synchronous=synchronous)

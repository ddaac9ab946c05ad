"""Ray Tune glue (the only module importing ray.tune): the 3D and 2D trainables, the callbacks
(MLflow runs, bounded checkpoints, result files), stratified ASHA and `run_sweep`, which every
script in sweeps/ calls. What trials start from is in starts.py; what follows them in results.py.
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path

import ray.util
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from tlcore.config import RunConfig, flatten_config
from tlcore.halving import CONTINUE, STOP, WAIT, SuccessiveHalving, SweepStalled, asha_rungs
from tlcore.progress import SweepProgress, quiet_ray_workers, ray_messages_to
from tlcore.results import after_fit
from tlcore.retention import best_paths, deletable
from tlcore.starts import (layer_analysis, num_classes, runtime_summary, start_classifier, start_segmentation,
                           transfer_summary, use_source_weights)
from tlcore.train import (amp_dtype, choose_channels_last, pick_device, read_segmentation_state, train_segmentation,
                          write_segmentation_checkpoint)
from tlcore.trial_runs import SweepRuns, TrialRunLog, iteration_tags, trial_run_name


def this_node() -> dict:
    """The Ray node a trial (re)starts on, for its run's `runtime.node` / `runtime.node_ip` tags:
    on a cluster, which machine trained it (a restored trial may land elsewhere)."""
    return {"node": socket.gethostname(), "node_ip": ray.util.get_node_ip_address()}


def train_segmentation_trial(config: dict, source_weights: dict | None = None) -> None:
    """Function trainable: train one configuration, report every `report_every` iterations.
    `source_weights`: the registered source models, from the driver (starts.use_source_weights)."""
    quiet_ray_workers()  # also when Ray was initialised without tlcore's setup hook (tests, notebooks)
    use_source_weights(source_weights)
    cfg = RunConfig.from_dict(config)
    model, transfer, sampler, val, device = start_segmentation(cfg)
    analysis = layer_analysis(cfg, model, val, device)  # before a resume: movement is from the start
    staged_on = sampler.device
    channels_last, layout_choice = choose_channels_last(cfg, device, model, num_classes(cfg))

    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            resume = read_segmentation_state(Path(d))
    # The transfer report (first start) and where this start runs (every start: a restored trial
    # may land on another node) ride along with the first result; the driver's callback logs them.
    first = {"runtime": runtime_summary(device, amp_dtype(cfg, device) is not None, layout_choice,
                                        volumes_on=staged_on.type, **this_node())}
    if resume is None:
        first["transfer"] = transfer_summary(transfer)

    def report(metrics: dict, state: dict) -> None:
        metrics = {**metrics, **(analysis(model) if analysis else {})}
        with tempfile.TemporaryDirectory() as d:
            write_segmentation_checkpoint(Path(d), cfg, model, state)
            tune.report({**metrics, **first}, checkpoint=tune.Checkpoint.from_directory(d))
        first.clear()

    train_segmentation(cfg, model, sampler, val, num_classes(cfg), report, resume, device, channels_last)


def trial_dirname(trial) -> str:
    """Short trial folder names (Tune's default spells out the whole config)."""
    return f"{trial.trainable_name}_{trial.trial_id}"


class _KeepDriverCopy:
    """Ray's result loggers, minus one step that loses reports.

    When a paused trial resumes (asha-sync pauses every trial at every rung), Ray's JSON and CSV
    loggers copy the trial's result file back from the storage path over the driver's own copy.
    The storage copy is only as new as the last periodic sync, so the reports in between vanish
    from `result.json`, and with them from `Result.metrics_dataframe`: best values, best
    checkpoints and tables then depend on when Ray happened to sync (MLflow, fed from the driver,
    kept them). The driver's copy is complete whenever it exists; only a new driver (--resume)
    needs the storage copy.
    """

    def _restore_from_remote(self, file_name: str, trial) -> None:
        if not Path(trial.local_path, file_name).exists():
            super()._restore_from_remote(file_name, trial)


class JsonResults(_KeepDriverCopy, JsonLoggerCallback):
    pass


class CsvResults(_KeepDriverCopy, CSVLoggerCallback):
    pass


def result_loggers() -> list:
    """The loggers every sweep passes to Tune (given these, Tune adds no JSON or CSV logger of its own)."""
    return [JsonResults(), CsvResults()]


class Progress(SweepProgress, tune.Callback):
    """The sweep's progress view (progress.py), fed by Tune's events. Errors still reach the
    output in full (Tune logs them itself)."""

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started(trial.trial_id, trial.config, trial_run_name(trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.reported(trial.trial_id, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished(trial.trial_id, (trial.last_result or {}).get("iteration", 0))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.failed(trial.trial_id, trial.error_file)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.retried(trial.trial_id, self.done.get(trial.trial_id, 0), trial.error_file)

    def on_step_end(self, iteration, trials, **info):
        self.tick(sum(t.status == Trial.RUNNING for t in trials), len(trials))

    def on_experiment_end(self, trials, **info):
        self.running, self.trials = 0, len(trials)
        self.end()


class KeepBestAndLatest(tune.Callback):
    """Each trial keeps its best checkpoint (by `metric`; ties all kept) and its latest; the
    others are deleted once Tune's experiment state in storage no longer needs them (the rule and
    why Tune's num_to_keep can lose a resumable checkpoint: retention.py). Tune itself keeps every
    entry (num_to_keep=None); best and latest always exist on disk.
    """

    def __init__(self, exp_dir: str, metric: str = "val_dice", mode: str = "max", every_s: float = 30.0):
        self.exp_dir, self.metric, self.mode, self.every_s = exp_dir, metric, mode, every_s
        self._next_check, self.deleted = 0.0, []

    def __getstate__(self):  # pickled with the experiment state: no point keeping the log
        return {**self.__dict__, "_next_check": 0.0, "deleted": []}

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if time.time() >= self._next_check:
            self.prune(trials)

    def on_experiment_end(self, trials, **info):
        self.prune(trials)  # Tune wrote and synced its final state just before this

    def _best(self, results) -> set[str]:
        return best_paths([(r.checkpoint.path, (r.metrics or {}).get(self.metric)) for r in results], self.mode)

    def stored_state(self) -> dict[str, tuple[str, set[str]]]:
        """trial_id -> (latest checkpoint path, best paths) in the newest experiment state in
        storage, read back with Tune's own decoder; {} while none can be read (not yet written,
        or being written)."""
        from ray.tune.experiment.trial import _TrainingRunMetadata

        states = sorted(Path(self.exp_dir).glob("experiment_state-*.json"))
        try:
            trial_data = json.loads(states[-1].read_text())["trial_data"] if states else []
            stored = {}
            for trial_json, meta_json in trial_data:
                manager = _TrainingRunMetadata.from_json_state(meta_json).checkpoint_manager
                latest = manager.latest_checkpoint_result
                if latest is not None:
                    stored[json.loads(trial_json)["trial_id"]] = (
                        latest.checkpoint.path, self._best(manager.best_checkpoint_results))
            return stored
        except Exception:  # noqa: BLE001 -- a state mid-copy: try again next time, delete nothing
            return {}

    def prune(self, trials) -> None:
        self._next_check = time.time() + self.every_s
        stored = self.stored_state()
        for trial in trials:
            manager = trial.run_metadata.checkpoint_manager
            latest = manager.latest_checkpoint_result
            if latest is None or trial.trial_id not in stored:
                continue
            stored_latest, stored_best = stored[trial.trial_id]
            checkpoints = {r.checkpoint.path: r.checkpoint for r in manager.best_checkpoint_results}
            for path in deletable(list(checkpoints), latest=latest.checkpoint.path, stored_latest=stored_latest,
                                  keep=stored_best | self._best(manager.best_checkpoint_results)):
                fs = checkpoints[path].filesystem
                try:
                    if fs.get_file_info(path).type.name == "NotFound":
                        continue
                    fs.delete_dir(path)
                    self.deleted.append(path)
                except OSError as e:  # a full disk is better than a lost checkpoint: leave it
                    print(f"[tlcore] WARNING: could not delete {path} ({e})", flush=True)


class MLflowTrialLogger(TrialRunLog, tune.Callback):
    """One MLflow child run per trial, written through trial_runs.TrialRunLog (buffered while the
    store is unreachable, found again by the trial_id tag after a restore).

    Ray's MLflowLoggerCallback keeps its trial -> run map in memory, so a restored sweep gets a
    second run per trial; this one keeps only strings and plain records (callbacks are pickled
    with the experiment state) and looks runs up in the store.
    """

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started(trial.trial_id, trial.config)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.reported(trial.trial_id, trial.config, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        done = (trial.last_result or {}).get("iteration", 0)
        self.ended(trial.trial_id, "FINISHED", iteration_tags(done, self.max_iterations))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended(trial.trial_id, "FAILED", {"error_file": trial.error_file or ""})

    def on_step_end(self, iteration, trials, **info):
        if self._pending:
            self.flush()

    def on_experiment_end(self, trials, **info):
        self.finish()


def reported_results(trial: Trial) -> list[dict]:
    """A trial's reports so far, from its result.json (the driver's copy, or the storage copy
    if that one is longer): what a restored scheduler rebuilds its rungs from."""
    if not getattr(trial.storage, "trial_dir_name", None):  # a new trial: no folder yet
        return []
    best: list[str] = []
    for folder in {trial.local_path, trial.storage.trial_fs_path}:
        path = Path(folder, "result.json")
        if path.exists():
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            best = lines if len(lines) > len(best) else best
    out = []
    for line in best:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a killed driver
            pass
    return out


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


def run_sweep(name: str, param_space: dict, *, tracking_uri: str, parent_run_id: str, storage_path: str,
              trainable=None,
              max_iterations: int, report_every: int, num_samples: int = 1, seed: int = 0, search_alg=None,
              cpus_per_trial: float = 1, gpus_per_trial: float = 0, max_failures: int = 1,
              resume: bool = False, metric: str = "val_dice", mode: str = "max",
              scheduler: str = "asha", strata=(), grace_period: int = 2, reduction_factor: int = 3,
              source_weights: dict | None = None):
    """Run (or resume) a sweep of `train_segmentation_trial`; returns the ResultGrid.

    num_samples: with a grid (no `search_alg`), the grid runs once per seed, seed .. seed +
    num_samples - 1 (repeats that differ reproducibly); with a search algorithm, its trials.

    scheduler: "asha" (asynchronous early stopping), "asha-sync" (decisions once every trial of
    the stratum reached the rung: independent of the order results arrive in) or "none" (every
    trial runs to the end). `strata`: config keys whose values split the trials into groups
    that early stopping compares separately (e.g. ("train_subset",)).
    source_weights: pinned model URI -> safetensors bytes of the registered sources the trials
    start from (the driver reads them once: driver.resolve_source).
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler={scheduler!r}: choose from {SCHEDULERS}")
    # the driver is the only MLflow client: source weights reach trials through Ray's object
    # store, results come back as Tune reports, and nothing secret is pickled into the trainable
    trainable = tune.with_resources(tune.with_parameters(trainable or train_segmentation_trial,
                                                         source_weights=source_weights or {}),
                                    {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
    exp_dir = os.path.join(storage_path, name)
    restored = resume and tune.Tuner.can_restore(exp_dir)
    mlflow_log = None
    if restored:
        print(f"[tlcore] resuming {exp_dir}")
        tuner = tune.Tuner.restore(exp_dir, trainable, resume_errored=True)
    else:
        if resume:
            print(f"[tlcore] nothing to resume at {exp_dir}; starting a new sweep")
        if search_alg is None and num_samples > 1:
            param_space = {**param_space, "seed": tune.grid_search([seed + i for i in range(num_samples)])}
            num_samples = 1
        reports = math.ceil(max_iterations / report_every)
        for searcher in (search_alg, getattr(search_alg, "searcher", None)):
            if isinstance(searcher, OptunaPruned):
                searcher.max_t = reports
        mlflow_log = MLflowTrialLogger(tracking_uri, name, parent_run_id, max_iterations, exp_dir)
        early_stopping = None if scheduler == "none" else asha(reports, grace_period, reduction_factor, strata,
                                                                synchronous=scheduler == "asha-sync")
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=early_stopping, search_alg=search_alg,
                                        num_samples=num_samples, reuse_actors=True,
                                        trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(
                # verbose=0: Progress prints a line per report instead of Tune's status tables,
                # which dump every configuration key (and the tracking URI) again and again
                name=name, storage_path=storage_path, verbose=0,
                callbacks=[Progress(max_iterations, metric, mode),
                           mlflow_log, KeepBestAndLatest(exp_dir, metric, mode), *result_loggers()],
                # Tune keeps every entry; KeepBestAndLatest deletes what no saved state needs
                # (num_to_keep deletes what a killed driver's stored state may still name).
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None, checkpoint_score_attribute=metric,
                                                        checkpoint_score_order=mode),
                failure_config=tune.FailureConfig(max_failures=max_failures)))
    # Ray's newer console output prints its own header and a TensorBoard hint even at verbose=0
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    print(f"[tlcore] sweep {name}: scheduler {scheduler}{' within ' + ','.join(strata) if strata else ''}; "
          f"Ray's files in {exp_dir}, its messages in {exp_dir}/ray.log", flush=True)
    t0 = time.perf_counter()
    with ray_messages_to(Path(exp_dir) / "ray.log"):
        results = tuner.fit()
    print(f"[tlcore] sweep {name} finished in {time.perf_counter() - t0:.0f} s")
    # a restored sweep's callback is Tune's unpickled copy: replay from Ray's files whenever resumed
    replay = restored or (mlflow_log is not None and mlflow_log.dropped > 0)
    after_fit(results, SweepRuns(tracking_uri, name, parent_run_id), max_iterations, metric, mode,
              replay_from=exp_dir if replay else None)
    return results


def train_classifier_trial(config: dict, source_weights: dict | None = None) -> None:
    """Function trainable for the 2D chain: one report (and checkpoint) per epoch."""
    from tlcore.train2d import (ReportEachEpoch, build_learner, classifier_checkpoint_epoch, fit_classifier,
                                load_classifier_state, uses_bf16, uses_channels_last, write_classifier_checkpoint)

    quiet_ray_workers()  # also when Ray was initialised without tlcore's setup hook (tests, notebooks)
    use_source_weights(source_weights)
    cfg = RunConfig.from_dict(config)
    start_epoch = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            start_epoch = classifier_checkpoint_epoch(Path(d))
    model, transfer, train_dl, val_dl = start_classifier(cfg, start_epoch)
    device = pick_device()
    analysis = layer_analysis(cfg, model, val_dl, device)  # before a resume: movement is from the start
    first = {"runtime": runtime_summary(device, uses_bf16(cfg, device),
                                        "channels-last" if uses_channels_last(cfg, device) else "NCHW", **this_node())}
    if not checkpoint:
        first["transfer"] = transfer_summary(transfer)

    def report(metrics: dict, learn) -> None:
        metrics = {**metrics, **(analysis(learn.model) if analysis else {})}
        with tempfile.TemporaryDirectory() as d:
            write_classifier_checkpoint(Path(d), cfg, learn, epoch=metrics["iteration"])
            tune.report({**metrics, **first}, checkpoint=tune.Checkpoint.from_directory(d))
        first.clear()

    each_epoch = ReportEachEpoch(report, start_epoch, len(train_dl), cfg.batch_size)
    learn = build_learner(cfg, model, train_dl, val_dl, device, cbs=[each_epoch])
    if checkpoint:
        with checkpoint.as_directory() as d:
            load_classifier_state(learn, Path(d))
    fit_classifier(learn, cfg, start_epoch)



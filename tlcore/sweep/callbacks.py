"""What the driver does with Tune's events: one MLflow run per trial, the progress view, bounded
checkpoints, and result files that keep every report."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ray import tune
from ray.tune.experiment import Trial
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from tlcore.sweep.progress import SweepProgress
from tlcore.sweep.retention import best_paths, deletable
from tlcore.tracking.trial_runs import TrialRunLog, iteration_tags, trial_run_name


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

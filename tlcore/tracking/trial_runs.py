"""The MLflow runs of trials: created with their parameters and lineage, found again by their
`trial_id` tag, closed with their final tags.
`TrialRunLog` writes them for the sweep's callback (callbacks.MLflowTrialLogger), buffering through
store outages; `python -m tlcore.tracking.sync` replays Ray's result files through the same functions. No Ray here.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from tlcore.config import TrialConfig, flatten_config, weights_of
from tlcore.data.splits import read_splits
from tlcore.tracking import registry, store

# per layer group at every report, models/probes.py: CKA with the source and its 95 % interval, weight movement
ANALYSIS_PREFIXES = ("cka.", "cka_low.", "cka_high.", "weight_change.")
METRICS = ("train_loss", "val_loss", "val_dice", "val_accuracy", "lr", "patches_per_s", "images_per_s",
           "precise_bn_s", "val_s", "step")


@dataclass(frozen=True)
class SweepRuns:
    """Where a sweep's runs are: the tracking store, the experiment (the sweep's name) and the
    parent run whose children are the trials."""
    uri: str
    experiment: str
    parent_run_id: str

    def run_of(self, trial_id: str) -> str | None:
        """The child run of a trial, None if it has none."""
        return store.find_child_run(self.uri, self.experiment, self.parent_run_id, trial_id)

    def trial_run(self, result) -> str:
        """The run of the trial behind a Tune result (the parent run if the trial has none)."""
        return self.run_of((result.metrics or {}).get("trial_id", "")) or self.parent_run_id


def trial_run_name(config: dict) -> str:
    """What varies first, as MLflow's runs table cuts long names: 'k=2 · ixi_hippocampus/1 · lr=0.001
    constant', 'S2 · scratch · lr=0.001 constant' (the training subset, then the frozen groups of a
    transferred start, then the start, then the learning rate)."""
    c = flatten_config(config)
    src = c.get("source_model", "scratch").replace("models:/", "")
    parts = [c["train_subset"]] if c.get("train_subset", "all") != "all" else []
    if src != "scratch" and not src.startswith("meanvar:"):
        parts.append(f"k={c.get('frozen_layers', 0)}")
    parts += [src, f"lr={c.get('lr', '')} {c.get('lr_schedule', '')}".strip()]
    return " · ".join(parts)


def logged_metrics(result: dict) -> dict:
    """The numbers of a trial's report that go to its MLflow run (Ray's bookkeeping stays out)."""
    return {k: v for k, v in result.items()
            if (k in METRICS or k.startswith(ANALYSIS_PREFIXES)) and isinstance(v, (int, float))}


def reported_dict(result: dict, key: str) -> dict:
    """A dict the trainable reported under `key` (Tune may flatten it to key/...)."""
    flat = {k.split("/", 1)[1]: v for k, v in result.items() if k.startswith(f"{key}/")}
    return flat or (result[key] if isinstance(result.get(key), dict) else {})


def open_trial_run(uri: str, experiment: str, parent_run_id: str, trial_id: str, config: dict,
                   last_step: dict | None = None, reopen: bool = True) -> str:
    """The trial's child run: found by its trial_id tag (and reopened), or created with the
    trial's parameters, source lineage and splits. `last_step[trial_id]` gets the last step
    already logged, so a restored trial never logs a step twice."""
    run_id = store.find_child_run(uri, experiment, parent_run_id, trial_id)
    if run_id is None:
        cfg = TrialConfig.from_dict(config)
        tags = {"sweep": experiment, "trial_id": trial_id}
        if weights_of(cfg.source_model).startswith("models:/"):  # meanvar: its statistics' source
            tags["source_run_id"] = registry.resolve_model(uri, weights_of(cfg.source_model)).run_id
        run_id = store.start_run(uri, experiment, trial_run_name(config), cfg.logged_params(), tags,
                                    parent_run_id=parent_run_id)
        if cfg.splits_file and os.path.exists(cfg.splits_file):  # every run names its subjects
            store.log_dict(uri, run_id, read_splits(cfg.splits_file), "splits.json")
    else:
        # A store outage between create_run and log_params leaves a run without params; finding
        # it again completes them (log_params adds only the missing keys).
        store.log_params(uri, run_id, TrialConfig.from_dict(config).logged_params())
        if last_step is not None:
            history = store.metric_history(uri, run_id, "train_loss")
            last_step[trial_id] = max((step for step, _ in history), default=-1)
        if reopen and store.get_run(uri, run_id).status != "RUNNING":
            store.reopen_run(uri, run_id)
    return run_id


def iteration_tags(done: int, max_iterations: int) -> dict:
    return {"iterations": done, "stopped_early": done < max_iterations}


def end_trial_run(uri: str, run_id: str, status: str, tags: dict) -> None:
    """Close a trial's run (FINISHED or FAILED) with its final tags."""
    store.set_tags(uri, run_id, tags)
    store.end_run(uri, run_id, status)


class TrialRunLog:
    """The MLflow runs of a sweep's trials, written as records (start, result, end) in order,
    each trial's run found again by its `trial_id` tag after a restore.

    When the store goes away, training goes on: records wait in order, the store is tried
    again every `retry_s` seconds, and at the end of the sweep `finish` waits up to
    `final_wait_s` for it. Anything still unwritten is in Ray's result files: `python -m
    tlcore.tracking.sync` replays it. The object holds only strings and plain records, so it pickles
    (Tune saves its callbacks with the experiment state).
    """

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str, max_iterations: int,
                 exp_dir: str = "", retry_s: float = 10.0, final_wait_s: float | None = None):
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.parent_run_id, self.max_iterations, self.exp_dir = parent_run_id, max_iterations, exp_dir
        self.retry_s = retry_s
        self.final_wait_s = final_wait_s if final_wait_s is not None else float(
            os.environ.get("TLCORE_MLFLOW_WAIT_S", 600))
        self._configs: dict[str, dict] = {}
        self._pending: list[tuple[str, str, dict]] = []  # (trial_id, kind, payload), in order
        self._runs: dict[str, str] = {}
        self._last_step: dict[str, int] = {}
        self._retry_at, self._down_since, self.dropped = 0.0, None, 0

    def __getstate__(self):  # run ids and steps are looked up again after a restore
        return {**self.__dict__, "_runs": {}, "_last_step": {}, "_retry_at": 0.0}

    # Saved with Tune's experiment state: records still buffered when the driver dies are
    # written by the resumed sweep.
    def get_state(self) -> dict | None:
        return {"pending": list(self._pending), "configs": dict(self._configs), "dropped": self.dropped}

    def set_state(self, state: dict) -> None:
        self._pending, self._configs = list(state["pending"]), dict(state["configs"])
        self.dropped = state.get("dropped", 0)

    # ---------------------------------------------------------------- events: enqueue, flush
    def started(self, trial_id: str, config: dict) -> None:
        self._configs[trial_id] = dict(config)
        self._push(trial_id, "start", {})

    def reported(self, trial_id: str, config: dict, result: dict) -> None:
        self._configs.setdefault(trial_id, dict(config))
        self._push(trial_id, "result", {
            "step": int(result.get("iteration", result.get("training_iteration", 0))),
            "metrics": logged_metrics(result),
            "transfer": reported_dict(result, "transfer"), "runtime": reported_dict(result, "runtime")})

    def ended(self, trial_id: str, status: str, tags: dict) -> None:
        self._push(trial_id, "end", {"status": status, "tags": tags})

    def finish(self) -> None:
        """At the end of the sweep: wait up to `final_wait_s` for the store, say what is left."""
        deadline = time.time() + self.final_wait_s
        while not self.flush(force=True) and time.time() < deadline:
            time.sleep(min(self.retry_s, max(deadline - time.time(), 0)))
        if self._pending or self.dropped:
            print(f"[tlcore] WARNING: {len(self._pending) + self.dropped} MLflow record(s) could not be written "
                  f"to {self.tracking_uri}. Nothing is lost: Ray's result files hold them. When the store is "
                  "back, rerun the sweep's command with --resume (it writes them, then evaluates), or for the "
                  f"records alone:\n    python -m tlcore.tracking.sync {self.exp_dir or '<storage-path>/' + self.experiment}",
                  flush=True)

    # ---------------------------------------------------------------- writing
    def _push(self, trial_id: str, kind: str, payload: dict) -> None:
        self._pending.append((trial_id, kind, payload))
        self.flush()

    def flush(self, force: bool = False) -> bool:
        """Write buffered records in order; False while the store is unreachable."""
        if not self._pending:
            return True
        if not force and time.time() < self._retry_at:
            return False
        with store.short_retries():
            if self._down_since is not None and not store.server_reachable(self.tracking_uri):
                return self._unreachable("no answer to /health")  # a cheap probe while it is down
            while self._pending:
                trial_id, kind, payload = self._pending[0]
                try:
                    self._write(trial_id, kind, payload)
                except Exception as e:  # noqa: BLE001 -- a logging failure must not end the sweep
                    if store.is_transient(e):
                        return self._unreachable(str(e).splitlines()[0][:200])
                    self.dropped += 1
                    print(f"[tlcore] WARNING: MLflow refused a {kind} record of trial {trial_id} ({e}); "
                          "skipped (python -m tlcore.tracking.sync replays results)", flush=True)
                self._pending.pop(0)
        if self._down_since is not None:
            print(f"[tlcore] MLflow store {self.tracking_uri} reachable again after "
                  f"{time.time() - self._down_since:.0f} s; buffered records written", flush=True)
            self._down_since = None
        return True

    def _unreachable(self, why: str) -> bool:
        if self._down_since is None:
            self._down_since = time.time()
            print(f"[tlcore] WARNING: MLflow store {self.tracking_uri} unreachable ({why}); training goes on, "
                  f"records are buffered and retried every {self.retry_s:.0f} s", flush=True)
        self._retry_at = time.time() + self.retry_s
        return False

    def _write(self, trial_id: str, kind: str, payload: dict) -> None:
        uri, run_id = self.tracking_uri, self._run_id(trial_id)
        if kind == "result":
            step = payload["step"]
            if step <= self._last_step.get(trial_id, -1):
                return  # replayed after a restore from an older checkpoint: already in MLflow
            if payload["transfer"]:
                t = payload["transfer"]
                store.log_params(uri, run_id, {f"transfer.{k}": v for k, v in t.items()})
                store.log_dict(uri, run_id, t, "transfer_report.json")
            if payload.get("runtime"):  # .get: records buffered by an older version have none
                store.set_tags(uri, run_id, {f"runtime.{k}": v for k, v in payload["runtime"].items()})
            store.log_metrics(uri, run_id, payload["metrics"], step=step)
            self._last_step[trial_id] = step
        elif kind == "end":
            end_trial_run(uri, run_id, payload["status"], payload["tags"])

    def _run_id(self, trial_id: str) -> str:
        if trial_id not in self._runs:
            self._runs[trial_id] = open_trial_run(self.tracking_uri, self.experiment, self.parent_run_id,
                                                  trial_id, self._configs[trial_id], self._last_step)
        return self._runs[trial_id]

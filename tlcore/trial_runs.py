"""The MLflow runs of trials: created with their parameters and lineage, found again by their
`trial_id` tag, closed with their final tags; and the credentials trials need to reach the store.
Shared by the sweep's logging callback (trainables) and `python -m tlcore.sync`; no Ray here.
"""

from __future__ import annotations

import functools
import os

from tlcore import tracking
from tlcore.config import RunConfig, flatten_config
from tlcore.data.splits import read_splits

METRICS = ("train_loss", "val_loss", "val_dice", "val_accuracy", "lr", "patches_per_s", "images_per_s", "step")


def trial_run_name(config: dict) -> str:
    c = flatten_config(config)
    src = c.get("source_model", "scratch").replace("models:/", "")
    return f"{src} k={c.get('frozen_layers', 0)} lr={c.get('lr', '')} {c.get('lr_schedule', '')}".strip()


def reported_dict(result: dict, key: str) -> dict:
    """A dict the trainable reported under `key` (Tune may flatten it to key/...)."""
    flat = {k.split("/", 1)[1]: v for k, v in result.items() if k.startswith(f"{key}/")}
    return flat or (result[key] if isinstance(result.get(key), dict) else {})


def open_trial_run(uri: str, experiment: str, parent_run_id: str, trial_id: str, config: dict,
                   last_step: dict | None = None, reopen: bool = True) -> str:
    """The trial's child run: found by its trial_id tag (and reopened), or created with the
    trial's parameters, source lineage and splits. `last_step[trial_id]` gets the last step
    already logged, so a restored trial never logs a step twice."""
    run_id = tracking.find_child_run(uri, experiment, parent_run_id, trial_id)
    if run_id is None:
        cfg = RunConfig.from_dict(config)
        tags = {"sweep": experiment, "trial_id": trial_id}
        if cfg.source_model.startswith("models:/"):
            tags["source_run_id"] = tracking.resolve_model(uri, cfg.source_model).run_id
        run_id = tracking.start_run(uri, experiment, trial_run_name(config), cfg.to_params(), tags,
                                    parent_run_id=parent_run_id)
        if cfg.splits_file and os.path.exists(cfg.splits_file):  # every run names its subjects
            tracking.log_dict(uri, run_id, read_splits(cfg.splits_file), "splits.json")
    else:
        # A store outage between create_run and log_params leaves a run without params; finding
        # it again completes them (log_params adds only the missing keys).
        tracking.log_params(uri, run_id, RunConfig.from_dict(config).to_params())
        if last_step is not None:
            history = tracking.metric_history(uri, run_id, "train_loss")
            last_step[trial_id] = max((step for step, _ in history), default=-1)
        if reopen and tracking.run_info(uri, run_id).info.status != "RUNNING":
            tracking.reopen_run(uri, run_id)
    return run_id


def iteration_tags(done: int, max_iterations: int) -> dict:
    return {"iterations": done, "stopped_early": done < max_iterations}


def end_trial_run(uri: str, run_id: str, status: str, tags: dict) -> None:
    """Close a trial's run (FINISHED or FAILED) with its final tags."""
    tracking.set_tags(uri, run_id, tags)
    tracking.end_run(uri, run_id, status)


def with_credentials(fn):
    """`fn` (a trainable or a Ray task), first putting the driver's MLflow credentials
    (tracking.credentials_env) into the worker's environment, where MLflow's client reads them:
    trials and evaluation tasks on nodes whose Ray was started without them still reach the
    registry and their runs. They travel inside the function Ray ships to the workers; not in the
    config (recorded as params and in Tune's result files) and not in a Ray runtime environment
    (Ray's runtime-env agent writes those values to its log)."""
    credentials = tracking.credentials_env()
    if not credentials:
        return fn

    @functools.wraps(fn)
    def with_env(*args, **kwargs):
        os.environ.update(credentials)
        return fn(*args, **kwargs)

    return with_env


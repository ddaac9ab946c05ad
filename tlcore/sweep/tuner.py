"""`run_sweep`: one Tune experiment, new or resumed, with tlcore's scheduler, callbacks and storage;
every script in sweeps/ calls it."""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

from ray import tune

from tlcore.sweep.callbacks import KeepBestAndLatest, MLflowTrialLogger, Progress, result_loggers
from tlcore.sweep.progress import ray_messages_to
from tlcore.sweep.results import finish_trial_runs
from tlcore.sweep.scheduling import SCHEDULERS, OptunaPruned, asha
from tlcore.sweep.trainables import train_segmentation_trial
from tlcore.tracking.trial_runs import SweepRuns


def trial_dirname(trial) -> str:
    """Short trial folder names (Tune's default spells out the whole config)."""
    return f"{trial.trainable_name}_{trial.trial_id}"


@contextlib.contextmanager
def no_tensorboard_logger():
    """Tune's loggers are result_loggers(); left to itself, fit() adds TensorBoard's too, whose
    import alone costs the driver ~1 CPU-s (the curves are in MLflow and the report). Tune's switch
    is an environment variable: set for the fit only, so no other Tuner in the process loses its
    default loggers."""
    before = os.environ.get("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS")
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS")
        else:
            os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = before


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
    with ray_messages_to(Path(exp_dir) / "ray.log"), no_tensorboard_logger():
        results = tuner.fit()
    print(f"[tlcore] sweep {name} finished in {time.perf_counter() - t0:.0f} s")
    # a restored sweep's callback is Tune's unpickled copy: replay from Ray's files whenever resumed
    replay = restored or (mlflow_log is not None and mlflow_log.dropped > 0)
    finish_trial_runs(results, SweepRuns(tracking_uri, name, parent_run_id), max_iterations, metric, mode,
              replay_from=exp_dir if replay else None)
    return results

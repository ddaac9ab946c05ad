"""The orchestration side (CPU is enough): what Ray Tune, MLflow logging and ASHA cost or save
against the training they manage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from common import SWEEP_REPORTS, FixedBatch, Profile, random_batch  # noqa: E402

from tlcore.config import TrialConfig  # noqa: E402
from tlcore.models.networks import build_model  # noqa: E402
from tlcore.training.device import pick_device  # noqa: E402
from tlcore.training.segmentation import train_segmentation  # noqa: E402


def bench_tracking(p: Profile, device, tmp: Path, emit, step_s: float) -> None:
    from tlcore.tracking import store

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    store.prepare_store(uri)
    run = store.start_run(uri, "bench", "bench")
    metrics = {"train_loss": 0.5, "val_loss": 0.6, "val_dice": 0.7, "lr": 1e-3, "patches_per_s": 10.0}
    store.log_metrics(uri, run, metrics, step=0)
    n = 30
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        store.log_metrics(uri, run, metrics, step=i)
    per_log = (time.perf_counter() - t0) / n
    report_every = TrialConfig().report_every
    # The trial never waits for MLflow: Tune's driver logs each report. Per training step
    # that is per_log / report_every, and even logging every step would cost per_log.
    emit("mlflow", {"mlflow.s_per_log_call": per_log, "mlflow.every_step_pct_of_step": 100 * per_log / step_s,
                    "mlflow.overhead_pct_of_step": 100 * per_log / report_every / step_s,
                    "mlflow.report_every": report_every})


def bench_tune(p: Profile, device, tmp: Path, emit) -> None:
    """The same fixed trials in a plain loop and under Tune (one at a time, checkpoints on)."""
    import ray
    from ray import tune

    cfg = dict(patch_size=p.patch, batch_size=p.batch, max_iterations=p.steps, report_every=p.steps // 2,
               inference_roi=p.roi, max_val_subjects=1)
    val_shape = p.volume

    def trial(config, report):
        torch.set_num_threads(config.get("threads", 1))
        c = TrialConfig(**{**cfg, "seed": config["seed"]})
        x, y = random_batch(p, config["seed"])
        from tlcore.data.pipeline import Subject
        val = Subject("v", torch.randn(2, *val_shape), (torch.rand(1, *val_shape) > 0.9).long(), np.eye(4))
        dev = pick_device()
        train_segmentation(c, build_model(in_channels=2, num_classes=2), FixedBatch(x.to(dev), y.to(dev)),
                           [val], 2, report, device=dev)

    def save(metrics, state, d):
        state.pop("val_per_subject")
        torch.save(state, Path(d) / "state.pt")

    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    for seed in range(p.tune_trials):
        with tempfile.TemporaryDirectory() as d:
            trial({"seed": seed, "threads": threads}, lambda m, s: save(m, s, d))
    plain = time.perf_counter() - t0

    def tune_trial(config):
        def report(m, s):
            with tempfile.TemporaryDirectory() as d:
                save(m, s, d)
                tune.report(m, checkpoint=tune.Checkpoint.from_directory(d))
        trial(config, report)

    t_init = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count(), include_dashboard=False,
             log_to_driver=False)
    init_s = time.perf_counter() - t_init
    try:
        t0 = time.perf_counter()
        tuner = tune.Tuner(
            tune.with_resources(tune_trial, {"cpu": os.cpu_count(), "gpu": 1 if device.type == "cuda" else 0}),
            param_space={"seed": tune.grid_search(list(range(p.tune_trials))), "threads": threads},
            tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=True),
            run_config=tune.RunConfig(storage_path=str(tmp / "ray"), name="overhead", verbose=0))
        tuner.fit()
        tuned = time.perf_counter() - t0
    finally:
        ray.shutdown()
    emit("tune", {"tune.plain_s": plain, "tune.tune_s": tuned, "tune.overhead_ratio": tuned / plain,
                  "tune.ray_init_s": init_s, "tune.with_init_ratio": (tuned + init_s) / plain,
                  "tune.trials": p.tune_trials})


def bench_asha(p: Profile, device, tmp: Path, emit) -> None:
    """Run the brats_layers grid to the end once (no early stopping), then replay ASHA with the
    sweeps' own settings on the recorded validation curves."""
    import ray
    from ray import tune

    from tlcore.sweep.scheduling import asha

    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    uri = f"sqlite:///{tmp / 'sweep.db'}"
    common = ["--mlflow-uri", uri, "--storage-path", str(tmp / "results")]
    # The source model only has to exist; the grid's curves are validated on every validation
    # subject, as in a real sweep (the smoke profile's 2 subjects make rung decisions coin flips).
    for script, extra in (("ixi_source.py", ["--smoke-test"] if p.name == "small" else []),
                          ("brats_layers.py", ["--scheduler", "none", "--max-iterations", str(p.sweep_iterations),
                                               "--report-every", str(p.sweep_iterations // SWEEP_REPORTS)])):
        out = subprocess.run([sys.executable, str(REPO / "sweeps" / script), *common, *extra], cwd=REPO, env=env,
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{script} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    curves = {}
    for d in (tmp / "results" / "brats_layers").glob("train_*"):
        rows = [json.loads(line) for line in (d / "result.json").read_text().splitlines() if line.strip()]
        params = json.loads((d / "params.json").read_text())
        name = f"{params['start']['source_model']} k={params['start']['frozen_layers']}"
        curves[name] = [r["val_dice"] for r in rows]
    reports = max(len(c) for c in curves.values())
    grid_best = max(curves, key=lambda k: max(curves[k]))

    def replay(config):
        for v in curves[config["name"]]:
            time.sleep(0.05)  # trials advance together, as equal-speed trials on a cluster do
            tune.report({"val_dice": v})

    def asha_replay(concurrency: int, grace_period: int = 2, reduction_factor: int = 3) -> tuple[float, str]:
        """ASHA's share of the grid's iterations and its best configuration, with `concurrency`
        trials running at once (async ASHA cannot stop a trial before others reach its rung)."""
        ray.init(num_cpus=concurrency, include_dashboard=False, log_to_driver=False)
        try:
            results = tune.Tuner(
                tune.with_resources(replay, {"cpu": 1}),
                param_space={"name": tune.grid_search(sorted(curves))},
                tune_config=tune.TuneConfig(metric="val_dice", mode="max",
                                            scheduler=asha(reports, grace_period, reduction_factor)),
                run_config=tune.RunConfig(storage_path=str(tmp / f"replay{concurrency}"), name="asha",
                                          verbose=0)).fit()
        finally:
            ray.shutdown()
        used = {r.config["name"]: int(r.metrics["training_iteration"]) for r in results}
        survivors = [k for k, n in used.items() if n == len(curves[k])]
        best = max(survivors, key=lambda k: max(curves[k]))
        return sum(used.values()) / sum(len(c) for c in curves.values()), best

    here = max(1, (os.cpu_count() or 2) if device.type == "cpu" else torch.cuda.device_count())
    share, best = asha_replay(here)
    share_all, best_all = asha_replay(len(curves))
    # other settings on the same curves, at this machine's concurrency: [share of the grid, same best]
    settings = {}
    for grace_period in (1, 2, 4):
        for reduction_factor in (2, 3, 4):
            if (grace_period, reduction_factor) != (2, 3):
                got, b = asha_replay(here, grace_period, reduction_factor)
                settings[f"grace{grace_period}_rf{reduction_factor}"] = [round(got, 3), b == grid_best]
    settings["grace2_rf3"] = [round(share, 3), best == grid_best]
    emit("asha", {"asha.iterations_over_grid": share, "asha.same_best": best == grid_best,
                  "asha.concurrent_trials": here,
                  "asha.iterations_over_grid_all_parallel": share_all,
                  "asha.same_best_all_parallel": best_all == grid_best,
                  "asha.grid_best": grid_best, "asha.asha_best": best, "asha.reports_per_trial": reports,
                  "asha.best_val_dice": {k: round(max(v), 4) for k, v in sorted(curves.items())},
                  "asha.curves": {k: [round(x, 4) for x in v] for k, v in sorted(curves.items())},  # to replay offline
                  "asha.other_settings": "; ".join(f"{k} {v[0]}{'' if v[1] else ' (other best)'}"
                                                   for k, v in sorted(settings.items()))})

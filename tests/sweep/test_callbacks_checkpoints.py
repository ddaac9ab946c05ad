"""Bounded checkpoints (callbacks.KeepBestAndLatest), through real local Ray Tune runs.

Every trial reports a made-up, non-monotone curve with a checkpoint at each report. An audit
callback looks, whenever a checkpoint registers and at the end of every controller step, at
every experiment state Tune has written (the driver's staging copy and the one in storage,
which `--resume` reads after a killed driver) and checks that each latest and best checkpoint
it names is still on disk.
"""

import json
import os
import tempfile
import time
from pathlib import Path

from ray import tune

from tlcore.sweep.callbacks import KeepBestAndLatest

CURVES = {0: [0.2, 0.5, 0.9, 0.4, 0.3, 0.6, 0.1, 0.2],   # best at the 3rd report
          1: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]}   # best = latest


def curve_trial(config):
    start = 0
    if tune.get_checkpoint():
        with tune.get_checkpoint().as_directory() as d:
            start = int((Path(d) / "done").read_text())
    for i in range(start, len(CURVES[config["curve"]])):
        time.sleep(0.3)  # several controller steps (and experiment-state saves) per trial
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "done").write_text(str(i + 1))
            tune.report({"val_dice": CURVES[config["curve"]][i]}, checkpoint=tune.Checkpoint.from_directory(d))


class Audit(tune.Callback):
    """Every checkpoint a written experiment state names as latest or best, missing from disk."""

    def __init__(self, exp_dir: str):
        self.exp_dir, self.missing, self.checks = exp_dir, set(), 0

    def _check(self, trials):
        staging = {t.storage.experiment_driver_staging_path for t in trials if t.storage}
        for folder in (self.exp_dir, *staging):
            named = KeepBestAndLatest(folder).stored_state()
            self.checks += bool(named)
            for latest, best in named.values():
                self.missing |= {p for p in (latest, *best) if not Path(p).exists()}

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        self._check(trials)

    def on_step_end(self, iteration, trials, **info):
        self._check(trials)


def run(tmp_path, keep: KeepBestAndLatest | None, num_to_keep=None):
    # Tune writes its experiment state every >= 10 s by default: a real sweep's reports are
    # minutes apart, so it writes between two of them. These trials report every 0.3 s: write
    # it at every step, as a real sweep does between its reports.
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "0"
    exp_dir = tmp_path / "exp"
    audit = Audit(str(exp_dir))
    tuner = tune.Tuner(
        tune.with_resources(curve_trial, {"cpu": 1}), param_space={"curve": tune.grid_search([0, 1])},
        tune_config=tune.TuneConfig(metric="val_dice", mode="max"),
        run_config=tune.RunConfig(name="exp", storage_path=str(tmp_path), verbose=0,
                                  callbacks=[c for c in (keep, audit) if c],
                                  checkpoint_config=tune.CheckpointConfig(
                                      num_to_keep=num_to_keep, checkpoint_score_attribute="val_dice",
                                      checkpoint_score_order="max")))
    try:
        results = tuner.fit()
    finally:
        os.environ.pop("TUNE_GLOBAL_CHECKPOINT_S")
    assert not results.errors
    return results, audit


def test_each_trial_keeps_its_best_and_latest_and_no_written_state_loses_a_checkpoint(local_ray, tmp_path):
    results, audit = run(tmp_path, KeepBestAndLatest(str(tmp_path / "exp"), every_s=0))
    assert audit.checks > 10 and audit.missing == set()
    for r in results:
        curve = CURVES[r.config["curve"]]
        best, latest = curve.index(max(curve)), len(curve) - 1
        left = sorted(int(p.name.split("_")[-1]) for p in Path(r.path).glob("checkpoint_*"))
        assert left == sorted({best, latest}), r.config
        checkpoint = r.get_best_checkpoint("val_dice", "max")
        with checkpoint.as_directory() as d:
            assert int((Path(d) / "done").read_text()) == best + 1  # the best one, readable


def test_tunes_own_num_to_keep_deletes_what_a_written_state_still_names(local_ray, tmp_path):
    """Why KeepBestAndLatest exists (a canary: if this fails, Ray changed how num_to_keep deletes,
    and CheckpointConfig(num_to_keep=1) may do the job). Tune deletes a superseded checkpoint as
    the next one registers, while the last written experiment state still names it as latest:
    a driver killed then cannot resume that trial."""
    _, audit = run(tmp_path, None, num_to_keep=1)
    assert audit.missing, "Tune's num_to_keep no longer deletes checkpoints a written state names"
    assert all(json.dumps(p) and "checkpoint_" in p for p in audit.missing)

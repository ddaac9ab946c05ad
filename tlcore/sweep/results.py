"""After the trials: the run of every trial closed (also those a killed driver left open), one
TrialRow per trial, and the thesis-shaped tables built from rows and evaluation scores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tlcore.config import TrialConfig
from tlcore.tracking import store
from tlcore.tracking.trial_runs import SweepRuns, end_trial_run, iteration_tags


def log_val_per_subject(results, runs: SweepRuns, metric: str, mode: str) -> None:
    """Each trial's per-subject validation Dice at its best checkpoint, for the report's box
    plots and paired statistics (3D trials write it into every checkpoint)."""
    for r in results:
        checkpoint, _ = best_checkpoint_of(r, metric, mode)
        trial_id = trial_id_of(r)
        if checkpoint is None:
            continue
        with checkpoint.as_directory() as d:
            f = Path(d) / "val_per_subject.json"
            if not f.exists():
                continue
            run_id = runs.run_of(trial_id)
            if run_id:
                store.log_dict(runs.uri, run_id, json.loads(f.read_text()), "val_per_subject_dice.json")


def log_best_scores(results, runs: SweepRuns, metric: str, mode: str) -> None:
    """Each trial's best validation score (`best_val_dice`, `best_val_accuracy`) and that report's
    iteration (`best_iteration`) as metrics of its run: MLflow's `val_dice` column is the last
    report's, while the table, the report and the evaluated checkpoint are the best one's."""
    for r in results:
        df = r.metrics_dataframe
        run_id = runs.run_of(trial_id_of(r))
        if df is None or metric not in df or df[metric].isna().all() or not run_id:
            continue
        row = df[metric].idxmax() if mode == "max" else df[metric].idxmin()
        iteration = int(df.loc[row, "iteration"])
        store.log_metrics(runs.uri, run_id, {f"best_{metric}": float(df.loc[row, metric]),
                                             "best_iteration": iteration}, step=iteration)


def finish_trial_runs(results, runs: SweepRuns, max_iterations: int, metric: str, mode: str,
              replay_from: str | Path | None = None) -> None:
    """What every sweep does once Tune returns: check the store is up (a store still down after the
    logging callback's final wait stops the sweep here, with what to do, not in a traceback
    halfway through evaluation; --resume then writes the rest), close runs a killed driver left
    open, and log each trial's per-subject validation Dice.

    `replay_from` (a resumed sweep's folder, or one whose logging callback had records refused):
    write every reported step MLflow lacks from Ray's result files (tlcore.tracking.sync). Tune saves the
    callback's buffered records only with its periodic experiment state, and a record the store
    refused while it was going down is not buffered at all; the result files hold everything."""
    store.require_store(runs.uri)
    if replay_from is not None:
        from tlcore.tracking.sync import replay

        rows = replay(runs.uri, runs.experiment, runs.parent_run_id, replay_from, max_iterations)
        added = sum(r["metric_values_added"] for r in rows)
        if added:
            print(f"[tlcore] {added} metric value(s) MLflow lacked written from Ray's result files", flush=True)
    close_orphaned_runs(results, runs, max_iterations)
    log_val_per_subject(results, runs, metric, mode)
    log_best_scores(results, runs, metric, mode)


def close_orphaned_runs(results, runs: SweepRuns, max_iterations: int) -> int:
    """End child runs left RUNNING (a driver killed after a trial finished but before MLflow
    heard of it); returns how many were closed."""
    closed = 0
    by_trial = {(r.metrics or {}).get("trial_id"): r for r in results}
    for run in store.child_runs(runs.uri, runs.experiment, runs.parent_run_id, "attributes.status = 'RUNNING'"):
        r = by_trial.get(run.tags.get("trial_id"))
        done = int((r.metrics or {}).get("iteration", 0)) if r is not None else 0
        end_trial_run(runs.uri, run.run_id, "FAILED" if r is None or r.error else "FINISHED",
                      {**iteration_tags(done, max_iterations), "closed_by": "close_orphaned_runs"})
        closed += 1
    return closed


@dataclass
class TrialRow:
    """One trial as its sweep ends: the axes a sweep varies, the best value of the sweep's
    objective, how far it ran and how it ended; `scores` holds what evaluation added (test
    Dice, test AUC, steps to a target loss), in the order the table shows them."""
    trial_id: str
    source_model: str
    frozen_layers: int
    train_subset: str
    lr: str                   # as the table prints it (3 significant digits)
    lr_schedule: str
    seed: int
    metric: str               # the sweep's objective, e.g. val_dice
    best: float               # its best reported value (nan before a first report)
    iterations: int
    stopped_early: bool
    error: str = ""           # the cause in a few words (a failed trial); the traceback is in error_file
    error_file: str = ""
    scores: dict = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return bool(self.error_file)

    def as_dict(self) -> dict:
        """The row as the printed table and results.json show it."""
        row = {"trial_id": self.trial_id, "source_model": self.source_model, "frozen_layers": self.frozen_layers,
               "train_subset": self.train_subset, "lr": self.lr, "lr_schedule": self.lr_schedule, "seed": self.seed,
               f"best_{self.metric}": round(self.best, 4), "iterations": self.iterations,
               "stopped_early": self.stopped_early, "status": "ERROR" if self.failed else "OK"}
        if self.failed:
            row.update(error=self.error, error_file=self.error_file)
        return {**row, **self.scores}


def trial_rows(results, sweep) -> list[TrialRow]:
    """One row per trial (scratch first, then by source, depth, lr and seed): its configuration,
    the best value of the sweep's metric, iterations run (of `sweep.max_iterations`), stopped
    early or not, and why it failed."""
    rows = []
    for r in results:
        c = TrialConfig.from_dict(config_of(r))  # its defaults, not restated here
        df = r.metrics_dataframe
        best = float(getattr(df[sweep.metric], sweep.mode)()) if df is not None and sweep.metric in df else float("nan")
        its = int(df["iteration"].max()) if df is not None and "iteration" in df else 0
        rows.append(TrialRow(trial_id_of(r), c.source_model, c.frozen_layers, c.train_subset, f"{c.lr:.3g}",
                             c.lr_schedule, c.seed, sweep.metric, best, its,
                             stopped_early=r.error is None and its < sweep.max_iterations))
        if r.error:
            rows[-1].error = (str(r.error).strip().splitlines() or [type(r.error).__name__])[-1][:120]
            rows[-1].error_file = str(Path(r.path) / "error.txt")
    return sorted(rows, key=lambda row: (row.source_model != "scratch", row.source_model, row.frozen_layers,
                                         row.lr, row.seed))


def config_of(result) -> dict:
    """A Tune result's trial configuration: from its metrics, or from the params.json Tune wrote
    in the trial's folder when it started (a trial whose last attempt failed before its first
    report has no metrics, so Ray's `result.config` is None)."""
    if result.config is not None:
        return result.config
    return json.loads((Path(result.path) / "params.json").read_text())


def trial_id_of(result) -> str:
    """A Tune result's trial id: from its metrics, or from the folder `trial_dirname` named
    (a trial that failed before its first report has no metrics)."""
    if (result.metrics or {}).get("trial_id"):
        return result.metrics["trial_id"]
    name = Path(result.path or "").name
    for prefix in ("train_segmentation_trial_", "train_classifier_trial_"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def best_trial_checkpoint(results, sweep):
    """(ResultGrid entry, checkpoint, its iteration) of the best trial's best report."""
    best = results.get_best_result(metric=sweep.metric, mode=sweep.mode, scope="all")
    checkpoint, iteration = best_checkpoint_of(best, sweep.metric, sweep.mode)
    return best, checkpoint, iteration


def best_checkpoint_of(result, metric: str, mode: str):
    """(checkpoint, iteration) of a trial's best report by `metric`; (None, 0) without one."""
    df = result.metrics_dataframe
    if df is None or metric not in df or df[metric].isna().all():
        return None, 0
    row = df[metric].idxmax() if mode == "max" else df[metric].idxmin()
    try:
        checkpoint = result.get_best_checkpoint(metric, mode) or result.checkpoint
    except (RuntimeError, ValueError, KeyError):
        checkpoint = result.checkpoint
    return checkpoint, int(df.loc[row, "iteration"])


def layer_table(rows: list[TrialRow], scores: dict) -> list[dict]:
    """Rows in the shape of thesis Table 6.2: every trial's whole-volume train / val / test Dice
    at its best checkpoint (the iteration of the best validation Dice), early-stopped or not."""
    fmt = lambda v: "" if v is None else round(v, 4)
    out = []
    for r in rows:
        s = scores.get(r.trial_id, {})
        out.append({**r.as_dict(), "train_dice": fmt(s.get("train_dice")), "val_dice": fmt(s.get("val_dice")),
                    "test_dice": fmt(s.get("test_dice")), "best_iteration": s.get("best_iteration", "")})
    return out


def subset_table(rows: list[TrialRow], scores: dict, splits: dict) -> list[dict]:
    """Rows in the shape of thesis Tables 6.3-6.6: per subset and model, train / val / test Dice
    and the iteration of the chosen (best validation) checkpoint."""
    subsets = splits.get("subsets", {})
    fmt = lambda v: "" if v is None else round(v, 4)
    out = []
    for r in rows:
        s = scores.get(r.trial_id, {})
        out.append({"train_subset": f"{r.train_subset} ({len(subsets.get(r.train_subset, splits['train']))})",
                    "model": "scratch" if r.source_model == "scratch" else f"k={r.frozen_layers}",
                    "lr_schedule": r.lr_schedule, "seed": r.seed,
                    "train_dice": fmt(s.get("train_dice")), "val_dice": fmt(r.best),
                    "test_dice": fmt(s.get("test_dice")), "best_iteration": s.get("best_iteration", ""),
                    "iterations": r.iterations, "stopped_early": r.stopped_early,
                    "status": "ERROR" if r.failed else "OK", "trial_id": r.trial_id})
    return sorted(out, key=lambda x: (x["train_subset"], x["model"] != "scratch", x["model"], x["lr_schedule"]))

"""After the trials: the run of every trial closed (also those a killed driver left open), one row
per trial, and the thesis-shaped tables built from rows and evaluation scores.
"""

from __future__ import annotations

import json
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


def trial_rows(results, sweep) -> list[dict]:
    """One row per trial: configuration, best value of the sweep's metric, iterations run (of
    `sweep.max_iterations`), stopped early or not."""
    max_iterations, metric, mode = sweep.max_iterations, sweep.metric, sweep.mode
    rows = []
    for r in results:
        c = TrialConfig.from_dict(config_of(r))  # its defaults, not restated here
        df = r.metrics_dataframe
        best = float(getattr(df[metric], mode)()) if df is not None and metric in df else float("nan")
        its = int(df["iteration"].max()) if df is not None and "iteration" in df else 0
        rows.append({"trial_id": trial_id_of(r), "source_model": c.source_model, "frozen_layers": c.frozen_layers,
                     "train_subset": c.train_subset, "lr": f"{c.lr:.3g}", "lr_schedule": c.lr_schedule,
                     "seed": c.seed, f"best_{metric}": round(best, 4),
                     "iterations": its, "stopped_early": r.error is None and its < max_iterations,
                     "status": "ERROR" if r.error else "OK"})
        if r.error:  # the cause in a few words; the whole traceback is in the trial's error.txt
            rows[-1]["error"] = (str(r.error).strip().splitlines() or [type(r.error).__name__])[-1][:120]
            rows[-1]["error_file"] = str(Path(r.path) / "error.txt")
    return sorted(rows, key=lambda row: (row["source_model"] != "scratch", row["source_model"],
                                         row["frozen_layers"], str(row["lr"]), row["seed"]))


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


def layer_table(rows: list[dict], scores: dict) -> list[dict]:
    """Rows in the shape of thesis Table 6.2: every trial's whole-volume train / val / test Dice
    at its best checkpoint (the iteration of the best validation Dice), early-stopped or not."""
    fmt = lambda v: "" if v is None else round(v, 4)
    out = []
    for r in rows:
        s = scores.get(r["trial_id"], {})
        out.append({**r, "train_dice": fmt(s.get("train_dice")), "val_dice": fmt(s.get("val_dice")),
                    "test_dice": fmt(s.get("test_dice")), "best_iteration": s.get("best_iteration", "")})
    return out


def subset_table(rows: list[dict], scores: dict, splits: dict) -> list[dict]:
    """Rows in the shape of thesis Tables 6.3-6.6: per subset and model, train / val / test Dice
    and the iteration of the chosen (best validation) checkpoint."""
    subsets = splits.get("subsets", {})
    out = []
    for r in rows:
        s = scores.get(r["trial_id"], {})
        fmt = lambda v: "" if v is None else round(v, 4)
        subset = r.get("train_subset", "all")
        out.append({"train_subset": f"{subset} ({len(subsets.get(subset, splits['train']))})",
                    "model": "scratch" if r["source_model"] == "scratch" else f"k={r['frozen_layers']}",
                    "lr_schedule": r["lr_schedule"], "seed": r["seed"],
                    "train_dice": fmt(s.get("train_dice")), "val_dice": r["best_val_dice"],
                    "test_dice": fmt(s.get("test_dice")), "best_iteration": s.get("best_iteration", ""),
                    "iterations": r["iterations"], "stopped_early": r["stopped_early"],
                    "status": r["status"], "trial_id": r["trial_id"]})
    return sorted(out, key=lambda x: (x["train_subset"], x["model"] != "scratch", x["model"], x["lr_schedule"]))

"""Evaluation after the trials, in Ray tasks next to the data: every trial's best checkpoint on whole
volumes (Dice per split, predictions returned as bytes for the driver to log), CKA against the
from-scratch baseline, the re-initialisation test, and the 2D chain's test metrics. The tasks'
code is in worker_tasks; the driver, the only MLflow client, logs what they return. Uses Ray's core for tasks; no ray.tune here.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import ray

from tlcore.config import TrialConfig
from tlcore.report.plots import confusion_png
from tlcore.sweep.invocation import Sweep
from tlcore.sweep.results import TrialRow, best_checkpoint_of, config_of, trial_id_of
from tlcore.sweep.worker_tasks import (
    cka_with_scratch_task,
    evaluate_classifier_task,
    evaluate_segmentation_task,
    reinit_drops_task,
)
from tlcore.text import format_table
from tlcore.tracking import store

# The tasks' own code is in worker_tasks (what a worker imports: no MLflow there); this
# module sends them and logs what they return.


def log_predictions(uri: str, run_id: str, files: dict[str, bytes], split: str) -> None:
    """The prediction files an evaluation task returned, logged by the driver under predictions/<split>/."""
    if not files:
        return
    with tempfile.TemporaryDirectory() as out:
        for name, data in files.items():
            (Path(out) / Path(name).name).write_bytes(data)
        store.log_artifacts(uri, run_id, out, f"predictions/{split}")


def evaluate_remote(config: dict, checkpoint, split: str, sweep: Sweep) -> dict:
    """Evaluate a checkpoint in a Ray task with the trial's resources (a GPU node on clusters)."""
    task = sweep.remote(evaluate_segmentation_task)
    return ray.get(task.remote(config, checkpoint, split))


def evaluate_trials(results, sweep: Sweep, splits=("train", "test")) -> dict:
    """Evaluate every trial at its best checkpoint on `splits`, in parallel Ray tasks.

    Every trial, early-stopped or not (a table with empty cells compares nothing): whole-volume
    Dice per split (train = the trial's own training subset) is logged to the trial's MLflow
    run at the best checkpoint's iteration, with the per-subject Dice as artifacts, and
    recorded in the run's `evaluation` tag, so that a `--resume` of a finished sweep does not
    evaluate the same checkpoint again. Trials that failed are left out.
    Returns trial_id -> {"<split>_dice", "best_iteration"}.
    """
    runs, metric, mode = sweep.runs, sweep.metric, sweep.mode
    task = sweep.remote(evaluate_segmentation_task)
    pending, out = {}, {}
    for r in results:
        checkpoint, best_iteration = best_checkpoint_of(r, metric, mode)
        if r.error or checkpoint is None:
            continue
        trial_id = trial_id_of(r)
        run_id = runs.run_of(trial_id) or ""
        done = json.loads(store.get_run(runs.uri, run_id).tags.get("evaluation", "{}")) if run_id else {}
        if done.get("best_iteration") == best_iteration and set(splits) <= set(done.get("dice", {})):
            out[trial_id] = {"best_iteration": best_iteration, **{f"{s}_dice": done["dice"][s] for s in splits}}
            continue
        pending[trial_id] = (run_id, best_iteration, {s: task.remote(r.config, checkpoint, s, bool(run_id)) for s in splits})
    for trial_id, (run_id, best_iteration, refs) in pending.items():
        scores = {s: ray.get(ref) for s, ref in refs.items()}
        dice = {s: v[f"{s}_dice"] for s, v in scores.items()}
        out[trial_id] = {"best_iteration": best_iteration, **{f"{s}_dice": v for s, v in dice.items()}}
        if run_id:  # val_dice is in the run's history already (the trial validated every checkpoint)
            store.log_metrics(runs.uri, run_id, {f"{s}_dice": v for s, v in dice.items() if s != "val"},
                                 step=best_iteration)
            for s, v in scores.items():
                store.log_dict(runs.uri, run_id, v["per_subject"], f"{s}_per_subject_dice.json")
                log_predictions(runs.uri, run_id, v.get("predictions", {}), s)
            store.set_tags(runs.uri, run_id, {"evaluation": json.dumps({"best_iteration": best_iteration,
                                                                                "dice": dice})})
    return out


def logged_already(runs, run_id: str, prefix: str) -> bool:
    """Has the trial's run metrics named `prefix...` (a resumed sweep does not compute them again)?"""
    return bool(run_id) and any(k.startswith(prefix) for k in store.get_run(runs.uri, run_id).metrics)


def log_task_metrics(runs, pending: dict) -> dict:
    """Wait for each trial's task ({trial_id: (run_id, step, ref)}) and log the metrics it returned
    to the trial's run at `step`. Returns trial_id -> {metric: value}."""
    out = {}
    for trial_id, (run_id, step, ref) in pending.items():
        out[trial_id] = ray.get(ref)
        if run_id:
            store.log_metrics(runs.uri, run_id, out[trial_id], step=step)
    return out


def cka_with_scratch(results, sweep: Sweep) -> dict:
    """At the end of a 3D sweep: each trial that started from a source (Mean-Var included) against
    the scratch trial of the same seed, subset and schedule, both at their best checkpoints: every
    group's CKA on the probe patches (do fine-tuned and scratch models end up computing the same
    thing?), logged to the trial's run as `cka_vs_scratch.<group>` (a resume does not compute it
    again). Returns trial_id -> {metric: value}."""
    runs, metric, mode = sweep.runs, sweep.metric, sweep.mode
    task = sweep.remote(cka_with_scratch_task)
    same = lambda c: (c.train_subset, c.lr, c.lr_schedule, c.seed)
    scratch = {same(TrialConfig.from_dict(config_of(r))): r for r in results
               if not r.error and TrialConfig.from_dict(config_of(r)).source_model == "scratch"}
    pending = {}
    for r in results:
        cfg = TrialConfig.from_dict(config_of(r))
        baseline = scratch.get(same(cfg))
        if r.error or cfg.source_model == "scratch" or baseline is None:
            continue
        run_id = runs.run_of(trial_id_of(r)) or ""
        if logged_already(runs, run_id, "cka_vs_scratch."):
            continue
        checkpoint, step = best_checkpoint_of(r, metric, mode)
        scratch_checkpoint, _ = best_checkpoint_of(baseline, metric, mode)
        if checkpoint is not None and scratch_checkpoint is not None:
            pending[trial_id_of(r)] = (run_id, step, task.remote(r.config, checkpoint, baseline.config, scratch_checkpoint))
    return log_task_metrics(runs, pending)


def reinit_drops(results, sweep: Sweep, scores: dict | None = None) -> dict:
    """At the end of a 3D sweep, for each trial that started from a source (Mean-Var included):
    the validation Dice its best checkpoint loses when one layer group is reset to the trial's
    start (analysis.reuse), logged to its run as `reinit_drop.<group>` at the best checkpoint's
    iteration, beside its CKA (a resume does not compute it again). `scores`: evaluate_trials'
    result, whose whole-volume val_dice saves each task one evaluation. Returns trial_id -> {metric: value}."""
    runs, metric, mode = sweep.runs, sweep.metric, sweep.mode
    task, weights, pending = sweep.remote(reinit_drops_task), None, {}
    for r in results:
        cfg = TrialConfig.from_dict(config_of(r))
        checkpoint, step = best_checkpoint_of(r, metric, mode)
        if r.error or cfg.source_model == "scratch" or checkpoint is None:
            continue
        trial_id = trial_id_of(r)
        run_id = runs.run_of(trial_id) or ""
        if logged_already(runs, run_id, "reinit_drop."):
            continue
        weights = weights or ray.put(sweep.source_weights)  # once for every task
        known = (scores or {}).get(trial_id, {})
        trained = known.get("val_dice") if known.get("best_iteration") == step else None
        pending[trial_id] = (run_id, step, task.remote(r.config, checkpoint, weights, trained))
    return log_task_metrics(runs, pending)


def evaluate_classifier_remote(config: dict, checkpoint, split: str, sweep: Sweep) -> dict:
    task = sweep.remote(evaluate_classifier_task)
    return ray.get(task.remote(config, checkpoint, split))


def evaluate_classifier_trials(results, rows: list[TrialRow], sweep: Sweep, target_loss: float | None = None) -> list[TrialRow]:
    """Evaluate every trial at its best epoch (by the sweep's objective) on the test split, early-stopped
    or not, and add the data-efficiency figure: training steps until the (smoothed, per-epoch)
    training loss first reaches `target_loss`."""
    from tlcore.evaluation.scores import classification_metrics, common_target_loss, steps_to_reach

    runs, curves = sweep.runs, {}
    for r in results:
        df = r.metrics_dataframe
        if df is not None and "train_loss" in df:
            curves[r.metrics.get("trial_id", "")] = (df["step"].tolist(), df["train_loss"].tolist(), r)
    if target_loss is None:  # the loss every trial reached
        target_loss = common_target_loss(c[1] for c in curves.values())
    out = []
    for row in rows:
        steps, losses, r = curves.get(row.trial_id, ([], [], None))
        reached = steps_to_reach(losses, target_loss, smooth=1) if losses else None
        scores = {"target_loss": round(target_loss, 4) if target_loss else "",
                  "steps_to_target": steps[reached - 1] if reached else "not reached"}
        checkpoint, best_epoch = best_checkpoint_of(r, sweep.metric, sweep.mode) if r is not None else (None, 0)
        if checkpoint is not None and not row.failed:
            scores["best_epoch"] = best_epoch
            pred = evaluate_classifier_remote(r.config, checkpoint, "test", sweep)
            m = classification_metrics(pred["label"], pred["prob"])
            scores.update({f"test_{k}": round(v, 4) for k, v in m.items() if k != "confusion"},
                          test_confusion=m["confusion"])
            run_id = runs.run_of(row.trial_id)
            if run_id:
                store.log_metrics(runs.uri, run_id, {f"test_{k}": v for k, v in m.items() if k != "confusion"},
                                     step=best_epoch)
                store.log_dict(runs.uri, run_id, m, "test_metrics.json")
                # per image, for the report's ROC curves and paired (McNemar) comparisons
                store.log_dict(runs.uri, run_id, {"image": list(pred["path"]),
                                                         "label": list(map(int, pred["label"])),
                                                         "prob": list(map(float, pred["prob"]))},
                                  "test_predictions.json")
                with tempfile.TemporaryDirectory() as d:
                    confusion_png(m["confusion"], ["no finding", "finding"], "test", Path(d) / "confusion_matrix.png")
                    store.log_artifacts(runs.uri, run_id, d)
        out.append(replace(row, scores={**row.scores, **scores}))
    return out


def log_mura_study_accuracy(sweep: Sweep, result, predictions: dict) -> dict:
    """Study-wise accuracy overall and per body part (thesis Table 5.1), kappa and the
    confusion matrix, logged to the best trial's run and the parent run."""
    from tlcore.evaluation.scores import classification_metrics, study_wise

    ids, y, p = study_wise(predictions["study"], predictions["label"], predictions["prob"])
    overall = classification_metrics(y, p)
    part_of = dict(zip(predictions["study"], predictions["body_part"]))
    per_part = {}
    for part in sorted(set(part_of.values())):
        mask = np.array([part_of[s] == part for s in ids])
        per_part[part] = {"studies": int(mask.sum()),
                          "accuracy": round(float(((p[mask] >= 0.5) == y[mask]).mean()), 4)}
    table = format_table([{"body_part": k, **v} for k, v in per_part.items()]
                         + [{"body_part": "all", "studies": len(ids), "accuracy": round(overall["accuracy"], 4)}])
    print(f"\nMURA study-wise test accuracy (kappa {overall['kappa']:.3f})\n{table}\n")
    runs = sweep.runs
    uri, run_id = runs.uri, runs.trial_run(result)
    with tempfile.TemporaryDirectory() as d:
        confusion_png(overall["confusion"], ["normal", "abnormal"], "MURA study-wise", Path(d) / "confusion_matrix.png")
        for rid in {run_id, runs.parent_run_id}:
            store.log_artifacts(uri, rid, d)
            store.log_dict(uri, rid, {"study_wise": overall, "per_body_part": per_part}, "test_metrics.json")
            store.log_text(uri, rid, table + "\n", "test_accuracy_by_body_part.md")
    return {"test_accuracy": overall["accuracy"], "test_kappa": overall["kappa"], "test_auc": overall["auc"],
            **{f"test_accuracy_{k.lower()}": v["accuracy"] for k, v in per_part.items()}}

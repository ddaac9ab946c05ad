"""After the trials: whole-volume evaluation of every trial's best checkpoint (in Ray tasks, next
to the data), the per-trial table rows, and the runs a killed driver left open. Uses Ray's
core for tasks; no ray.tune here.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import ray
import torch

from tlcore import tracking
from tlcore.config import DATASETS_2D, RunConfig, write_run_config
from tlcore.evaluate import evaluate_subjects
from tlcore.models import build_for, spec_for
from tlcore.plots import confusion_png
from tlcore.progress import format_table
from tlcore.starts import load_images, load_split, num_classes
from tlcore.train import amp_dtype, choose_channels_last, pick_device
from tlcore.transfer import read_weights
from tlcore.trial_runs import SweepRuns, end_trial_run, iteration_tags

def evaluate_checkpoint(config: dict, checkpoint_dir: str, split: str = "test", predictions: bool = False) -> dict:
    """Whole-volume Dice of a checkpoint on one split (run as a Ray task next to the data).
    With `predictions`, also the NIfTI predictions of a val or test split (on each input's grid,
    with its affine and header) as {file name: bytes}, for the driver to log: a task never talks
    to MLflow (no credential on the nodes)."""
    cfg = RunConfig.from_dict(config)
    torch.set_num_threads(cfg.num_threads or 1)
    model = build_for(cfg, num_classes(cfg))
    model.load_state_dict(read_weights(Path(checkpoint_dir) / "model.safetensors"))
    device = pick_device()
    channels_last = choose_channels_last(cfg, device, model, num_classes(cfg))[0]  # as the trial trained
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
    with tempfile.TemporaryDirectory() as out:
        keep = out if predictions and split != "train" else None
        ev = evaluate_subjects(model, load_split(cfg, split), num_classes(cfg), cfg.roi, device, None,
                               cfg.sw_batch_size, cfg.sw_overlap, amp_dtype(cfg, device),
                               channels_last, keep)
        files = {f.name: f.read_bytes() for f in sorted(Path(out).iterdir()) if f.is_file()} if keep else {}
    return {f"{split}_dice": ev["dice"], "per_subject": ev["per_subject"], **({"predictions": files} if predictions else {})}


def log_predictions(uri: str, run_id: str, files: dict[str, bytes], split: str) -> None:
    """The prediction files an evaluation task returned, logged by the driver under predictions/<split>/."""
    if not files:
        return
    with tempfile.TemporaryDirectory() as out:
        for name, data in files.items():
            (Path(out) / Path(name).name).write_bytes(data)
        tracking.log_artifacts(uri, run_id, out, f"predictions/{split}")


def evaluate_classifier(config: dict, checkpoint_dir: str, split: str = "test") -> dict:
    """P(positive) of every image of a split, with the ids needed for study-wise metrics."""
    from tlcore.train2d import predict_probabilities
    from tlcore.data.images2d import RadiographDataset

    cfg = RunConfig.from_dict(config)
    torch.set_num_threads(cfg.num_threads or 1)
    model = build_for(cfg, num_classes=2)
    model.load_state_dict(read_weights(Path(checkpoint_dir) / "model.safetensors"))
    images = load_images(cfg, split)
    ds = RadiographDataset([i.path for i in images], [i.label for i in images], cfg.image_size)
    y, p = predict_probabilities(model, torch.utils.data.DataLoader(ds, batch_size=32), pick_device())
    return {"label": y, "prob": p, "path": [i.path for i in images],
            "study": [getattr(i, "study", i.path) for i in images],
            "body_part": [getattr(i, "body_part", "") for i in images]}


def log_val_per_subject(results, runs: SweepRuns, metric: str = "val_dice", mode: str = "max") -> None:
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
                tracking.log_dict(runs.uri, run_id, json.loads(f.read_text()), "val_per_subject_dice.json")


def after_fit(results, runs: SweepRuns, max_iterations: int, metric: str = "val_dice", mode: str = "max",
              replay_from: str | Path | None = None) -> None:
    """What every sweep does once Tune returns: check the store is up (a store still down after the
    logging callback's final wait stops the sweep here, with what to do, not in a traceback
    halfway through evaluation; --resume then writes the rest), close runs a killed driver left
    open, and log each trial's per-subject validation Dice.

    `replay_from` (a resumed sweep's folder, or one whose logging callback had records refused):
    write every reported step MLflow lacks from Ray's result files (tlcore.sync). Tune saves the
    callback's buffered records only with its periodic experiment state, and a record the store
    refused while it was going down is not buffered at all; the result files hold everything."""
    tracking.require_store(runs.uri)
    if replay_from is not None:
        from tlcore.sync import replay

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
    for run in tracking.child_runs(runs.uri, runs.experiment, runs.parent_run_id, "attributes.status = 'RUNNING'"):
        r = by_trial.get(run.tags.get("trial_id"))
        done = int((r.metrics or {}).get("iteration", 0)) if r is not None else 0
        end_trial_run(runs.uri, run.run_id, "FAILED" if r is None or r.error else "FINISHED",
                      {**iteration_tags(done, max_iterations), "closed_by": "close_orphaned_runs"})
        closed += 1
    return closed


def trial_rows(results, max_iterations: int, metric: str = "val_dice", mode: str = "max") -> list[dict]:
    """One row per trial: configuration, best metric, iterations run, stopped early or not."""
    rows = []
    for r in results:
        c = RunConfig.from_dict(r.config)  # its defaults, not restated here
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


def best_trial_checkpoint(results, metric: str = "val_dice", mode: str = "max"):
    """(ResultGrid entry, checkpoint, its iteration) of the best trial's best report."""
    best = results.get_best_result(metric=metric, mode=mode, scope="all")
    checkpoint, iteration = best_checkpoint_of(best, metric, mode)
    return best, checkpoint, iteration


def best_checkpoint_of(result, metric: str = "val_dice", mode: str = "max"):
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


def evaluate_remote(config: dict, checkpoint, split: str, cpus: float, gpus: float) -> dict:
    """Evaluate a checkpoint in a Ray task with the trial's resources (a GPU node on clusters)."""
    task = ray.remote(num_cpus=cpus, num_gpus=gpus)(_evaluate_task)
    return ray.get(task.remote(config, checkpoint, split))


def _evaluate_task(config: dict, checkpoint, split: str, predictions: bool = False) -> dict:
    with checkpoint.as_directory() as d:
        return evaluate_checkpoint(config, d, split, predictions)


def evaluate_trials(results, runs: SweepRuns, *, splits=("train", "test"), cpus: float = 1, gpus: float = 0, metric: str = "val_dice",
                    mode: str = "max") -> dict:
    """Evaluate every trial at its best checkpoint on `splits`, in parallel Ray tasks.

    Every trial, early-stopped or not (a table with empty cells compares nothing): whole-volume
    Dice per split (train = the trial's own training subset) is logged to the trial's MLflow
    run at the best checkpoint's iteration, with the per-subject Dice as artifacts, and
    recorded in the run's `evaluation` tag, so that a `--resume` of a finished sweep does not
    evaluate the same checkpoint again. Trials that failed are left out.
    Returns trial_id -> {"<split>_dice", "best_iteration"}.
    """
    task = ray.remote(num_cpus=cpus, num_gpus=gpus)(_evaluate_task)
    pending, out = {}, {}
    for r in results:
        checkpoint, best_iteration = best_checkpoint_of(r, metric, mode)
        if r.error or checkpoint is None:
            continue
        trial_id = trial_id_of(r)
        run_id = runs.run_of(trial_id) or ""
        done = json.loads(tracking.get_run(runs.uri, run_id).tags.get("evaluation", "{}")) if run_id else {}
        if done.get("best_iteration") == best_iteration and set(splits) <= set(done.get("dice", {})):
            out[trial_id] = {"best_iteration": best_iteration, **{f"{s}_dice": done["dice"][s] for s in splits}}
            continue
        pending[trial_id] = (run_id, best_iteration, {s: task.remote(r.config, checkpoint, s, bool(run_id)) for s in splits})
    for trial_id, (run_id, best_iteration, refs) in pending.items():
        scores = {s: ray.get(ref) for s, ref in refs.items()}
        dice = {s: v[f"{s}_dice"] for s, v in scores.items()}
        out[trial_id] = {"best_iteration": best_iteration, **{f"{s}_dice": v for s, v in dice.items()}}
        if run_id:  # val_dice is in the run's history already (the trial validated every checkpoint)
            tracking.log_metrics(runs.uri, run_id, {f"{s}_dice": v for s, v in dice.items() if s != "val"},
                                 step=best_iteration)
            for s, v in scores.items():
                tracking.log_dict(runs.uri, run_id, v["per_subject"], f"{s}_per_subject_dice.json")
                log_predictions(runs.uri, run_id, v.get("predictions", {}), s)
            tracking.set_tags(runs.uri, run_id, {"evaluation": json.dumps({"best_iteration": best_iteration,
                                                                                "dice": dice})})
    return out


def _cka_with_scratch_task(config: dict, checkpoint, scratch_config: dict, scratch_checkpoint) -> dict:
    from tlcore.analysis import LayerProbe
    from tlcore.starts import probe_inputs

    def load(cfg: RunConfig, ckpt) -> torch.nn.Module:
        model = build_for(cfg, num_classes(cfg))
        with ckpt.as_directory() as d:
            model.load_state_dict(read_weights(Path(d) / "model.safetensors"))
        return model.to(device)

    cfg, scratch_cfg, device = RunConfig.from_dict(config), RunConfig.from_dict(scratch_config), pick_device()
    torch.set_num_threads(cfg.num_threads or 1)
    inputs = probe_inputs(cfg, load_split(cfg, "val"))
    probe = LayerProbe(load(scratch_cfg, scratch_checkpoint), inputs, device, minibatch=min(8, len(inputs)))
    return {k.replace("cka.", "cka_vs_scratch."): v for k, v in probe.cka(load(cfg, checkpoint)).items()}


def cka_with_scratch(results, runs: SweepRuns, *, cpus: float = 1, gpus: float = 0, metric: str = "val_dice",
                     mode: str = "max") -> dict:
    """At the end of a 3D sweep: each trial that started from a source (Mean-Var included) against
    the scratch trial of the same seed, subset and schedule, both at their best checkpoints: every
    group's CKA on the probe patches (do fine-tuned and scratch models end up computing the same
    thing?), logged to the trial's run as `cka_vs_scratch.<group>` (a resume does not compute it
    again). Returns trial_id -> {metric: value}."""
    task = ray.remote(num_cpus=cpus, num_gpus=gpus)(_cka_with_scratch_task)
    same = lambda c: (c.train_subset, c.lr, c.lr_schedule, c.seed)
    scratch = {same(RunConfig.from_dict(r.config)): r for r in results
               if not r.error and RunConfig.from_dict(r.config).source_model == "scratch"}
    pending = {}
    for r in results:
        cfg = RunConfig.from_dict(r.config)
        baseline = scratch.get(same(cfg))
        if r.error or cfg.source_model == "scratch" or baseline is None:
            continue
        run_id = runs.run_of(trial_id_of(r)) or ""
        if run_id and any(k.startswith("cka_vs_scratch.") for k in tracking.get_run(runs.uri, run_id).metrics):
            continue
        checkpoint, step = best_checkpoint_of(r, metric, mode)
        scratch_checkpoint, _ = best_checkpoint_of(baseline, metric, mode)
        if checkpoint is not None and scratch_checkpoint is not None:
            pending[trial_id_of(r)] = (run_id, step, task.remote(r.config, checkpoint, baseline.config, scratch_checkpoint))
    out = {}
    for trial_id, (run_id, step, ref) in pending.items():
        out[trial_id] = ray.get(ref)
        if run_id:
            tracking.log_metrics(runs.uri, run_id, out[trial_id], step=step)
    return out


def evaluate_classifier_remote(config: dict, checkpoint, split: str, cpus: float, gpus: float) -> dict:
    def run(config, checkpoint, split):
        with checkpoint.as_directory() as d:
            return evaluate_classifier(config, d, split)
    return ray.get(ray.remote(num_cpus=cpus, num_gpus=gpus)(run).remote(config, checkpoint, split))


def chestxray_table(results, rows: list[dict], runs: SweepRuns, *, target_loss: float | None = None, cpus: float = 1, gpus: float = 0) -> list[dict]:
    """Evaluate every trial at its best epoch (lowest val_loss) on the test split, early-stopped
    or not, and add the data-efficiency figure: training steps until the (smoothed, per-epoch)
    training loss first reaches `target_loss`."""
    from tlcore.evaluate import classification_metrics, common_target_loss, steps_to_reach

    curves = {}
    for r in results:
        df = r.metrics_dataframe
        if df is not None and "train_loss" in df:
            curves[r.metrics.get("trial_id", "")] = (df["step"].tolist(), df["train_loss"].tolist(), r)
    if target_loss is None:  # the loss every trial reached
        target_loss = common_target_loss(c[1] for c in curves.values())
    out = []
    for row in rows:
        steps, losses, r = curves.get(row["trial_id"], ([], [], None))
        reached = steps_to_reach(losses, target_loss, smooth=1) if losses else None
        row = {**row, "target_loss": round(target_loss, 4) if target_loss else "",
               "steps_to_target": steps[reached - 1] if reached else "not reached"}
        checkpoint, best_epoch = best_checkpoint_of(r, "val_loss", "min") if r is not None else (None, 0)
        if checkpoint is not None and row["status"] == "OK":
            row["best_epoch"] = best_epoch
            pred = evaluate_classifier_remote(r.config, checkpoint, "test", cpus, gpus)
            m = classification_metrics(pred["label"], pred["prob"])
            row.update({f"test_{k}": round(v, 4) for k, v in m.items() if k != "confusion"},
                       test_confusion=m["confusion"])
            run_id = runs.run_of(row["trial_id"])
            if run_id:
                tracking.log_metrics(runs.uri, run_id, {f"test_{k}": v for k, v in m.items() if k != "confusion"},
                                     step=best_epoch)
                tracking.log_dict(runs.uri, run_id, m, "test_metrics.json")
                # per image, for the report's ROC curves and paired (McNemar) comparisons
                tracking.log_dict(runs.uri, run_id, {"image": list(pred["path"]),
                                                         "label": list(map(int, pred["label"])),
                                                         "prob": list(map(float, pred["prob"]))},
                                  "test_predictions.json")
                with tempfile.TemporaryDirectory() as d:
                    confusion_png(m["confusion"], ["no finding", "finding"], "test", Path(d) / "confusion_matrix.png")
                    tracking.log_artifacts(runs.uri, run_id, d)
        out.append(row)
    return out


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


def model_card(cfg: RunConfig, task: str) -> dict:
    """What a registered model is (tlcore_model.json beside its weights), derived from the run
    configuration it was trained with (run_config.json, also beside them)."""
    spec = spec_for(cfg)
    if cfg.dataset in DATASETS_2D:
        return {"architecture": f"{spec.name}+fastai_head", "num_classes": 2, "image_size": cfg.image_size, "task": task}
    return {"architecture": spec.name, "in_channels": len(cfg.modalities), "num_classes": num_classes(cfg),
            "head": cfg.head, "spacing": list(cfg.spacing), "modalities": list(cfg.modalities),
            "label_map": cfg.label_map, "task": task}


def publish_model(runs: SweepRuns, result, checkpoint, iteration: int, metrics: dict, registry_name: str,
                  task: str) -> tracking.ModelRef:
    """Log a checkpoint's weights, run configuration and model card to its trial's run and
    register them as `registry_name`; `metrics` (its test scores) are logged at the checkpoint's
    `iteration`."""
    uri, parent = runs.uri, runs.parent_run_id
    run_id = runs.trial_run(result)
    per_subject = metrics.pop("per_subject", None)
    for rid in {run_id, parent}:
        tracking.log_metrics(uri, rid, metrics, step=iteration)
    if per_subject is not None:
        tracking.log_dict(uri, run_id, per_subject, "test_per_subject_dice.json")
    with checkpoint.as_directory() as d, tempfile.TemporaryDirectory() as out:
        shutil.copy(Path(d) / "model.safetensors", Path(out) / "model.safetensors")
        cfg = RunConfig.from_dict(result.config)
        write_run_config(cfg, Path(out))
        (Path(out) / "tlcore_model.json").write_text(json.dumps(model_card(cfg, task), indent=1))
        tracking.log_artifacts(uri, run_id, out, "model")
    ref = tracking.register_model(uri, registry_name, run_id, "model",
                                  tags={"source_run_id": run_id, "sweep_parent_run_id": parent,
                                        "checkpoint_iteration": iteration,
                                        **{k: round(v, 4) for k, v in metrics.items()}})
    tracking.set_tags(uri, parent, {"registered_model": ref.uri})
    print(f"[tlcore] registered {ref.uri} (run {run_id}, {metrics})")
    return ref


def report_mura(runs: SweepRuns, result, predictions: dict) -> dict:
    """Study-wise accuracy overall and per body part (thesis Table 5.1), kappa and the
    confusion matrix, logged to the best trial's run and the parent run."""
    from tlcore.evaluate import classification_metrics, study_wise

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
    uri, run_id = runs.uri, runs.trial_run(result)
    with tempfile.TemporaryDirectory() as d:
        confusion_png(overall["confusion"], ["normal", "abnormal"], "MURA study-wise", Path(d) / "confusion_matrix.png")
        for rid in {run_id, runs.parent_run_id}:
            tracking.log_artifacts(uri, rid, d)
            tracking.log_dict(uri, rid, {"study_wise": overall, "per_body_part": per_part}, "test_metrics.json")
            tracking.log_text(uri, rid, table + "\n", "test_accuracy_by_body_part.md")
    return {"test_accuracy": overall["accuracy"], "test_kappa": overall["kappa"], "test_auc": overall["auc"],
            **{f"test_accuracy_{k.lower()}": v["accuracy"] for k, v in per_part.items()}}

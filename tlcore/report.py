"""A sweep's report: summary table with statistics, box plots, learning curves and lineage, as one
self-contained HTML page plus the PNGs and CSVs behind it.

    python -m tlcore.report brats_layers                        # the newest sweep of the experiment
    python -m tlcore.report brats_subsets --parent-run <id> --out reports/subsets

Every sweep builds its report when it ends and logs it to its MLflow parent run under
`report/`. Configurations (source, frozen layers, subset, lr, schedule) are summarised over
seeds (mean and standard deviation); each is compared with the scratch baseline of the same
subset and schedule on the same subjects (paired per-subject Dice: bootstrap 95 % interval of
the mean difference, Wilcoxon signed-rank p, Holm-corrected over the report's comparisons;
McNemar's exact test on per-image correctness for classifiers). Figures: per-subject Dice box
plots, loss curves, prediction overlays (best / median / worst subject); for classifiers ROC
curves, training loss against steps with the steps to reach a target loss per starting point,
and MURA's accuracy per body part.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tlcore import tracking
from tlcore.lineage import chain, short
from tlcore.stats import holm, paired_correctness, paired_scores

CONFIG_KEYS = ("source_model", "frozen_layers", "train_subset", "lr", "lr_schedule")
CURVES = ("train_loss", "val_loss")
FIGURE_TITLES = {
    "dice_val": "Per-subject validation Dice (each trial's best checkpoint)",
    "dice_test": "Per-subject test Dice",
    "dice_by_subset": "Dice and iterations against training-set size, per model",
    "overlays_test": "Test predictions (red) and ground truth (green) on the best, median and worst subject",
    "overlays_val": "Validation predictions (red) and ground truth (green) on the best, median and worst subject",
    "loss_curves": "Training and validation loss",
    "roc_test": "Test ROC curves",
    "training_steps": "Training loss against steps, per starting point",
    "accuracy_by_body_part": "Accuracy per body part",
}


@dataclass
class TrialRun:
    run_id: str
    params: dict
    tags: dict
    metrics: dict
    histories: dict                 # metric -> [(step, value)]
    per_subject: dict               # split -> {subject: dice}
    predictions: dict = field(default_factory=dict)  # 2D test images: path -> (label, P(positive))

    @property
    def config(self) -> tuple:
        return tuple(self.params.get(k, "") for k in CONFIG_KEYS)


@dataclass
class Report:
    html: Path
    rows: list[dict]
    figures: dict = field(default_factory=dict)   # name -> (png path, panel labels)


def collect(uri: str, experiment: str, parent_run_id: str) -> list[TrialRun]:
    out = []
    for run in tracking.child_runs(uri, experiment, parent_run_id):
        rid = run.info.run_id
        histories = {k: tracking.metric_history(uri, rid, k) for k in (*CURVES, "val_dice", "val_accuracy", "step")
                     if k in run.data.metrics}
        per_subject = {s: d for s in ("val", "test", "train")
                       if (d := tracking.load_json(uri, rid, f"{s}_per_subject_dice.json")) is not None}
        pred = tracking.load_json(uri, rid, "test_predictions.json") or {"image": [], "label": [], "prob": []}
        out.append(TrialRun(rid, dict(run.data.params), dict(run.data.tags), dict(run.data.metrics),
                            histories, per_subject, dict(zip(pred["image"], zip(pred["label"], pred["prob"])))))
    return out


def label(config: tuple, shared: frozenset = frozenset()) -> str:
    """A configuration's short name: the source, k, and the settings that vary across the sweep
    (those in `shared`, the same for every trial, are stated once on the page instead)."""
    source, frozen, subset, lr, schedule = config
    name = "scratch" if source == "scratch" else f"{short_source(source)} k={frozen}"
    extra = [x for k, x in (("train_subset", subset if subset not in ("", "all") else ""),
                            ("lr", f"lr={lr}" if lr else ""), ("lr_schedule", schedule)) if x and k not in shared]
    return f"{name} ({', '.join(extra)})" if extra else name


def shared_settings(trials: list) -> frozenset:
    """Settings (subset, lr, schedule) with one value in every trial of a sweep of several configurations."""
    configs = {t.config for t in trials}
    if len(configs) < 2:
        return frozenset()
    return frozenset(k for i, k in enumerate(CONFIG_KEYS) if i >= 2 and len({c[i] for c in configs}) == 1)


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _best(trial: TrialRun, key: str, mode: str) -> float:
    values = [v for _, v in trial.histories.get(key, [])]
    return (max if mode == "max" else min)(values) if values else float("nan")


def _subject_means(trials: list[TrialRun], split: str) -> dict[str, float]:
    """Per-subject score averaged over a configuration's seeds."""
    acc = defaultdict(list)
    for t in trials:
        for sid, v in t.per_subject.get(split, {}).items():
            acc[sid].append(v)
    return {sid: statistics.mean(v) for sid, v in acc.items()}


def _correct(trials: list[TrialRun]) -> dict[str, bool]:
    """Per test image: right at threshold 0.5 for the majority of a configuration's seeds."""
    votes = defaultdict(list)
    for t in trials:
        for image, (label, prob) in t.predictions.items():
            votes[image].append((prob >= 0.5) == bool(label))
    return {image: sum(v) * 2 > len(v) for image, v in votes.items()}


def summarise(trials: list[TrialRun], uri: str | None = None, shared: frozenset = frozenset()) -> list[dict]:
    groups = defaultdict(list)
    for t in trials:
        groups[t.config].append(t)
    rows, comparisons = [], []
    for config in sorted(groups, key=lambda c: (c[2], c[3], c[4], c[0] != "scratch", c[0], str(c[1]))):
        ts = groups[config]
        its = [int(float(t.tags.get("iterations", 0) or 0)) for t in ts]
        row = {"configuration": label(config, shared), **dict(zip(CONFIG_KEYS, config)), "seeds": len(ts)}
        for key, mode in (("val_dice", "max"), ("val_accuracy", "max"), ("val_loss", "min")):
            if any(key in t.histories for t in ts):
                row[f"best_{key}"] = _mean_sd([_best(t, key, mode) for t in ts])
        for key in ("train_dice", "test_dice", "test_accuracy", "test_auc"):
            if any(key in t.metrics for t in ts):
                row[key] = _mean_sd([t.metrics.get(key, float("nan")) for t in ts])
        row["iterations"] = round(statistics.mean(its)) if its else 0
        row["stopped_early"] = f"{sum(t.tags.get('stopped_early') == 'True' for t in ts)}/{len(ts)}"
        if uri and config[0] not in ("", "scratch"):
            try:
                row["lineage"] = short(chain(uri, config[0]))
            except Exception as e:  # noqa: BLE001 -- a deleted model must not sink the report
                row["lineage"] = f"{config[0]} (lineage unavailable: {type(e).__name__})"
        baseline = groups.get(("scratch", "0", *config[2:]))
        if (baseline and config[0] != "scratch" and any(t.predictions for t in ts)
                and any(t.predictions for t in baseline)):  # seeds that ASHA stopped have no test predictions
            c = paired_correctness(_correct(ts), _correct(baseline))
            if c.n:
                row.update({"vs_scratch_split": "test", "accuracy_difference": round(c.mean_difference, 4),
                            "ci95": f"[{c.ci_low:.4f}, {c.ci_high:.4f}]", "p_mcnemar": c.p_value, "images": c.n})
                comparisons.append(row)
        elif baseline and config[0] != "scratch":
            split = "test" if all("test" in t.per_subject for t in ts + baseline) else "val"
            c = paired_scores(_subject_means(ts, split), _subject_means(baseline, split))
            if c.n:
                row.update({"vs_scratch_split": split, "dice_difference": round(c.mean_difference, 4),
                            "ci95": f"[{c.ci_low:.4f}, {c.ci_high:.4f}]", "p_wilcoxon": c.p_value,
                            "subjects": c.n})
                comparisons.append(row)
        rows.append(row)
    test_key = lambda r: "p_wilcoxon" if "p_wilcoxon" in r else "p_mcnemar"
    for row, p in zip(comparisons, holm([r[test_key(r)] for r in comparisons])):
        row["p_holm"] = p
    for row in comparisons:
        row[test_key(row)], row["p_holm"] = f"{row[test_key(row)]:.3g}", f"{row['p_holm']:.3g}"
    return rows


# ----------------------------------------------------------------------------- figures

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def box_plot(groups: dict[str, list[float]], title: str, path: Path) -> list[str]:
    """One box of per-subject Dice per configuration; returns the boxes' labels."""
    plt = _plt()
    labels = list(groups)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 1.5), 3.6), dpi=110)
    ax.boxplot([groups[k] for k in labels], showmeans=True)
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("Dice per subject")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return labels


def smooth(values: list[float], weight: float = 0.6) -> list[float]:
    """Exponential moving average, as TensorBoard's smoothing slider."""
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out


def curves_plot(curves: dict[str, dict[str, list]], path: Path) -> list[str]:
    """Smoothed training and validation loss against iterations, one line per run; returns panels."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(10, 3.6), dpi=110, sharey=False)
    for ax, key in zip(axes, CURVES):
        for name, hist in curves.items():
            pts = sorted(hist.get(key, []))
            if pts:
                ax.plot([s for s, _ in pts], smooth([v for _, v in pts]), label=name, linewidth=1.2)
        ax.set_title(f"{key} (smoothed)")
        ax.set_xlabel("iteration")
    if axes[-1].get_legend_handles_labels()[0]:
        axes[-1].legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return list(CURVES)


def _ground_truth(run: TrialRun, subject: str):
    """(first-modality image, class-index label) of a subject, from the run's dataset params."""
    import json

    import nibabel as nib
    import numpy as np

    import torch

    from tlcore.data.layouts import default_label_map, find_subjects
    from tlcore.data.pipeline import map_labels

    p = run.params
    modalities = tuple(json.loads(p.get("modalities", '["t1", "t2"]')))
    files = find_subjects(p["dataset"], p["data_dir"], modalities, grades=("HGG", "LGG"))[subject]
    mapping = {int(k): v for k, v in (json.loads(p.get("label_map") or "{}") or default_label_map(p["dataset"])).items()}
    raw = torch.as_tensor(np.asarray(nib.load(files["label"]).dataobj).round().astype(np.int64))
    return np.asarray(nib.load(files[modalities[0]]).dataobj, dtype=float), map_labels(raw, mapping).numpy()


def overlay_plot(uri: str, runs: dict[str, TrialRun], path: Path, split: str = "test") -> list[str]:
    """Ground truth and each configuration's prediction on the same axial slice, for the `split`
    subjects with the best, median and worst mean Dice; returns the row titles."""
    import tempfile

    import nibabel as nib
    import numpy as np

    common = set.intersection(*(set(r.per_subject.get(split, {})) for r in runs.values()))
    if not common:
        return []
    mean = {sid: statistics.mean(r.per_subject[split][sid] for r in runs.values()) for sid in common}
    ranked = sorted(common, key=mean.get)
    picks = {"best": ranked[-1], "median": ranked[len(ranked) // 2], "worst": ranked[0]}
    plt = _plt()
    fig, axes = plt.subplots(len(picks), 1 + len(runs), figsize=(2.2 * (1 + len(runs)), 2.3 * len(picks)),
                             dpi=100, squeeze=False)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for i, (which, sid) in enumerate(picks.items()):
            image, truth = _ground_truth(next(iter(runs.values())), sid)
            z = int(np.argmax((truth > 0).sum(axis=(0, 1)))) if truth.any() else truth.shape[2] // 2
            axes[i, 0].imshow(image[:, :, z].T, cmap="gray", origin="lower")
            axes[i, 0].contour(truth[:, :, z].T > 0, levels=[0.5], colors="lime", linewidths=0.8)
            axes[i, 0].set_title(f"{which}: {sid}\nground truth (z={z})", fontsize=7)
            for j, (name, run) in enumerate(runs.items(), start=1):
                f = tracking.client(uri).download_artifacts(run.run_id, f"predictions/{split}/{sid}_pred.nii.gz", d)
                pred = np.asarray(nib.load(f).dataobj)
                axes[i, j].imshow(image[:, :, z].T, cmap="gray", origin="lower")
                axes[i, j].imshow(np.ma.masked_equal(pred[:, :, z].T, 0), cmap="autumn", alpha=0.5, origin="lower")
                axes[i, j].contour(truth[:, :, z].T > 0, levels=[0.5], colors="lime", linewidths=0.8)
                wrapped = name.replace(" (", "\n(")  # the settings on a line of their own
                axes[i, j].set_title(f"{wrapped}\nDice {run.per_subject[split][sid]:.3f}", fontsize=7)
            rows.append(f"{which}: {sid}")
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return rows


def roc_plot(runs: dict[str, TrialRun], path: Path) -> list[str]:
    """Test ROC curve of each configuration (its first seed), with the AUC; returns the curves' labels."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.2), dpi=110)
    drawn = []
    for name, run in runs.items():
        labels = [label for label, _ in run.predictions.values()]
        probs = [prob for _, prob in run.predictions.values()]
        if len(set(labels)) < 2:
            continue
        fpr, tpr, _ = roc_curve(labels, probs)
        ax.plot(fpr, tpr, linewidth=1.2, label=f"{name} (AUC {roc_auc_score(labels, probs):.3f})")
        drawn.append(name)
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.6, linestyle="--")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("test ROC")
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return drawn


def subsets_plot(trials: list[TrialRun], split: str, sizes: dict[str, int], path: Path,
                 shared: frozenset = frozenset()) -> tuple[list[str], list[dict]]:
    """brats_subsets (thesis Tables 6.3-6.6): per model, the mean per-subject Dice on `split`
    (seeds averaged per subject, bootstrap 95 % interval over subjects) and the iteration of the
    best validation Dice, against the training-set size. Returns the models drawn and the rows."""
    from tlcore.stats import bootstrap_ci

    plt = _plt()
    models = defaultdict(lambda: defaultdict(list))
    for t in trials:
        models[label((t.config[0], t.config[1], "", *t.config[3:]), shared | {"train_subset"})][t.config[2]].append(t)
    subsets = sorted({t.config[2] for t in trials}, key=lambda k: (sizes.get(k, 0), k))
    fig, (ax, its) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    rows = []
    for i, (model, by_subset) in enumerate(sorted(models.items(), key=lambda kv: (kv[0] != "scratch", kv[0]))):
        xs, mean, low, high, best_at = [], [], [], [], []
        for x, subset in enumerate(subsets):
            scores = list(_subject_means(by_subset.get(subset, []), split).values())
            if not scores:
                continue
            ci = bootstrap_ci(scores)
            at = [max(t.histories["val_dice"], key=lambda sv: sv[1])[0] for t in by_subset[subset]
                  if t.histories.get("val_dice")]
            xs.append(x)
            mean.append(statistics.mean(scores))
            low.append(ci[0] if ci[0] == ci[0] else mean[-1])
            high.append(ci[1] if ci[1] == ci[1] else mean[-1])
            best_at.append(statistics.mean(at) if at else float("nan"))
            rows.append({"model": model, "train_subset": subset, "subjects_in_subset": sizes.get(subset, ""),
                         f"mean_{split}_dice": round(mean[-1], 4), "ci95_low": round(low[-1], 4),
                         "ci95_high": round(high[-1], 4), f"{split}_subjects": len(scores),
                         "best_val_iteration": round(best_at[-1]) if at else ""})
        if not xs:
            continue
        shift = (i - (len(models) - 1) / 2) * 0.06  # side by side, so the intervals do not hide each other
        colour = plt.cm.tab10(i % 10)
        ax.errorbar([x + shift for x in xs], mean, yerr=[[m - lo for m, lo in zip(mean, low)],
                                                         [hi - m for m, hi in zip(mean, high)]],
                    marker="o", capsize=3, color=colour, label=model)
        its.plot(xs, best_at, marker="o", color=colour, label=model)
    names = [f"{k} ({sizes[k]})" if k in sizes else k for k in subsets]
    for a in (ax, its):
        a.set_xticks(range(len(subsets)), names)
        a.set_xlabel("training subset (subjects)")
    ax.set_ylabel(f"mean {split} Dice per subject")
    ax.set_title(f"{split} Dice against training-set size (95 % bootstrap interval)", fontsize=9)
    its.set_ylabel("iteration of the best validation Dice")
    its.set_title("iterations needed", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return sorted(models, key=lambda m: (m != "scratch", m)), rows


def steps_to_target(run: TrialRun, target: float) -> tuple[list, list, int | None]:
    """(training steps, training loss, steps when the loss first reached `target` or None)."""
    from tlcore.evaluate import steps_to_reach

    steps_at = dict(run.histories.get("step", []))      # iteration -> optimizer steps so far
    pts = sorted(run.histories.get("train_loss", []))
    steps = [int(steps_at.get(i, i)) for i, _ in pts]
    losses = [v for _, v in pts]
    hit = steps_to_reach(losses, target, smooth=1) if losses else None
    return steps, losses, (steps[hit - 1] if hit else None)


def training_steps_plot(runs: list[TrialRun], target: float, path: Path,
                        shared: frozenset = frozenset()) -> tuple[list[str], list[dict]]:
    """Classifier sweeps (thesis Fig. 5.6/5.7): training loss against optimizer steps, one colour
    per starting point; and the fewest steps each starting point needed to reach `target`.
    Returns the panel titles and the per-run rows behind the figure."""
    plt = _plt()
    starts = sorted({t.params.get("source_model", "") for t in runs}, key=lambda s: (s != "scratch", s))
    colour = {s: plt.cm.tab10(i % 10) for i, s in enumerate(starts)}
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110, gridspec_kw={"width_ratios": [3, 2]})
    rows, fewest = [], {s: None for s in starts}
    for t in sorted(runs, key=lambda t: label(t.config, shared)):
        source = t.params.get("source_model", "")
        steps, losses, reached = steps_to_target(t, target)
        if not steps:
            continue
        style = ("-", "--", ":", "-.")[int(t.params.get("frozen_layers", 0) or 0) % 4]
        ax.plot(steps, losses, style, color=colour[source], linewidth=1.1,
                label=f"{label(t.config, shared)} s{t.params.get('seed', '')}")
        if reached is not None:
            ax.plot([reached], [losses[steps.index(reached)]], "o", color=colour[source], markersize=4)
            fewest[source] = reached if fewest[source] is None else min(fewest[source], reached)
        rows.append({"run": label(t.config, shared), "seed": t.params.get("seed", ""), "source_model": source,
                     "target_loss": round(target, 4), "steps_to_target": reached if reached is not None else "not reached"})
    ax.axhline(target, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("training steps (batches)")
    ax.set_ylabel("training loss")
    ax.set_title(f"training loss; dots: first step at loss <= {target:.3f}")
    ax.legend(fontsize=5.5, loc="upper right")
    names = [short_source(s) for s in starts]
    top = max([v for v in fewest.values() if v] or [1])
    heights = [fewest[s] if fewest[s] is not None else top * 1.1 for s in starts]
    drawn = bars.bar(range(len(starts)), heights, color=[colour[s] for s in starts])
    for bar, s in zip(drawn, starts):
        if fewest[s] is None:
            bar.set_hatch("//")
            bar.set_alpha(0.4)
        bars.text(bar.get_x() + bar.get_width() / 2, bar.get_height(),
                  "not reached" if fewest[s] is None else str(fewest[s]), ha="center", va="bottom", fontsize=7)
    bars.set_xticks(range(len(starts)), names, rotation=20, ha="right", fontsize=7)
    bars.set_ylabel("steps")
    bars.set_title("fewest steps to the target loss")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return ["training loss vs steps", "steps to target"], rows


def short_source(source: str) -> str:
    return Path(source).name if source.endswith((".pth", ".pt", ".safetensors")) else source.replace("models:/", "")


def body_part_plot(per_part: dict[str, dict], path: Path) -> list[str]:
    """MURA study-wise test accuracy per body part (thesis Table 5.1) with Wilson 95 % intervals;
    returns the body parts drawn."""
    from scipy.stats import binomtest

    plt = _plt()
    parts = sorted(per_part)
    acc = [per_part[k]["accuracy"] for k in parts]
    n = [int(per_part[k]["studies"]) for k in parts]
    ci = [binomtest(round(a * m), m).proportion_ci(method="wilson") for a, m in zip(acc, n)]
    fig, ax = plt.subplots(figsize=(max(4.5, 0.8 * len(parts) + 1.5), 3.6), dpi=110)
    ax.bar(range(len(parts)), acc, color="steelblue",
           yerr=[[a - c.low for a, c in zip(acc, ci)], [c.high - a for a, c in zip(acc, ci)]], capsize=3)
    for i, (a, m) in enumerate(zip(acc, n)):
        ax.text(i, 0.02, f"n={m}", ha="center", fontsize=7, color="white")
    ax.set_xticks(range(len(parts)), [p.replace("XR_", "").lower() for p in parts], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("study-wise accuracy")
    ax.set_title("MURA test accuracy per body part\n(study-wise, 95 % Wilson interval)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return parts


# ----------------------------------------------------------------------------- page

def sweep_artifacts(uri: str, parent_run_id: str, out: Path) -> str:
    """What the sweep itself logged to its parent run (2D: the confusion matrix, accuracy per
    body part, steps to reach a loss), as HTML sections; copied into `out`."""
    parts = []
    for a in tracking.client(uri).list_artifacts(parent_run_id):
        if a.is_dir or a.path in ("results.md",) or not a.path.endswith((".png", ".md")):
            continue
        f = Path(tracking.client(uri).download_artifacts(parent_run_id, a.path, str(out)))
        title = html.escape(f.stem.replace("_", " "))
        if f.suffix == ".png":
            parts.append(f"<h2>{title}</h2><img alt='{title}' src='data:image/png;base64,"
                         f"{base64.b64encode(f.read_bytes()).decode()}'>")
        else:
            parts.append(f"<h2>{title}</h2><pre>{html.escape(f.read_text())}</pre>")
    return "".join(parts)



def _table_html(rows: list[dict]) -> str:
    """The summary as HTML: settings shared by every row are stated once above the table (the
    CSV keeps every column), so the results fit the page."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    shared = [c for c in (*CONFIG_KEYS, "seeds") if c in cols and len(rows) > 1
              and len({str(r.get(c, "")) for r in rows}) == 1]
    # and what every compared (non-scratch) row has in common: the source's lineage, the split, the count
    compared = [c for c in ("lineage", "vs_scratch_split", "subjects", "images") if c in cols
                and len({str(r[c]) for r in rows if r.get(c, "") != ""}) == 1]
    cols = [c for c in cols if c not in shared and c not in compared and c != "source_model"]
    first = lambda c: next(r[c] for r in rows if r.get(c, "") != "")
    note = "".join(f"<p>{title}: " + ", ".join(f"{html.escape(c)} = <code>{html.escape(str(value(c)))}</code>"
                                                for c in keys) + "</p>"
                   for title, keys, value in (("Every row", shared, lambda c: rows[0].get(c)),
                                              ("Every row compared with scratch", compared, first)) if keys)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"{note}<div class='wide'><table><tr>{head}</tr>{body}</table></div>"


def spreadsheet_safe(value):
    """A text cell that a spreadsheet would run as a formula (subject ids and run names come from
    file names and user input) gets a leading apostrophe; numbers stay numbers."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _write_csv(rows: list[dict], path: Path) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[spreadsheet_safe(c) for c in cols])
        w.writeheader()
        w.writerows({spreadsheet_safe(k): spreadsheet_safe(v) for k, v in r.items()} for r in rows)


def build(uri: str, experiment: str, parent_run_id: str | None = None, out: str | Path | None = None,
          log: bool = True) -> Report:
    """Build the report of one sweep (the newest of `experiment` by default) into `out`, and log
    it to the parent run under `report/` when `log`."""
    parent_run_id = parent_run_id or tracking.newest_parent_run(uri, experiment)
    if parent_run_id is None:
        raise LookupError(f"no sweep of experiment {experiment!r} in {uri}")
    out = Path(out or Path("reports") / f"{experiment}-{parent_run_id[:8]}")
    out.mkdir(parents=True, exist_ok=True)
    trials = collect(uri, experiment, parent_run_id)
    shared = shared_settings(trials)
    rows = summarise(trials, uri, shared)
    _write_csv(rows, out / "summary.csv")

    by_config = {r["configuration"]: [] for r in rows}  # the table's order: scratch first
    for t in trials:
        by_config[label(t.config, shared)].append(t)
    per_subject_rows, figures = [], {}
    for split in ("val", "test"):
        groups = {}
        for name, ts in by_config.items():
            scores = [v for t in ts for v in t.per_subject.get(split, {}).values()]
            if scores:
                groups[name] = scores
            per_subject_rows += [{"configuration": name, "seed": t.params.get("seed", ""), "split": split,
                                  "subject": sid, "dice": v}
                                 for t in ts for sid, v in t.per_subject.get(split, {}).items()]
        if groups:
            png = out / f"dice_{split}_boxplot.png"
            figures[f"dice_{split}"] = (png, box_plot(groups, f"{experiment}: per-subject {split} Dice", png))
    if per_subject_rows:
        _write_csv(per_subject_rows, out / "per_subject_dice.csv")
    for split in ("test", "val"):  # test predictions where the sweep has a test split (subsets), else val (layers)
        with_predictions = {}
        for name, ts in by_config.items():  # one run per configuration (its first seed) with predictions
            for t in sorted(ts, key=lambda t: str(t.params.get("seed", ""))):
                if t.per_subject.get(split) and tracking.client(uri).list_artifacts(t.run_id, f"predictions/{split}"):
                    with_predictions[name] = t
                    break
        if with_predictions:  # at most 8 columns: the configurations with the best mean Dice
            top = sorted(with_predictions, key=lambda k: -statistics.mean(with_predictions[k].per_subject[split].values()))
            png = out / f"overlays_{split}.png"
            drawn = overlay_plot(uri, {k: with_predictions[k] for k in top[:8]}, png, split)
            if drawn:
                figures[f"overlays_{split}"] = (png, drawn)
                break
    first_with_predictions = {name: next(t for t in ts if t.predictions)
                              for name, ts in by_config.items() if any(t.predictions for t in ts)}
    if first_with_predictions:
        png = out / "roc_test.png"
        drawn = roc_plot(first_with_predictions, png)
        if drawn:
            figures["roc_test"] = (png, drawn)
    curves = {f"{label(t.config, shared)} s{t.params.get('seed', '')}": t.histories for t in trials if t.histories}
    if curves:
        png = out / "loss_curves.png"
        figures["loss_curves"] = (png, curves_plot(curves, png))
        _write_csv([{"run": name, "metric": k, "step": s, "value": v} for name, h in curves.items()
                    for k, pts in h.items() for s, v in pts], out / "curves.csv")

    subsets = {t.config[2] for t in trials} - {"", "all"}
    if len(subsets) > 1:  # the training-set-size sweep
        split = "test" if any("test" in t.per_subject for t in trials) else "val"
        sizes = {k: len(v) for k, v in
                 ((tracking.load_json(uri, parent_run_id, "splits.json") or {}).get("subsets") or {}).items()}
        png = out / "dice_by_subset.png"
        models, subset_rows = subsets_plot(trials, split, sizes, png, shared)
        figures["dice_by_subset"] = (png, models)
        _write_csv(subset_rows, out / "dice_by_subset.csv")
    with_steps = [t for t in trials if t.histories.get("step") and t.histories.get("train_loss")]
    if with_steps:  # classifier sweeps: data efficiency per starting point
        from tlcore.evaluate import common_target_loss

        given = tracking.run_info(uri, parent_run_id).data.params.get("target_loss", "null")  # --target-loss
        target = (float(given) if given not in ("null", "None", "")
                  else common_target_loss([v for _, v in t.histories["train_loss"]] for t in with_steps))
        png = out / "training_steps.png"
        panels, step_rows = training_steps_plot(with_steps, target, png, shared)
        figures["training_steps"] = (png, panels)
        _write_csv(step_rows, out / "steps_to_target.csv")
    parts = (tracking.load_json(uri, parent_run_id, "test_metrics.json") or {}).get("per_body_part")
    if parts:  # the MURA source sweep
        png = out / "accuracy_by_body_part.png"
        figures["accuracy_by_body_part"] = (png, body_part_plot(parts, png))

    extras = sweep_artifacts(uri, parent_run_id, out)
    page = out / "report.html"
    images = "".join(
        f"<h2 id='{name}'>{html.escape(FIGURE_TITLES.get(name, name))}</h2><img alt='{html.escape(name)}' "
        f"src='data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}'>" for name, (png, _) in figures.items())
    page.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(experiment)} report</title>"
        "<style>body{font-family:sans-serif;margin:2em auto;max-width:1200px;padding:0 1em}"
        "table{border-collapse:collapse;font-size:12px}.wide{overflow-x:auto}"
        "td,th{border:1px solid #ccc;padding:3px 6px}th{background:#f3f3f3}img{max-width:100%}</style></head><body>"
        f"<h1>{html.escape(experiment)}</h1><p>MLflow parent run <code>{parent_run_id}</code> in "
        f"<code>{html.escape(uri)}</code>; {len(trials)} trial runs. Differences are against scratch on the "
        "same subjects (mean over seeds per subject): bootstrap 95 % interval, Wilcoxon signed-rank p, "
        "Holm-corrected over this table's comparisons.</p>"
        f"<h2>Summary</h2>{_table_html(rows)}{images}{extras}"
        f"<p>CSV: {', '.join(sorted(f.name for f in out.glob('*.csv')))}</p></body></html>")
    if log:
        tracking.log_artifacts(uri, parent_run_id, out, "report")
    return Report(page, rows, figures)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tlcore.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", help="MLflow experiment = sweep name, e.g. brats_layers")
    p.add_argument("--parent-run", default=None, help="the sweep's parent run id (default: the newest)")
    p.add_argument("--out", default=None, help="output folder (default reports/<experiment>-<run>)")
    p.add_argument("--mlflow-uri", default=None, help=f"default {tracking.default_tracking_uri()}")
    p.add_argument("--no-log", action="store_true", help="do not log the report to the parent run")
    args = p.parse_args(argv)
    try:
        report = build(args.mlflow_uri or tracking.default_tracking_uri(), args.experiment, args.parent_run,
                       args.out, log=not args.no_log)
    except LookupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[tlcore] report: {report.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

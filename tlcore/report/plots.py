"""Figures (matplotlib, headless): a run's confusion matrix, and the report's box plots, curves,
overlays, ROC curves and subset / step / body-part plots. Each returns the labels of its panels.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

from tlcore.report.summary import CURVES, TrialRun, label, source_name, steps_to_target, subject_means
from tlcore.tracking import store


def confusion_png(cm, labels, title: str, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.6, 3.2), dpi=120)
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(np.asarray(cm)):
        ax.text(j, i, str(v), ha="center", va="center")
    ax.set_xticks([0, 1], labels)
    ax.set_yticks([0, 1], labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    save(fig, path)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# The report page is 1200 px wide at most (page.py): the browser shrinks a wider PNG to fit, and
# its text with it (the overlays' titles showed at 6 px). No text shows smaller than MIN_TEXT_PX.
PAGE_WIDTH_PX = 1150
MIN_TEXT_PX = 11


def save(fig, path: Path, rect=None) -> None:
    """Write a report figure and close it: text that would show below MIN_TEXT_PX at 100 % zoom
    is enlarged first (tick labels included), then the layout is redone around it."""
    from matplotlib.text import Text

    shrink = min(1.0, PAGE_WIDTH_PX / (fig.get_figwidth() * fig.dpi))
    floor = MIN_TEXT_PX * 72 / (fig.dpi * shrink) * (1 + 1e-9)  # in points; the margin: 11 px, not 10.999...
    fig.canvas.draw()  # lays out the tick labels, so they can be measured
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            ticks = [t for t in axis.get_ticklabels() if t.get_text()]
            if ticks and min(t.get_fontsize() for t in ticks) < floor:
                axis.set_tick_params(labelsize=floor)
    for text in fig.findobj(Text):
        if text.get_text() and text.get_fontsize() < floor:
            text.set_fontsize(floor)
    fig.tight_layout(rect=rect)
    fig.savefig(path)
    _plt().close(fig)


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
    save(fig, path)
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
    save(fig, path)
    return list(CURVES)


def _ground_truth(run: TrialRun, subject: str):
    """(first-modality image, class-index label) of a subject, from the run's dataset params."""
    import json

    import nibabel as nib
    import numpy as np

    from tlcore.data.layouts import class_indices, default_label_map, find_subjects

    p = run.params
    modalities = tuple(json.loads(p.get("modalities", '["t1", "t2"]')))
    files = find_subjects(p["dataset"], p["data_dir"], modalities, grades=("HGG", "LGG"))[subject]
    mapping = {int(k): v for k, v in (json.loads(p.get("label_map") or "{}") or default_label_map(p["dataset"])).items()}
    raw = np.asarray(nib.load(files["label"]).dataobj).round().astype(np.int64)
    return np.asarray(nib.load(files[modalities[0]]).dataobj, dtype=float), class_indices(raw, mapping)


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
                f = store.download_artifact(uri, run.run_id, f"predictions/{split}/{sid}_pred.nii.gz", d)
                pred = np.asarray(nib.load(f).dataobj)
                axes[i, j].imshow(image[:, :, z].T, cmap="gray", origin="lower")
                axes[i, j].imshow(np.ma.masked_equal(pred[:, :, z].T, 0), cmap="autumn", alpha=0.5, origin="lower")
                axes[i, j].contour(truth[:, :, z].T > 0, levels=[0.5], colors="lime", linewidths=0.8)
                wrapped = name.replace(" (", "\n(")  # the settings on a line of their own
                axes[i, j].set_title(f"{wrapped}\nDice {run.per_subject[split][sid]:.3f}", fontsize=7)
            rows.append(f"{which}: {sid}")
    for ax in axes.flat:
        ax.axis("off")
    save(fig, path)
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
    save(fig, path)
    return drawn


def subsets_plot(trials: list[TrialRun], split: str, sizes: dict[str, int], path: Path,
                 shared: frozenset = frozenset()) -> tuple[list[str], list[dict]]:
    """brats_subsets (thesis Tables 6.3-6.6): per model, the mean per-subject Dice on `split`
    (seeds averaged per subject, bootstrap 95 % interval over subjects) and the iteration of the
    best validation Dice, against the training-set size. Returns the models drawn and the rows."""
    from tlcore.analysis.stats import bootstrap_ci

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
            scores = list(subject_means(by_subset.get(subset, []), split).values())
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
    save(fig, path)
    return sorted(models, key=lambda m: (m != "scratch", m)), rows


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
    names = [source_name(s) for s in starts]
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
    save(fig, path)
    return ["training loss vs steps", "steps to target"], rows


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
    for i, (_a, m) in enumerate(zip(acc, n)):
        ax.text(i, 0.02, f"n={m}", ha="center", fontsize=7, color="white")
    ax.set_xticks(range(len(parts)), [p.replace("XR_", "").lower() for p in parts], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("study-wise accuracy")
    ax.set_title("MURA test accuracy per body part\n(study-wise, 95 % Wilson interval)", fontsize=10)
    save(fig, path)
    return parts


def layer_heatmap(rows: list[dict], path: Path) -> list[str]:
    """Configurations x layer groups: final CKA with the source (with its 95 % interval over the
    probe patches under each value), relative weight change from the start, CKA with the
    scratch model at the end and the re-initialisation test's Dice drop (the panels with data),
    rows of summary.layer_analysis_rows; returns the panels drawn."""
    plt = _plt()
    configs = list(dict.fromkeys(r["configuration"] for r in rows))
    panels = [(key, title, cmap) for key, title, cmap in
              (("cka", "CKA with the source (1 = its features kept)", "viridis"),
               ("weight_change", "weight change |w - w0| / |w0|", "magma"),
               ("cka_vs_scratch", "CKA with the scratch model at the end", "viridis"),
               ("reinit_drop", "val Dice lost when the group is reset to its start", "magma"))
              if any(key in r for r in rows)]
    columns = min(2, len(panels))  # two panels a row: each cell has room for its value and interval
    rows_of_panels = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows_of_panels, columns, figsize=(2 + 5.4 * columns, (0.5 * len(configs) + 1.4) * rows_of_panels),
                             dpi=110, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for n, (ax, (key, title, cmap)) in enumerate(zip(axes.flat, panels)):
        groups = list(dict.fromkeys(r["group"] for r in rows if key in r))
        grid = np.full((len(configs), len(groups)), np.nan)
        for r in rows:
            if key in r:
                grid[configs.index(r["configuration"]), groups.index(r["group"])] = r[key]
        low = min(0.0, float(np.nanmin(grid))) if np.isfinite(grid).any() else 0.0  # a reset may help: drops < 0
        image = ax.imshow(grid, cmap=cmap, aspect="auto", vmin=low, vmax=1 if key.startswith("cka") else None)
        interval = {(r["configuration"], r["group"]): f"\n{r[key + '_low']:.2f}\u2013{r[key + '_high']:.2f}"
                    for r in rows if r.get(key + "_high", 0) - r.get(key + "_low", 0) >= 0.005}  # CKA's 95 % interval
        for (i, j), v in np.ndenumerate(grid):
            if v == v:
                ax.text(j, i, f"{v:.2f}".replace("-0.00", "0.00") + interval.get((configs[i], groups[j]), ""), ha="center", va="center",
                        fontsize=7, color="white" if v < np.nanmean(grid) else "black")
            else:  # e.g. scratch has no source to compare with
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=7, color="#999999")
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        ax.set_yticks(range(len(configs)), configs if n % columns == 0 else [""] * len(configs), fontsize=7)
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.04)
    save(fig, path)
    return [key for key, _, _ in panels]


def layer_curves_plot(curves: dict[str, dict[str, list]], groups: list[str], path: Path) -> list[str]:
    """CKA (top row, its 95 % interval over the probe patches shaded) and weight change (bottom
    row) against iteration, one panel per layer group with data, one line per configuration
    (mean over its seeds, one colour each throughout); returns the panel titles."""
    plt = _plt()
    has = lambda key: any(c.get(key) for c in curves.values())
    rows = [[f"{p}.{g}" for g in groups if has(f"{p}.{g}")] for p in ("cka", "weight_change")]
    rows = [r for r in rows if r]
    width = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), width, figsize=(2.3 * width, 2.2 * len(rows) + 0.4), dpi=110,
                             squeeze=False)
    colour = {name: f"C{i % 10}" for i, name in enumerate(curves)}
    for i, keys in enumerate(rows):
        for j in range(width):
            ax = axes[i][j]
            if j >= len(keys):
                ax.axis("off")
                continue
            for name, c in curves.items():
                pts = c.get(keys[j], [])
                if pts:
                    ax.plot([s for s, _ in pts], [v for _, v in pts], color=colour[name], linewidth=1.1)
                band = [c.get(keys[j].replace(".", f"_{end}.", 1), []) for end in ("low", "high")]
                if all(band) and len(band[0]) == len(band[1]):  # CKA's 95 % interval over the probe patches
                    ax.fill_between([s for s, _ in band[0]], [v for _, v in band[0]], [v for _, v in band[1]],
                                    color=colour[name], alpha=0.18, linewidth=0)
            ax.set_title(keys[j].replace(".", " "), fontsize=8)
            ax.tick_params(labelsize=6)
            ax.set_xlabel("iteration", fontsize=7)
    from matplotlib.lines import Line2D
    fig.legend([Line2D([], [], color=colour[n]) for n in curves], list(curves), fontsize=6, loc="lower center",
               ncol=min(4, len(curves)))
    save(fig, path, rect=(0, 0.05 + 0.03 * ((len(curves) - 1) // 4), 1, 1))
    return [k for r in rows for k in r]


def forecast_plot(forecast: dict, agreement: dict, split: str, path: Path, scores: dict | None = None,
                  what: str = "LogME gain over untrained networks") -> list[str]:
    """The forecast (x: `what`) against the measured mean Dice (y) per freeze depth k, with
    Kendall's tau and its bootstrap interval in the title; with `scores` ({"logme": {k: v},
    "baseline": ..., "meanvar": ...}), beside it the raw scores per depth: the source's, the
    untrained networks' and Mean-Var's. Returns the panels' names."""
    plt = _plt()
    keys, measured = agreement["keys"], agreement["measured"]
    fig, axes = plt.subplots(1, 2 if scores else 1, figsize=(10.4 if scores else 5.2, 3.8), dpi=110, squeeze=False)
    ax = axes[0][0]
    xs, ys = [forecast[k] for k in keys], [measured[k] for k in keys]
    ax.plot(xs, ys, "o", color="C0")
    for k, x, y in zip(keys, xs, ys):
        ax.annotate(f"k={k}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    low, high = agreement["ci95"]
    ax.set_title(f"Kendall tau {agreement['tau']:.2f} [{low:.2f}, {high:.2f}] over {agreement['subjects']} subjects",
                 fontsize=9)
    ax.set_xlabel(f"forecast: {what}", fontsize=8)
    ax.set_ylabel(f"measured: mean {split} Dice", fontsize=8)
    if scores:
        raw = axes[0][1]
        names = {"logme": "the source", "baseline": "untrained networks (mean)", "meanvar": "Mean-Var start"}
        for kind, label in names.items():
            if scores.get(kind):
                depths = sorted(scores[kind])
                raw.plot(depths, [scores[kind][k] for k in depths], "o-", label=label)
        raw.set_xlabel("freeze depth k (the trained layers receive group k-1's output)")
        raw.set_ylabel("LogME")
        raw.set_title("Raw scores: untrained networks rise with depth too")
        raw.legend()
    save(fig, path)
    return ["gain against Dice", *(["raw scores per depth"] if scores else [])]

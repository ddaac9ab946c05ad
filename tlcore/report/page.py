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
from dataclasses import dataclass, field
from pathlib import Path

from tlcore.analysis.stats import rank_agreement
from tlcore.report.plots import (
    body_part_plot,
    box_plot,
    curves_plot,
    forecast_plot,
    layer_curves_plot,
    layer_heatmap,
    overlay_plot,
    roc_plot,
    subsets_plot,
    training_steps_plot,
)
from tlcore.report.summary import (
    CONFIG_KEYS,
    collect,
    headline_columns,
    label,
    layer_analysis_rows,
    layer_groups_of,
    mean_curve,
    shared_settings,
    subject_means,
    summarise,
    verdict,
)
from tlcore.tracking import store
from tlcore.tracking.credentials import tracking_uri_flag
from tlcore.tracking.trial_runs import ANALYSIS_PREFIXES

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
    "layers_final": "Each layer group at the end of training: CKA with the source (95 % interval), weight change "
                    "and the re-initialisation test",
    "layers_curves": "CKA with the source and weight change against iteration (mean over seeds)",
    "forecast": "Forecast before training against the measured Dice, per freeze depth",
}

LAYERS_GUIDE = """<h2 id='layers'>Which layers transfer</h2>
<p><b>CKA</b> compares what a layer group computes, on fixed validation voxels, with what the same
group of the source model computes: 1 is the same representation up to rotation and scale, 0 an
unrelated one. Frozen groups stay at 1. A fine-tuned group whose CKA stays high was reused; one
whose CKA falls was re-learned for the target. <b>Weight change</b> is |w - w0| / |w0| of the
group's parameters from the trial's own start (0 for frozen groups); a large change with a high CKA
means the weights moved without changing what the group represents.</p>
<p>Under each CKA value, and shaded around each CKA curve, is its <b>95 % interval</b>: a bootstrap
over the probe patches (which patches were drawn is most of CKA's uncertainty). Two configurations
whose intervals overlap are not told apart by this probe.</p>
<p><b>Val Dice lost when the group is reset to its start</b> is the re-initialisation test (Zhang,
Bengio &amp; Singer, 2022), on each transferred model's best checkpoint: that group alone goes back
to the weights the trial started from (the source's, for a transferred group), the rest stays
trained. A large loss means the model depends on what the group learnt on the target; none means
the start serves as well (frozen groups: 0 by construction). Where CKA is ambiguous (a group moved
but its CKA stayed high), this says whether the change mattered.</p>
<p>The <b>Mean-Var</b> start (<code>meanvar:</code>) draws every weight from the mean and variance of
the matching source tensor: the source's weight scales, none of its features. Its row in the summary
is compared with scratch and with the transferred model (<code>vs_transferred_*</code>): if it does
as well as the transferred model, the transfer helped through weight scaling, not reused features
(Raghu et al. 2019).</p>
"""


STOPPED_MARK = "†"  # a configuration ASHA stopped early (some seed or all)
OVERLAY_COLUMNS = 5  # predictions side by side: more would shrink their titles below reading size


@dataclass
class Report:
    html: Path
    rows: list[dict]
    figures: dict = field(default_factory=dict)   # name -> (png path, panel labels)


def sweep_artifacts(uri: str, parent_run_id: str, out: Path) -> str:
    """What the sweep itself logged to its parent run (2D: the confusion matrix, accuracy per
    body part, steps to reach a loss), as HTML sections; copied into `out`."""
    parts = []
    for path in store.artifact_files(uri, parent_run_id):
        if path == "results.md" or not path.endswith((".png", ".md")):
            continue
        f = store.download_artifact(uri, parent_run_id, path, out)
        title = html.escape(f.stem.replace("_", " "))
        if f.suffix == ".png":
            parts.append(f"<h2>{title}</h2><img alt='{title}' src='data:image/png;base64,"
                         f"{base64.b64encode(f.read_bytes()).decode()}'>")
        else:
            parts.append(f"<h2>{title}</h2><pre>{html.escape(f.read_text())}</pre>")
    return "".join(parts)


def _table_html(rows: list[dict], only: tuple[str, ...] | None = None) -> str:
    """The summary as HTML: settings shared by every row are stated once above the table (the
    CSV keeps every column), so the results fit the page; with `only`, just those columns. A cell
    whose value cannot exist (scratch against itself, a test a row did not run) reads n/a."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    if only is not None:  # in the order given
        cols = [c for c in only if c in cols]
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
    cell = lambda v: "<td class='na'>n/a</td>" if v in ("", None) else f"<td>{html.escape(str(v))}</td>"
    body = "".join("<tr>" + "".join(cell(r.get(c, "")) for c in cols) + "</tr>" for r in rows)
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
    owner = store.get_run(uri, parent_run_id).experiment if parent_run_id else experiment  # RunNotFoundError
    if owner != experiment:
        raise LookupError(f"run {parent_run_id} is not a sweep of {experiment!r}: it belongs to experiment {owner!r}")
    parent_run_id = parent_run_id or store.newest_parent_run(uri, experiment)
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
    stopped_early = lambda t: t.tags.get("stopped_early") == "True"
    stopped = {name for name, ts in by_config.items() if any(map(stopped_early, ts))}
    shown = lambda name: f"{name} {STOPPED_MARK}" if name in stopped else name  # early stops marked in every figure
    per_subject_rows, figures = [], {}
    for split in ("val", "test"):
        groups = {}
        for name, ts in by_config.items():
            scores = [v for t in ts for v in t.per_subject.get(split, {}).values()]
            if scores:
                groups[shown(name)] = scores
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
                if t.per_subject.get(split) and store.artifact_files(uri, t.run_id, f"predictions/{split}"):
                    with_predictions[name] = t
                    break
        if with_predictions:  # the configurations with the best mean Dice, as many as stay readable
            top = sorted(with_predictions, key=lambda k: -statistics.mean(with_predictions[k].per_subject[split].values()))
            png = out / f"overlays_{split}.png"
            drawn = overlay_plot(uri, {shown(k): with_predictions[k] for k in top[:OVERLAY_COLUMNS]}, png, split)
            if drawn:
                figures[f"overlays_{split}"] = (png, drawn)
                break
    first_with_predictions = {shown(name): next(t for t in ts if t.predictions)
                              for name, ts in by_config.items() if any(t.predictions for t in ts)}
    if first_with_predictions:
        png = out / "roc_test.png"
        drawn = roc_plot(first_with_predictions, png)
        if drawn:
            figures["roc_test"] = (png, drawn)
    curves = {f"{label(t.config, shared)} s{t.params.get('seed', '')}{f' {STOPPED_MARK}' if stopped_early(t) else ''}":
              t.histories for t in trials if t.histories}
    if curves:
        png = out / "loss_curves.png"
        figures["loss_curves"] = (png, curves_plot(curves, png))
        _write_csv([{"run": name, "metric": k, "step": s, "value": v} for name, h in curves.items()
                    for k, pts in h.items() for s, v in pts], out / "curves.csv")

    subsets = {t.config[2] for t in trials} - {"", "all"}
    if len(subsets) > 1:  # the training-set-size sweep
        split = "test" if any("test" in t.per_subject for t in trials) else "val"
        sizes = {k: len(v) for k, v in
                 ((store.load_json(uri, parent_run_id, "splits.json") or {}).get("subsets") or {}).items()}
        png = out / "dice_by_subset.png"
        models, subset_rows = subsets_plot(trials, split, sizes, png, shared)
        figures["dice_by_subset"] = (png, models)
        _write_csv(subset_rows, out / "dice_by_subset.csv")
    with_steps = [t for t in trials if t.histories.get("step") and t.histories.get("train_loss")]
    if with_steps:  # classifier sweeps: data efficiency per starting point
        from tlcore.evaluation.scores import common_target_loss

        given = store.get_run(uri, parent_run_id).params.get("target_loss", "null")  # --target-loss
        target = (float(given) if given not in ("null", "None", "")
                  else common_target_loss([v for _, v in t.histories["train_loss"]] for t in with_steps))
        png = out / "training_steps.png"
        panels, step_rows = training_steps_plot(with_steps, target, png, shared)
        figures["training_steps"] = (png, panels)
        _write_csv(step_rows, out / "steps_to_target.csv")
    parts = (store.load_json(uri, parent_run_id, "test_metrics.json") or {}).get("per_body_part")
    if parts:  # the MURA source sweep
        png = out / "accuracy_by_body_part.png"
        figures["accuracy_by_body_part"] = (png, body_part_plot(parts, png))

    layers = layer_figures(trials, by_config, shared, out, shown)
    forecast, forecast_text = forecast_figure(uri, parent_run_id, trials, out)
    extras = sweep_artifacts(uri, parent_run_id, out)
    page = out / "report.html"
    said = verdict(rows)
    verdict_html = f"<p class='verdict' id='verdict'>{html.escape(said)}</p>" if said else ""
    stopped_note = (f"<p>{STOPPED_MARK} in a figure: ASHA stopped every seed of that configuration, or some, before "
                    "the end; its curves and analysis end at its last report, its Dice is from its best checkpoint "
                    "until then.</p>" if stopped else "")
    images = "".join(
        f"<h2 id='{name}'>{html.escape(FIGURE_TITLES.get(name, name))}</h2><img alt='{html.escape(name)}' "
        f"src='data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}'>" for name, (png, _) in figures.items())
    page.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(experiment)} report</title>"
        "<style>body{font-family:sans-serif;margin:2em auto;max-width:1200px;padding:0 1em}"
        "table{border-collapse:collapse;font-size:12px}.wide{overflow-x:auto}"
        "td,th{border:1px solid #ccc;padding:3px 6px}th{background:#f3f3f3}img{max-width:100%}"
        ".na{color:#999}.verdict{font-size:15px;background:#f6f8fa;border-left:4px solid #2a6;padding:8px 12px}"
        "</style></head><body>"
        f"<h1>{html.escape(experiment)}</h1><p>MLflow parent run <code>{parent_run_id}</code> in "
        f"<code>{html.escape(uri)}</code>; {len(trials)} trial runs. Differences are against scratch on the "
        "same subjects (mean over seeds per subject): bootstrap 95 % interval, Wilcoxon signed-rank p, "
        "Holm-corrected over this table's comparisons.</p>"
        f"<h2>Summary</h2>{verdict_html}{_table_html(rows, headline_columns(rows))}"
        f"<details><summary>Every column (also in summary.csv)</summary>{_table_html(rows)}</details>{stopped_note}{images}{_layers_html(layers)}{forecast_text}{_layers_html(forecast, guide='')}{extras}"
        f"<p>CSV: {', '.join(sorted(f.name for f in out.glob('*.csv')))}</p></body></html>")
    if log:
        store.log_artifacts(uri, parent_run_id, out, "report")
    return Report(page, rows, {**figures, **layers, **forecast})


def layer_figures(trials: list, by_config: dict, shared: frozenset, out: Path, shown=lambda name: name) -> dict:
    """The "Which layers transfer" figures (and layers.csv), for sweeps with a transferred start
    whose trials logged the per-group analysis; {} otherwise (a source sweep has no source)."""
    rows = layer_analysis_rows(trials, shared)
    if not rows or all(t.config[0] in ("", "scratch") for t in trials):
        return {}
    _write_csv(rows, out / "layers.csv")
    drawn = [{**r, "configuration": shown(r["configuration"])} for r in rows]
    figures = {"layers_final": (out / "layers_final.png", layer_heatmap(drawn, out / "layers_final.png"))}
    groups = layer_groups_of(trials)
    keys = [p + g for p in ANALYSIS_PREFIXES for g in groups]
    curves = {shown(name): {k: [(step, mean) for step, mean, _ in mean_curve(ts, k)] for k in keys}
              for name, ts in by_config.items()}
    png = out / "layers_curves.png"
    figures["layers_curves"] = (png, layer_curves_plot(curves, groups, png))
    return figures


def logged_forecast(metrics: dict) -> dict[str, dict[int, float]]:
    """{kind: {k: score}} from a parent run's `forecast_<kind>.k<k>` metrics (driver.FORECAST_METRIC)."""
    scores: dict[str, dict[int, float]] = {}
    for key, value in metrics.items():
        if key.startswith("forecast_") and ".k" in key:
            kind, k = key[len("forecast_"):].rsplit(".k", 1)
            scores.setdefault(kind, {})[int(k)] = value
    return scores


def forecast_figure(uri: str, parent_run_id: str, trials: list, out: Path) -> tuple[dict, str]:
    """The forecast logged before the trials (the source's LogME gain over untrained networks)
    against the Dice they measured, per freeze depth: the figure and a paragraph that says plainly
    whether the forecast ranked the depths right, and whether untrained networks alone rank them
    as the raw score does."""
    scores = logged_forecast(store.get_run(uri, parent_run_id).metrics)
    forecast = scores.get("gain") or scores.get("logme", {})  # sweeps before the baseline logged LogME only
    transferred = [t for t in trials if str(t.params.get("source_model", "")).startswith("models:/")]
    if not forecast or not transferred:
        return {}, ""
    split = "test" if all("test" in t.per_subject for t in transferred) else "val"
    per_k = {k: subject_means([t for t in transferred if int(t.params.get("frozen_layers", 0)) == k], split)
             for k in forecast}
    agreement = rank_agreement(forecast, {k: v for k, v in per_k.items() if v})
    if agreement["tau"] != agreement["tau"]:  # fewer than three depths measured on shared subjects
        return {}, ""
    png = out / "forecast.png"
    gain = "gain" in scores
    figure = {"forecast": (png, forecast_plot(forecast, agreement, split, png, scores if gain else None,
                                              "LogME gain over untrained networks" if gain else "LogME"))}
    tau, (low, high) = agreement["tau"], agreement["ci95"]
    if agreement["forecast_best"] == agreement["measured_best"] and low > 0:
        verdict = "The forecast picked the depth that won, and its ranking agrees with the measured one beyond chance."
    elif low > 0:
        verdict = (f"The forecast ranks the depths broadly right (its interval excludes 0) but picked "
                   f"k={agreement['forecast_best']}, not the measured best k={agreement['measured_best']}.")
    elif high < 0:
        verdict = "<b>The forecast is wrong here</b>: it ranks the depths against what the sweep measured."
    else:
        verdict = ("<b>The forecast cannot be trusted here</b>: its agreement with the measured ranking is not "
                   "distinguishable from chance (the interval includes 0).")
    stopped = sorted({int(t.params.get("frozen_layers", 0)) for t in transferred if t.tags.get("stopped_early") == "True"})
    if stopped:  # their Dice is that of a shorter training: part of a disagreement may be ASHA's
        verdict += (f" ASHA stopped k={', '.join(map(str, stopped))} early: their Dice is from shorter training, so the "
                    "measured ranking mixes transferability with training length (--scheduler none runs every depth "
                    "to the end).")
    if agreement["subjects"] < 10:
        verdict += f" With {agreement['subjects']} subjects the interval itself is rough."
    if gain:  # would the raw score have said only what depth says?
        from scipy.stats import kendalltau

        raw, base = scores["logme"], scores["baseline"]
        depths = sorted(raw)
        same = kendalltau([raw[k] for k in depths], [base[k] for k in depths]).statistic
        verdict += (f" The raw LogME would have picked k={max(raw, key=raw.get)}; untrained networks alone pick "
                    f"k={max(base, key=base.get)} and rank the depths as the raw score does with Kendall tau {same:.2f}"
                    + (": the raw score measures depth as much as transfer, which the gain takes out." if same > 0.6
                       else "."))
        scored = ("the gain in LogME (You et al. 2021) of what the trained layers receive (the source's group k-1 "
                  "output; the input for k = 0) over the same layer of untrained networks of the same architecture")
    else:
        scored = "LogME (You et al. 2021) of what the trained layers receive (a sweep from before the baseline)"
    text = (f"<h2 id='forecast'>Forecast against result</h2><p>Before any trial, the sweep scored each freeze "
            f"depth k by {scored}, against the target labels on class-balanced voxels. Forecast best: "
            f"k={agreement['forecast_best']}; measured best ({split} Dice, {agreement['subjects']} subjects, mean "
            f"over seeds): k={agreement['measured_best']}; Kendall tau {tau:.2f}, bootstrap 95 % interval "
            f"[{low:.2f}, {high:.2f}] over subjects. {verdict}</p>")
    return figure, text


def _layers_html(figures: dict, guide: str = LAYERS_GUIDE) -> str:
    if not figures:
        return ""
    return guide + "".join(
        f"<h3>{html.escape(FIGURE_TITLES[name])}</h3><img alt='{name}' "
        f"src='data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}'>" for name, (png, _) in figures.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tlcore.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", help="MLflow experiment = sweep name, e.g. brats_layers")
    p.add_argument("--parent-run", default=None, help="the sweep's parent run id (default: the newest)")
    p.add_argument("--out", default=None, help="output folder (default reports/<experiment>-<run>)")
    p.add_argument("--mlflow-uri", default=None, type=tracking_uri_flag, help=f"default {store.default_tracking_uri()}")
    p.add_argument("--no-log", action="store_true", help="do not log the report to the parent run")
    args = p.parse_args(argv)
    try:
        report = build(args.mlflow_uri or store.default_tracking_uri(), args.experiment, args.parent_run,
                       args.out, log=not args.no_log)
    except LookupError as e:  # no such experiment, sweep or run
        print(f"[tlcore] error: {e}", file=sys.stderr)
        return 2
    print(f"[tlcore] report: {report.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

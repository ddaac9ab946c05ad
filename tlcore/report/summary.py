"""What a sweep's runs say, before any figure: the trials of a parent run read back from MLflow,
their configurations and labels, and the summary table (mean and spread over seeds, each
configuration against the scratch baseline on the same subjects, Holm-corrected).
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tlcore.analysis.stats import holm, paired_correctness, paired_scores
from tlcore.config import MEANVAR, weights_of
from tlcore.tracking import store
from tlcore.tracking.lineage import chain, chain_line
from tlcore.tracking.trial_runs import ANALYSIS_PREFIXES

CONFIG_KEYS = ("source_model", "frozen_layers", "train_subset", "lr", "lr_schedule")


CURVES = ("train_loss", "val_loss")
# layer groups in network order (models/networks.py: HighRes3DNet's, then DenseNet121's; a test keeps them equal)
GROUP_ORDER = ("conv_0", "res_1", "res_2", "res_3", "conv_1", "conv_2", "body_1", "body_2", "head")
# per group, the report's layer table: the analysis at every report, and at the end
# evaluation.cka_with_scratch and evaluation.reinit_drops
LAYER_METRICS = (*ANALYSIS_PREFIXES, "cka_vs_scratch.", "reinit_drop.")
AGGREGATE_ROLE = "seed_aggregate"  # the `role` tag of a configuration's mean-over-seeds run


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


def collect(uri: str, experiment: str, parent_run_id: str, artifacts: bool = True) -> list[TrialRun]:
    """The sweep's trial runs with their curves; with `artifacts`, also the per-layer analysis
    curves, per-subject scores and test predictions each run logged (reads the mean-over-seeds
    runs do not need). From a tracking server, eight runs are read at a time: each takes a
    handful of requests, and a 1,000-trial sweep read one request at a time took minutes
    (bench/RESULTS.md, scale.server.report_s)."""
    runs = [r for r in store.child_runs(uri, experiment, parent_run_id) if r.tags.get("role") != AGGREGATE_ROLE]
    return store.map_runs(uri, lambda run: _trial_run(uri, run, artifacts), runs)


def _trial_run(uri: str, run, artifacts: bool) -> TrialRun:
    rid = run.run_id
    histories = {k: store.metric_history(uri, rid, k) for k in run.metrics
                 if k in (*CURVES, "val_dice", "val_accuracy", "step")
                 or (artifacts and k.startswith(ANALYSIS_PREFIXES))}
    listed = set(store.artifact_files(uri, rid)) if artifacts else set()  # one listing for the four reads
    per_subject = {s: d for s in (("val", "test", "train") if artifacts else ())
                   if (d := store.load_json(uri, rid, f"{s}_per_subject_dice.json", listed)) is not None}
    pred = (artifacts and store.load_json(uri, rid, "test_predictions.json", listed)) or {
        "image": [], "label": [], "prob": []}
    return TrialRun(rid, run.params, run.tags, run.metrics,
                    histories, per_subject, dict(zip(pred["image"], zip(pred["label"], pred["prob"]))))


def label(config: tuple, shared: frozenset = frozenset()) -> str:
    """A configuration's short name: the source, k, and the settings that vary across the sweep
    (those in `shared`, the same for every trial, are stated once on the page instead)."""
    source, frozen, subset, lr, schedule = config
    name = "scratch" if source == "scratch" else f"{source_name(source)} k={frozen}"
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


def subject_means(trials: list[TrialRun], split: str) -> dict[str, float]:
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
                row["lineage"] = chain_line(chain(uri, config[0]))
            except Exception as e:  # noqa: BLE001 -- a deleted model must not sink the report
                row["lineage"] = f"{config[0]} (lineage unavailable: {type(e).__name__})"
        baselines = {"": groups.get(("scratch", "0", *config[2:]))}
        if config[0].startswith(MEANVAR):  # the control's question: features, or only their weight scales?
            baselines["vs_transferred_"] = groups.get((weights_of(config[0]), "0", *config[2:]))
        for prefix, baseline in baselines.items():
            comparison = _compare(ts, baseline) if baseline and config[0] != "scratch" else {}
            if comparison:
                row[f"{prefix or 'vs_scratch_'}split"] = comparison.pop("split")
                row.update({prefix + k: v for k, v in comparison.items()})
                comparisons.append((row, prefix))
        rows.append(row)
    p_key = lambda row, prefix: prefix + ("p_wilcoxon" if prefix + "p_wilcoxon" in row else "p_mcnemar")
    for (row, prefix), p in zip(comparisons, holm([row[p_key(row, prefix)] for row, prefix in comparisons])):
        row[prefix + "p_holm"] = p
    for row, prefix in comparisons:
        key = p_key(row, prefix)
        row[key], row[prefix + "p_holm"] = f"{row[key]:.3g}", f"{row[prefix + 'p_holm']:.3g}"
    return rows


# What a reader compares; the rest of summarise()'s columns go to the page's details table and summary.csv.
HEADLINE_COLUMNS = ("configuration", "seeds", "best_val_dice", "best_val_accuracy", "best_val_loss", "test_dice",
                    "test_accuracy", "test_auc", "dice_difference", "accuracy_difference", "ci95", "p_holm",
                    "stopped_early")  # Mean-Var against the transferred model: in the verdict and the details
OBJECTIVES = (("best_val_dice", max, "best validation Dice"), ("best_val_accuracy", max, "best validation accuracy"),
              ("best_val_loss", min, "lowest validation loss"))
ALPHA = 0.05


def headline_columns(rows: list[dict]) -> tuple[str, ...]:
    """HEADLINE_COLUMNS with one objective, the verdict's: a segmentation sweep's best validation
    loss is in the details, its Dice in the headline."""
    objective = next((k for k, _, _ in OBJECTIVES if any(r.get(k) for r in rows)), None)
    return tuple(c for c in HEADLINE_COLUMNS if c == objective or c not in {k for k, _, _ in OBJECTIVES})


def verdict(rows: list[dict]) -> str:
    """The report's first sentences (plain text): which configuration leads, and what the paired
    tests against scratch on the same subjects say after Holm's correction."""
    key, best, what = next(((k, f, w) for k, f, w in OBJECTIVES if any(r.get(k) for r in rows)), (None, None, ""))
    if key is None:
        return ""
    mean = lambda r: float(str(r[key]).split()[0])  # "0.7480 ± 0.0210"
    lead = best((r for r in rows if r.get(key)), key=mean)
    seeds = min(int(r.get("seeds", 1)) for r in rows)
    text = [f"{lead['configuration']} leads on {what} ({lead[key]}, "
            f"{'mean ± sd over ' + str(seeds) + ' seeds' if seeds > 1 else 'one seed'})."]
    compared = [r for r in rows if r.get("p_holm", "") != ""]
    if compared:
        text += _against_scratch(rows, compared)
    else:
        text.append("The sweep has no scratch baseline on the same data, so no difference between rows is tested.")
    if seeds == 1:
        text.append("Every configuration ran once: the tests pair subjects, not seeds, so rerun with "
                    "--num-samples 3 before concluding.")
    return " ".join(text)


def _against_scratch(rows: list[dict], compared: list[dict]) -> list[str]:
    text = []
    diff = "dice_difference" if "dice_difference" in compared[0] else "accuracy_difference"
    n = compared[0].get("subjects") or compared[0].get("images")
    on = f"on the same {n} {compared[0]['vs_scratch_split']} {'subjects' if 'subjects' in compared[0] else 'images'}"
    said = lambda r: f"{r[diff]:+.3f} (95 % CI {r['ci95']}, Holm p = {r['p_holm']})"
    better = [r for r in compared if float(r["p_holm"]) < ALPHA and r[diff] > 0]
    worse = [r for r in compared if float(r["p_holm"]) < ALPHA and r[diff] < 0]
    if better:
        top = max(better, key=lambda r: r[diff])
        text.append(f"Against scratch {on}, after Holm over {len(compared)} comparisons: {top['configuration']} is "
                    f"better by {said(top)}" + (f", and {len(better) - 1} more configurations are also better" if
                                              len(better) > 1 else "") + ".")
    else:
        closest = max(compared, key=lambda r: r[diff])
        text.append(f"Against scratch {on}, after Holm over {len(compared)} comparisons, no configuration is better "
                    f"beyond chance; the largest difference is {closest['configuration']}'s, {said(closest)}.")
        if "subjects" in compared[0] and 2 / 2 ** int(n) >= ALPHA:  # Wilcoxon's exact p is at least 2 / 2^n
            text.append(f"With {n} subjects no paired test can reach p < {ALPHA} (the smallest Wilcoxon p is "
                        f"2/2^{n} = {2 / 2 ** int(n):.3g}): give the {compared[0]['vs_scratch_split']} split more subjects "
                        "(--splits).")
    if worse:
        text.append(f"Worse than scratch beyond chance: {', '.join(r['configuration'] for r in worse)}.")
    for r in rows:  # the Mean-Var control against the model whose weight scales it copied
        if r.get("vs_transferred_p_holm", "") != "":
            vs = r["vs_transferred_" + diff]
            held = float(r["vs_transferred_p_holm"]) < ALPHA
            text.append(f"The Mean-Var control {r['configuration']} against the transferred model: {vs:+.3f} "
                        f"(Holm p = {r['vs_transferred_p_holm']}): " +
                        ("the transferred features matter beyond their weight scales." if held and vs < 0 else
                         "its weight scales alone do better than the transferred features." if held else
                         "not distinguishable here."))
    return text


def _compare(ts: list[TrialRun], baseline: list[TrialRun]) -> dict:
    """A configuration against a baseline on the same subjects or images: classifiers by McNemar on
    per-image correctness (test), segmenters by the paired per-subject Dice (test, else val)."""
    if any(t.predictions for t in ts) and any(t.predictions for t in baseline):  # ASHA-stopped seeds have none
        c = paired_correctness(_correct(ts), _correct(baseline))
        return {"split": "test", "accuracy_difference": round(c.mean_difference, 4),
                "ci95": f"[{c.ci_low:.4f}, {c.ci_high:.4f}]", "p_mcnemar": c.p_value, "images": c.n} if c.n else {}
    split = "test" if all("test" in t.per_subject for t in ts + baseline) else "val"
    c = paired_scores(subject_means(ts, split), subject_means(baseline, split))
    return {"split": split, "dice_difference": round(c.mean_difference, 4),
            "ci95": f"[{c.ci_low:.4f}, {c.ci_high:.4f}]", "p_wilcoxon": c.p_value, "subjects": c.n} if c.n else {}


def steps_to_target(run: TrialRun, target: float) -> tuple[list, list, int | None]:
    """(training steps, training loss, steps when the loss first reached `target` or None)."""
    from tlcore.evaluation.scores import steps_to_reach

    steps_at = dict(run.histories.get("step", []))      # iteration -> optimizer steps so far
    pts = sorted(run.histories.get("train_loss", []))
    steps = [int(steps_at.get(i, i)) for i, _ in pts]
    losses = [v for _, v in pts]
    hit = steps_to_reach(losses, target, smooth=1) if losses else None
    return steps, losses, (steps[hit - 1] if hit else None)


def source_name(source: str) -> str:
    return Path(source).name if source.endswith((".pth", ".pt", ".safetensors")) else source.replace("models:/", "")


# Seed-to-seed standard deviation of one configuration's best validation Dice on the synthetic
# demo data (scratch, demo profile; bench/RESULTS.md, "Final activation of HighRes3DNet").
DEMO_SEED_SD = 0.05


def seeds_note(rows: list[dict], synthetic: bool) -> str:
    """How many seeds stand behind each row, and what a difference between rows can mean."""
    config = lambda r: tuple(r.get(k) for k in ("source_model", "model", "frozen_layers", "train_subset", "lr", "lr_schedule"))
    seeds: dict = {}
    for r in rows:
        seeds.setdefault(config(r), set()).add(r.get("seed"))
    n = min((len(s) for s in seeds.values()), default=0)
    if n > 1:
        return (f"[tlcore] each configuration ran with {n}+ seeds (one row each); the report gives mean ± sd over "
                "seeds and paired tests against scratch, which say which differences hold.")
    spread = (f"on this synthetic data one configuration's best val Dice varies by sd ~{DEMO_SEED_SD} from seed "
              f"to seed, so rows closer than ~{2 * DEMO_SEED_SD:.2f} may differ by chance"
              if synthetic else "one seed cannot separate a difference from seed-to-seed noise")
    return (f"[tlcore] every row is one seed: {spread}. Rerun with --num-samples 3 (or more) and read the "
            "report's paired statistics before concluding.")


def _spread(key: str, values: list[float]) -> dict[str, float]:
    values = [v for v in values if v == v]
    if not values:
        return {}
    return {key: statistics.mean(values), f"{key}_sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            f"{key}_min": min(values), f"{key}_max": max(values)}


# Curves are averaged step by step instead; rates and throughput say nothing about the configuration.
NOT_AGGREGATED = {"step", "lr", "patches_per_s", "images_per_s", "precise_bn_s", "val_s", *CURVES,
                  "val_dice", "val_accuracy"}


def log_seed_aggregates(uri: str, experiment: str, parent_run_id: str) -> list[str]:
    """For every configuration that ran with two seeds or more, one more child run of the sweep
    (tag role=seed_aggregate, named "<configuration> · mean of n seeds") with the configuration's
    params, each final metric as its mean over seeds (same key, so MLflow's table and charts set
    it beside the single runs) with `_sd`, `_min` and `_max`, the mean of each seed's best
    validation score, and mean curves at the steps every seed reached. Earlier aggregates of the
    sweep are replaced (a resumed sweep may have more seeds). Returns the new runs' ids."""
    for run in store.child_runs(uri, experiment, parent_run_id, f"tags.role = '{AGGREGATE_ROLE}'"):
        store.delete_run(uri, run.run_id)
    trials = collect(uri, experiment, parent_run_id, artifacts=False)
    groups = defaultdict(list)
    for t in trials:
        groups[t.config].append(t)
    shared, made = shared_settings(trials), []
    for config, ts in groups.items():
        if len(ts) < 2:
            continue
        seeds = sorted(t.params.get("seed", "") for t in ts)
        metrics = {"n_seeds": float(len(ts))}
        for key in sorted({k for t in ts for k in t.metrics} - NOT_AGGREGATED):
            metrics.update(_spread(key, [t.metrics.get(key, float("nan")) for t in ts]))
        for key, mode in (("val_dice", "max"), ("val_accuracy", "max"), ("val_loss", "min")):
            if all(key in t.histories for t in ts):
                metrics.update(_spread(f"best_{key}", [_best(t, key, mode) for t in ts]))
        run_id = store.start_run(uri, experiment, f"{label(config, shared)} · mean of {len(ts)} seeds",
                                    {**dict(zip(CONFIG_KEYS, config)), "seed": ",".join(seeds)},
                                    {"role": AGGREGATE_ROLE, "seeds": ",".join(seeds),
                                     "trial_runs": ",".join(t.run_id for t in ts)}, parent_run_id=parent_run_id)
        now = int(time.time() * 1000)
        rows = [(k, v, 0, now) for k, v in metrics.items()]
        for key in (*CURVES, "val_dice", "val_accuracy"):
            for step, mean, sd in mean_curve(ts, key):
                rows += [(key, mean, step, now), (f"{key}_sd", sd, step, now)]
        store.log_metric_rows(uri, run_id, rows)
        store.end_run(uri, run_id)
        made.append(run_id)
    return made


def mean_curve(trials: list[TrialRun], key: str) -> list[tuple[int, float, float]]:
    """(step, mean, sd) over the trials' histories of `key`, at the steps every trial reached."""
    per_seed = [dict(t.histories.get(key, [])) for t in trials]
    if not per_seed or not all(per_seed):
        return []
    out = []
    for step in sorted(set.intersection(*(set(h) for h in per_seed))):
        at = [h[step] for h in per_seed]
        out.append((step, statistics.mean(at), statistics.stdev(at) if len(at) > 1 else 0.0))
    return out


def layer_groups_of(trials: list[TrialRun]) -> list[str]:
    """The layer groups the trials' analysis metrics name, in network order."""
    named = {k.split(".", 1)[1] for t in trials for k in t.metrics if k.startswith(LAYER_METRICS)}
    return [g for g in GROUP_ORDER if g in named] + sorted(named - set(GROUP_ORDER))


def layer_analysis_rows(trials: list[TrialRun], shared: frozenset = frozenset()) -> list[dict]:
    """Per configuration and layer group: the final CKA with the source (and its interval's ends)
    and weight change from the start (each trial's last report), the CKA with scratch and the
    re-initialisation drop at the end, mean over seeds; configurations without analysis left out."""
    groups = defaultdict(list)
    for t in trials:
        groups[label(t.config, shared)].append(t)
    rows = []
    for name, ts in groups.items():
        for g in layer_groups_of(ts):
            row = {"configuration": name, "group": g, "seeds": len(ts)}
            for prefix in LAYER_METRICS:
                values = [t.metrics[prefix + g] for t in ts if prefix + g in t.metrics]
                if values:
                    row[prefix.rstrip(".")] = round(statistics.mean(values), 4)
            rows.append(row)
    return rows

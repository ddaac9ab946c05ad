"""Sweep reports built from a hand-made MLflow store with known differences."""

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import mlflow_child_runs

from tlcore.report.page import build
from tlcore.report.plots import smooth
from tlcore.tracking import registry, store


@pytest.fixture
def text_px(monkeypatch) -> dict:
    """Per PNG the report saves, its smallest text in pixels as the page shows it at 100 % zoom:
    the report's page is 1150 px wide inside its margins, and a wider image is shrunk to fit."""
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    smallest, real_savefig = {}, Figure.savefig

    def measured(fig, path, *args, **kwargs):
        fig.canvas.draw()
        shrink = min(1.0, 1150 / (fig.get_figwidth() * fig.dpi))
        sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_text() and t.get_visible()]
        smallest[Path(path).name] = min(sizes) * fig.dpi / 72 * shrink
        return real_savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", measured)
    return smallest


def make_sweep(uri: str, brats_dir: Path, tmp: Path) -> str:
    """Two seeds of scratch and of an IXI-started model on 10 real (synthetic) BraTS subjects; each
    run has per-subject Dice, loss curves and, for three subjects, NIfTI test predictions."""
    import nibabel as nib

    from tlcore.data.layouts import find_brats
    from tlcore.evaluation.metrics import write_prediction

    files = find_brats(brats_dir)
    src = store.start_run(uri, "ixi_source", "source", {"source_model": "scratch"})
    store.log_text(uri, src, "w", "model/model.safetensors")
    ref = registry.register_model(uri, "ixi", src)
    parent = store.start_run(uri, "brats_layers", "sweep", None, {"role": "parent", "sweep": "brats_layers"})
    subjects = sorted(files)[:10]
    for seed in (0, 1):
        for source, frozen, gain in (("scratch", 0, 0.0), (ref.uri, 1, 0.05)):
            params = {"source_model": source, "frozen_layers": frozen, "train_subset": "all", "lr": 0.001,
                      "lr_schedule": "constant", "seed": seed, "dataset": "brats", "data_dir": str(brats_dir),
                      "modalities": ["t1", "t2"], "label_map": {}}
            run = store.start_run(uri, "brats_layers", f"{source} {seed}", params,
                                     {"trial_id": f"{source}{seed}", "iterations": 120,
                                      "stopped_early": False}, parent_run_id=parent)
            for step in (20, 40, 60):
                store.log_metrics(uri, run, {"train_loss": 1 / step + gain, "val_loss": 2 / step,
                                                "val_dice": 0.5 + gain + step / 1000}, step=step)
            # the transferred model is better by 0.05 + a distinct 0.001 * i on every subject
            test = {s: 0.6 + (gain + 0.001 * i if gain else 0.0) for i, s in enumerate(subjects)}
            store.log_dict(uri, run, test, "test_per_subject_dice.json")
            store.log_dict(uri, run, {s: v - 0.1 for s, v in test.items()}, "val_per_subject_dice.json")
            store.log_metrics(uri, run, {"test_dice": float(np.mean(list(test.values())))}, step=120)
            out = tmp / run
            for sid in subjects:  # "predictions": the ground truth, shifted for the scratch model
                truth = torch.as_tensor(np.asarray(nib.load(files[sid]["label"]).dataobj) > 0).long()
                write_prediction(truth if gain else truth.roll(2, 0), files[sid]["t1"], out / f"{sid}_pred.nii.gz")
            store.log_artifacts(uri, run, out, "predictions/test")
    return parent


def test_report_table_statistics_figures_and_lineage(mlflow_uri, tmp_path, synthetic_root, text_px):
    parent = make_sweep(mlflow_uri, synthetic_root / "brats", tmp_path / "preds")
    report = build(mlflow_uri, "brats_layers", out=tmp_path / "report")
    rows = {r["configuration"]: r for r in report.rows}
    assert set(rows) == {"scratch", "ixi/1 k=1"}
    tl = rows["ixi/1 k=1"]
    assert tl["seeds"] == 2 and tl["vs_scratch_split"] == "test" and tl["subjects"] == 10
    assert tl["dice_difference"] == pytest.approx(0.0545, abs=1e-4)
    assert float(tl["p_wilcoxon"]) == pytest.approx(2 / 2**10, rel=1e-2)   # 10 distinct positive differences
    assert tl["p_holm"] == tl["p_wilcoxon"]                                # one comparison
    low, high = (float(x) for x in tl["ci95"].strip("[]").split(","))
    assert 0.05 <= low < 0.0545 < high <= 0.06
    assert tl["lineage"] == "scratch -> models:/ixi/1"
    assert tl["best_val_dice"] == "0.6100 ± 0.0000" and tl["stopped_early"] == "0/2"
    assert "dice_difference" not in rows["scratch"]

    assert report.figures["dice_test"][1] == ["scratch", "ixi/1 k=1"]
    assert report.figures["dice_val"][0].stat().st_size > 5000
    assert report.figures["loss_curves"][1] == ["train_loss", "val_loss"]
    subjects = sorted(synthetic_subjects(synthetic_root))[:10]  # the gain grows with the index
    assert report.figures["overlays_test"][1] == [f"best: {subjects[9]}", f"median: {subjects[5]}",
                                                  f"worst: {subjects[0]}"]
    page = report.html.read_text()
    assert page.count("data:image/png;base64,") == 4 and "ixi/1 k=1" in page
    # the verdict comes first; the headline table holds what a reader compares, every column below it
    verdict = page.split("<p class='verdict' id='verdict'>")[1].split("</p>")[0]
    assert verdict.startswith("ixi/1 k=1 leads on best validation Dice (0.6100 ± 0.0000, mean ± sd over 2 seeds).")
    assert (f"Against scratch on the same 10 test subjects, after Holm over 1 comparisons: ixi/1 k=1 is better by "
            f"{tl['dice_difference']:+.3f} (95 % CI {tl['ci95']}, Holm p = {tl['p_holm']})") in verdict
    headline, details = page.split("<h2>Summary</h2>")[1].split("<details>")
    header = lambda part: re.findall(r"<th>([^<]+)</th>", part.split("</tr>")[0])
    assert header(headline) == ["configuration", "best_val_dice", "test_dice", "dice_difference", "ci95", "p_holm",
                                "stopped_early"]
    assert {"p_wilcoxon", "best_val_loss", "iterations"} <= set(header(details.split("</details>")[0]))
    assert "<td>scratch</td>" + "<td>0.5600 ± 0.0000</td><td>0.6000 ± 0.0000</td>" + "<td class='na'>n/a</td>" * 3 in headline
    assert "lr_schedule = <code>constant</code>" in page          # shared settings stated once
    for f in ("summary.csv", "per_subject_dice.csv", "curves.csv"):
        assert (tmp_path / "report" / f).exists()
    assert set(text_px) >= {"dice_val_boxplot.png", "dice_test_boxplot.png", "overlays_test.png", "loss_curves.png"}
    assert min(text_px.values()) >= 11, text_px  # readable at 100 % zoom
    logged = {a.path for a in store.client(mlflow_uri).list_artifacts(parent, "report")}
    assert "report/report.html" in logged and "report/dice_test_boxplot.png" in logged


def test_smoothing_is_an_exponential_moving_average():
    assert smooth([1.0, 0.0, 0.0], 0.5) == [1.0, 0.5, 0.25]


def synthetic_subjects(root):
    from tlcore.data.layouts import find_brats

    return find_brats(root / "brats")


def test_classifier_report_compares_per_image_correctness_and_draws_roc(mlflow_uri, tmp_path):
    parent = store.start_run(mlflow_uri, "chestxray_transfer", "sweep", None, {"role": "parent"})
    images = [f"/data/images/{i:08d}_000.png" for i in range(60)]
    labels = [i % 3 == 0 for i in range(60)]
    for source, wrong in (("scratch", range(0, 30)), ("imagenet", range(0, 10))):  # imagenet: 20 more right
        run = store.start_run(mlflow_uri, "chestxray_transfer", source,
                                 {"source_model": source, "frozen_layers": 0, "train_subset": "all", "lr": 0.001,
                                  "lr_schedule": "one_cycle", "seed": 0},
                                 {"trial_id": source, "iterations": 4, "stopped_early": False},
                                 parent_run_id=parent)
        # imagenet's loss falls faster: 0.9, 0.5, 0.3 against scratch's 0.9, 0.7, 0.5 (10 batches an epoch)
        for epoch, loss in enumerate((0.9, 0.5, 0.3) if source == "imagenet" else (0.9, 0.7, 0.5), start=1):
            store.log_metrics(mlflow_uri, run, {"train_loss": loss, "val_loss": 0.6, "step": 10 * epoch}, step=epoch)
        probs = [(0.3 if y else 0.7) if i in wrong else (0.9 if y else 0.1) for i, y in enumerate(labels)]
        store.log_dict(mlflow_uri, run, {"image": images, "label": [int(y) for y in labels], "prob": probs},
                          "test_predictions.json")
    report = build(mlflow_uri, "chestxray_transfer", parent, tmp_path / "r")
    row = next(r for r in report.rows if r["source_model"] == "imagenet")
    assert row["images"] == 60 and row["accuracy_difference"] == pytest.approx(20 / 60, abs=1e-4)
    assert float(row["p_mcnemar"]) == pytest.approx(2 * 0.5**20, rel=1e-2)   # 20 discordant pairs, all one way
    assert report.figures["roc_test"][1] == ["scratch", "imagenet k=0"]

    # steps to the loss both reached (the higher of the lowest losses: 0.5): scratch 30, imagenet 20
    assert report.figures["training_steps"][1] == ["training loss vs steps", "steps to target"]
    with (tmp_path / "r" / "steps_to_target.csv").open() as f:
        steps = {r["source_model"]: r for r in csv.DictReader(f)}
    assert steps["scratch"]["steps_to_target"] == "30" and steps["imagenet"]["steps_to_target"] == "20"
    assert steps["scratch"]["target_loss"] == "0.5"
    assert "accuracy_by_body_part" not in report.figures                  # not a MURA sweep


def test_mura_report_draws_accuracy_per_body_part(mlflow_uri, tmp_path):
    parent = store.start_run(mlflow_uri, "mura_source", "sweep", {"target_loss": None}, {"role": "parent"})
    run = store.start_run(mlflow_uri, "mura_source", "imagenet",
                             {"source_model": "imagenet", "frozen_layers": 0, "lr": 0.001, "seed": 0},
                             {"trial_id": "t0", "iterations": 2}, parent_run_id=parent)
    store.log_metrics(mlflow_uri, run, {"train_loss": 0.4, "step": 5}, step=1)
    per_part = {"XR_HAND": {"studies": 20, "accuracy": 0.75}, "XR_WRIST": {"studies": 10, "accuracy": 0.9}}
    store.log_dict(mlflow_uri, parent, {"per_body_part": per_part}, "test_metrics.json")
    report = build(mlflow_uri, "mura_source", parent, tmp_path / "r")
    assert report.figures["accuracy_by_body_part"][1] == ["XR_HAND", "XR_WRIST"]
    assert report.figures["accuracy_by_body_part"][0].stat().st_size > 5000
    assert report.html.read_text().count("data:image/png;base64,") >= 3   # losses, steps, body parts


def test_subsets_report_draws_dice_and_iterations_against_training_set_size(mlflow_uri, tmp_path):
    parent = store.start_run(mlflow_uri, "brats_subsets", "sweep", None, {"role": "parent"})
    store.log_dict(mlflow_uri, parent, {"subsets": {"S1": ["a"] * 3, "S2": ["a"] * 6}}, "splits.json")
    subjects = [f"s{i}" for i in range(8)]
    for subset, base in (("S1", 0.4), ("S2", 0.6)):
        for source, gain, best_at in (("scratch", 0.0, 60), ("models:/ixi/1", 0.1, 20)):
            run = store.start_run(mlflow_uri, "brats_subsets", f"{source} {subset}",
                                     {"source_model": source, "frozen_layers": 0 if gain == 0 else 1,
                                      "train_subset": subset, "lr": 0.001, "lr_schedule": "constant", "seed": 0},
                                     {"trial_id": f"{source}{subset}", "iterations": 60}, parent_run_id=parent)
            for step in (20, 40, 60):  # the best validation Dice at `best_at`
                store.log_metrics(mlflow_uri, run, {"val_dice": 0.9 if step == best_at else 0.5}, step=step)
            store.log_dict(mlflow_uri, run, {s: base + gain + 0.01 * (i % 2) for i, s in enumerate(subjects)},
                              "test_per_subject_dice.json")
    report = build(mlflow_uri, "brats_subsets", parent, tmp_path / "r")
    assert report.figures["dice_by_subset"][1] == ["scratch", "ixi/1 k=1"]
    with (tmp_path / "r" / "dice_by_subset.csv").open() as f:
        rows = {(r["model"], r["train_subset"]): r for r in csv.DictReader(f)}
    assert float(rows["ixi/1 k=1", "S2"]["mean_test_dice"]) == pytest.approx(0.705)  # 0.7 + half of 0.01
    assert float(rows["scratch", "S1"]["mean_test_dice"]) == pytest.approx(0.405)
    assert rows["scratch", "S1"]["subjects_in_subset"] == "3" and rows["scratch", "S2"]["test_subjects"] == "8"
    assert rows["scratch", "S2"]["best_val_iteration"] == "60" and rows["ixi/1 k=1", "S1"]["best_val_iteration"] == "20"
    low, high = float(rows["scratch", "S1"]["ci95_low"]), float(rows["scratch", "S1"]["ci95_high"])
    assert 0.4 <= low < 0.405 < high <= 0.41


def test_csv_cells_that_a_spreadsheet_would_run_are_defused(tmp_path):
    import csv

    from tlcore.report.page import _write_csv

    _write_csv([{"subject": "=HYPERLINK(\"http://x\")", "run": "@SUM(A1)", "dice": -0.5, "note": "-1+1"},
                {"subject": "Brats18_2013_2_1", "run": "scratch", "dice": 0.81, "note": ""}], tmp_path / "t.csv")
    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert rows[0]["subject"] == "'=HYPERLINK(\"http://x\")" and rows[0]["run"] == "'@SUM(A1)"
    assert rows[0]["note"] == "'-1+1" and rows[0]["dice"] == "-0.5"  # numbers stay numbers
    assert rows[1]["subject"] == "Brats18_2013_2_1" and rows[1]["dice"] == "0.81"


def test_each_configuration_gets_a_mean_over_seeds_run_in_mlflow(mlflow_uri):
    import statistics

    from tlcore.report.summary import collect, log_seed_aggregates

    parent = store.start_run(mlflow_uri, "brats_layers", "sweep", None, {"role": "parent"})
    tests = {("scratch", 0): [0.50, 0.56, 0.59], ("models:/ixi/1", 2): [0.61, 0.65], ("models:/ixi/1", 4): [0.3]}
    for (source, frozen), scores in tests.items():
        for seed, score in enumerate(scores):
            run = store.start_run(mlflow_uri, "brats_layers", f"{source} {seed}",
                                     {"source_model": source, "frozen_layers": frozen, "train_subset": "all",
                                      "lr": 0.001, "lr_schedule": "constant", "seed": seed},
                                     {"trial_id": f"{source}{frozen}{seed}"}, parent_run_id=parent)
            steps = (20, 40) if seed == 1 else (20, 40, 60)  # seed 1 stopped early: 60 is not common
            for step in steps:
                store.log_metrics(mlflow_uri, run, {"val_dice": score * step / 60, "train_loss": 1 / step},
                                     step=step)
            store.log_metrics(mlflow_uri, run, {"test_dice": score}, step=60)

    made = log_seed_aggregates(mlflow_uri, "brats_layers", parent)
    assert len(made) == 2  # the single-seed configuration gets none
    runs = {r.data.params["frozen_layers"]: r for r in mlflow_child_runs(mlflow_uri, "brats_layers", parent)
            if r.data.tags.get("role") == "seed_aggregate"}
    scratch = runs["0"]
    assert scratch.info.run_name == "scratch · mean of 3 seeds" and scratch.data.tags["seeds"] == "0,1,2"
    assert scratch.data.params["seed"] == "0,1,2"  # the seed column of MLflow's table names the members
    assert scratch.data.metrics["test_dice"] == pytest.approx(statistics.mean(tests[("scratch", 0)]))
    assert scratch.data.metrics["test_dice_sd"] == pytest.approx(statistics.stdev(tests[("scratch", 0)]))
    assert scratch.data.metrics["test_dice_max"] == pytest.approx(0.59)
    assert scratch.data.metrics["best_val_dice"] == pytest.approx(statistics.mean([0.50, 0.56 * 40 / 60, 0.59]))
    curve = store.metric_history(mlflow_uri, scratch.info.run_id, "val_dice")
    assert [s for s, _ in curve] == [20, 40]  # only the steps every seed reached
    assert curve[1][1] == pytest.approx(statistics.mean(tests[("scratch", 0)]) * 40 / 60)
    assert runs["2"].data.metrics["n_seeds"] == 2 and runs["2"].data.params["source_model"] == "models:/ixi/1"

    # the summary still sees trials only, and a second call replaces the aggregates
    assert len(collect(mlflow_uri, "brats_layers", parent)) == 6
    again = log_seed_aggregates(mlflow_uri, "brats_layers", parent)
    live = [r for r in mlflow_child_runs(mlflow_uri, "brats_layers", parent)
            if r.data.tags.get("role") == "seed_aggregate" and r.info.lifecycle_stage == "active"]
    assert sorted(r.info.run_id for r in live) == sorted(again)


def test_which_layers_transfer_section_and_the_mean_var_row(mlflow_uri, tmp_path, text_px):
    """Scratch, the source fine-tuned (k=0) and its Mean-Var control, with per-group CKA and weight
    change curves: the report draws them, and compares Mean-Var with both scratch and the source."""
    src = store.start_run(mlflow_uri, "ixi_source", "source", {"source_model": "scratch"})
    ref = registry.register_model(mlflow_uri, "ixi", src)
    parent = store.start_run(mlflow_uri, "brats_layers", "sweep", None, {"role": "parent"})
    subjects = [f"s{i:02d}" for i in range(8)]
    groups = ("conv_0", "res_1", "res_2", "res_3", "conv_1")
    # val Dice per subject: transferred best, Mean-Var between, scratch worst; CKA only with a source
    starts = {"scratch": (0.0, None), ref.uri: (0.1, 0.9), f"meanvar:{ref.uri}": (0.04, 0.3)}
    for seed in (0, 1):
        for source, (gain, cka) in starts.items():
            run = store.start_run(mlflow_uri, "brats_layers", f"{source} {seed}",
                                     {"source_model": source, "frozen_layers": 0, "train_subset": "all",
                                      "lr": 0.001, "lr_schedule": "constant", "seed": seed},
                                     {"trial_id": f"{source}{seed}", "iterations": 8,
                                      "stopped_early": source.startswith("meanvar") and seed == 1},
                                     parent_run_id=parent)
            for step in (4, 8):
                metrics = {"val_dice": 0.4 + gain, **{f"weight_change.{g}": 0.01 * step * (i + 1)
                                                       for i, g in enumerate((*groups, "conv_2"))}}
                if cka is not None:
                    metrics.update({f"cka.{g}": cka + (0.1 - 0.01 * step) - 0.02 * i for i, g in enumerate(groups)})
                    metrics.update({f"cka_{end}.{g}": metrics[f"cka.{g}"] + d for g in groups
                                    for end, d in (("low", -0.02), ("high", 0.03))})
                store.log_metrics(mlflow_uri, run, metrics, step=step)
            if cka is not None:  # evaluation.cka_with_scratch and .reinit_drops, at the end
                store.log_metrics(mlflow_uri, run, {f"cka_vs_scratch.{g}": cka / 2 for g in groups}, step=8)
                store.log_metrics(mlflow_uri, run, {f"reinit_drop.{g}": cka / 10 * i for i, g in enumerate((*groups, "conv_2"))}, step=8)
            store.log_dict(mlflow_uri, run, {s: 0.5 + gain + 0.002 * i + 0.001 * seed
                                                for i, s in enumerate(subjects)}, "val_per_subject_dice.json")
    report = build(mlflow_uri, "brats_layers", parent, out=tmp_path / "report", log=False)
    rows = {r["configuration"]: r for r in report.rows}
    meanvar = rows["meanvar:ixi/1 k=0"]
    assert meanvar["dice_difference"] == pytest.approx(0.04, abs=1e-6)              # against scratch
    assert meanvar["vs_transferred_dice_difference"] == pytest.approx(-0.06, abs=1e-6)  # against the source
    assert meanvar["vs_transferred_split"] == "val" and meanvar["vs_transferred_subjects"] == 8
    assert float(meanvar["vs_transferred_p_holm"]) >= float(meanvar["vs_transferred_p_wilcoxon"])
    assert "vs_transferred_dice_difference" not in rows["ixi/1 k=0"]
    # three comparisons in one Holm family: the smallest p is multiplied by 3
    ps = sorted((float(r[k]), float(r[k.replace("p_wilcoxon", "p_holm")])) for r in report.rows
                for k in ("p_wilcoxon", "vs_transferred_p_wilcoxon") if k in r)
    assert len(ps) == 3 and ps[0][1] == pytest.approx(min(1.0, 3 * ps[0][0]), rel=1e-2)

    assert report.figures["layers_final"][1] == ["cka", "weight_change", "cka_vs_scratch", "reinit_drop"]
    assert report.figures["layers_curves"][1][:5] == [f"cka.{g}" for g in groups]
    assert "weight_change.conv_2" in report.figures["layers_curves"][1]
    with (tmp_path / "report" / "layers.csv").open() as f:
        table = {(r["configuration"], r["group"]): r for r in csv.DictReader(f)}
    assert float(table[("ixi/1 k=0", "res_1")]["cka"]) == pytest.approx(0.9 + 0.02 - 0.02)  # last report, mean of seeds
    assert float(table[("meanvar:ixi/1 k=0", "conv_0")]["cka"]) == pytest.approx(0.32)
    assert float(table[("meanvar:ixi/1 k=0", "conv_1")]["cka_vs_scratch"]) == pytest.approx(0.15)
    assert float(table[("ixi/1 k=0", "res_1")]["cka_low"]) == pytest.approx(0.9 - 0.02)  # the interval's ends
    assert float(table[("ixi/1 k=0", "conv_2")]["reinit_drop"]) == pytest.approx(0.45)
    assert "re-initialisation test" in page_text(report) and "95 % interval" in page_text(report)
    assert "cka_vs_scratch.conv_1" not in report.figures["layers_curves"][1]  # one value per run, no curve
    assert table[("scratch", "res_1")]["cka"] == "" and float(table[("scratch", "res_1")]["weight_change"]) == 0.16
    page = report.html.read_text()
    assert "Which layers transfer" in page and page.count("data:image/png;base64,") >= 4
    # a configuration ASHA stopped early is marked in every figure that draws it
    assert report.figures["dice_val"][1] == ["scratch", "meanvar:ixi/1 k=0 \u2020", "ixi/1 k=0"]
    assert "\u2020 in a figure: ASHA stopped" in page and meanvar["stopped_early"] == "1/2"
    assert set(text_px) >= {"layers_final.png", "layers_curves.png", "loss_curves.png"}
    assert min(text_px.values()) >= 11, text_px


def page_text(report) -> str:
    return report.html.read_text()


def test_the_layer_figures_show_ckas_interval(tmp_path, monkeypatch):
    """The heatmap writes each CKA's interval under it; the curves shade it."""
    from tlcore.report import plots

    drawn = {}
    monkeypatch.setattr(plots, "save", lambda fig, path, **kw: drawn.__setitem__(path.name, fig))
    rows = [{"configuration": "ixi/1 k=0", "group": "res_1", "cka": 0.81, "cka_low": 0.79, "cka_high": 0.84,
             "weight_change": 0.1, "reinit_drop": -0.01},
            {"configuration": "scratch", "group": "res_1", "weight_change": 0.2}]
    assert plots.layer_heatmap(rows, tmp_path / "final.png") == ["cka", "weight_change", "reinit_drop"]
    texts = [t.get_text() for ax in drawn["final.png"].axes for t in ax.texts]
    assert "0.81\n0.79\u20130.84" in texts and "0.10" in texts and "-0.01" in texts
    curves = {"ixi/1 k=0": {"cka.res_1": [(4, 0.9), (8, 0.8)], "cka_low.res_1": [(4, 0.88), (8, 0.77)],
                            "cka_high.res_1": [(4, 0.93), (8, 0.84)], "weight_change.res_1": [(4, 0.1), (8, 0.2)]}}
    plots.layer_curves_plot(curves, ["res_1"], tmp_path / "curves.png")
    cka_panel = drawn["curves.png"].axes[0]
    assert cka_panel.get_title() == "cka res_1" and len(cka_panel.collections) == 1  # the shaded band
    band = cka_panel.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(0.77) and band[:, 1].max() == pytest.approx(0.93)
    assert len(drawn["curves.png"].axes[1].collections) == 0  # weight change has no interval


def test_a_source_sweep_has_no_which_layers_transfer_section(mlflow_uri, tmp_path):
    """Trials that all start from scratch (the IXI source sweep) may log the analysis curves, but
    with no source there is nothing to transfer: the report leaves the section out."""
    parent = store.start_run(mlflow_uri, "ixi_source", "sweep", None, {"role": "parent"})
    for lr in (0.001, 0.003):
        run = store.start_run(mlflow_uri, "ixi_source", f"lr={lr}", {"source_model": "scratch", "frozen_layers": 0,
                                                                     "lr": lr, "lr_schedule": "constant", "seed": 0},
                              {"trial_id": str(lr), "iterations": 8, "stopped_early": False}, parent_run_id=parent)
        for step in (4, 8):
            store.log_metrics(mlflow_uri, run, {"val_dice": 0.5 + lr * step, "weight_change.conv_0": 0.1 * step}, step)
    report = build(mlflow_uri, "ixi_source", parent, out=tmp_path / "report", log=False)
    page = report.html.read_text()
    assert "Which layers transfer" not in page and "layers_final" not in report.figures
    assert "no scratch baseline on the same data" in page


@pytest.mark.parametrize("order, verdict", [(1, "picked the depth that won"), (-1, "The forecast is wrong here")])
def test_forecast_against_result_sets_the_gain_against_the_dice_and_says_whether_it_ranked_right(
        mlflow_uri, tmp_path, order, verdict):
    from tlcore.sweep.driver import FORECAST_METRIC

    src = store.start_run(mlflow_uri, "ixi_source", "source", {"source_model": "scratch"})
    ref = registry.register_model(mlflow_uri, "ixi", src)
    parent = store.start_run(mlflow_uri, "brats_layers", "sweep", None, {"role": "parent"})
    # the forecast, as the driver logs it before the trials: the gain rising (order 1) or falling
    # with k; the raw score falls with k either way, as the untrained baseline does more steeply
    gain = {k: order * (k - 2.0) for k in range(4)}
    baseline = {k: -1.0 - 2.0 * k - gain[k] for k in range(4)}
    logged = {**{FORECAST_METRIC.format("gain", k): v for k, v in gain.items()},
              **{FORECAST_METRIC.format("baseline", k): v for k, v in baseline.items()},
              **{FORECAST_METRIC.format("logme", k): baseline[k] + gain[k] for k in range(4)}}
    store.log_metrics(mlflow_uri, parent, logged, step=0)
    for k in range(4):  # measured: Dice rises with k on every one of 8 subjects
        run = store.start_run(mlflow_uri, "brats_layers", f"k={k}",
                                 {"source_model": ref.uri, "frozen_layers": k, "train_subset": "all", "lr": 0.001,
                                  "lr_schedule": "constant", "seed": 0},
                                 {"trial_id": f"t{k}", "iterations": 8, "stopped_early": False}, parent_run_id=parent)
        store.log_metrics(mlflow_uri, run, {"val_dice": 0.5}, step=8)
        store.log_dict(mlflow_uri, run, {f"s{i}": 0.3 + 0.1 * k + 0.01 * i for i in range(8)},
                          "val_per_subject_dice.json")
    report = build(mlflow_uri, "brats_layers", parent, out=tmp_path / "report", log=False)
    page = report.html.read_text()
    assert "Forecast against result" in page and verdict in page
    assert report.figures["forecast"][1] == ["gain against Dice", "raw scores per depth"]
    assert f"Kendall tau {float(order):.2f}" in page and "measured best (val Dice, 8 subjects" in page
    assert "gain in LogME" in page and f"Forecast best: k={3 if order == 1 else 0}" in page
    assert "The raw LogME would have picked k=0; untrained networks alone pick k=0" in page


def test_overlays_draw_the_ground_truth_the_trials_score_against_without_loading_torch(synthetic_root, tmp_path):
    """The report runs in the sweep's driver, which loads neither torch nor MONAI (~5 CPU-s a sweep):
    its ground truth is the raw label mapped to classes as a trial maps it, read with nibabel alone."""
    import subprocess
    import sys

    import nibabel as nib
    from helpers import REPO

    from tlcore.data.layouts import default_label_map, find_brats
    from tlcore.data.pipeline import map_labels

    subject, files = sorted(find_brats(synthetic_root / "brats").items())[0]
    params = {"dataset": "brats", "data_dir": str(synthetic_root / "brats"), "modalities": '["t1", "t2"]', "label_map": "{}"}
    code = ("import sys, numpy\n"
            "from tlcore.report.plots import _ground_truth\nfrom tlcore.report.summary import TrialRun\n"
            f"image, truth = _ground_truth(TrialRun('r', {params!r}, {{}}, {{}}, {{}}, {{}}), {subject!r})\n"
            f"numpy.save({str(tmp_path / 'truth.npy')!r}, truth)\n"
            "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))")
    drawn = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert drawn.returncode == 0, drawn.stderr[-3000:]
    assert drawn.stdout.strip() == "[]"
    raw = torch.as_tensor(np.asarray(nib.load(files["label"]).dataobj)).round().long()
    scored = map_labels(raw, default_label_map("brats")).numpy()
    truth = np.load(tmp_path / "truth.npy")
    assert scored.any() and (truth == scored).all() and truth.dtype == scored.dtype


@pytest.mark.parametrize("rows, says", [
    ([{"configuration": "lr=0.001", "seeds": 1, "best_val_dice": "0.7000"},
      {"configuration": "lr=0.003", "seeds": 1, "best_val_dice": "0.7500"}],
     ["lr=0.003 leads on best validation Dice (0.7500, one seed).", "no scratch baseline",
      "--num-samples 3"]),
    ([{"configuration": "scratch", "seeds": 3, "best_val_dice": "0.8000 ± 0.0100"},
      {"configuration": "k=1", "seeds": 3, "best_val_dice": "0.8100 ± 0.0100", "dice_difference": 0.012,
       "ci95": "[-0.0100, 0.0300]", "p_holm": "0.4", "subjects": 12, "vs_scratch_split": "test"},
      {"configuration": "k=5", "seeds": 3, "best_val_dice": "0.3000 ± 0.0100", "dice_difference": -0.41,
       "ci95": "[-0.4500, -0.3800]", "p_holm": "0.001", "subjects": 12, "vs_scratch_split": "test"}],
     ["k=1 leads on best validation Dice (0.8100 ± 0.0100, mean ± sd over 3 seeds).",
      "on the same 12 test subjects, after Holm over 2 comparisons, no configuration is better beyond chance; "
      "the largest difference is k=1's, +0.012 (95 % CI [-0.0100, 0.0300], Holm p = 0.4).",
      "Worse than scratch beyond chance: k=5."]),
    ([{"configuration": "scratch", "seeds": 1, "best_val_dice": "0.3000"},
      {"configuration": "k=2", "seeds": 1, "best_val_dice": "0.5000", "dice_difference": 0.2,
       "ci95": "[0.1500, 0.2500]", "p_holm": "0.125", "subjects": 4, "vs_scratch_split": "val"}],
     ["no configuration is better beyond chance", "With 4 subjects no paired test can reach p < 0.05 (the smallest "
      "Wilcoxon p is 2/2^4 = 0.125): give the val split more subjects (--splits)."]),
    ([{"configuration": "scratch", "seeds": 2, "best_val_loss": "0.3000 ± 0.0100"},
      {"configuration": "mura k=0", "seeds": 2, "best_val_loss": "0.2000 ± 0.0100", "accuracy_difference": 0.08,
       "ci95": "[0.0400, 0.1200]", "p_holm": "0.002", "images": 60, "vs_scratch_split": "test"}],
     ["mura k=0 leads on lowest validation loss", "on the same 60 test images", "mura k=0 is better by +0.080"]),
])
def test_the_verdict_names_the_leader_and_what_the_paired_tests_say(rows, says):
    from tlcore.report.summary import verdict

    text = verdict(rows)
    assert all(s in text for s in says), text
    assert ("--num-samples 3" in text) == (min(r["seeds"] for r in rows) == 1)

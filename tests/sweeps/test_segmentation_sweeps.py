"""The experiments end to end, as a user runs the sweep scripts: the IXI source, the layer, search and
subset sweeps on BraTS, joining a running Ray cluster, replaying a sweep into MLflow. Real local
Ray and SQLite MLflow."""

import html
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, mlflow_child_runs, reported_steps, run_script

from tlcore.tracking import registry, store

SPEC_PARAMS = {"source_model", "frozen_layers", "train_subset", "lr", "lr_schedule", "seed"}
pytestmark = pytest.mark.slow


@pytest.mark.xdist_group("workspace_store")  # one store and one source model (conftest.source_model)
def test_source_sweep_registers_weights_with_lineage(workspace, source_model):
    w, ref = workspace, source_model
    assert ref.version == "1"
    run = store.client(w["uri"]).get_run(ref.run_id)
    assert run.data.tags["sweep"] == "ixi_source" and "test_dice" in run.data.metrics
    mv = store.client(w["uri"]).get_model_version("ixi_hippocampus", "1")
    assert mv.tags["source_run_id"] == ref.run_id
    folder = registry.download_model(w["uri"], ref, w["tmp"] / "dl")
    assert (folder / "model.safetensors").stat().st_size > 3_000_000  # ~0.81 M float32 parameters
    card = json.loads((folder / "tlcore_model.json").read_text())
    assert (card["num_classes"], card["in_channels"], card["modalities"]) == (3, 2, ["t1", "t2"])
    # the run configuration travels with the weights (and with every checkpoint), no longer beside them
    from tlcore.config import read_run_config

    trained_with = read_run_config(folder)
    assert trained_with.label_map == {17: 1, 53: 2} and str(trained_with.lr) == run.data.params["lr"]
    assert trained_with.to_params() == read_run_config(next((w["tmp"] / "results" / "ixi_source").glob(
        f"*_{run.data.tags['trial_id']}/checkpoint_*"))).to_params()
    # Tune's result files, without TensorBoard's (tuner.no_tensorboard_logger: the driver never imports it)
    results = w["tmp"] / "results" / "ixi_source"
    assert list(results.glob("train_*/result.json")) and not list(results.rglob("events.out.tfevents*"))


GROUPS = ("conv_0", "res_1", "res_2", "res_3", "conv_1")


@pytest.fixture(scope="session")  # once per worker (a module fixture is rebuilt when xdist interleaves)
def layer_sweep(workspace, source_model):
    """brats_layers as a user runs it, once for the tests below: what it printed, its parent run and
    its eight trial runs."""
    w = workspace
    proc = run_script("brats_layers.py", "--data-dir", str(w["data"] / "brats"), *w["common"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    c = store.client(w["uri"])
    exp = c.get_experiment_by_name("brats_layers")
    parents = c.search_runs([exp.experiment_id], "tags.role = 'parent'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    return {"out": proc.stdout, "client": c, "experiment": exp, "parent": parent,
            "children": mlflow_child_runs(w["uri"], "brats_layers", parent)}


in_workspace_store = pytest.mark.xdist_group("workspace_store")  # one store and one source model (conftest.source_model)


@in_workspace_store
def test_layer_sweep_runs_scratch_meanvar_and_every_freeze_depth(layer_sweep, source_model):
    children = layer_sweep["children"]
    assert "brats_layers results" in layer_sweep["out"] and "mlflow ui --backend-store-uri" in layer_sweep["out"]
    configs = sorted((r.data.params["source_model"], int(r.data.params["frozen_layers"])) for r in children)
    assert configs == sorted([("scratch", 0), ("meanvar:models:/ixi_hippocampus/1", 0)]
                             + [("models:/ixi_hippocampus/1", k) for k in range(6)])
    for r in children:
        assert SPEC_PARAMS <= set(r.data.params), set(r.data.params)
        assert r.data.tags["sweep"] == "brats_layers" and r.data.tags["trial_id"]
        assert r.info.status == "FINISHED"
        if r.data.params["source_model"].startswith("models:/"):
            assert r.data.tags["source_run_id"] == source_model.run_id
            assert int(r.data.params["transfer.loaded_tensors"]) > 0
            assert r.data.params["transfer.reinitialised_tensors"] == "2"  # 3 IXI classes -> 2 BraTS: the conv head's weight and bias


@in_workspace_store
def test_frozen_groups_keep_the_sources_features_and_weights(layer_sweep, workspace):
    """Which layers changed: every group's CKA with the source (every start with one), weight movement."""
    for r in layer_sweep["children"]:
        k, source = int(r.data.params["frozen_layers"]), r.data.params["source_model"]
        moved = [r.data.metrics[f"weight_change.{g}"] for g in (*GROUPS, "conv_2")]
        assert all(m == 0 for m in moved[:k]) and all(m > 0 for m in moved[k:]), (source, k, moved)
        if source == "scratch":
            assert not any(m.startswith(("cka.", "reinit_drop.")) for m in r.data.metrics)
            continue
        cka = [r.data.metrics[f"cka.{g}"] for g in GROUPS]
        assert all(c == pytest.approx(1.0, abs=1e-6) for c in cka[:k]), (k, cka)  # frozen: the source's features
        assert len(store.metric_history(workspace["uri"], r.info.run_id, "cka.conv_1")) >= 2  # a curve, one per report
        for g in GROUPS:  # and its 95 % interval over the probe patches at every report (the smoke
            # profile's probe is a quarter of the default's: tests/training/test_segmentation.py holds that to 0.06)
            series = [dict(store.metric_history(workspace["uri"], r.info.run_id, f"{m}.{g}")) for m in ("cka_low", "cka", "cka_high")]
            assert series[0].keys() == series[1].keys() == series[2].keys()
            for step in series[1]:
                low, value, high = (s[step] for s in series)
                assert low - 1e-9 <= value <= high + 1e-9 and high - low <= 0.15, (source, g, step, low, value, high)
        # the re-initialisation test at the end: frozen groups lose nothing, and every group has a value
        best = json.loads(r.data.tags["evaluation"])["best_iteration"]
        drops = {g: store.metric_history(workspace["uri"], r.info.run_id, f"reinit_drop.{g}") for g in (*GROUPS, "conv_2")}
        assert all(h and h[-1][0] == best for h in drops.values()), drops
        assert all(drops[g][-1][1] == 0 for g in GROUPS[:k]), drops
        # at the end, against the scratch trial: do fine-tuned and scratch models compute the same thing?
        assert all(0 <= r.data.metrics[f"cka_vs_scratch.{g}"] <= 1 + 1e-6 for g in GROUPS)
        if source.startswith("meanvar:"):  # the source's weight statistics, none of its features
            assert int(r.data.params["transfer.sampled_tensors"]) > 0 and r.data.params["transfer.loaded_tensors"] == "0"
            assert max(cka) < 0.95, cka


@in_workspace_store
def test_every_trial_logs_its_curves_where_it_ran_and_asha_stops_some(layer_sweep, workspace):
    children = layer_sweep["children"]
    for r in children:
        assert (r.data.tags["runtime.device"], r.data.tags["runtime.layout"]) == ("cpu", "auto: NCDHW on cpu")
        assert r.data.tags["runtime.node"] == socket.gethostname() and r.data.tags["runtime.node_ip"]  # which machine
        history = store.metric_history(workspace["uri"], r.info.run_id, "val_dice")
        assert len(history) >= 2 and [s for s, _ in history] == sorted({s for s, _ in history})
        assert {"train_loss", "val_loss", "val_dice"} <= set(r.data.metrics)
    assert any(r.data.tags["stopped_early"] == "True" for r in children), "ASHA stopped nothing"
    assert any(r.data.tags["stopped_early"] == "False" for r in children)


@in_workspace_store
def test_every_trial_is_evaluated_at_its_best_checkpoint(layer_sweep, workspace):
    """Early-stopped or not: whole-volume train / test Dice (thesis Table 6.2) at the best checkpoint's
    iteration, per-subject validation Dice and validation predictions for the overlays."""
    uri, c = workspace["uri"], layer_sweep["client"]
    for r in layer_sweep["children"]:
        best = max(store.metric_history(uri, r.info.run_id, "val_dice"), key=lambda sv: (sv[1], -sv[0]))
        assert json.loads(r.data.tags["evaluation"])["best_iteration"] == best[0]
        # the runs table's columns for it (val_dice there is the last report's)
        assert (r.data.metrics["best_val_dice"], r.data.metrics["best_iteration"]) == (best[1], best[0])
        for split in ("train_dice", "test_dice"):
            assert [s for s, _ in store.metric_history(uri, r.info.run_id, split)] == [best[0]]
            assert 0 <= r.data.metrics[split] <= 1
        assert c.list_artifacts(r.info.run_id, "predictions/val")
        assert store.load_json(uri, r.info.run_id, "val_per_subject_dice.json")


@in_workspace_store
def test_the_table_report_and_forecast_reach_the_parent_run(layer_sweep, workspace):
    w, c, parent, out = workspace, layer_sweep["client"], layer_sweep["parent"], layer_sweep["out"]
    table = Path(c.download_artifacts(parent, "results.md", str(w["tmp"]))).read_text()
    assert table.count("| models:/ixi_hippocampus/1") == 6 and "meanvar:" in table and "test_dice" in table
    description = c.get_run(parent).data.tags["mlflow.note.content"]  # the run's description in the UI
    assert table.strip() in description
    # the report's verdict: in the description and the terminal, the same words as atop the page
    said = re.search(r"\[tlcore\] verdict: (.+)", out).group(1)
    assert " leads on best validation Dice" in said and f"**Verdict**: {said}" in description
    # the report: named in the output, in the results folder and in the parent run
    page = w["tmp"] / "results" / "brats_layers" / "report" / "report.html"
    assert f"[tlcore] report: {page}" in out and page.read_text().count("data:image/png") >= 2
    assert page.parents[1].stat().st_mode & 0o777 == 0o700  # the sweep's folder: its user's alone
    assert "report/report.html" in {a.path for a in c.list_artifacts(parent, "report")}
    assert "overlays_test" in page.read_text()  # every trial has test predictions
    # the forecast before the trials, on the parent run, set against the result in the report
    assert re.search(r"transferability forecast \(\d+ s\): LogME .* minus .* k=0 [+-]\d\.\d{3}.*forecast best k=\d", out), out
    metrics = c.get_run(parent).data.metrics  # the source's score, its untrained baseline, the gain, Mean-Var's
    assert {f"forecast_{kind}.k{k}" for kind in ("logme", "baseline", "gain", "meanvar") for k in range(6)} <= set(metrics)
    assert all(metrics[f"forecast_gain.k{k}"] == pytest.approx(metrics[f"forecast_logme.k{k}"]
                                                               - metrics[f"forecast_baseline.k{k}"]) for k in range(6))
    assert "Which layers transfer" in page.read_text() and "Forecast against result" in page.read_text()
    assert html.escape(said) in page.read_text()


@in_workspace_store
def test_resuming_a_finished_layer_sweep_reruns_and_duplicates_nothing(layer_sweep, workspace):
    w, c, parent = workspace, layer_sweep["client"], layer_sweep["parent"]
    again = run_script("brats_layers.py", "--data-dir", str(w["data"] / "brats"), *w["common"], "--resume")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert len(c.search_runs([layer_sweep["experiment"].experiment_id], "tags.role = 'parent'")) == 1
    assert len(mlflow_child_runs(w["uri"], "brats_layers", parent)) == 8
    assert len(store.metric_history(w["uri"], parent, "forecast_logme.k3")) == 1  # not forecast again
    for r in layer_sweep["children"]:  # nor compared with scratch again, nor evaluated again
        assert len(store.metric_history(w["uri"], r.info.run_id, "cka_vs_scratch.res_1")) <= 1
        assert len(store.metric_history(w["uri"], r.info.run_id, "reinit_drop.res_1")) <= 1  # nor reset again
        assert len(store.metric_history(w["uri"], r.info.run_id, "train_dice")) == 1
        assert json.loads(r.data.tags["evaluation"])["dice"]["train"] == r.data.metrics["train_dice"]
    splits = json.loads((w["tmp"] / "results" / "brats_layers" / "splits.json").read_text())
    assert not set(splits["train"]) & set(splits["val"])


@pytest.mark.xdist_group("workspace_store")  # one store and one source model (conftest.source_model)
def test_optuna_search(workspace, source_model):
    w = workspace
    proc = run_script("brats_layers.py", "--data-dir", str(w["data"] / "brats"), *w["common"],
                     "--search", "optuna", "--num-samples", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    c = store.client(w["uri"])
    exp = c.get_experiment_by_name("brats_layers")
    newest = c.search_runs([exp.experiment_id], "tags.role = 'parent'", order_by=["attributes.start_time DESC"])[0]
    children = mlflow_child_runs(w["uri"], "brats_layers", newest.info.run_id)
    assert len(children) == 2
    assert len({r.data.params["lr"] for r in children}) == 2
    for r in children:
        assert r.data.params["lr_schedule"] in {"constant", "cosine", "poly", "one_cycle"}
        assert 1e-4 <= float(r.data.params["lr"]) <= 1e-2
        if r.data.params["source_model"] == "scratch":
            assert r.data.params["frozen_layers"] == "0"


@pytest.mark.xdist_group("workspace_store")  # one store and one source model (conftest.source_model)
def test_subsets_sweep(workspace, source_model):
    w = workspace
    proc = run_script("brats_subsets.py", "--data-dir", str(w["data"] / "brats"), *w["common"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    c = store.client(w["uri"])
    exp = c.get_experiment_by_name("brats_subsets")
    parent = c.search_runs([exp.experiment_id], "tags.role = 'parent'")[0].info.run_id
    children = mlflow_child_runs(w["uri"], "brats_subsets", parent)
    assert len(children) == 4  # scratch + k=1 x S1, S4 (one lr schedule in a smoke test)
    assert sorted({r.data.params["train_subset"] for r in children}) == ["S1", "S4"]
    survivors = [r for r in children if r.data.tags["stopped_early"] == "False"]
    assert survivors
    for r in children:  # every (model, subset) cell is evaluated, early-stopped or not
        assert 0 <= r.data.metrics["test_dice"] <= 1 and "train_dice" in r.data.metrics
        arts = {a.path for a in c.list_artifacts(r.info.run_id)}
        assert "test_per_subject_dice.json" in arts
    # test predictions as NIfTI on the input's grid
    import nibabel as nib

    preds = c.list_artifacts(survivors[0].info.run_id, "predictions/test")
    assert len(preds) == len(json.loads((w["tmp"] / "results" / "brats_subsets" / "splits.json").read_text())["test"])
    pred = nib.load(c.download_artifacts(survivors[0].info.run_id, preds[0].path, str(w["tmp"])))
    sid = Path(preds[0].path).name.replace("_pred.nii.gz", "")
    t1 = nib.load(next((w["data"] / "brats").glob(f"*/{sid}/{sid}_t1.nii.gz")))
    assert pred.shape == t1.shape and (pred.affine == t1.affine).all()
    splits = json.loads((w["tmp"] / "results" / "brats_subsets" / "splits.json").read_text())
    s = [set(splits["subsets"][f"S{k}"]) for k in range(1, 5)]
    assert s[0] < s[1] < s[2] < s[3] == set(splits["train"])
    table = Path(c.download_artifacts(parent, "results.md", str(w["tmp"]))).read_text()
    assert "test_dice" in table and table.count("S1 (") == 2
    report = w["tmp"] / "results" / "brats_subsets" / "report"
    assert "dice_by_subset" in (report / "report.html").read_text()
    drawn = {(r.split(",")[0], r.split(",")[1]) for r in (report / "dice_by_subset.csv").read_text().splitlines()[1:]}
    assert {sub for _, sub in drawn} == {r.data.params["train_subset"] for r in children}  # every subset
    assert len(drawn) == len({(r.data.params["frozen_layers"], r.data.params["train_subset"]) for r in children})


@pytest.mark.xdist_group("workspace_store")  # reads the source sweep's results folder
def test_sync_replays_a_sweep_into_a_store_that_lacks_it(workspace, source_model, tmp_path):
    """`tlcore.tracking.sync` writes runs and every step from Ray's files; a second run adds nothing."""
    from tlcore.tracking.sync import sync

    results = workspace["tmp"] / "results" / "ixi_source"
    uri = f"sqlite:///{tmp_path / 'copy.db'}"
    first = sync(results, uri)
    c = store.client(uri)
    exp = c.get_experiment_by_name("ixi_source")
    parents = c.search_runs([exp.experiment_id], "tags.role = 'parent'")
    assert len(parents) == 1
    children = mlflow_child_runs(uri, "ixi_source", parents[0].info.run_id)
    assert len(children) == len(list(results.glob("train_segmentation_trial_*"))) == 2
    for r in children:
        steps = reported_steps(next(results.glob(f"train_*_{r.data.tags['trial_id']}")))
        for key in ("train_loss", "val_loss", "val_dice"):
            assert dict(store.metric_history(uri, r.info.run_id, key)) == {
                s: pytest.approx(v[key]) for s, v in steps.items()}
        assert r.info.status == "FINISHED" and r.data.params["lr"] in ("0.001", "0.003")
        assert int(r.data.params["transfer.total_params"]) > 0
        assert r.data.tags["runtime.precision"] == "fp32" and r.data.tags["runtime.volumes_on"] == "cpu"
    assert all(row["metric_values_added"] > 0 for row in first)
    assert sum(row["metric_values_added"] for row in sync(results, uri)) == 0
    assert len(c.search_runs([exp.experiment_id], "")) == 3  # still one parent and two children
    # the command, into the sweep's own store: its callback had logged everything already
    original = subprocess.run([sys.executable, "-m", "tlcore.tracking.sync", str(results)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    assert original.returncode == 0 and "2 trial(s), 0 metric value(s) added" in original.stdout, original.stderr

"""End to end: ImageNet (a local weights file) -> MURA -> ChestX-ray14, real local Ray and SQLite MLflow."""

import os

import pytest
import torch
from helpers import mlflow_child_runs, run_script

from tlcore.data.synthetic import write_chestxray, write_mura
from tlcore.tracking import registry, store

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("chain2d")]  # one worker makes the chain once


@pytest.fixture(scope="session")  # module scope is rebuilt when the worker interleaves other modules
def chain(tmp_path_factory):
    from torchvision.models import densenet121

    tmp = tmp_path_factory.mktemp("chain2d")
    weights = tmp / "densenet121-a639ec97.pth"
    torch.save(densenet121().state_dict(), weights)  # stands in for the ImageNet file offline
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    common = ["--mlflow-uri", uri, "--storage-path", str(tmp / "results"), "--smoke-test"]
    mura = write_mura(tmp / "mura", n_patients=16, size=32)
    chest = write_chestxray(tmp / "chest", n_patients=30, size=32)
    # --scheduler none: nothing but the trial's own budget (the smoke profile's 2 epochs) ends it
    src = run_script("mura_source.py", "--data-dir", str(mura), "--source", str(weights), "--num-samples", "2",
              "--scheduler", "none", *common)
    assert src.returncode == 0, src.stdout[-3000:] + src.stderr[-3000:]
    return {"tmp": tmp, "uri": uri, "common": common, "weights": weights, "chest": chest, "mura_out": src.stdout}


def test_mura_source_registers_a_model_with_study_wise_results(chain):
    uri = chain["uri"]
    assert "MURA study-wise test accuracy" in chain["mura_out"] and "XR_" in chain["mura_out"]
    ref = registry.resolve_model(uri, "models:/mura_densenet121/latest")
    run = store.client(uri).get_run(ref.run_id)
    assert run.data.params["source_model"] == str(chain["weights"])
    assert int(run.data.params["transfer.loaded_tensors"]) > 300  # the ImageNet body
    assert (run.data.tags["runtime.device"], run.data.tags["runtime.layout"]) == ("cpu", "NCHW")
    assert 0 <= run.data.metrics["test_accuracy"] <= 1 and "test_kappa" in run.data.metrics
    arts = {a.path for a in store.client(uri).list_artifacts(ref.run_id)}
    assert {"confusion_matrix.png", "test_metrics.json", "test_accuracy_by_body_part.md", "model"} <= arts
    history = store.metric_history(uri, ref.run_id, "val_accuracy")
    assert [s for s, _ in history] == [1, 2]  # one report per epoch, max_iterations epochs
    page = (chain["tmp"] / "results" / "mura_source" / "report" / "report.html").read_text()
    assert "accuracy_by_body_part" in page and "training_steps" in page


def test_two_seeds_per_configuration_give_a_mean_over_seeds_run(chain):
    """--num-samples 2 on a grid of two learning rates: four trials, and per learning rate one
    MLflow run with the mean and spread over its two seeds."""
    uri = chain["uri"]
    parent = store.client(uri).get_run(registry.resolve_model(uri, "models:/mura_densenet121/latest").run_id)
    runs = mlflow_child_runs(uri, "mura_source", parent.data.tags["mlflow.parentRunId"])
    trials = [r for r in runs if "trial_id" in r.data.tags]
    aggregates = {r.data.params["lr"]: r for r in runs if r.data.tags.get("role") == "seed_aggregate"}
    assert sorted((r.data.params["lr"], r.data.params["seed"]) for r in trials) == [
        ("0.0001", "0"), ("0.0001", "1"), ("0.001", "0"), ("0.001", "1")]
    assert sorted(aggregates) == ["0.0001", "0.001"]
    for lr, agg in aggregates.items():
        members = [r for r in trials if r.data.params["lr"] == lr]
        assert agg.data.tags["seeds"] == "0,1" and agg.info.run_name.endswith("mean of 2 seeds")
        assert set(agg.data.tags["trial_runs"].split(",")) == {r.info.run_id for r in members}
        best = [max(v for _, v in store.metric_history(uri, r.info.run_id, "val_accuracy")) for r in members]
        assert agg.data.metrics["best_val_accuracy"] == pytest.approx(sum(best) / 2)
        assert agg.data.metrics["best_val_accuracy_max"] == pytest.approx(max(best))
    assert "2 run(s) 'mean of n seeds'" in chain["mura_out"]


def test_chestxray_transfer_compares_three_starting_points(chain):
    uri = chain["uri"]
    proc = run_script("chestxray_transfer.py", "--data-dir", str(chain["chest"]), "--imagenet", str(chain["weights"]),
               "--controls", "scratch,meanvar", *chain["common"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Steps to reach the training loss" in proc.stdout
    c = store.client(uri)
    exp = c.get_experiment_by_name("chestxray_transfer")
    parent = c.search_runs([exp.experiment_id], "tags.role = 'parent'")[0].info.run_id
    children = mlflow_child_runs(uri, "chestxray_transfer", parent)
    starts = sorted((r.data.params["source_model"], r.data.params["frozen_layers"]) for r in children)
    mura = registry.resolve_model(uri, "models:/mura_densenet121/latest")
    assert starts == sorted([("scratch", "0"), (f"meanvar:{mura.uri}", "0")]
                            + [(str(chain["weights"]), str(k)) for k in range(3)] + [(mura.uri, str(k)) for k in range(3)])
    for r in children:
        assert {"train_loss", "val_loss", "val_accuracy", "step"} <= set(r.data.metrics)
        # the three fastai groups: weight movement always, CKA with the source where there is one
        k, source = int(r.data.params["frozen_layers"]), r.data.params["source_model"]
        moved = [r.data.metrics[f"weight_change.{g}"] for g in ("body_1", "body_2", "head")]
        assert all(m == 0 for m in moved[:k]) and all(m > 0 for m in moved[k:]), (source, k, moved)
        if source != "scratch":
            cka = [r.data.metrics[f"cka.{g}"] for g in ("body_1", "body_2")]
            assert all(c == pytest.approx(1.0, abs=1e-6) for c in cka[:k]) and all(0 <= c <= 1 + 1e-6 for c in cka)
        if source.startswith("meanvar:"):
            assert int(r.data.params["transfer.sampled_tensors"]) > 100 and r.data.params["transfer.loaded_tensors"] == "0"
        if r.data.params["source_model"] == mura.uri:
            assert r.data.tags["source_run_id"] == mura.run_id       # lineage to the MURA run
    finished = [r for r in children if r.data.tags["stopped_early"] == "False"]
    assert finished and all({"test_accuracy", "test_auc", "test_sensitivity", "test_specificity"} <= set(r.data.metrics)
                            for r in finished)
    arts = {a.path for a in c.list_artifacts(parent)}
    assert {"results.md", "steps_to_target.md"} <= arts
    # the report: loss curves per starting point, the steps-to-reach table, lineage back to ImageNet
    page = (chain["tmp"] / "results" / "chestxray_transfer" / "report" / "report.html").read_text()
    assert "loss_curves" in page and "steps to target" in page and "roc_test" in page and "training_steps" in page
    steps = (chain["tmp"] / "results" / "chestxray_transfer" / "report" / "steps_to_target.csv").read_text()
    assert "scratch" in steps and str(mura.uri) in steps
    assert f"{chain['weights']} -&gt; {mura.uri}" in page


def test_offline_imagenet_fails_before_any_trial(chain, tmp_path):
    proc = run_script("mura_source.py", "--smoke-test", "--data-dir", str(chain["tmp"] / "mura"),
                      "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}", "--storage-path", str(tmp_path / "results"),
                      env={**os.environ, "TORCH_HOME": str(tmp_path / "torch")}, timeout=300)
    assert proc.returncode in (0, 2), proc.stderr[-3000:]
    if proc.returncode == 2:  # offline (as here): a clear error, and nothing written
        assert "weights='IMAGENET1K_V1'" in proc.stderr and "--source /path/to/" in proc.stderr
        assert not (tmp_path / "results").exists()
    else:  # a machine that can download the weights trains from them
        assert "registered models:/mura_densenet121/" in proc.stdout

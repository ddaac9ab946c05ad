"""End to end: the sweep scripts as a user runs them, with a real local Ray and SQLite MLflow."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (REPO, free_port, kill_ray_processes, processes_with_env, start_tracking_server,
                     stop_tracking_server, sweep_env)

from tlcore import tracking
SPEC_PARAMS = {"source_model", "frozen_layers", "train_subset", "lr", "lr_schedule", "seed"}
pytestmark = pytest.mark.slow


def store_with_untrained_source(tmp_path) -> str:
    """A fresh SQLite store with an untrained 3-class HighRes3DNet registered as the IXI source:
    tests of resuming and recovery need a source to transfer from, not a good one."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.prepare_store(uri)
    return register_untrained_source(uri, tmp_path)


def register_untrained_source(uri: str, tmp_path) -> str:
    """An untrained 3-class HighRes3DNet, registered as `ixi_hippocampus` in the store at `uri`."""
    from safetensors.torch import save_file

    from tlcore.models import build_model

    weights = tmp_path / "src"
    weights.mkdir()
    save_file(build_model(in_channels=2, num_classes=3).state_dict(), str(weights / "model.safetensors"))
    run = tracking.start_run(uri, "ixi_source", "untrained source")
    tracking.log_artifacts(uri, run, weights, "model")
    tracking.register_model(uri, "ixi_hippocampus", run)
    return uri


def wait_for_trial_runs(uri: str, ready, timeout: float) -> list:
    """Poll the brats_layers child runs until `ready(runs)`; fail the test on timeout."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(2)
        exp = tracking.client(uri).get_experiment_by_name("brats_layers")
        runs = tracking.client(uri).search_runs([exp.experiment_id], "tags.trial_id != ''") if exp else []
        if ready(runs):
            return runs
    pytest.fail("the sweep made no progress to interrupt")


def run_sweep(script, *args, timeout=600, env=None):
    env = sweep_env(env)
    proc = subprocess.run([sys.executable, str(REPO / "sweeps" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc


# Session-scoped (per xdist worker): a module-scoped fixture is built again whenever the worker
# interleaves another module's tests, and the source sweep behind `source_model` takes a minute.
@pytest.fixture(scope="session")
def workspace(tmp_path_factory, synthetic_root):
    tmp = tmp_path_factory.mktemp("sweeps")
    uri = f"sqlite:///{tmp / 'mlflow' / 'mlflow.db'}"
    common = ["--mlflow-uri", uri, "--storage-path", str(tmp / "results"), "--smoke-test"]
    return {"tmp": tmp, "uri": uri, "common": common, "data": synthetic_root}


@pytest.mark.xdist_group("workspace_store")  # one store, in this order (first: no source yet)
def test_missing_source_fails_before_any_trial(workspace):
    w = workspace
    proc = run_sweep("brats_layers.py", "--data-dir", str(w["data"] / "brats"), *w["common"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "models:/ixi_hippocampus/latest" in proc.stderr and "python sweeps/ixi_source.py" in proc.stderr
    assert not (w["tmp"] / "results" / "brats_layers").exists()  # nothing written, no trial started
    assert tracking.client(w["uri"]).get_experiment_by_name("brats_layers") is None


@pytest.fixture(scope="session")
def source_model(workspace):
    w = workspace
    src = run_sweep("ixi_source.py", "--data-dir", str(w["data"] / "ixi"), *w["common"])
    assert src.returncode == 0, src.stdout[-3000:] + src.stderr[-3000:]
    assert "registered models:/ixi_hippocampus/1" in src.stdout and "test_dice" in src.stdout
    # what the researcher reads: a line per trial report, no configuration dumps or Ray chatter
    out = src.stdout + src.stderr
    assert len(out.splitlines()) <= 80, out
    for chatter in ("Checkpoint successfully created", "params={", "Trial status:", "tensorboard", "data_dir"):
        assert chatter not in out, chatter
    assert len(re.findall(r"iteration \d+/\d+ +val_dice \d\.\d{3} \(best", out)) >= 2, out
    assert re.search(r"2/2 trials ended .* best val_dice", out), out
    return tracking.resolve_model(w["uri"], "models:/ixi_hippocampus/latest")


def test_more_gpus_than_the_cluster_has_fails_fast(workspace, tmp_path):
    w = workspace
    proc = run_sweep("ixi_source.py", "--data-dir", str(w["data"] / "ixi"), "--smoke-test",
                     "--gpus-per-trial", "1", "--storage-path", str(tmp_path / "results"),
                     "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}", timeout=120)
    assert proc.returncode == 2 and "--gpus-per-trial 1.0 but the Ray cluster has 0 GPUs" in proc.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.xdist_group("workspace_store")  # one store, in this order (first: no source yet)
def test_source_sweep_registers_weights_with_lineage(workspace, source_model):
    w, ref = workspace, source_model
    assert ref.version == "1"
    run = tracking.run_info(w["uri"], ref.run_id)
    assert run.data.tags["sweep"] == "ixi_source" and "test_dice" in run.data.metrics
    mv = tracking.client(w["uri"]).get_model_version("ixi_hippocampus", "1")
    assert mv.tags["source_run_id"] == ref.run_id
    folder = tracking.download_model(w["uri"], ref, w["tmp"] / "dl")
    assert (folder / "model.safetensors").stat().st_size > 3_000_000  # ~0.81 M float32 parameters
    assert json.loads((folder / "tlcore_model.json").read_text())["num_classes"] == 3


@pytest.mark.xdist_group("workspace_store")  # one store, in this order (first: no source yet)
def test_layer_sweep(workspace, source_model):
    w, ref = workspace, source_model

    proc = run_sweep("brats_layers.py", "--data-dir", str(w["data"] / "brats"), *w["common"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "brats_layers results" in proc.stdout and "mlflow ui --backend-store-uri" in proc.stdout

    c = tracking.client(w["uri"])
    exp = c.get_experiment_by_name("brats_layers")
    parents = c.search_runs([exp.experiment_id], "tags.role = 'parent'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    children = tracking.child_runs(w["uri"], "brats_layers", parent)
    assert len(children) == 7
    configs = sorted((r.data.params["source_model"], int(r.data.params["frozen_layers"])) for r in children)
    assert configs == sorted([("scratch", 0)] + [("models:/ixi_hippocampus/1", k) for k in range(6)])
    for r in children:
        assert SPEC_PARAMS <= set(r.data.params), set(r.data.params)
        assert r.data.tags["sweep"] == "brats_layers" and r.data.tags["trial_id"]
        assert r.info.status == "FINISHED"
        assert (r.data.tags["runtime.device"], r.data.tags["runtime.layout"]) == ("cpu", "auto: NCDHW on cpu")
        history = tracking.metric_history(w["uri"], r.info.run_id, "val_dice")
        assert len(history) >= 2 and [s for s, _ in history] == sorted({s for s, _ in history})
        assert {"train_loss", "val_loss", "val_dice"} <= set(r.data.metrics)
        if r.data.params["source_model"] != "scratch":
            assert r.data.tags["source_run_id"] == ref.run_id
            assert int(r.data.params["transfer.loaded_tensors"]) > 0
            assert r.data.params["transfer.reinitialised_tensors"] == "2"  # 3 IXI classes -> 2 BraTS: the conv head's weight and bias
    assert any(r.data.tags["stopped_early"] == "True" for r in children), "ASHA stopped nothing"
    assert any(r.data.tags["stopped_early"] == "False" for r in children)
    table = Path(c.download_artifacts(parent, "results.md", str(w["tmp"])))
    assert table.read_text().count("models:/ixi_hippocampus/1") == 6
    # the report: named in the output, in the results folder and in the parent run
    page = w["tmp"] / "results" / "brats_layers" / "report" / "report.html"
    assert f"[tlcore] report: {page}" in proc.stdout and page.read_text().count("data:image/png") >= 2
    assert "report/report.html" in {a.path for a in c.list_artifacts(parent, "report")}
    assert all(tracking.load_json(w["uri"], r.info.run_id, "val_per_subject_dice.json") for r in children)
    # every trial, early-stopped or not: whole-volume train / test Dice (thesis Table 6.2) at its best
    # checkpoint's iteration, and validation predictions for the overlays
    for r in children:
        best = max(tracking.metric_history(w["uri"], r.info.run_id, "val_dice"), key=lambda sv: (sv[1], -sv[0]))
        assert json.loads(r.data.tags["evaluation"])["best_iteration"] == best[0]
        for split in ("train_dice", "test_dice"):
            assert [s for s, _ in tracking.metric_history(w["uri"], r.info.run_id, split)] == [best[0]]
            assert 0 <= r.data.metrics[split] <= 1
        assert c.list_artifacts(r.info.run_id, "predictions/val")
    assert "overlays_test" in page.read_text() and "test_dice" in table.read_text()  # every trial has test predictions

    # --resume on a finished sweep re-runs nothing and duplicates no run
    again = run_sweep("brats_layers.py", "--data-dir", str(w["data"] / "brats"), *w["common"], "--resume")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert len(c.search_runs([exp.experiment_id], "tags.role = 'parent'")) == 1
    assert len(tracking.child_runs(w["uri"], "brats_layers", parent)) == 7
    for r in children:  # the same best checkpoints were not evaluated again
        assert len(tracking.metric_history(w["uri"], r.info.run_id, "train_dice")) == 1
        assert json.loads(r.data.tags["evaluation"])["dice"]["train"] == r.data.metrics["train_dice"]
    splits = json.loads((w["tmp"] / "results" / "brats_layers" / "splits.json").read_text())
    assert not set(splits["train"]) & set(splits["val"])


@pytest.mark.xdist_group("workspace_store")  # one store, in this order (first: no source yet)
def test_optuna_search(workspace, source_model):
    w = workspace
    proc = run_sweep("brats_layers.py", "--data-dir", str(w["data"] / "brats"), *w["common"],
                     "--search", "optuna", "--num-samples", "3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    c = tracking.client(w["uri"])
    exp = c.get_experiment_by_name("brats_layers")
    newest = c.search_runs([exp.experiment_id], "tags.role = 'parent'", order_by=["attributes.start_time DESC"])[0]
    children = tracking.child_runs(w["uri"], "brats_layers", newest.info.run_id)
    assert len(children) == 3
    assert len({r.data.params["lr"] for r in children}) == 3
    for r in children:
        assert r.data.params["lr_schedule"] in {"constant", "cosine", "poly", "one_cycle"}
        assert 1e-4 <= float(r.data.params["lr"]) <= 1e-2
        if r.data.params["source_model"] == "scratch":
            assert r.data.params["frozen_layers"] == "0"


@pytest.mark.xdist_group("ray_clusters")  # they start clusters that `--address auto` finds
def test_address_joins_a_running_ray_cluster(workspace, tmp_path):
    """`--address` with a cluster started by `ray start --head` (here: on this machine)."""
    w = workspace
    import tempfile

    ray_bin = str(Path(sys.executable).parent / "ray")
    port = "6391"
    ray_tmp = tempfile.mkdtemp(prefix="tlr", dir="/tmp")  # short: Ray's socket paths have a length limit
    # `auto` reads the address `ray start` leaves in $RAY_TMPDIR/ray, and failing that joins ANY Ray
    # running here, such as the private one of a sweep test in the other pytest worker. A user's
    # `ray start` writes to /tmp/ray; this test's to its own folder, which the sweep is told of.
    env = sweep_env(RAY_TMPDIR=ray_tmp)
    start = subprocess.run([ray_bin, "start", "--head", "--port", port, "--num-cpus", "2",
                            "--include-dashboard", "false", "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        proc = run_sweep("ixi_source.py", "--data-dir", str(w["data"] / "ixi"), "--smoke-test",
                         "--address", "auto", "--mlflow-uri", uri,
                         "--storage-path", str(tmp_path / "results"), "--max-iterations", "4", env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert re.search(rf"Connecting to existing Ray cluster at address: [\d.]+:{port}", proc.stdout + proc.stderr)
        assert tracking.resolve_model(uri, "models:/ixi_hippocampus/latest").version == "1"
    finally:
        kill_ray_processes(ray_tmp)


def test_unknown_stratum_key_stops_the_sweep_before_anything_is_written(workspace, tmp_path):
    db = tmp_path / "mlflow.db"
    proc = run_sweep("brats_subsets.py", "--data-dir", str(workspace["data"] / "brats"), "--smoke-test",
                     "--strata", "train_subset,subset_size", "--mlflow-uri", f"sqlite:///{db}",
                     "--storage-path", str(tmp_path / "results"), timeout=120)
    assert proc.returncode == 2
    assert "--strata train_subset,subset_size: ['subset_size'] are not run-config keys" in proc.stderr
    assert not db.exists() and not (tmp_path / "results").exists()


def test_broken_dataset_stops_the_sweep_before_anything_is_written(workspace, tmp_path):
    import shutil

    data = tmp_path / "brats"
    shutil.copytree(workspace["data"] / "brats", data)
    cases = sorted((data / "HGG").iterdir())
    (cases[0] / f"{cases[0].name}_t2.nii.gz").unlink()
    (cases[1] / f"{cases[1].name}_seg.nii.gz").write_bytes(b"\x1f\x8b garbage")
    db = tmp_path / "mlflow" / "mlflow.db"
    proc = run_sweep("brats_layers.py", "--data-dir", str(data), "--smoke-test", "--mlflow-uri", f"sqlite:///{db}",
                     "--storage-path", str(tmp_path / "results"), "--source", "models:/whatever/1", timeout=120)
    assert proc.returncode == 2
    assert f"{cases[0].name}_t2.nii.gz: file missing" in proc.stderr
    assert f"{cases[1].name}_seg.nii.gz: truncated or corrupt gzip" in proc.stderr
    assert "no trial was started" in proc.stderr
    assert not db.exists() and not (tmp_path / "results").exists()


@pytest.mark.xdist_group("workspace_store")  # one store, in this order (first: no source yet)
def test_subsets_sweep(workspace, source_model):
    w = workspace
    proc = run_sweep("brats_subsets.py", "--data-dir", str(w["data"] / "brats"), *w["common"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    c = tracking.client(w["uri"])
    exp = c.get_experiment_by_name("brats_subsets")
    parent = c.search_runs([exp.experiment_id], "tags.role = 'parent'")[0].info.run_id
    children = tracking.child_runs(w["uri"], "brats_subsets", parent)
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


@pytest.mark.xdist_group("ray_clusters")  # they start clusters that `--address auto` finds
def test_multi_node_run_refuses_a_local_storage_path_and_store(workspace, tmp_path):
    """Paths only this node can read: the checkpoints' folder, and a SQLite store (trials on other
    nodes would each create an empty database there and find no source model)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    db = tmp_path / "m.db"
    try:
        proc = run_sweep("ixi_source.py", "--data-dir", str(workspace["data"] / "ixi"), "--smoke-test",
                         "--address", cluster.address, "--storage-path", str(tmp_path / "results"),
                         "--mlflow-uri", f"sqlite:///{db}", timeout=180)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "has 2 nodes" in proc.stderr and "shared file system" in proc.stderr
        assert f"sqlite:///{db} is a file on this node's disk" in proc.stderr and "mlflow/server.sh" in proc.stderr
        assert not (tmp_path / "results").exists()  # no trial, no run: the checks come first
        assert tracking.client(f"sqlite:///{db}").get_experiment_by_name("ixi_source") is None
    finally:
        cluster.shutdown()


def test_driver_killed_mid_sweep_then_resumed(workspace, tmp_path):
    """SIGKILL the driver mid-sweep, rerun with --resume: one parent, one run per trial, no step twice."""
    import signal

    w = workspace
    uri = store_with_untrained_source(tmp_path)
    args = [sys.executable, str(REPO / "sweeps" / "brats_layers.py"), "--data-dir", str(w["data"] / "brats"),
            "--smoke-test", "--max-iterations", "16", "--report-every", "4", "--mlflow-uri", uri,
            "--storage-path", str(tmp_path / "results")]
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="tlr", dir="/tmp")
    env = sweep_env(RAY_TMPDIR=ray_tmp)
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        def finished_one_and_one_under_way(runs):
            steps = lambda r: len(tracking.metric_history(uri, r.info.run_id, "val_dice"))
            return (any(r.info.status == "FINISHED" for r in runs)
                    and any(r.info.status == "RUNNING" and steps(r) >= 2 for r in runs))

        runs = wait_for_trial_runs(uri, finished_one_and_one_under_way, timeout=300)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver ...
        proc.wait()
        kill_ray_processes(ray_tmp)           # ... and the local Ray it started, nothing else
    env.pop("RAY_TMPDIR")
    before = {r.data.tags["trial_id"]: tracking.metric_history(uri, r.info.run_id, "val_dice") for r in runs}

    resumed = subprocess.run(args + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("brats_layers")
    assert len(c.search_runs([exp.experiment_id], "tags.role = 'parent'")) == 1
    children = c.search_runs([exp.experiment_id], "tags.trial_id != ''")
    assert len(children) == 7 and len({r.data.tags["trial_id"] for r in children}) == 7
    for r in children:
        assert r.info.status == "FINISHED", (r.data.tags, r.info.status)
        steps = [s for s, _ in tracking.metric_history(uri, r.info.run_id, "val_dice")]
        assert steps == sorted(set(steps)), steps                      # no step logged twice
        old = [s for s, _ in before.get(r.data.tags["trial_id"], [])]
        assert steps[:len(old)] == old                                 # history before the kill kept
    for trial_dir in (tmp_path / "results" / "brats_layers").glob("train_segmentation_trial_*"):
        import json as _json
        its = [_json.loads(line)["iteration"] for line in (trial_dir / "result.json").read_text().splitlines()]
        assert its.count(4) <= 1, its                                  # interrupted trials did not restart from 0
    # the resumed sweep's report covers every trial, those finished before the kill included, once
    page = tmp_path / "results" / "brats_layers" / "report" / "report.html"
    assert f"[tlcore] report: {page}" in resumed.stdout
    parent = c.search_runs([exp.experiment_id], "tags.role = 'parent'")[0].info.run_id
    assert parent in page.read_text()
    with (page.parent / "summary.csv").open() as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 7 and all(r["seeds"] == "1" and int(r["iterations"]) > 0 for r in summary)
    with (page.parent / "per_subject_dice.csv").open() as f:
        val = [r for r in csv.DictReader(f) if r["split"] == "val"]
    assert len({r["configuration"] for r in val}) == 7
    assert len(val) == len({(r["configuration"], r["subject"]) for r in val})   # no subject twice
    with (page.parent / "curves.csv").open() as f:
        points = [(r["run"], r["metric"], r["step"]) for r in csv.DictReader(f)]
    assert len(points) == len(set(points))                                     # no step drawn twice


def test_unreachable_tracking_server_fails_fast(workspace, tmp_path):
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    t0 = time.time()
    proc = run_sweep("ixi_source.py", "--data-dir", str(workspace["data"] / "ixi"), "--smoke-test",
                     "--mlflow-uri", f"http://127.0.0.1:{port}", "--storage-path", str(tmp_path / "results"),
                     timeout=120)
    assert proc.returncode == 2 and f"MLflow tracking server http://127.0.0.1:{port} is not reachable" in proc.stderr
    assert time.time() - t0 < 60
    assert not (tmp_path / "results").exists()  # nothing that --resume could mistake for a sweep


@pytest.mark.xdist_group("ray_clusters")  # they start clusters that `--address auto` finds
def test_lost_worker_node_trials_resume_elsewhere(workspace, tmp_path):
    """A worker node removed mid-sweep: its trial continues from its checkpoint on the other node."""
    import json as _json
    import time

    from ray.cluster_utils import Cluster

    w = workspace
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    doomed = cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    env = sweep_env()
    args = [sys.executable, str(REPO / "sweeps" / "ixi_source.py"), "--data-dir", str(w["data"] / "ixi"),
            "--smoke-test", "--max-iterations", "16", "--report-every", "4", "--mlflow-uri", uri,
            "--storage-path", str(tmp_path / "results"), "--shared-storage", "--address", cluster.address,
            "--max-failures", "3"]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = tmp_path / "results" / "ixi_source"
    try:
        deadline = time.time() + 240  # both trials (one per node) have a checkpoint to resume from
        while time.time() < deadline and sum(1 for d in results.glob("train_*") if any(d.glob("checkpoint_*"))) < 2:
            time.sleep(0.5)
        cluster.remove_node(doomed, allow_graceful=False)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster.shutdown()
    assert proc.returncode == 0, out[-4000:]
    assert "Trial task failed" in out  # the node loss did hit a running trial ...
    exp = tracking.client(uri).get_experiment_by_name("ixi_source")
    children = tracking.client(uri).search_runs([exp.experiment_id], "tags.trial_id != ''")
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)  # ... which recovered
    for trial_dir in results.glob("train_segmentation_trial_*"):
        its = [_json.loads(line)["iteration"] for line in (trial_dir / "result.json").read_text().splitlines()]
        assert its.count(4) <= 1, its                    # resumed from a checkpoint, not from scratch
    for r in children:
        steps = [s for s, _ in tracking.metric_history(uri, r.info.run_id, "val_dice")]
        assert steps == sorted(set(steps))

def reported_steps(trial_dir: Path) -> dict[int, dict]:
    """Every result a trial reported, by iteration, from Ray's result.json."""
    rows = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]
    return {r["iteration"]: r for r in rows}


def test_a_sweep_logs_through_an_authenticated_server_and_records_no_password(workspace, tmp_path, monkeypatch):
    """The team path: basic-auth on, the password given in --mlflow-uri, trials on a Ray that was
    started without it (as every worker node is): they download the source model from the
    registry and the evaluation tasks log to their runs. Every trial logs; the password is in none
    of the output, the runs' params and tags, Tune's files, the artifacts or Ray's own logs."""
    import secrets
    import shutil
    import tempfile

    password, port = secrets.token_hex(8), free_port()
    (tmp_path / "server").mkdir()
    server = start_tracking_server(tmp_path / "server", port, admin_password=password)
    uri = f"http://127.0.0.1:{port}"
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths have a length limit
    # no MLflow credentials anywhere but in --mlflow-uri; Ray's logs go to ray_tmp, to search too
    env = sweep_env({k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")},
                    RAY_TMPDIR=str(ray_tmp))
    ray_port = free_port()
    started = subprocess.run([str(Path(sys.executable).parent / "ray"), "start", "--head", "--port", str(ray_port),
                              "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats"],
                             env=env, capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        with monkeypatch.context() as m:  # the source model, registered by someone with the password
            m.setenv("MLFLOW_TRACKING_USERNAME", "admin")
            m.setenv("MLFLOW_TRACKING_PASSWORD", password)
            register_untrained_source(uri, tmp_path)
        # two trials (Optuna with seed 1 picks the source model for both), each evaluated on 3 splits
        proc = run_sweep("brats_layers.py", "--data-dir", str(workspace["data"] / "brats"), "--smoke-test",
                         "--search", "optuna", "--num-samples", "2", "--seed", "1", "--max-iterations", "4",
                         "--mlflow-uri", f"http://admin:{password}@127.0.0.1:{port}",
                         "--address", f"127.0.0.1:{ray_port}", "--storage-path", str(tmp_path / "results"), env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert password not in proc.stdout + proc.stderr

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        c = tracking.client(uri)
        runs = c.search_runs([c.get_experiment_by_name("brats_layers").experiment_id])
        children = [r for r in runs if r.data.tags.get("trial_id")]
        assert len(children) == 2 and all(r.info.status == "FINISHED" and "test_dice" in r.data.metrics
                                          for r in children)
        assert any(r.data.params["source_model"].startswith("models:/") for r in children)  # a download
        for r in runs:
            assert password not in json.dumps([r.data.params, r.data.tags])
        assert any(ray_tmp.rglob("raylet.out"))  # Ray did log there
        leaked = [f for root in (tmp_path / "results", tmp_path / "server" / "artifacts", ray_tmp)
                  for f in root.rglob("*") if f.is_file() and not f.is_socket() and password.encode() in f.read_bytes()]
        assert not leaked, leaked
    finally:
        kill_ray_processes(str(ray_tmp))
        stop_tracking_server(server)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_tracking_server_restarted_mid_sweep_loses_no_metric(workspace, tmp_path):
    """The MLflow server dies mid-sweep and comes back: training goes on, every step reaches MLflow."""
    import time

    port = free_port()
    server = start_tracking_server(tmp_path, port)
    uri, results = f"http://127.0.0.1:{port}", tmp_path / "results" / "ixi_source"
    env = sweep_env()
    proc = subprocess.Popen([sys.executable, str(REPO / "sweeps" / "ixi_source.py"), "--data-dir",
                             str(workspace["data"] / "ixi"), "--smoke-test", "--max-iterations", "24",
                             "--report-every", "4", "--mlflow-uri", uri, "--storage-path", str(tmp_path / "results")],
                            cwd=REPO, env=env, stdout=(tmp_path / "sweep.log").open("w"), stderr=subprocess.STDOUT)
    log = lambda: (tmp_path / "sweep.log").read_text()[-4000:]
    # trials write a checkpoint with every report, at once (Ray's result.json lags behind)
    reported = lambda: len(list(results.glob("train_*/checkpoint_*")))
    try:
        deadline = time.time() + 240
        while reported() < 1 and time.time() < deadline:
            time.sleep(0.5)
        at_outage = reported()
        assert at_outage >= 1, "the sweep made no progress"
        stop_tracking_server(server)
        deadline = time.time() + 120
        while reported() < at_outage + 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert reported() >= at_outage + 3, f"training stopped while the server was down ({at_outage})\n{log()}"
        server = start_tracking_server(tmp_path, port)
        proc.wait(timeout=600)
        out = (tmp_path / "sweep.log").read_text()
        assert proc.returncode == 0, out[-4000:]
        assert "unreachable" in out and "reachable again" in out, out[-4000:]

        c = tracking.client(uri)
        exp = c.get_experiment_by_name("ixi_source")
        assert len(c.search_runs([exp.experiment_id], "tags.role = 'parent'")) == 1
        children = c.search_runs([exp.experiment_id], "tags.trial_id != ''")
        assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
        for r in children:
            steps = reported_steps(next(results.glob(f"train_*_{r.data.tags['trial_id']}")))
            for key in ("train_loss", "val_dice"):
                logged = dict(tracking.metric_history(uri, r.info.run_id, key))
                assert logged == {s: pytest.approx(v[key]) for s, v in steps.items()}, key
        synced = subprocess.run([sys.executable, "-m", "tlcore.sync", str(results)], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert synced.returncode == 0 and "0 metric value(s) added" in synced.stdout, synced.stdout + synced.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_tracking_server(server)


def test_store_down_as_a_sweep_ends_stops_it_clearly_and_resume_completes_it(workspace, tmp_path):
    """The MLflow server dies mid-sweep and is still down when the trials end: the sweep stops
    with exit 75 and what to do, no traceback. Back up, `--resume` trains nothing again, writes
    every step MLflow lacks, evaluates, registers the model and builds the report."""
    import time

    port = free_port()
    server = start_tracking_server(tmp_path, port)
    uri, results = f"http://127.0.0.1:{port}", tmp_path / "results" / "ixi_source"
    args = [sys.executable, str(REPO / "sweeps" / "ixi_source.py"), "--data-dir", str(workspace["data"] / "ixi"),
            "--smoke-test", "--max-iterations", "8", "--report-every", "4", "--mlflow-uri", uri,
            "--storage-path", str(tmp_path / "results")]
    env = sweep_env(TLCORE_MLFLOW_WAIT_S="3")
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=(tmp_path / "sweep.log").open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while not any(results.glob("train_*/checkpoint_*")) and time.time() < deadline:
            time.sleep(0.5)
        stop_tracking_server(server)
        proc.wait(timeout=600)
        out = (tmp_path / "sweep.log").read_text()
        assert proc.returncode == 75, out[-4000:]
        assert "stopped answering" in out and "rerun the same command with --resume" in out, out[-3000:]
        assert str(results) in out and "Traceback" not in out, out[-3000:]
        trials = sorted(results.glob("train_segmentation_trial_*"))
        before = {t.name: reported_steps(t) for t in trials}
        assert len(before) == 2 and all(max(steps) == 8 for steps in before.values())  # the trials did finish

        server = start_tracking_server(tmp_path, port)
        again = run_sweep("ixi_source.py", *args[2:], "--resume", env={**os.environ, "TLCORE_MLFLOW_WAIT_S": "3"})
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert {t.name: reported_steps(t) for t in trials} == before  # no trial trained again

        c = tracking.client(uri)
        exp = c.get_experiment_by_name("ixi_source")
        (parent,) = c.search_runs([exp.experiment_id], "tags.role = 'parent'")
        assert parent.info.status == "FINISHED"
        assert any(a.path == "report" for a in c.list_artifacts(parent.info.run_id))
        children = c.search_runs([exp.experiment_id], "tags.trial_id != ''")
        assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
        for r in children:
            steps = before[next(n for n in before if n.endswith(r.data.tags["trial_id"]))]
            assert dict(tracking.metric_history(uri, r.info.run_id, "val_dice")) == {
                s: pytest.approx(v["val_dice"]) for s, v in steps.items()}
        model = tracking.resolve_model(uri, "models:/ixi_hippocampus/latest")
        assert model.version == "1" and "test_dice" in c.get_run(model.run_id).data.metrics
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_tracking_server(server)


@pytest.mark.xdist_group("workspace_store")  # reads the source sweep's results folder
def test_sync_replays_a_sweep_into_a_store_that_lacks_it(workspace, source_model, tmp_path):
    """`tlcore.sync` writes runs and every step from Ray's files; a second run adds nothing."""
    from tlcore.sync import sync

    results = workspace["tmp"] / "results" / "ixi_source"
    uri = f"sqlite:///{tmp_path / 'copy.db'}"
    first = sync(results, uri)
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("ixi_source")
    parents = c.search_runs([exp.experiment_id], "tags.role = 'parent'")
    assert len(parents) == 1
    children = tracking.child_runs(uri, "ixi_source", parents[0].info.run_id)
    assert len(children) == len(list(results.glob("train_segmentation_trial_*"))) == 2
    for r in children:
        steps = reported_steps(next(results.glob(f"train_*_{r.data.tags['trial_id']}")))
        for key in ("train_loss", "val_loss", "val_dice"):
            assert dict(tracking.metric_history(uri, r.info.run_id, key)) == {
                s: pytest.approx(v[key]) for s, v in steps.items()}
        assert r.info.status == "FINISHED" and r.data.params["lr"] in ("0.001", "0.003")
        assert int(r.data.params["transfer.total_params"]) > 0
        assert r.data.tags["runtime.precision"] == "fp32" and r.data.tags["runtime.volumes_on"] == "cpu"
    assert all(row["metric_values_added"] > 0 for row in first)
    assert sum(row["metric_values_added"] for row in sync(results, uri)) == 0
    assert len(c.search_runs([exp.experiment_id], "")) == 3  # still one parent and two children
    # the command, into the sweep's own store: its callback had logged everything already
    original = subprocess.run([sys.executable, "-m", "tlcore.sync", str(results)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    assert original.returncode == 0 and "2 trial(s), 0 metric value(s) added" in original.stdout, original.stderr


def test_exhausted_retries_exit_non_zero_naming_the_failed_trial(workspace, tmp_path):
    """A trial's worker killed twice with --max-failures 1: the sweep ends, exits 2, names it."""
    import signal
    import time

    marker = f"TLCORE_TEST_RUN={tmp_path.name}"
    env = sweep_env(TLCORE_TEST_RUN=tmp_path.name)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.Popen([sys.executable, str(REPO / "sweeps" / "ixi_source.py"), "--data-dir",
                             str(workspace["data"] / "ixi"), "--smoke-test", "--max-iterations", "24",
                             "--report-every", "4", "--max-failures", "1", "--mlflow-uri", uri,
                             "--storage-path", str(tmp_path / "results")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim, killed = None, set()
    try:
        deadline = time.time() + 300
        while len(killed) < 2 and time.time() < deadline and proc.poll() is None:
            for pid, title, cwd in processes_with_env(marker):
                trial = Path(cwd).name  # Tune runs each trial in a working dir named after it
                if title.startswith("ray::ImplicitFunc") and trial.startswith("train_") and pid not in killed:
                    victim = victim or trial
                    if trial == victim and (Path(tmp_path / "results" / "ixi_source" / trial / "result.json")).exists():
                        os.kill(pid, signal.SIGKILL)
                        killed.add(pid)
            time.sleep(0.5)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(killed) == 2, f"could not kill trial {victim} twice"
    trial_id = victim.rsplit("_trial_", 1)[1]
    assert proc.returncode == 2, err[-3000:]
    assert "1 trial(s) failed after 1 retry" in err and f"trial {trial_id}" in err, err[-3000:]
    assert "--resume" in err
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("ixi_source")
    failed = c.search_runs([exp.experiment_id], f"tags.trial_id = '{trial_id}'")
    assert len(failed) == 1 and failed[0].info.status == "FAILED" and failed[0].data.tags["error_file"]
    parent = c.search_runs([exp.experiment_id], "tags.role = 'parent'")[0]
    assert parent.info.status == "FAILED" and parent.data.tags["errored_trials"] == "1"

"""Bad input stops a sweep before any trial starts, with an error that names the fix, and nothing
already written is touched."""

import pytest
from helpers import run_script

from tlcore.tracking import store

pytestmark = pytest.mark.slow


def test_missing_source_fails_before_any_trial(workspace, tmp_path):
    w, uri = workspace, f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_script("brats_layers.py", "--data-dir", str(w["data"] / "brats"), "--smoke-test",
                      "--mlflow-uri", uri, "--storage-path", str(tmp_path / "results"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "models:/ixi_hippocampus/latest" in proc.stderr and "python sweeps/ixi_source.py" in proc.stderr
    assert not (tmp_path / "results" / "brats_layers").exists()  # nothing written, no trial started
    assert store.client(uri).get_experiment_by_name("brats_layers") is None


def test_more_gpus_than_the_cluster_has_fails_fast(workspace, tmp_path):
    w = workspace
    proc = run_script("ixi_source.py", "--data-dir", str(w["data"] / "ixi"), "--smoke-test",
                     "--gpus-per-trial", "1", "--storage-path", str(tmp_path / "results"),
                     "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}", timeout=120)
    assert proc.returncode == 2 and "--gpus-per-trial 1.0 but the Ray cluster has 0 GPUs" in proc.stderr
    assert not (tmp_path / "results").exists()


def test_unknown_stratum_key_stops_the_sweep_before_anything_is_written(workspace, tmp_path):
    db = tmp_path / "mlflow.db"
    proc = run_script("brats_subsets.py", "--data-dir", str(workspace["data"] / "brats"), "--smoke-test",
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
    proc = run_script("brats_layers.py", "--data-dir", str(data), "--smoke-test", "--mlflow-uri", f"sqlite:///{db}",
                     "--storage-path", str(tmp_path / "results"), "--source", "models:/whatever/1", timeout=120)
    assert proc.returncode == 2
    assert f"{cases[0].name}_t2.nii.gz: file missing" in proc.stderr
    assert f"{cases[1].name}_seg.nii.gz: truncated or corrupt gzip" in proc.stderr
    assert "no trial was started" in proc.stderr
    assert not db.exists() and not (tmp_path / "results").exists()


@pytest.mark.xdist_group("ray_clusters")  # they start clusters that `--address auto` finds
def test_multi_node_run_refuses_a_local_storage_path_but_not_a_local_store(workspace, tmp_path):
    """The checkpoints' folder must be one every node can read; a SQLite store need not (the driver
    is the only MLflow client: trials get the source weights from it)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    db = tmp_path / "m.db"
    try:
        proc = run_script("ixi_source.py", "--data-dir", str(workspace["data"] / "ixi"), "--smoke-test",
                         "--address", cluster.address, "--storage-path", str(tmp_path / "results"),
                         "--mlflow-uri", f"sqlite:///{db}", timeout=180)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "has 2 nodes" in proc.stderr and "shared file system" in proc.stderr
        assert str(db) not in proc.stderr  # not a problem
        assert not (tmp_path / "results").exists()  # no trial, no run: the checks come first
        assert store.client(f"sqlite:///{db}").get_experiment_by_name("ixi_source") is None
    finally:
        cluster.shutdown()


def test_unreachable_tracking_server_fails_fast(workspace, tmp_path):
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    t0 = time.time()
    proc = run_script("ixi_source.py", "--data-dir", str(workspace["data"] / "ixi"), "--smoke-test",
                     "--mlflow-uri", f"http://127.0.0.1:{port}", "--storage-path", str(tmp_path / "results"),
                     timeout=120)
    assert proc.returncode == 2 and f"MLflow tracking server http://127.0.0.1:{port} is not reachable" in proc.stderr
    assert time.time() - t0 < 60
    assert not (tmp_path / "results").exists()  # nothing that --resume could mistake for a sweep

"""Bad input stops a sweep before any trial starts (most checks before Ray starts), with an error
that names the fix, and nothing already written is touched. The checks are called in-process as
the driver calls them (`preflight.prepare`, `resolve_source`); what only a real process shows (the
order against Ray, the cluster's resources) runs the sweep script."""

import json
import re
import time

import pytest
from helpers import run_script

import tlcore
from tlcore.sweep import flags, preflight
from tlcore.tracking import store


def parsed(dataset: str, *argv: str):
    return flags.sweep_parser("", source="models:/ixi_hippocampus/latest", dataset=dataset).parse_args(list(argv))


def refused(capsys, check, *args) -> str:
    """`check(*args)` ends the sweep with exit status 2; its one message."""
    with pytest.raises(SystemExit) as stop:
        check(*args)
    assert stop.value.code == 2
    return capsys.readouterr().err


@pytest.mark.slow
def test_missing_source_is_refused_before_ray_is_contacted(workspace, tmp_path):
    """The address is one nothing listens on: had the sweep started or joined Ray first, it would
    wait there; it names the missing model and how to make it instead."""
    w, uri = workspace, f"sqlite:///{tmp_path / 'mlflow.db'}"
    t0 = time.time()
    proc = run_script("brats_layers.py", "--data-dir", str(w["data"] / "brats"), "--smoke-test", "--address",
                      "127.0.0.1:1", "--mlflow-uri", uri, "--storage-path", str(tmp_path / "results"), timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "models:/ixi_hippocampus/latest" in proc.stderr and "python sweeps/ixi_source.py" in proc.stderr
    assert "Ray" not in proc.stderr and time.time() - t0 < 90
    assert not (tmp_path / "results" / "brats_layers").exists()  # nothing written, no trial started
    assert store.client(uri).get_experiment_by_name("brats_layers") is None


def test_a_missing_source_names_the_sweep_that_makes_it(synthetic_root, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = parsed("brats", "--data-dir", str(synthetic_root / "brats"), "--smoke-test", "--mlflow-uri", uri,
                  "--storage-path", str(tmp_path / "results"))
    sweep = preflight.prepare("brats_layers", "brats", args)
    err = refused(capsys, preflight.resolve_source, sweep, "models:/ixi_hippocampus/3", "python sweeps/ixi_source.py")
    assert "models:/ixi_hippocampus/3 is not available" in err and f"python sweeps/ixi_source.py --mlflow-uri {uri}" in err
    assert not (tmp_path / "results").exists()


def test_a_resume_of_a_sweep_another_tlcore_version_started_is_refused(synthetic_root, tmp_path, capsys):
    """Tune's saved state names tlcore's classes by module: 0.1's cannot be loaded by 0.2."""
    exp_dir = tmp_path / "results" / "ixi_source"
    exp_dir.mkdir(parents=True, mode=0o700)
    (exp_dir / "tlcore_sweep.json").write_text(json.dumps({"name": "ixi_source", "parent_run_id": "x"}))
    args = parsed("ixi", "--data-dir", str(synthetic_root / "ixi"), "--smoke-test", "--resume", "--mlflow-uri",
                  f"sqlite:///{tmp_path / 'm.db'}", "--storage-path", str(tmp_path / "results"))
    err = refused(capsys, preflight.prepare, "ixi_source", "ixi", args)
    assert f"was started by tlcore 0.1.0, whose saved Tune state this tlcore {tlcore.__version__} cannot load" in err
    assert len(err.strip().splitlines()) == 1
    # a sweep this version started resumes
    (exp_dir / "tlcore_sweep.json").write_text(json.dumps({
        "name": "ixi_source", "parent_run_id": "x", "splits_file": str(exp_dir / "splits.json"),
        "tlcore_version": tlcore.__version__}))
    fresh = preflight.prepare("ixi_source", "ixi", parsed("ixi", "--data-dir", str(synthetic_root / "ixi"), "--smoke-test",
                                                       "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}",
                                                       "--storage-path", str(tmp_path / "results"), "--seed", "1"))
    from tlcore.data.splits import write_splits
    write_splits(exp_dir / "splits.json", fresh.splits)
    assert preflight.prepare("ixi_source", "ixi", args).previous["parent_run_id"] == "x"


@pytest.mark.slow
def test_more_gpus_than_the_cluster_has_fails_fast(workspace, tmp_path):
    w = workspace
    proc = run_script("ixi_source.py", "--data-dir", str(w["data"] / "ixi"), "--smoke-test",
                     "--gpus-per-trial", "1", "--storage-path", str(tmp_path / "results"),
                     "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}", timeout=120)
    assert proc.returncode == 2 and "--gpus-per-trial 1.0 but the Ray cluster has 0 GPUs" in proc.stderr
    assert not (tmp_path / "results").exists()


def test_unknown_stratum_key_stops_the_sweep_before_anything_is_written(synthetic_root, tmp_path, capsys):
    db = tmp_path / "mlflow.db"
    args = parsed("brats", "--data-dir", str(synthetic_root / "brats"), "--smoke-test", "--strata",
                  "train_subset,subset_size", "--mlflow-uri", f"sqlite:///{db}", "--storage-path", str(tmp_path / "results"))
    err = refused(capsys, preflight.prepare, "brats_subsets", "brats", args)
    assert "--strata train_subset,subset_size: ['subset_size'] are not run-config keys" in err
    assert not db.exists() and not (tmp_path / "results").exists()


def test_broken_dataset_stops_the_sweep_before_anything_is_written(synthetic_root, tmp_path, capsys):
    import shutil

    data = tmp_path / "brats"
    shutil.copytree(synthetic_root / "brats", data)
    cases = sorted((data / "HGG").iterdir())
    (cases[0] / f"{cases[0].name}_t2.nii.gz").unlink()
    (cases[1] / f"{cases[1].name}_seg.nii.gz").write_bytes(b"\x1f\x8b garbage")
    db = tmp_path / "mlflow" / "mlflow.db"
    args = parsed("brats", "--data-dir", str(data), "--smoke-test", "--mlflow-uri", f"sqlite:///{db}",
                  "--storage-path", str(tmp_path / "results"), "--source", "models:/whatever/1")
    err = refused(capsys, preflight.prepare, "brats_layers", "brats", args)
    assert f"{cases[0].name}_t2.nii.gz: file missing" in err
    assert f"{cases[1].name}_seg.nii.gz: truncated or corrupt gzip" in err
    assert "no trial was started" in err
    assert not db.exists() and not (tmp_path / "results").exists()


@pytest.mark.slow
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


def test_unreachable_tracking_server_fails_fast(synthetic_root, tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    t0 = time.time()
    args = parsed("ixi", "--data-dir", str(synthetic_root / "ixi"), "--smoke-test", "--mlflow-uri",
                  f"http://127.0.0.1:{port}", "--storage-path", str(tmp_path / "results"))
    err = refused(capsys, preflight.prepare, "ixi_source", "ixi", args)
    assert f"MLflow tracking server http://127.0.0.1:{port} is not reachable" in err
    assert time.time() - t0 < 30
    assert not (tmp_path / "results").exists()  # nothing that --resume could mistake for a sweep


def test_a_mistyped_flag_ends_the_script_at_once_and_touches_nothing(tmp_path):
    """As a user meets it: the real script, an earlier sweep's results in --storage-path."""
    earlier = tmp_path / "results" / "brats_layers"
    earlier.mkdir(parents=True)
    (earlier / "tlcore_sweep.json").write_text("{}")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for argv in (["--frozen-layers", "7"], ["--num-samples", "0"]):
        t0 = time.time()
        proc = run_script("brats_layers.py", *argv, "--mlflow-uri", uri, "--storage-path", str(tmp_path / "results"),
                          timeout=60)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.startswith("[tlcore] error: argument " + argv[0]) and time.time() - t0 < 20, proc.stderr
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["brats_layers"]  # not moved aside
    assert [p.name for p in earlier.iterdir()] == ["tlcore_sweep.json"] and not (tmp_path / "mlflow.db").exists()


def test_an_address_nothing_answers_is_refused_in_seconds():
    """ray.init would retry such an address for minutes; a listening port passes."""
    import socket

    from helpers import free_port

    from tlcore.sweep.cluster import ClusterMismatch, check_address_answers

    dead = f"127.0.0.1:{free_port()}"
    for address, says in ((dead, "nothing answers there (connection refused"), (f"ray://{dead}", "nothing answers"),
                          ("10.0.0.5", "give auto (the Ray cluster this machine belongs to) or host:port")):
        t0 = time.time()
        with pytest.raises(ClusterMismatch, match=re.escape(says)):
            check_address_answers(address)
        assert time.time() - t0 < 3
    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen()
        check_address_answers(f"127.0.0.1:{head.getsockname()[1]}")
    check_address_answers("auto")  # Ray's own lookup, which fails at once when no cluster runs


@pytest.mark.slow
def test_a_dead_address_ends_the_sweep_before_anything_is_written(synthetic_root, tmp_path):
    """As a user meets it, with the source model present (it is checked first): under 20 s, one line."""
    from helpers import free_port, store_with_untrained_source

    uri = store_with_untrained_source(tmp_path)
    t0 = time.time()
    proc = run_script("brats_layers.py", "--data-dir", str(synthetic_root / "brats"), "--smoke-test", "--address",
                      f"127.0.0.1:{free_port()}", "--mlflow-uri", uri, "--storage-path", str(tmp_path / "results"),
                      timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "nothing answers there" in proc.stderr and time.time() - t0 < 20, proc.stderr
    assert not (tmp_path / "results" / "brats_layers").exists()
    assert store.client(uri).get_experiment_by_name("brats_layers") is None  # no parent run

"""Sweeps that lose something midway (the driver, a worker node, the tracking server, a trial's
retries) and what they keep. (The sweep through the authenticated team server, on a Ray whose
workers hold no MLflow credentials, runs on a cluster `ray up` launched: tests/cluster/test_ray_up.py.)"""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    REPO,
    free_port,
    kill_ray_processes,
    make_certificates,
    processes_with_env,
    reported_steps,
    start_tracking_server,
    stop_tracking_server,
    store_with_untrained_source,
    sweep_env,
    wait_for_trial_runs,
)

from tlcore.tracking import registry, store

pytestmark = pytest.mark.slow


def test_driver_killed_mid_sweep_then_resumed(workspace, tmp_path):
    """SIGKILL the driver while two trials wait at an asha-sync rung for the third, rerun with
    --resume: the rung is rebuilt and decided as without the kill (one of three goes on), one
    parent, one run per trial, no step twice, a step MLflow lost written back."""
    import signal

    w = workspace
    uri = store_with_untrained_source(tmp_path)
    args = [sys.executable, str(REPO / "sweeps" / "brats_layers.py"), "--data-dir", str(w["data"] / "brats"),
            "--smoke-test", "--max-iterations", "16", "--report-every", "4", "--mlflow-uri", uri,
            "--frozen-layers", "0,1", "--controls", "scratch",  # three trials: enough to be killed between
            "--scheduler", "asha-sync",  # one rung, at report 2: ceil(3/3) = 1 trial goes on
            "--storage-path", str(tmp_path / "results")]
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="tlr", dir="/tmp")
    env = sweep_env(RAY_TMPDIR=ray_tmp)
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        def two_waiting_at_the_rung(runs):
            steps = {r.info.run_id: len(store.metric_history(uri, r.info.run_id, "val_dice")) for r in runs}
            waiting = sum(r.info.status == "RUNNING" and steps[r.info.run_id] >= 2 for r in runs)
            # the aim; should the third trial reach the rung between two polls, the rung has
            # decided and the survivor runs on: killing it then still tests a resume mid-sweep
            decided = any(r.info.status == "FINISHED" for r in runs) and waiting == 1
            return waiting == 2 or decided

        runs = wait_for_trial_runs(uri, two_waiting_at_the_rung, timeout=300)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver ...
        proc.wait()
        kill_ray_processes(ray_tmp)           # ... and the local Ray it started, nothing else
    env.pop("RAY_TMPDIR")
    before = {r.data.tags["trial_id"]: store.metric_history(uri, r.info.run_id, "val_dice") for r in runs}
    # A record the store lost or refused (as a dying server may): Ray's result files still hold it,
    # and the resumed sweep writes it back.
    import sqlite3

    lost = next(r for r in runs if len(before[r.data.tags["trial_id"]]) >= 2)
    with sqlite3.connect(store.local_store_path(uri)) as db:
        assert db.execute("DELETE FROM metrics WHERE run_uuid = ? AND key = 'val_dice' AND step = 4",
                          (lost.info.run_id,)).rowcount == 1

    resumed = subprocess.run(args + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    c = store.client(uri)
    exp = c.get_experiment_by_name("brats_layers")
    assert len(c.search_runs([exp.experiment_id], "tags.role = 'parent'")) == 1
    children = c.search_runs([exp.experiment_id], "tags.trial_id != ''")
    assert len(children) == 3 and len({r.data.tags["trial_id"] for r in children}) == 3
    for r in children:
        assert r.info.status == "FINISHED", (r.data.tags, r.info.status)
        steps = [s for s, _ in store.metric_history(uri, r.info.run_id, "val_dice")]
        assert steps == sorted(set(steps)), steps                      # no step logged twice
        old = [s for s, _ in before.get(r.data.tags["trial_id"], [])]
        assert steps[:len(old)] == old                                 # history before the kill kept
        trial_dir, = (tmp_path / "results" / "brats_layers").glob(f"train_*_{r.data.tags['trial_id']}")
        assert steps == sorted(reported_steps(trial_dir)), r.data.tags  # every reported step, the lost one too
    for trial_dir in (tmp_path / "results" / "brats_layers").glob("train_segmentation_trial_*"):
        import json as _json
        its = [_json.loads(line)["iteration"] for line in (trial_dir / "result.json").read_text().splitlines()]
        assert its.count(4) <= 1, its                                  # interrupted trials did not restart from 0
    went_on = [d for d in (tmp_path / "results" / "brats_layers").glob("train_segmentation_trial_*")
               if max(reported_steps(d)) == 16]
    assert len(went_on) == 1, "the resumed rung kept ceil(3/3) = 1 trial"
    # the resumed sweep's report covers every trial, those finished before the kill included, once
    page = tmp_path / "results" / "brats_layers" / "report" / "report.html"
    assert f"[tlcore] report: {page}" in resumed.stdout
    parent = c.search_runs([exp.experiment_id], "tags.role = 'parent'")[0].info.run_id
    assert parent in page.read_text()
    with (page.parent / "summary.csv").open() as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 3 and all(r["seeds"] == "1" and int(r["iterations"]) > 0 for r in summary)
    with (page.parent / "per_subject_dice.csv").open() as f:
        val = [r for r in csv.DictReader(f) if r["split"] == "val"]
    assert len({r["configuration"] for r in val}) == 3
    assert len(val) == len({(r["configuration"], r["subject"]) for r in val})   # no subject twice
    with (page.parent / "curves.csv").open() as f:
        points = [(r["run"], r["metric"], r["step"]) for r in csv.DictReader(f)]
    assert len(points) == len(set(points))                                     # no step drawn twice


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
    exp = store.client(uri).get_experiment_by_name("ixi_source")
    children = store.client(uri).search_runs([exp.experiment_id], "tags.trial_id != ''")
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)  # ... which recovered
    for trial_dir in results.glob("train_segmentation_trial_*"):
        its = [_json.loads(line)["iteration"] for line in (trial_dir / "result.json").read_text().splitlines()]
        assert its.count(4) <= 1, its                    # resumed from a checkpoint, not from scratch
    for r in children:
        steps = [s for s, _ in store.metric_history(uri, r.info.run_id, "val_dice")]
        assert steps == sorted(set(steps))


def test_tracking_server_lost_mid_sweep_stops_it_clearly_and_resume_completes_it(workspace, tmp_path, monkeypatch):
    """The MLflow server dies mid-sweep and is still down when the trials end: training goes on to
    the end, the sweep stops with exit 75 and what to do, no traceback. Back up, `--resume` trains
    nothing again, writes every step MLflow lacks, evaluates, registers the model and builds the
    report; a replay then finds nothing missing. (A store that comes back mid-sweep is written by
    the running sweep itself: tests/sweep/test_callbacks_mlflow.py.)
    The server is the team's as shipped: HTTPS (cluster/tls_certs.sh), basic-auth with
    default_permission NO_PERMISSIONS; the sweep runs as an account the accounts tool made, with
    EDIT on its experiment and model only, trusting the server's CA through MLFLOW_TRACKING_SERVER_CERT_PATH."""
    import secrets
    import time

    port, admin, sweeper = free_port(), secrets.token_hex(8), secrets.token_hex(8)
    tls = make_certificates(tmp_path / "tls", "server")
    start = lambda: start_tracking_server(tmp_path, port, admin_password=admin, tls=tls,
                                          default_permission="NO_PERMISSIONS")
    server = start()
    uri, results = f"https://127.0.0.1:{port}", tmp_path / "results" / "ixi_source"
    for k, v in {"MLFLOW_TRACKING_SERVER_CERT_PATH": str(tls / "ca.crt"), "MLFLOW_TRACKING_USERNAME": "admin",
                 "MLFLOW_TRACKING_PASSWORD": admin}.items():
        monkeypatch.setenv(k, v)  # this test's own reads, as the admin
    for argv, stdin in ((["add", "sweeper"], sweeper + "\n"),
                        (["grant", "sweeper", "EDIT", "--experiment", "ixi_source", "--model", "ixi_hippocampus"], None)):
        done = subprocess.run([sys.executable, "-m", "tlcore.tracking.accounts", *argv, "--mlflow-uri", uri], input=stdin,
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    env = sweep_env(MLFLOW_TRACKING_USERNAME="sweeper", MLFLOW_TRACKING_PASSWORD=sweeper, TLCORE_MLFLOW_WAIT_S="3")
    args = [sys.executable, str(REPO / "sweeps" / "ixi_source.py"), "--data-dir", str(workspace["data"] / "ixi"),
            "--smoke-test", "--scheduler", "none", "--mlflow-uri", uri, "--storage-path", str(tmp_path / "results")]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=(tmp_path / "sweep.log").open("w"), stderr=subprocess.STDOUT)
    # trials write a checkpoint with every report, at once (Ray's result.json lags behind)
    checkpoints = lambda: len(list(results.glob("train_*/checkpoint_*")))
    try:
        deadline = time.time() + 240
        while checkpoints() < 1 and time.time() < deadline:
            time.sleep(0.5)
        at_outage = checkpoints()
        assert at_outage >= 1, "the sweep made no progress"
        stop_tracking_server(server)
        proc.wait(timeout=600)
        out = (tmp_path / "sweep.log").read_text()
        assert proc.returncode == 75, out[-4000:]
        assert "unreachable" in out and "training goes on" in out, out[-4000:]
        assert "stopped answering" in out and "rerun the same command with --resume" in out, out[-3000:]
        assert str(results) in out and "Traceback" not in out and sweeper not in out, out[-3000:]
        trials = sorted(results.glob("train_segmentation_trial_*"))
        before = {t.name: reported_steps(t) for t in trials}
        assert len(before) == 2 and all(max(steps) == 12 for steps in before.values())  # the trials did finish
        assert sum(len(steps) for steps in before.values()) > at_outage  # ... training on through the outage

        server = start()
        again = subprocess.run(args + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert {t.name: reported_steps(t) for t in trials} == before  # no trial trained again

        c = store.client(uri)
        exp = c.get_experiment_by_name("ixi_source")
        (parent,) = c.search_runs([exp.experiment_id], "tags.role = 'parent'")
        assert parent.info.status == "FINISHED"
        assert any(a.path == "report" for a in c.list_artifacts(parent.info.run_id))
        children = c.search_runs([exp.experiment_id], "tags.trial_id != ''")
        assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
        for r in children:
            steps = before[next(n for n in before if n.endswith(r.data.tags["trial_id"]))]
            for key in ("train_loss", "val_dice"):
                assert dict(store.metric_history(uri, r.info.run_id, key)) == {
                    s: pytest.approx(v[key]) for s, v in steps.items()}, key
        model = registry.resolve_model(uri, "models:/ixi_hippocampus/latest")
        assert model.version == "1" and "test_dice" in c.get_run(model.run_id).data.metrics
        synced = subprocess.run([sys.executable, "-m", "tlcore.tracking.sync", str(results)], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert synced.returncode == 0 and "0 metric value(s) added" in synced.stdout, synced.stdout + synced.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_tracking_server(server)


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
    c = store.client(uri)
    exp = c.get_experiment_by_name("ixi_source")
    failed = c.search_runs([exp.experiment_id], f"tags.trial_id = '{trial_id}'")
    assert len(failed) == 1 and failed[0].info.status == "FAILED" and failed[0].data.tags["error_file"]
    parent = c.search_runs([exp.experiment_id], "tags.role = 'parent'")[0]
    assert parent.info.status == "FAILED" and parent.data.tags["errored_trials"] == "1"

"""No secret leaves the driver: a password in --mlflow-uri is refused by every entry point before
anything runs, and tlcore's private local Ray listens on 127.0.0.1 only, keeps its token to its
user, and gives its processes (so every worker) no MLflow credential. The team path across two
hosts (worker environments, Ray's key-value store and logs) is in tests/cluster/test_ray_up.py.
"""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from helpers import REPO, listening_sockets, processes_with_env

PASSWORD = "pw-" + os.urandom(6).hex()


def test_a_password_in_mlflow_uri_is_refused_by_sweep_report_lineage_and_sync(tmp_path):
    uri = f"http://alice:{PASSWORD}@127.0.0.1:5000"
    storage = tmp_path / "results"
    commands = {"sweep": ["sweeps/brats_layers.py", "--storage-path", str(storage)],
                "report": ["-m", "tlcore.report.page", "brats_layers", "--out", str(tmp_path / "report")],
                "lineage": ["-m", "tlcore.tracking.lineage", "models:/ixi_hippocampus/1"],
                "sync": ["-m", "tlcore.tracking.sync", str(storage / "brats_layers")]}
    started = time.time()
    procs = {name: subprocess.Popen([sys.executable, *argv, "--mlflow-uri", uri], cwd=REPO, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, argv in commands.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, out, err)
        assert "MLFLOW_TRACKING_PASSWORD" in err and "read -rs" in err and "alice:***@" in err, (name, err)
        assert PASSWORD not in out + err, name
    print(f"4 entry points refused in {time.time() - started:.1f} s (in parallel)")
    assert not storage.exists() and not (tmp_path / "report").exists()  # nothing written


PROBE = textwrap.dedent('''
    import json, os, sys, argparse
    from tlcore.sweep.cluster import connect
    import ray
    sys.path.insert(0, sys.argv[1])
    from gcs_kv_search import search

    args = argparse.Namespace(address=None, deterministic=False, gpus_per_trial=0, cpus_per_trial=1,
                              autoscale=False, shared_storage=False, storage_path=sys.argv[2], mlflow_uri=None)
    connect(args)
    secret = os.environ["MLFLOW_TRACKING_PASSWORD"]
    in_task = ray.get(ray.remote(lambda: os.environ.get("MLFLOW_TRACKING_PASSWORD")).remote())
    print(json.dumps({"task_sees": in_task, "driver_keeps": secret == os.environ.get("MLFLOW_TRACKING_PASSWORD"),
                      "node_ip": ray.nodes()[0]["NodeManagerAddress"], "kv": search(secret.encode())[1],
                      "switch_left_on": os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}), flush=True)
    sys.stdin.readline()  # the test looks at the processes meanwhile
    ray.shutdown()
''')


def listening_addresses(pids: set[int]) -> set[str]:
    """The local addresses of the TCP sockets `pids` listen on (from /proc/net/tcp and tcp6)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            pass
    return {address for address, _, inode in listening_sockets() if inode in inodes}


LOOPBACK = {"127.0.0.1", "0000:0000:0000:0000:0000:ffff:7f00:0001", "0000:0000:0000:0000:0000:0000:0000:0001"}


def test_private_local_ray_is_loopback_only_with_a_private_token_and_no_credentials(tmp_path):
    marker = "TLCORE_PROBE_" + os.urandom(4).hex()
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(HOME=str(home), MLFLOW_TRACKING_USERNAME="alice", MLFLOW_TRACKING_PASSWORD=PASSWORD, **{marker: "1"})
    proc = subprocess.Popen([sys.executable, "-c", PROBE, str(REPO / "tests"), str(tmp_path)], cwd=REPO, env=env,
                            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:] if proc.poll() is not None else "no output"
        seen = json.loads(line)
        assert seen["task_sees"] is None and seen["driver_keeps"] and seen["kv"] == []
        assert seen["node_ip"] == "127.0.0.1"
        # the single-machine switch is not left in the driver's environment: a `ray start` or
        # `sbatch` it (or a test process) runs later would refuse to join a multi-node cluster
        assert seen["switch_left_on"] is None
        ray_processes = {pid for pid, title, _ in processes_with_env(marker) if pid != proc.pid}
        assert len(ray_processes) >= 3  # GCS, raylet, a worker
        holding = [title for pid, title, _ in processes_with_env(PASSWORD) if pid in ray_processes]
        assert not holding, holding
        listening = listening_addresses(ray_processes | {proc.pid})
        assert listening and listening <= LOOPBACK, listening
        token = home / ".ray" / "auth_token"  # token authentication on (Ray's default), made by tlcore
        assert token.stat().st_mode & 0o777 == 0o600 and token.parent.stat().st_mode & 0o777 == 0o700
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_resume_refuses_a_sweep_folder_someone_else_could_have_written(workspace, tmp_path):
    """--resume unpickles Tune's state (tuner.pkl): a folder or state file writable by others, or a
    link, is refused before Ray starts, naming it and the fix; nothing in it is touched."""
    storage = tmp_path / "results"
    exp_dir = storage / "brats_layers"
    exp_dir.mkdir(parents=True)
    (exp_dir / "tuner.pkl").write_bytes(b"not loaded")
    argv = [sys.executable, str(REPO / "sweeps" / "brats_layers.py"), "--resume", "--smoke-test", "--data-dir",
            str(workspace["data"] / "brats"), "--storage-path", str(storage), "--mlflow-uri", workspace["uri"]]
    for make_unsafe, said in ((lambda: exp_dir.chmod(0o777), f"{exp_dir} is writable by others"),
                              (lambda: (exp_dir.chmod(0o700), (exp_dir / "tuner.pkl").chmod(0o664)),
                               f"{exp_dir / 'tuner.pkl'} is writable by its group")):
        make_unsafe()
        refused = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=180)
        assert refused.returncode == 2 and said in refused.stderr and "chmod -R go-w" in refused.stderr, refused.stderr
        assert "Started a local Ray" not in refused.stdout + refused.stderr
    assert sorted(p.name for p in exp_dir.iterdir()) == ["tuner.pkl"]

"""cluster/slurm/tlcore.sbatch through a real Slurm made on this machine (tests/slurm_cluster.py:
munged, slurmctld, two slurmd nodes in network namespaces) and the team MLflow server path.

One job is cancelled mid-sweep and the same sbatch resubmitted: the first job starts a new sweep,
the second resumes it and completes it, so both of the script's paths run in one test (a tiny
sweep: three trials of 4 iterations on two 1-CPU nodes). Skips where Slurm cannot run here."""

import json
import os
import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import REPO, SWEEP_VOLUME, register_untrained_source
from slurm_cluster import SlurmCluster, SlurmUnavailable, missing, ray_processes

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

SBATCH = REPO / "cluster" / "slurm" / "tlcore.sbatch"
TRIALS = 3  # --frozen-layers 0,1 --controls scratch: two trials at a time on two 1-CPU nodes, then one
ITERATIONS = 4  # one report (and checkpoint) per trial


@pytest.fixture()
def slurm(tmp_path):
    why = missing()
    if why:
        pytest.skip(why)
    cluster = SlurmCluster(tmp_path / "slurm")
    try:
        try:
            cluster.start()
        except SlurmUnavailable as e:
            pytest.skip(f"Slurm does not run on this machine: {e}")
        yield cluster
    finally:
        cluster.close()
    assert not cluster.leftover, cluster.leftover


def trial_states(exp_dir: Path) -> dict[str, str]:
    """trial id -> status, as Tune last saved its experiment state (what a restore starts from)."""
    for f in sorted(exp_dir.glob("experiment_state-*.json"), reverse=True):
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):  # being rewritten
            return {}
        return {t["trial_id"]: t["status"] for t in (json.loads(s) for s, _ in data["trial_data"])}
    return {}


def iterations(exp_dir: Path, trial_id: str) -> list[int]:
    (d,) = exp_dir.glob(f"train_*_{trial_id}")
    return [json.loads(line)["iteration"] for line in (d / "result.json").read_text().splitlines() if line.strip()]


def test_sbatch_runs_a_sweep_on_two_nodes_and_a_cancelled_job_resubmitted_resumes_it(slurm, tmp_path):
    t0 = time.time()
    password = secrets.token_hex(8)
    out = tmp_path / "out"
    out.mkdir()
    home, storage = tmp_path / "home", tmp_path / "storage"
    # the team MLflow server, where both nodes reach it. Without basic-auth: it checks the password
    # hash at every request (~1 s of CPU each on this 2-core machine under load, and the report
    # makes a request per metric and run); tests/sweep/test_recovery.py runs a sweep through basic-auth.
    # The job still gets MLflow credentials in its environment, to check where they go (nowhere
    # but the driver). The server takes ~15 s to answer: start it first, prepare the rest meanwhile.
    uri = slurm.start_mlflow(tmp_path / "mlflow")
    with ThreadPoolExecutor(1) as pool:
        data = pool.submit(_synthetic_brats, tmp_path / "brats")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(HOME=str(home), TLCORE_DIR=str(REPO), TLCORE_PYTHON=sys.executable, STORAGE=str(storage),
                   MLFLOW_URI=uri, MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password,
                   RAY_START_TIMEOUT="120", PYTHONUNBUFFERED="1",
                   TUNE_GLOBAL_CHECKPOINT_S="1",  # Tune saves its state every second: what a restore sees is now
                   SWEEP_ARGS=f"--smoke-test --max-iterations {ITERATIONS} --report-every {ITERATIONS} "
                              "--frozen-layers 0,1 --controls scratch --shared-storage")  # the nodes share the disk
        opts = (f"--nodes={len(slurm.nodes)}", "--cpus-per-task=1", "--job-name=tlsl")

        # no token: the job refuses before it starts Ray (HOME holds no ~/.ray/auth_token yet)
        refused = slurm.sbatch(SBATCH, *opts, f"--output={out}/%j.out", env=env)
        # a busy 2-core machine (the other test worker training) can keep it pending a while
        slurm.wait_state(refused, {"FAILED"}, timeout=180, output=out / f"{refused}.out")
        text = (out / f"{refused}.out").read_text()
        assert "no Ray token at" in text and "ray get-auth-token --generate" in text, text
        assert not ray_processes(refused)

        token = subprocess.run([str(Path(sys.executable).parent / "ray"), "get-auth-token", "--generate"],
                               env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=60)
        assert token.returncode == 0, token.stderr
        (home / ".ray" / "auth_token").chmod(0o600)
        env["DATA_DIR"] = str(data.result())
    t_refused = time.time() - t0
    slurm.wait_mlflow()
    t_server = time.time() - t0
    slurm.call(register_untrained_source, uri, tmp_path)
    t_ready = time.time() - t0

    # --- job 1: a new sweep, cancelled once a trial has finished (in Tune's saved state) while
    # another is still to train
    first = slurm.sbatch(SBATCH, *opts, f"--output={out}/%j.out", env=env)
    log1 = out / f"{first}.out"
    exp_dir = storage / "brats_layers"
    _wait(lambda: any(exp_dir.glob("experiment_state-*.json")), 240, slurm, first, log1)  # trials under way
    # Ray's token authentication and TLS are on: from a node, `ray status` without the token is
    # refused, and so is one without a certificate of the job's CA (its client never gets through:
    # cut at 8 s, while the other two run: job 1 must still be running after them); with both (the
    # job's HOME) it answers and counts every node
    head = f"{slurm.node_ip['n1']}:{_ray_port(log1)}"
    ray_cli = ["timeout", "8", str(Path(sys.executable).parent / "ray"), "status", "--address", head]
    in_n1 = ["nsenter", f"--net=/run/netns/{slurm.node_ns['n1']}"] if slurm.two else []
    no_tls = subprocess.Popen(in_n1 + ray_cli, env={**env, "RAY_AUTH_MODE": "token"}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tls_dir = home / ".tlcore" / "tls-jobs" / first
    assert "Ray's TLS on" in log1.read_text() and not (tls_dir / "ca.key").exists()  # no more certificates
    assert {f.stat().st_mode & 0o777 for f in tls_dir.iterdir()} == {0o600} and tls_dir.stat().st_mode & 0o777 == 0o700
    tls = {"RAY_USE_TLS": "1", "RAY_TLS_CA_CERT": str(tls_dir / "ca.crt"),
           "RAY_TLS_SERVER_CERT": str(tls_dir / "n1.crt"), "RAY_TLS_SERVER_KEY": str(tls_dir / "n1.key")}
    (tmp_path / "nobody").mkdir()
    without = slurm.on_node("n1", ray_cli, env={**env, **tls, "HOME": str(tmp_path / "nobody"), "RAY_AUTH_MODE": "disabled"})
    assert without.returncode != 0 and "InvalidAuthToken" in without.stdout + without.stderr, without
    status = slurm.on_node("n1", ray_cli, env={**env, **tls, "RAY_AUTH_MODE": "token"})
    assert status.returncode == 0 and status.stdout.count(" node_") == len(slurm.nodes), status
    refused = no_tls.communicate(timeout=60)[0]
    assert no_tls.returncode != 0 and " node_" not in refused, refused[-2000:]
    # a raylet on each node; the MLflow password reached the driver (from the job's environment)
    # and none of Ray's processes
    rays = ray_processes(first)
    raylets = [pid for pid, cmd in rays if cmd.split(" ")[0].endswith("/raylet")]
    if slurm.two:
        assert {slurm.netns_of(pid) for pid in raylets} == set(slurm.node_ns.values()), rays
    else:
        assert len(raylets) == 1, rays
    assert password.encode() in _environ(_driver(first)), "the job's environment did not reach the driver"
    for pid, _ in rays:
        assert password.encode() not in _environ(pid), pid
    _wait(lambda: 0 < list(trial_states(exp_dir).values()).count("TERMINATED") < TRIALS, 240, slurm, first, log1)
    slurm.slurm("scancel", first)
    slurm.wait_state(first, {"CANCELLED"}, timeout=60, output=log1)
    deadline = time.time() + 30
    while (first in slurm.in_queue() or ray_processes(first)) and time.time() < deadline:
        time.sleep(0.5)
    assert first not in slurm.in_queue()
    assert not ray_processes(first), ray_processes(first)   # scancel left no Ray process behind
    assert not tls_dir.exists()  # nor the job's certificates
    # what job 2 restores from: the trials Tune last saved as finished are not to be trained again
    saved = trial_states(exp_dir)
    finished_before = {t: iterations(exp_dir, t) for t, s in saved.items() if s == "TERMINATED"}
    assert finished_before and len(finished_before) < TRIALS, saved
    t_cancel = time.time() - t0

    # --- job 2: the same sbatch again resumes the sweep and completes it
    second = slurm.sbatch(SBATCH, *opts, f"--output={out}/%j.out", env=env)
    log2 = out / f"{second}.out"
    slurm.wait_state(second, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=300, output=log2)
    text1, text2 = log1.read_text(), log2.read_text()
    assert slurm.state(second) == "COMPLETED", text2[-6000:]
    assert "starting a new sweep" in text1, text1[-3000:]
    assert f"resuming the sweep in {exp_dir}" in text2 and f"[tlcore] resuming {exp_dir}" in text2, text2[-3000:]
    head_ip = slurm.node_ip["n1"]
    for text in (text1, text2):
        assert f"Ray head n1 at {head_ip}:" in text and f"{len(slurm.nodes)} node(s)" in text, text[-3000:]
        assert password not in text
    assert "sweep ended with exit status 0" in text2
    # the trials that had finished were not trained again
    for t, its in finished_before.items():
        assert iterations(exp_dir, t) == its, t
    for t in trial_states(exp_dir):
        its = iterations(exp_dir, t)
        assert its == sorted(set(its)) and its[-1] == ITERATIONS, (t, its)
    assert not ray_processes(second)

    # MLflow, as the team server holds it: one parent, one finished run per trial, nothing RUNNING
    def runs():
        from tlcore.tracking import store
        c = store.client(uri)
        exp = c.get_experiment_by_name("brats_layers")
        return c.search_runs([exp.experiment_id], max_results=1000)

    every = slurm.call(runs)
    parents = [r for r in every if r.data.tags.get("role") == "parent"]
    children = [r for r in every if r.data.tags.get("trial_id")]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", [(r.data.tags, r.info.status) for r in every]
    assert len(children) == TRIALS and len({r.data.tags["trial_id"] for r in children}) == TRIALS
    assert all(r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id for r in children)
    assert all(r.info.status == "FINISHED" for r in children), [(r.data.tags["trial_id"], r.info.status)
                                                                 for r in children]
    assert not [r for r in every if r.info.status == "RUNNING"]
    print(f"\nslurm test: token refused at {t_refused:.0f} s, MLflow up {t_server:.0f} s, source registered "
          f"{t_ready:.0f} s, job 1 cancelled at {t_cancel:.0f} s, "
          f"job 2 done at {time.time() - t0:.0f} s ({len(slurm.nodes)} node(s){'; ' + slurm.why_one_node if slurm.why_one_node else ''})")


def _wait(ready, timeout: float, slurm, job: str, log: Path) -> None:
    """Poll `ready()` while job `job` runs; fail with the job's output if it ends or time is up."""
    deadline = time.time() + timeout
    while not ready():
        state = slurm.state(job)
        assert state in ("PENDING", "RUNNING"), f"job {job} {state}\n{log.read_text()[-4000:]}"
        assert time.time() < deadline, f"job {job}: not ready in {timeout:.0f} s\n{log.read_text()[-4000:]}"
        time.sleep(0.5)


def _ray_port(log: Path) -> str:
    import re

    return re.search(r"Ray head n1 at [\d.]+:(\d+)", log.read_text()).group(1)


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # ended meanwhile
        return b""


def _driver(job: str) -> int:
    """The sweep's driver process of Slurm job `job`."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and f"SLURM_JOB_ID={job}\0".encode() in _environ(int(proc.name)):
            try:
                if b"sweeps/brats_layers.py" in (proc / "cmdline").read_bytes():
                    return int(proc.name)
            except OSError:
                pass
    raise AssertionError(f"no driver process of job {job}")


def _synthetic_brats(root: Path) -> Path:
    from tlcore.data.synthetic import ensure_synthetic

    ensure_synthetic(root, "brats", seed=0, n_hgg=12, n_lgg=2, shape=SWEEP_VOLUME)
    import safetensors.torch  # noqa: F401 -- imported while the MLflow server starts: register_untrained_source

    import tlcore.models.networks  # noqa: F401
    return root

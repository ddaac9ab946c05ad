"""Helpers shared by the end-to-end tests (real Ray, real MLflow servers, the sweep scripts)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tlcore.tracking import registry, store

REPO = Path(__file__).resolve().parents[1]
# The sweeps' synthetic volumes: 20^3, not the demo's 32^3. Whole-volume inference (validation at
# every report, the final train/val/test Dice, CKA) dominates a smoke sweep's CPU time and scales
# with the voxels: 20^3 is a quarter of 32^3, and still holds a 16^3 training patch.
SWEEP_VOLUME = (20, 20, 20)


def sweep_env(base: dict | None = None, **extra: str) -> dict:
    """The environment a test runs a sweep script in: a private Ray without token auth (tests start
    their own) that sees one CPU, unbuffered output (tests read it as it comes), a crash's stack,
    plus `extra`.

    One CPU (Ray's own RAY_OVERRIDE_RESOURCES, read where a node starts): the suite runs two tests
    at once on two cores, so a sweep's second trial slot only adds a worker process that imports
    torch and MONAI again (~6 CPU-s) and a second evaluation worker; a layer sweep spent 104 CPU-s
    with two, 93 with one (docs/testing.md)."""
    return {**(base if base is not None else os.environ), "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
            "PYTHONFAULTHANDLER": "1", "RAY_OVERRIDE_RESOURCES": '{"CPU": 1}', **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_with_env(marker: str):
    """(pid, title, cwd) of every process whose environment contains `marker`."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker.encode() in (proc / "environ").read_bytes():
                    title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="ignore")
                    yield int(proc.name), title, os.readlink(proc / "cwd")
            except OSError:
                pass


def listening_sockets() -> list[tuple[str, int, str]]:
    """(address, port, socket inode) of every TCP socket in LISTEN state (/proc/net/tcp and tcp6);
    IPv6 addresses as eight groups of four hex digits."""
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # 0A: LISTEN
                continue
            host, port = fields[1].split(":")
            raw = bytes.fromhex(host)
            if len(raw) == 4:
                address = ".".join(str(b) for b in raw[::-1])
            else:  # four little-endian 32-bit words
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                address = ":".join(words[i:i + 2].hex() for i in range(0, 16, 2))
            found.append((address, int(port, 16), fields[9]))
    return found


def processes_with_cmdline(marker: str) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose command line contains `marker`."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmd:
                found.append((int(proc.name), cmd.replace(b"\0", b" ").decode(errors="replace")))
    return found


def kill_ray_processes(marker: str) -> None:
    """SIGKILL the Ray processes of one test's Ray instance (their command lines name its temp
    dir). `ray stop` would also stop every other Ray on the machine, a user's sweep included."""
    for pid, _ in processes_with_cmdline(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_tracking_server(workdir: Path, port: int, timeout: float = 90, admin_password: str | None = None,
                          log: Path | None = None, tls: Path | None = None,
                          default_permission: str = "READ", workers: int = 1) -> subprocess.Popen:
    """mlflow/server.sh on 127.0.0.1:`port` with a SQLite backend in `workdir`; returns once it
    answers /health (the same store again when called again with the same `workdir`).
    With `admin_password`: basic-auth on, as server.sh runs by default (user `admin`).
    With `tls` (a folder of cluster/tls_certs.sh with server.crt/.key): HTTPS.
    One server process by default: MLflow's four each load MLflow (~10 CPU-s apiece), and no test
    needs them (test_team_server starts the default too)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({"MLFLOW_BACKEND_URI": f"sqlite:///{workdir / 'server.db'}",
                "MLFLOW_ARTIFACTS": str(workdir / "artifacts"), "MLFLOW_AUTH": "off",
                "MLFLOW_BIN": str(Path(sys.executable).parent / "mlflow")})
    if admin_password is not None:
        ini = workdir / "basic_auth.ini"
        ini.write_text(f"[mlflow]\ndefault_permission = {default_permission}\ndatabase_uri = sqlite:///{workdir / 'auth.db'}\n"
                       f"admin_username = admin\nadmin_password = {admin_password}\nauth_cache_ttl_seconds = 60\n")  # mlflow/README.md
        ini.chmod(0o600)
        env.update({"MLFLOW_AUTH": "on", "MLFLOW_AUTH_CONFIG_PATH": str(ini), "XDG_CONFIG_HOME": str(workdir / "config")})
    context = None
    if tls is not None:
        import ssl

        env.update(MLFLOW_TLS_CERT=str(tls / "server.crt"), MLFLOW_TLS_KEY=str(tls / "server.key"))
        context = ssl.create_default_context(cafile=str(tls / "ca.crt"))
    out = log.open("ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen(["bash", str(REPO / "mlflow" / "server.sh"), "--port", str(port), "--workers", str(workers)], env=env,
                            stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/health"
            if urllib.request.urlopen(url, timeout=2, context=context).status == 200:
                return proc
        except urllib.error.HTTPError:
            return proc  # it answers (basic-auth may guard /health too)
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            break
    stop_tracking_server(proc)
    raise AssertionError(f"the MLflow server on port {port} did not answer /health")


def make_certificates(folder: Path, *names: str) -> Path:
    """cluster/tls_certs.sh: a CA and a certificate `<name>.crt/.key` for each of `names` (valid
    for 127.0.0.1 and this machine's address) in `folder`."""
    ip = (subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split() or ["127.0.0.1"])[0]
    for name in names:
        subprocess.run(["bash", str(REPO / "cluster" / "tls_certs.sh"), str(folder), name, ip], check=True,
                       capture_output=True, text=True)
    return folder


def stop_tracking_server(proc: subprocess.Popen) -> None:
    """Stop the server and its workers at once (as a crash or a reboot would)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def store_with_untrained_source(tmp_path) -> str:
    """A fresh SQLite store with an untrained 3-class HighRes3DNet registered as the IXI source:
    tests of resuming and recovery need a source to transfer from, not a good one."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store.prepare_store(uri)
    return register_untrained_source(uri, tmp_path)


def register_untrained_source(uri: str, tmp_path) -> str:
    """An untrained 3-class HighRes3DNet, registered as `ixi_hippocampus` in the store at `uri`."""
    from safetensors.torch import save_file

    from tlcore.models.networks import build_model

    weights = tmp_path / "src"
    weights.mkdir()
    save_file(build_model(in_channels=2, num_classes=3).state_dict(), str(weights / "model.safetensors"))
    run = store.start_run(uri, "ixi_source", "untrained source")
    store.log_artifacts(uri, run, weights, "model")
    registry.register_model(uri, "ixi_hippocampus", run)
    return uri


def wait_for_trial_runs(uri: str, ready, timeout: float) -> list:
    """Poll the brats_layers child runs until `ready(runs)`; fail the test on timeout."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(2)
        exp = store.client(uri).get_experiment_by_name("brats_layers")
        runs = store.client(uri).search_runs([exp.experiment_id], "tags.trial_id != ''") if exp else []
        if ready(runs):
            return runs
    pytest.fail("the sweep made no progress to interrupt")


def reported_steps(trial_dir: Path) -> dict[int, dict]:
    """Every result a trial reported, by iteration, from Ray's result.json."""
    rows = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]
    return {r["iteration"]: r for r in rows}


# The IXI source sweep's own flags in the tests (conftest.source_sweep): synchronous early stopping,
# so a second run with the same seed makes the same decisions (test_reproducibility runs it again
# in a fresh process and compares every curve and the printed table).
SOURCE_SWEEP_FLAGS = ("--smoke-test", "--scheduler", "asha-sync")


def run_script(script, *args, timeout=600, env=None):
    """Run sweeps/<script> as a user would; returns the CompletedProcess (output captured)."""
    env = sweep_env(env)
    proc = subprocess.run([sys.executable, str(REPO / "sweeps" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc


def mlflow_child_runs(uri: str, experiment: str, parent_run_id: str) -> list:
    """A parent run's children as MLflow itself returns them (what the UI shows), to check what
    tlcore wrote with MLflow's own client rather than tlcore's."""
    exp = store.client(uri).get_experiment_by_name(experiment)
    return store.client(uri).search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                            max_results=10_000)

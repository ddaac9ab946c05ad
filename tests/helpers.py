"""Process helpers shared by the end-to-end tests (real Ray, real MLflow servers)."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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


def kill_ray_processes(marker: str) -> None:
    """SIGKILL the Ray processes of one test's Ray instance (their command lines name its temp
    dir). `ray stop` would also stop every other Ray on the machine, a user's sweep included."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "cmdline").read_bytes().decode(errors="ignore"):
                    os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


def start_tracking_server(workdir: Path, port: int, timeout: float = 90) -> subprocess.Popen:
    """mlflow/server.sh on 127.0.0.1:`port` with a SQLite backend in `workdir`; returns once it
    answers /health (the same store again when called again with the same `workdir`)."""
    env = {**os.environ, "MLFLOW_BACKEND_URI": f"sqlite:///{workdir / 'server.db'}",
           "MLFLOW_ARTIFACTS": str(workdir / "artifacts"), "MLFLOW_AUTH": "off",
           "MLFLOW_BIN": str(Path(sys.executable).parent / "mlflow")}
    proc = subprocess.Popen(["bash", str(REPO / "mlflow" / "server.sh"), "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            break
    stop_tracking_server(proc)
    raise AssertionError(f"the MLflow server on port {port} did not answer /health")


def stop_tracking_server(proc: subprocess.Popen) -> None:
    """Stop the server and its workers at once (as a crash or a reboot would)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)

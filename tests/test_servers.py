"""Servers bind to 127.0.0.1 unless told otherwise."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """IPv4/IPv6 addresses with a socket in LISTEN state on `port` (from /proc/net/tcp*)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:  # 0A = LISTEN
                if len(addr) == 8:
                    found.add(".".join(str(b) for b in reversed(bytes.fromhex(addr))))
                else:
                    found.add("::" if set(addr) == {"0"} else addr)
    return found


@pytest.mark.slow
def test_team_mlflow_server_binds_to_loopback(tmp_path):
    port = free_port()
    env = {**os.environ, "MLFLOW_BACKEND_URI": f"sqlite:///{tmp_path / 'm.db'}",
           "MLFLOW_ARTIFACTS": str(tmp_path / "artifacts"), "MLFLOW_AUTH": "off",
           "MLFLOW_BIN": str(Path(sys.executable).parent / "mlflow")}
    proc = subprocess.Popen(["bash", str(REPO / "mlflow" / "server.sh"), "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, ok = time.time() + 90, False
        while time.time() < deadline and not ok:
            try:
                ok = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
            except OSError:
                time.sleep(1)
        assert ok, "server did not answer /health on 127.0.0.1"
        addresses = listening_addresses(port)
        assert addresses and addresses <= {"127.0.0.1"}, addresses
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_team_server_refuses_to_start_without_a_backend():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    out = subprocess.run(["bash", str(REPO / "mlflow" / "server.sh")], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "MLFLOW_BACKEND_URI" in out.stderr

"""Servers bind to 127.0.0.1 unless told otherwise."""

import os
import subprocess
from pathlib import Path

import pytest
from helpers import REPO, free_port, start_tracking_server, stop_tracking_server


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
    server = start_tracking_server(tmp_path, port)
    try:
        addresses = listening_addresses(port)
        assert addresses and addresses <= {"127.0.0.1"}, addresses
    finally:
        stop_tracking_server(server)


def test_team_server_refuses_to_start_without_a_backend():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    out = subprocess.run(["bash", str(REPO / "mlflow" / "server.sh")], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "MLFLOW_BACKEND_URI" in out.stderr

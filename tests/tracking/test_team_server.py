"""Servers bind to 127.0.0.1 unless told otherwise."""

import os
import subprocess

import pytest
from helpers import (
    REPO,
    free_port,
    listening_sockets,
    processes_with_cmdline,
    start_tracking_server,
    stop_tracking_server,
)


def listening_addresses(port: int) -> set[str]:
    """IPv4/IPv6 addresses with a socket in LISTEN state on `port`."""
    return {address for address, p, _ in listening_sockets() if p == port}


def processes_in_session(session: int) -> list[str]:
    """Command lines of the processes in a session (the server started its own: start_new_session)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[3]) == session:  # field 6: the session id
            found.append(cmd)
    return found


@pytest.mark.slow
def test_team_mlflow_server_binds_to_loopback_and_starts_no_job_runner(tmp_path):
    """Loopback only; and without MLflow 3's GenAI job runner (its huey consumers: about ten processes
    of ~240 MB each, serving nothing tlcore logs)."""
    port = free_port()
    server = start_tracking_server(tmp_path, port)
    try:
        addresses = listening_addresses(port)
        assert addresses and addresses <= {"127.0.0.1"}, addresses
        processes = processes_in_session(server.pid)
        assert any("mlflow" in c for c in processes), processes
        assert not [c for c in processes if "huey" in c], processes
    finally:
        stop_tracking_server(server)


def test_team_server_refuses_to_start_without_a_backend():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    out = subprocess.run(["bash", str(REPO / "mlflow" / "server.sh")], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "MLFLOW_BACKEND_URI" in out.stderr


def _get(url: str, auth: tuple[str, str] | None = None) -> int:
    import base64
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        return urllib.request.urlopen(req, timeout=60).status
    except urllib.error.HTTPError as e:
        return e.code


def _cmdlines_containing(secret: str) -> list[str]:
    return [cmd[:200] for _, cmd in processes_with_cmdline(secret)]


@pytest.mark.slow
def test_team_server_with_basic_auth_starts_and_refuses_anonymous_requests(tmp_path):
    """server.sh as shipped (auth on): it starts, answers 401 without credentials and 200 with
    them; the backend URI and the Flask key stay off every command line and out of its output."""
    import secrets

    password, port, log = secrets.token_hex(8), free_port(), tmp_path / "server.log"
    server = start_tracking_server(tmp_path, port, admin_password=password, log=log, default_permission="NO_PERMISSIONS",
                                   workers=4)  # MLflow's default number of server processes, as shipped
    try:
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _get(api) == 401
        assert _get(api, ("admin", "wrong")) == 401
        assert _get(api, ("admin", password)) == 200
        assert (tmp_path / "auth.db").stat().st_mode & 0o777 == 0o600  # every account's password hash
        _accounts_tool_grants_per_experiment_and_model(f"http://127.0.0.1:{port}", password)
        key_file = tmp_path / "config" / "tlcore" / "mlflow-flask-secret-key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        key = key_file.read_text().strip()
        assert len(key) >= 32
        for secret in (key, str(tmp_path / "server.db")):  # the backend URI names the database
            assert not _cmdlines_containing(secret), secret
        assert "basic-auth on" in log.read_text() and key not in log.read_text()
    finally:
        stop_tracking_server(server)


def test_team_server_refuses_a_number_of_workers_that_is_not_one_or_more():
    for bad in ("0", "two", ""):
        out = subprocess.run(["bash", str(REPO / "mlflow" / "server.sh"), "--workers", bad], capture_output=True, text=True)
        assert out.returncode == 2 and "1 or more" in out.stderr, (bad, out.stderr)


def test_team_server_prints_no_backend_password(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({"MLFLOW_BACKEND_URI": "postgresql://mlflow:hunter2@db.internal:5432/mlflow",
                "MLFLOW_ARTIFACTS": str(tmp_path), "MLFLOW_AUTH": "off", "MLFLOW_BIN": "/bin/true"})
    out = subprocess.run(["bash", str(REPO / "mlflow" / "server.sh")], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "db.internal:5432/mlflow" in out.stdout and "hunter2" not in out.stdout + out.stderr


def _accounts_tool_grants_per_experiment_and_model(uri: str, admin_password: str) -> None:
    """python -m tlcore.tracking.accounts against the real server (default_permission NO_PERMISSIONS): a
    person's password on stdin only; a grant opens one experiment and one model to one account."""
    import secrets
    import sys

    env = {**os.environ, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": admin_password}
    tool = lambda *a, stdin=None: subprocess.run([sys.executable, "-m", "tlcore.tracking.accounts", *a, "--mlflow-uri", uri],
                                                 input=stdin, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    bob, carol = secrets.token_hex(8), secrets.token_hex(8)
    for user, pw in (("bob", bob), ("carol", carol)):
        made = tool("add", user, stdin=pw + "\n")
        assert made.returncode == 0 and f"account {user} created" in made.stdout, made.stderr
        assert pw not in made.stdout + made.stderr
    assert tool("add", "dave", stdin="short\n").returncode != 0  # a password too short to keep anyone out
    granted = tool("grant", "bob", "EDIT", "--experiment", "brats_layers", "--model", "ixi_hippocampus")
    assert granted.returncode == 0 and granted.stdout.count("bob: EDIT on") == 2, granted.stderr
    experiment = f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=brats_layers"
    model = f"{uri}/api/2.0/mlflow/registered-models/get?name=ixi_hippocampus"
    assert _get(experiment, ("bob", bob)) == 200 and _get(model, ("bob", bob)) == 200
    assert _get(experiment, ("carol", carol)) == 403 and _get(model, ("carol", carol)) == 403  # NO_PERMISSIONS
    # a second grant replaces the first: READ on the model, and bob can no longer change it
    assert tool("grant", "bob", "READ", "--model", "ixi_hippocampus").returncode == 0
    assert _send(f"{uri}/api/2.0/mlflow/registered-models/update", ("bob", bob),
                 {"name": "ixi_hippocampus", "description": "x"}, "PATCH") == 403
    assert _get(model, ("bob", bob)) == 200


def _send(url: str, auth: tuple[str, str], body: dict, method: str) -> int:
    import base64
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), method=method,
                                 headers={"Content-Type": "application/json"})
    req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        return urllib.request.urlopen(req, timeout=60).status
    except urllib.error.HTTPError as e:
        return e.code

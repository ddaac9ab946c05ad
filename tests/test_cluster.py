"""The `ray up` YAMLs: valid for Ray's own cluster-config schema, commented, and closed by default."""

import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
YAMLS = sorted(CLUSTER.glob("*.yaml"))
RAY_PORTS = {6379, 8265, 10001}


def test_there_are_aws_gcp_and_onprem_configs():
    providers = {yaml.safe_load(p.read_text())["provider"]["type"] for p in YAMLS}
    assert providers == {"aws", "gcp", "local"}


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_validates_against_rays_schema(path):
    config = yaml.safe_load(path.read_text())
    validate_config(config)  # raises jsonschema.ValidationError on an unknown or mistyped key
    if config["provider"]["type"] != "local":
        gpus = {t: n for t, n in config["available_node_types"].items() if t.startswith("gpu")}
        assert set(gpus) == {"gpu1", "gpu4", "gpu8"}
        assert all(n["min_workers"] == 0 for n in gpus.values())  # autoscaling from zero


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_top_level_key_is_commented(path):
    bare = [line for line in path.read_text().splitlines() if re.match(r"^[a-z_]+:", line) and "#" not in line]
    assert bare == []


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_secure_by_default(path):
    text = path.read_text()
    config = yaml.safe_load(text)
    assert "RAY_AUTH_MODE=disabled" not in text                       # (token auth: tested with real processes below)
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head                      # dashboard via `ray dashboard <yaml>`
    assert "pip install -q -e ~/tlcore" in " ".join(config["setup_commands"])
    sg = config["provider"].get("security_group")
    if config["provider"]["type"] == "aws":
        rules = sg["IpPermissions"]
        assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]
        assert all(ip["CidrIp"] != "0.0.0.0/0" for r in rules for ip in r["IpRanges"])
        opened = {p for r in rules for p in range(r["FromPort"], r["ToPort"] + 1)}
        assert not opened & RAY_PORTS


def _ray_command(config: dict, key: str, ray_bin: str, port: int) -> str:
    """The YAML's `ray start` line for this machine: our venv's ray, a free port, no autoscaler
    file, one CPU; everything that decides authentication kept as written."""
    line = next(c for c in config[key] if "ray start" in c)
    line = re.sub(r"(~/tlcore-venv/bin/)?ray start", f"{ray_bin} start", line)
    line = re.sub(r"--autoscaling-config=\S+", "", line).replace(":6379", f":{port}").replace("--port=6379", f"--port={port}")
    return line + " --num-cpus=1 --disable-usage-stats" + (" --include-dashboard=false" if "--head" in line else "")


def _auth_commands(config: dict) -> tuple:
    """What decides authentication on a node: its setup line for the token and its ray start lines."""
    norm = lambda c: re.sub(r"(~/tlcore-venv/bin/)?ray ", "ray ", c)  # noqa: E731
    return (next(c for c in config["setup_commands"] if "auth_token" in c),
            *(norm(next(c for c in config[k] if "ray start" in c))
              for k in ("head_start_ray_commands", "worker_start_ray_commands")))


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_yaml_starts_its_nodes_as_the_tested_one(path):
    """The real-process test below runs onprem.yaml's commands; the cloud YAMLs use the same ones."""
    config = yaml.safe_load(path.read_text())
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"  # every node gets the token
    assert _auth_commands(config) == _auth_commands(yaml.safe_load((CLUSTER / "onprem.yaml").read_text()))


@pytest.mark.slow
def test_nodes_started_as_the_yaml_says_require_the_token(tmp_path):
    """Real Ray processes, started with the YAML's own commands: the head refuses a driver and a
    worker node without the token (copied to every node by file_mounts) and accepts them with it."""
    import os
    import subprocess
    import sys

    from helpers import free_port, kill_ray_processes

    config = yaml.safe_load((CLUSTER / "onprem.yaml").read_text())
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"  # every node gets it
    ray_bin = str(Path(sys.executable).parent / "ray")
    with_token, without = tmp_path / "home", tmp_path / "stranger"
    with_token.mkdir(), without.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    subprocess.run([ray_bin, "get-auth-token", "--generate"], env={**base, "HOME": str(with_token)},
                   capture_output=True, check=True)  # what cluster/README.md has you run before `ray up`
    # the setup command makes every shell a token-mode shell; run it as the nodes do
    setup = next(c for c in config["setup_commands"] if "auth_token" in c)
    subprocess.run(["bash", "-c", setup], env={**base, "HOME": str(with_token)}, check=True)
    assert (with_token / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600
    shell = lambda home: {**base, "HOME": str(home)}  # noqa: E731
    port, temp = free_port(), f"/tmp/rt{free_port()}"  # short: Ray's socket paths are length-limited
    head = _ray_command(config, "head_start_ray_commands", ray_bin, port) + f" --temp-dir={temp}"
    try:
        started = subprocess.run(["bash", "-ic", head], env=shell(with_token), capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        probe = ("import sys, ray\ntry:\n    ray.init(address=sys.argv[1], log_to_driver=False)\n"
                 "    print('NODES', len([n for n in ray.nodes() if n['Alive']]))\nexcept Exception as e:\n"
                 "    print('REFUSED', type(e).__name__)\n")

        def driver(home) -> str:
            # an interactive shell, as `ray exec` and `ray attach` give: ~/.bashrc sets the auth mode
            out = subprocess.run(["bash", "-ic", f"{sys.executable} -c \"$PROBE\" 127.0.0.1:{port}"],
                                 env={**shell(home), "PROBE": probe}, capture_output=True, text=True, timeout=120)
            return out.stdout

        assert "NODES 1" in driver(with_token)
        assert "REFUSED" in driver(without)
        worker = _ray_command(config, "worker_start_ray_commands", ray_bin, port).replace("$RAY_HEAD_IP", "127.0.0.1")
        refused = subprocess.run(["bash", "-ic", worker], env=shell(without), capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0
        joined = subprocess.run(["bash", "-ic", worker], env=shell(with_token), capture_output=True, text=True, timeout=120)
        assert joined.returncode == 0, joined.stdout[-2000:] + joined.stderr[-2000:]
        assert "NODES 2" in driver(with_token)
    finally:
        kill_ray_processes(temp)

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
    assert "RAY_AUTH_MODE=disabled" not in text                       # token authentication stays on
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

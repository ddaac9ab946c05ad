"""The `ray up` YAMLs: valid for Ray's own cluster-config schema, commented, and closed by default."""

import json
import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
YAMLS = sorted(p for p in CLUSTER.glob("*.yaml") if "cluster_name:" in p.read_text())  # not gcp-head-role.yaml
RAY_PORTS = {6379, 8265, 10001}


def test_there_are_aws_gcp_and_onprem_configs():
    providers = {yaml.safe_load(p.read_text())["provider"]["type"] for p in YAMLS}
    assert providers == {"aws", "gcp", "local"}


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_validates_against_rays_schema(path):
    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(config))  # as `ray up` does; raises on an unknown or mistyped key
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


# ----------------------------------------------------------------------------- AWS: what `ray up` prepares

@pytest.fixture()
def aws(monkeypatch, tmp_path):
    """An AWS account in this process (moto): Ray's own AWS bootstrap and cluster/aws_setup.py talk
    to it through boto3 as they would to AWS. HOME is the test's: Ray writes its key pair there."""
    moto = pytest.importorskip("moto")
    for k in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("HOME", str(tmp_path))
    with moto.mock_aws():
        yield


def _aws_setup():
    import importlib.util

    spec = importlib.util.spec_from_file_location("aws_setup", CLUSTER / "aws_setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _aws_config_with(made: dict) -> dict:
    """aws-gpu.yaml with its CHANGE ME ids replaced by what aws_setup.py printed."""
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    for name, node_type in config["available_node_types"].items():
        node_config = node_type["node_config"]
        assert node_config["SecurityGroupIds"] == ["sg-0123456789abcdef0"]
        node_config["SecurityGroupIds"] = [made["security_group_id"]]
        kind = "head" if name == config["head_node_type"] else "worker"
        assert node_config["IamInstanceProfile"]["Arn"].endswith(f"instance-profile/tlcore-aws-{kind}")
        node_config["IamInstanceProfile"] = {"Arn": made[f"{kind}_profile_arn"]}
    return config


def test_ray_up_on_aws_creates_no_group_or_role_and_uses_the_scoped_ones(aws):
    """Ray's own preparation of aws-gpu.yaml (what `ray up` runs before launching anything): with
    the ids aws_setup.py made, Ray creates no security group (its own would open SSH to 0.0.0.0/0)
    and no IAM role (its own has EC2 and S3 full access); every node runs with ours."""
    import boto3
    from ray.autoscaler._private.commands import _bootstrap_config

    region = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())["provider"]["region"]
    made = _aws_setup().setup(region, "198.51.100.0/24", "tlcore-test-data")
    ec2, iam = boto3.client("ec2", region_name=region), boto3.client("iam")
    groups_before = {g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]}
    roles_before = {r["RoleName"] for r in iam.list_roles()["Roles"]}

    prepared = _bootstrap_config(_aws_config_with(made), no_config_cache=True)

    assert {g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]} == groups_before
    assert {r["RoleName"] for r in iam.list_roles()["Roles"]} == roles_before == {"tlcore-aws-head", "tlcore-aws-worker"}
    assert "IamInstanceProfile" not in prepared.get("head_node", {})  # Ray added no default profile
    for name, node_type in prepared["available_node_types"].items():
        node_config = node_type["node_config"]
        assert node_config["SecurityGroupIds"] == [made["security_group_id"]], name
        kind = "head" if name == prepared["head_node_type"] else "worker"
        assert node_config["IamInstanceProfile"] == {"Arn": made[f"{kind}_profile_arn"]}, name


def test_the_aws_group_lets_in_ssh_from_one_network_and_the_cluster_itself(aws):
    import boto3

    setup = _aws_setup()
    made = setup.setup("eu-west-1", "198.51.100.0/24", "tlcore-test-data")
    ec2 = boto3.client("ec2", region_name="eu-west-1")
    gid = made["security_group_id"]
    ec2.authorize_security_group_ingress(GroupId=gid, IpPermissions=[  # someone opens Ray's ports by hand
        {"IpProtocol": "tcp", "FromPort": 6379, "ToPort": 6379, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    assert setup.setup("eu-west-1", "198.51.100.0/24", "tlcore-test-data") == made  # run again: the same ids
    group = ec2.describe_security_groups(GroupIds=[gid])["SecurityGroups"][0]
    assert sorted(setup._rules(group["IpPermissions"]), key=str) == sorted(
        [("tcp", 22, 22, "CidrIp", "198.51.100.0/24"), ("-1", None, None, "GroupId", gid)], key=str)
    for wide in ("0.0.0.0/0", "::/0", "10.0.0.0/4"):
        with pytest.raises(SystemExit, match="--ssh-cidr"):
            setup.setup("eu-west-1", wide, "tlcore-test-data")


def test_the_aws_identities_reach_one_bucket_and_this_clusters_instances(aws):
    """The policies as AWS holds them after aws_setup.py: no wildcard service, S3 only the given
    bucket, instance changes only on instances tagged for this cluster, workers: the bucket only."""
    import boto3

    _aws_setup().setup("eu-west-1", "198.51.100.0/24", "tlcore-test-data")
    iam = boto3.client("iam")

    def statements(role):
        assert iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"] == []  # no managed policy
        names = iam.list_role_policies(RoleName=role)["PolicyNames"]
        docs = [iam.get_role_policy(RoleName=role, PolicyName=n)["PolicyDocument"] for n in names]
        docs = [d if isinstance(d, dict) else json.loads(d) for d in docs]
        return [{**s, "Action": [s["Action"]] if isinstance(s["Action"], str) else s["Action"],
                 "Resource": [s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"]}
                for d in docs for s in d["Statement"]]

    for role in ("tlcore-aws-head", "tlcore-aws-worker"):
        for s in statements(role):
            assert s["Effect"] == "Allow" and "NotAction" not in s and "NotResource" not in s
            assert not any(a == "*" or a.endswith(":*") for a in s["Action"]), s
            if any(a.startswith("s3:") for a in s["Action"]):
                assert all(a.startswith("s3:") for a in s["Action"])
                assert set(s["Resource"]) <= {"arn:aws:s3:::tlcore-test-data", "arn:aws:s3:::tlcore-test-data/*"}, s
            changes = {"ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"}
            if changes & set(s["Action"]):
                assert s["Condition"] == {"StringEquals": {"ec2:ResourceTag/ray-cluster-name": "tlcore-aws"}}
            if "ec2:RunInstances" in s["Action"] and any(":instance/" in r for r in s["Resource"]):
                assert s["Condition"] == {"StringEquals": {"aws:RequestTag/ray-cluster-name": "tlcore-aws"}}
            if "ec2:CreateTags" in s["Action"]:
                assert "Condition" in s
            if "iam:PassRole" in s["Action"]:
                assert s["Resource"] == ["arn:aws:iam::123456789012:role/tlcore-aws-worker"]
            if "*" in s["Resource"]:
                assert all(a.startswith("ec2:Describe") for a in s["Action"]), s
    assert {a for s in statements("tlcore-aws-worker") for a in s["Action"]} == {
        "s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"}


# ----------------------------------------------------------------------------- GCP and on-prem

def test_ray_up_on_gcp_adds_no_public_ip_to_workers_and_no_node_runs_as_a_default_account():
    """Ray's GCP preparation picks a subnet and adds a public IP to every node type that names no
    network interface (compute=None: here it must not need the API at all). Nodes run as the
    accounts gcp_setup.sh makes, never the Compute Engine default or Ray's ray-autoscaler-sa-v1."""
    from ray.autoscaler._private.gcp.config import DEFAULT_SERVICE_ACCOUNT_ID, _configure_subnet
    from ray.autoscaler._private.util import prepare_config

    config = yaml.safe_load((CLUSTER / "gcp-gpu.yaml").read_text())
    prepared = _configure_subnet(prepare_config(config), compute=None)
    for name, node_type in prepared["available_node_types"].items():
        node_config, is_head = node_type["node_config"], name == prepared["head_node_type"]
        (interface,) = node_config["networkInterfaces"]
        assert interface["subnetwork"].endswith("/subnetworks/tlcore-subnet")
        assert bool(interface["accessConfigs"]) == is_head, name      # only the head has a public IP
        (account,) = node_config["serviceAccounts"]
        assert account["email"].split("@")[0] == ("tlcore-head" if is_head else "tlcore-worker"), name
        assert DEFAULT_SERVICE_ACCOUNT_ID not in account["email"] and "developer.gserviceaccount" not in account["email"]
        assert "tlcore" in node_config["tags"]["items"] and ("tlcore-head" in node_config["tags"]["items"]) == is_head


def test_gcp_setup_opens_ssh_to_one_network_and_the_head_only():
    """The gcloud commands gcp_setup.sh runs (--dry-run prints them): a network of its own (no
    default rules), SSH from the given network to the head, internal traffic between tagged nodes."""
    import shlex
    import subprocess

    run = lambda *a: subprocess.run(["bash", str(CLUSTER / "gcp_setup.sh"), "--project", "p", "--region", "europe-west4",  # noqa: E731
                                     "--bucket", "b", "--dry-run", *a], capture_output=True, text=True)
    out = run("--ssh-cidr", "198.51.100.0/24")
    assert out.returncode == 0, out.stderr
    commands = [shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ ")]
    rules = [dict(a.split("=", 1) for a in c if a.startswith("--") and "=" in a)
             for c in commands if c[3:6] == ["compute", "firewall-rules", "create"]]
    assert [r.get("--network") for r in rules] == ["tlcore-net", "tlcore-net"]
    assert {(r["--allow"], r.get("--source-ranges"), r.get("--source-tags"), r["--target-tags"]) for r in rules} == {
        ("tcp:22", "198.51.100.0/24", None, "tlcore-head"), ("all", None, "tlcore", "tlcore")}
    roles = {a.split("=", 1)[1] for c in commands for a in c if a.startswith("--role=")}
    assert roles == {"projects/p/roles/tlcoreAutoscaler", "roles/iam.serviceAccountUser", "roles/storage.objectAdmin"}
    for wide in ("0.0.0.0/0", "10.0.0.0/4", "everyone"):
        assert run("--ssh-cidr", wide).returncode == 2


def test_ray_up_on_premises_accepts_the_file_and_copies_a_cluster_key_not_a_personal_one(monkeypatch, tmp_path):
    """Ray's own on-premise preparation (what `ray up` runs first) accepts onprem.yaml; the key
    it copies to the head (as ~/ray_bootstrap_key.pem) is one made for this cluster."""
    from ray.autoscaler._private.commands import _bootstrap_config

    monkeypatch.setenv("HOME", str(tmp_path))
    prepared = _bootstrap_config(yaml.safe_load((CLUSTER / "onprem.yaml").read_text()), no_config_cache=True)
    key = Path(prepared["auth"]["ssh_private_key"]).name
    assert key == "tlcore_cluster_ed25519" and not key.startswith("id_")
    (node_type,) = prepared["available_node_types"].values()
    assert node_type["min_workers"] == node_type["max_workers"] == len(prepared["provider"]["worker_ips"])

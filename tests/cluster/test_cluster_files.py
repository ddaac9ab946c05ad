"""The `ray up` YAMLs: valid for Ray's own cluster-config schema, commented, and closed by default."""

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
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
    """What decides authentication on a node: its setup line for the token and its ray start lines
    (which autoscaler a head runs does not: onprem.yaml's must be v1, Ray's v2 lacks provider local)."""
    norm = lambda c: re.sub(r"(~/tlcore-venv/bin/)?ray ", "ray ", re.sub(r"RAY_enable_autoscaler_v2=\w+ ", "", c))
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
def test_nodes_started_as_the_yaml_says_require_the_token_and_tls(tmp_path):
    """Real Ray processes, started with the YAML's own commands: the head refuses a driver and a
    worker node without the token (copied to every node by file_mounts), and, with Ray's TLS on
    (each node's certificate from cluster/tls_certs.sh, found by cluster/tls_env.sh), a driver or
    a worker without a certificate of the cluster's CA; it accepts them with both."""
    import os
    import shutil
    import subprocess
    import sys

    from helpers import free_port, kill_ray_processes, make_certificates

    config = yaml.safe_load((CLUSTER / "onprem.yaml").read_text())
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"  # every node gets it
    ray_bin = str(Path(sys.executable).parent / "ray")
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    certs = make_certificates(tmp_path / "ca", "head", "worker")
    homes = {}
    for name, token, cert in (("head", True, "head"), ("worker", True, "worker"), ("no_tls", True, None),
                              ("no_token", False, "worker")):
        home = homes[name] = tmp_path / name
        (home / "tlcore").mkdir(parents=True)
        (home / "tlcore" / "cluster").symlink_to(CLUSTER)  # ~/tlcore as `ray up` copies it
        if token and name == "head":  # what cluster/README.md has you run before `ray up`
            subprocess.run([ray_bin, "get-auth-token", "--generate"], env={**base, "HOME": str(home)},
                           capture_output=True, check=True)
        elif token:
            (home / ".ray").mkdir()
            shutil.copy(homes["head"] / ".ray" / "auth_token", home / ".ray" / "auth_token")
        if cert:  # cluster/README.md: each node gets ca.crt and its own certificate, as node.crt/.key
            tls = home / ".tlcore" / "tls"
            tls.mkdir(parents=True)
            for src, dst in (("ca.crt", "ca.crt"), (f"{cert}.crt", "node.crt"), (f"{cert}.key", "node.key")):
                shutil.copy(certs / src, tls / dst)
        # the setup commands make every shell a token-mode (and TLS) shell; run them as the nodes do
        for setup in (c for c in config["setup_commands"] if "auth_token" in c or "tls_env" in c):
            subprocess.run(["bash", "-c", setup], env={**base, "HOME": str(home)}, check=token or "tls_env" in setup,
                           capture_output=True)
    assert (homes["head"] / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600
    shell = lambda home: {**base, "HOME": str(homes[home])}
    port, temp = free_port(), f"/tmp/rt{free_port()}"  # short: Ray's socket paths are length-limited
    head = _ray_command(config, "head_start_ray_commands", ray_bin, port) + f" --temp-dir={temp}"
    try:
        started = subprocess.run(["bash", "-ic", head], env=shell("head"), capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        probe = ("import sys, ray\ntry:\n    ray.init(address=sys.argv[1], log_to_driver=False)\n"
                 "    print('NODES', len([n for n in ray.nodes() if n['Alive']]))\nexcept Exception as e:\n"
                 "    print('REFUSED', type(e).__name__)\n")

        def driver(home, wait_s: int = 25) -> subprocess.Popen:
            # an interactive shell, as `ray exec` and `ray attach` give: ~/.bashrc sets the auth mode
            # and TLS. Without TLS, Ray's client retries until it gives up: `wait_s` here.
            return subprocess.Popen(["bash", "-ic", f"timeout {wait_s} {sys.executable} -c \"$PROBE\" 127.0.0.1:{port}"],
                                    env={**shell(home), "PROBE": probe}, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True)

        assert "NODES 1" in driver("head").communicate(timeout=120)[0]
        worker = _ray_command(config, "worker_start_ray_commands", ray_bin, port).replace("$RAY_HEAD_IP", "127.0.0.1")
        # the four refusals at once (each waits for Ray's client to give up)
        strangers = [driver("no_token"), driver("no_tls")]
        workers = [subprocess.Popen(["bash", "-ic", worker.replace(f"{ray_bin} start", f"timeout 30 {ray_bin} start")],
                                    env=shell(home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for home in ("no_token", "no_tls")]
        assert all("NODES" not in p.communicate(timeout=120)[0] for p in strangers)
        assert all(p.wait(timeout=120) != 0 for p in workers)
        joined = subprocess.run(["bash", "-ic", worker], env=shell("worker"), capture_output=True, text=True, timeout=120)
        assert joined.returncode == 0, joined.stdout[-2000:] + joined.stderr[-2000:]
        assert "NODES 2" in driver("head").communicate(timeout=120)[0]
    finally:
        kill_ray_processes(temp)


# ----------------------------------------------------------------------------- what `ray up` copies

FAKE_SSH = """#!/bin/sh
# ssh to the node, played here: drop ssh's options and the host, run the command in this machine's shell
while [ $# -gt 0 ]; do
  case "$1" in -i|-o|-p|-l|-F) shift 2 ;; -*) shift ;; *) shift; break ;; esac
done
exec sh -c "$*"
"""


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_ray_up_copies_the_code_and_no_local_data(path, tmp_path, monkeypatch):
    """file_mounts `~/tlcore: .` through Ray's own rsync call (SSHCommandRunner.run_rsync_up, with the
    YAML's rsync_exclude and rsync_filter, as `ray up` runs it from the repository root) into a node's
    home here; only ssh is played by a script. Every tracked file of the package arrives (a bare
    "data" exclude dropped tlcore/data/); the local data, results, venv and what git ignores do not."""
    import shutil
    import subprocess

    from ray.autoscaler._private.command_runner import SSHCommandRunner

    repo = CLUSTER.parent
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    checkout, node_home, bin_dir = tmp_path / "checkout", tmp_path / "node-home", tmp_path / "bin"
    for name in filter(None, listed.stdout.decode().split("\0")):  # a copy of the checkout (.gitignore included)
        if (repo / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / name, checkout / name)
    local_only = ["data/brats/x.nii.gz", "results/sweep/result.json", ".venv/bin/python", "mlflow/mlflow.db",
                  "mlflow/artifacts/1/model.pt", "tlcore/__pycache__/x.pyc", "tlcore.egg-info/PKG-INFO"]
    for name in local_only:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).write_text("local only")
    node_home.mkdir(), bin_dir.mkdir()
    (bin_dir / "ssh").write_text(FAKE_SSH)
    (bin_dir / "ssh").chmod(0o755)

    class OneNode:  # the cloud: a node at an address (the stand-in ssh ignores it)
        def external_ip(self, node_id):
            return "192.0.2.20"
        internal_ip = external_ip

        def is_terminated(self, node_id):
            return False

    config = yaml.safe_load(path.read_text())
    assert config["file_mounts"]["~/tlcore"] == "."
    runner = SSHCommandRunner(log_prefix="", node_id="node", provider=OneNode(), auth_config=config["auth"],
                              cluster_name=config["cluster_name"], process_runner=subprocess, use_internal_ip=False)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("HOME", str(node_home))  # the node's ~
    monkeypatch.chdir(checkout)
    # as NodeUpdater.sync_file_mounts + rsync_up call it for a folder
    runner.run_rsync_up("./", "~/tlcore/", options={"docker_mount_if_possible": True,
                                                    "rsync_exclude": config.get("rsync_exclude"),
                                                    "rsync_filter": config.get("rsync_filter")})

    arrived = {str(p.relative_to(node_home / "tlcore")) for p in (node_home / "tlcore").rglob("*") if p.is_file()}
    package = subprocess.run(["git", "ls-files", "tlcore", "sweeps", "mlflow", "cluster", "pyproject.toml"],
                             cwd=repo, capture_output=True, text=True, check=True).stdout.split()
    missing = [name for name in package if (repo / name).is_file() and name not in arrived]
    assert missing == [], f"{path.name}: rsync left out {missing[:10]}"
    assert any(name.startswith("tlcore/data/") for name in arrived)
    assert sorted(set(local_only) & arrived) == []


# ----------------------------------------------------------------------------- GPU node types: what the autoscaler plans with

GPUS = {"gpu1": 1, "gpu4": 4, "gpu8": 8}
# Google's accelerator-optimized machine types: vCPUs and the A100s that come with them (no guestAccelerators)
A2_HIGHGPU = {"a2-highgpu-1g": {"CPU": 12, "GPU": 1}, "a2-highgpu-4g": {"CPU": 48, "GPU": 4},
              "a2-highgpu-8g": {"CPU": 96, "GPU": 8}}


def _gcp_planned(path: Path = CLUSTER / "gcp-gpu.yaml") -> dict:
    """gcp-gpu.yaml as `ray up` resolves node resources before bootstrapping (commands._bootstrap_config):
    Ray's GCP provider fills in what it detects (TPUs only) without calling the API."""
    from ray.autoscaler._private.gcp.node_provider import GCPNodeProvider

    planned = GCPNodeProvider.fillout_available_node_types_resources(prepare_config(yaml.safe_load(path.read_text())))
    validate_config(planned)
    return planned


def test_gcp_gpu_node_types_declare_the_gpus_ray_plans_with():
    planned = _gcp_planned()
    types = planned["available_node_types"]
    assert not types[planned["head_node_type"]]["resources"].get("GPU")
    for name, gpus in GPUS.items():
        node_config = types[name]["node_config"]
        assert types[name]["resources"].get("GPU") == gpus, name                # else no GPU trial ever starts it
        assert types[name]["resources"] == A2_HIGHGPU[node_config["machineType"]], name   # Ray starts the node with these
        assert "guestAccelerators" not in node_config, name                      # a2 types come with their GPUs


@pytest.mark.slow
def test_the_autoscaler_starts_a_gpu_node_for_a_gpu_trial_and_none_for_cpu_work(tmp_path):
    """Ray's autoscaler (its monitor, started by `ray start --head --autoscaling-config`) with
    gcp-gpu.yaml's node types as planned above, on Ray's fake multi-node provider (a launched node
    is a local raylet with the node type's resources): CPU work that fits the head launches nothing;
    a task asking for one GPU gets a gpu1 node. The autoscaler is the one the YAML's head runs: v2,
    which `ray up` turns on since Ray 2.50, unless its start line sets RAY_enable_autoscaler_v2=0
    (both pass this test). (ray.cluster_utils.AutoscalingCluster does the same but runs
    `ray stop --force`; and Ray's wheel lacks fake_multi_node/example.yaml, which it and provider type
    fake_multinode read: the provider is named as an external module instead.)"""
    import shutil
    import signal
    import subprocess
    import sys

    from helpers import free_port, kill_ray_processes, processes_with_env
    from ray._private import services
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    planned = _gcp_planned()
    v2 = "RAY_enable_autoscaler_v2=0" not in " ".join(planned["head_start_ray_commands"])
    head = planned["available_node_types"][planned["head_node_type"]]["resources"]
    workers = {name: {"resources": dict(t["resources"]), "node_config": {}, "min_workers": 0, "max_workers": 1}
               for name, t in planned["available_node_types"].items() if name != planned["head_node_type"]}
    port, temp, ip = free_port(), f"/tmp/rt{free_port()}", services.get_node_ip_address()
    config = {  # Ray's fake_multi_node/example.yaml with our node types
        "cluster_name": "fake_multinode", "max_workers": 2, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        "provider": {"type": "external", "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"{ip}:{port}",
                     **({"launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID} if v2 else {})},
        "available_node_types": {**workers, "ray.head.default": {"resources": head, "node_config": {}, "max_workers": 0}},
        "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": []}
    (tmp_path / "autoscaler.json").write_text(json.dumps(config))
    marker = f"TLCORE_AUTOSCALER_TEST={temp}"  # launched nodes inherit it (their process titles lose the temp dir)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "RAY_AUTH_MODE": "disabled",
           "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", marker.split("=")[0]: temp,
           "RAY_enable_autoscaler_v2": "1" if v2 else "0"}
    if v2:  # as AutoscalingCluster(autoscaler_v2=True) starts it
        env.update(RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_NODE_ID, RAY_OVERRIDE_NODE_ID_FOR_TESTING=FAKE_HEAD_NODE_ID)
    ray_bin = str(Path(sys.executable).parent / "ray")
    driver = (
        "import os, sys, time, ray\n"
        "ray.init(address=sys.argv[1], log_to_driver=False)\n"
        "@ray.remote\n"
        "def node_type():\n"
        "    return os.environ.get('RAY_NODE_TYPE_NAME', 'head')\n"
        f"print('CPU', ray.get([node_type.options(num_cpus=1).remote() for _ in range({int(head['CPU'])})], timeout=60))\n"
        "time.sleep(4)  # four autoscaler rounds\n"
        "print('NODES', len([n for n in ray.nodes() if n['Alive']]))\n"
        "print('GPU', ray.get(node_type.options(num_gpus=1).remote(), timeout=90))\n"
        "print('GPUS', sorted(n['Resources'].get('GPU', 0) for n in ray.nodes() if n['Alive']))\n")
    try:
        subprocess.run([ray_bin, "start", "--head", f"--port={port}", f"--temp-dir={temp}",
                        f"--autoscaling-config={tmp_path / 'autoscaler.json'}", f"--num-cpus={head['CPU']}",
                        "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats"],
                       env=env, capture_output=True, check=True, timeout=120)
        out = subprocess.run([sys.executable, "-c", driver, f"{ip}:{port}"], env=env, capture_output=True,
                             text=True, timeout=180, check=False)
        monitor = Path(temp, "session_latest", "logs", "monitor.log")
        log = monitor.read_text()[-3000:] if monitor.exists() else ""
        assert out.returncode == 0, out.stdout + out.stderr[-3000:] + log
        lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line[:3] in ("CPU", "NOD", "GPU"))
        assert lines["CPU"] == str(["head"] * int(head["CPU"])) and lines["NODES"] == "1"   # no node for CPU work
        assert lines["GPU"] == "gpu1" and lines["GPUS"] == "[0, 1.0]", out.stdout        # the smallest that fits
    finally:
        kill_ray_processes(temp)
        for pid, _, _ in processes_with_env(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


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
    def own_roles():  # not the service-linked ones (aws_setup.py makes EC2's Spot role)
        return {r["RoleName"] for r in iam.list_roles()["Roles"] if not r["Path"].startswith("/aws-service-role/")}

    roles_before = own_roles()

    prepared = _bootstrap_config(_aws_config_with(made), no_config_cache=True)

    assert {g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]} == groups_before
    assert own_roles() == roles_before == {"tlcore-aws-head", "tlcore-aws-worker"}
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
    for wide in ("0.0.0.0/0", "::/0", "10.0.0.0/4", "3.0.0.0/8", "2001:db8::/32"):
        with pytest.raises(SystemExit, match="--ssh-cidr"):
            setup.setup("eu-west-1", wide, "tlcore-test-data")
    for bad_name in ({"bucket": "*"}, {"cluster": "tlcore aws"}):
        with pytest.raises(SystemExit, match="--bucket|--cluster-name"):
            setup.setup("eu-west-1", "198.51.100.0/24", **{"bucket": "tlcore-test-data", **bad_name})
    # an IPv6 office network goes in as Ipv6Ranges, replacing the IPv4 rule
    setup.setup("eu-west-1", "2001:db8:1234::/48", "tlcore-test-data")
    group = ec2.describe_security_groups(GroupIds=[gid])["SecurityGroups"][0]
    assert sorted(setup._rules(group["IpPermissions"]), key=str) == sorted(
        [("tcp", 22, 22, "CidrIpv6", "2001:db8:1234::/48"), ("-1", None, None, "GroupId", gid)], key=str)


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


def _aws_launch() -> tuple[dict, dict, dict]:
    """aws_setup.py, then Ray's `ray up` preparation, then one instance of every node type launched by
    Ray's AWS node provider (AWSNodeProvider.create_node: how `ray up` starts the head and the head's
    autoscaler its workers). Returns what aws_setup made, the prepared config and {node type:
    the instance as EC2's describe_instances returns it}."""
    import boto3
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler._private.commands import _bootstrap_config
    from ray.autoscaler.tags import TAG_RAY_USER_NODE_TYPE

    region = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())["provider"]["region"]
    made = _aws_setup().setup(region, "198.51.100.0/24", "tlcore-test-data")
    prepared = _bootstrap_config(_aws_config_with(made), no_config_cache=True)
    provider = AWSNodeProvider(prepared["provider"], prepared["cluster_name"])
    for name, node_type in prepared["available_node_types"].items():
        provider.create_node(node_type["node_config"], {TAG_RAY_USER_NODE_TYPE: name}, 1)
    reservations = boto3.client("ec2", region_name=region).describe_instances()["Reservations"]
    instances = {next(t["Value"] for t in i["Tags"] if t["Key"] == TAG_RAY_USER_NODE_TYPE): i
                 for r in reservations for i in r["Instances"]}
    assert set(instances) == set(prepared["available_node_types"])
    return made, prepared, instances


def test_aws_gpu_node_types_have_the_gpus_ray_plans_with(aws):
    """Ray fills in an AWS node type's resources from EC2's instance-type data (describe_instance_types:
    moto has the GPU counts): gpu1, gpu4, gpu8 plan with 1, 4 and 8 GPUs, the head with none."""
    _, prepared, _ = _aws_launch()
    types = prepared["available_node_types"]
    assert not types[prepared["head_node_type"]]["resources"].get("GPU")
    assert {name: types[name]["resources"].get("GPU") for name in GPUS} == GPUS


def test_every_aws_node_is_launched_with_imdsv2_only(aws):
    """The instances Ray's AWS node provider launches, as EC2 reports them: the metadata service answers
    only with a session token (IMDSv2), so a trial's process cannot fetch the role's credentials with
    one unauthenticated GET; hop limit 1: no token for a container behind another network hop."""
    _, _, instances = _aws_launch()
    for name, instance in instances.items():
        options = instance["MetadataOptions"]
        assert (options["HttpTokens"], options["HttpEndpoint"], options["HttpPutResponseHopLimit"]) == (
            "required", "enabled", 1), name


def _as_list(value) -> list:
    return [value] if isinstance(value, str) else value


def _policy_documents() -> dict:
    values = {"REGION": "eu-west-1", "ACCOUNT": "123456789012", "CLUSTER": "tlcore-aws", "BUCKET": "tlcore-test-data",
              "SECURITY_GROUP": "sg-0123456789abcdef0"}
    return {f: json.loads(_aws_setup().policy(f, **values)) for f in ("aws-head-policy.json", "aws-worker-policy.json")}


SPOT_REQUEST = "spot-instances-request"  # RunInstances with spot market options: in AWS's EC2 example policies, not in its table


def test_every_action_and_resource_in_the_iam_policies_is_one_aws_defines():
    """Against AWS's own IAM definitions (policy_sentry's bundled copy of the Service Authorization
    Reference, offline): every action exists, every ARN is of a resource type its action takes, and
    "*" only where the action takes no resource type (a typo or a wrong ARN would deny silently)."""
    pytest.importorskip("policy_sentry")
    from policy_sentry.querying.actions import (
        get_action_data,
        get_actions_for_service,
        get_actions_that_support_wildcard_arns_only,
    )
    from policy_sentry.shared.iam_data import get_service_prefix_data
    from policy_sentry.util.arns import does_arn_match

    for file, document in _policy_documents().items():
        for s in document["Statement"]:
            for action in _as_list(s["Action"]):
                service, name = action.split(":")
                assert action.lower() in get_actions_for_service(service, lowercase=True), f"{file}: no action {action}"
                formats = [a["resource_arn_format"] for a in get_action_data(service, name)[service]]
                for arn in _as_list(s["Resource"]):
                    if arn == "*":
                        assert action in get_actions_that_support_wildcard_arns_only(service), (file, action)
                    elif action == "ec2:RunInstances" and f":{SPOT_REQUEST}/" in arn:
                        assert does_arn_match(arn, get_service_prefix_data("ec2")["resources"][SPOT_REQUEST]["arn"])
                    else:
                        assert any(does_arn_match(arn, f) for f in formats), f"{file}: {action} takes no {arn}"


def _allows(statements: list, action: str, arn: str, request_tags: dict) -> bool:
    """Whether one of these Allow statements grants `action` on `arn` (IAM's wildcards; of conditions,
    only StringEquals on aws:RequestTag/... is known here: any other denies)."""
    import fnmatch

    for s in statements:
        if action not in _as_list(s["Action"]) or not any(fnmatch.fnmatchcase(arn, r) for r in _as_list(s["Resource"])):
            continue
        conditions = s.get("Condition", {})
        if set(conditions) - {"StringEquals"}:
            continue
        if all(request_tags.get(key.split("/", 1)[1]) == value if key.startswith("aws:RequestTag/") else False
               for key, value in conditions.get("StringEquals", {}).items()):
            return True
    return False


def test_the_head_may_launch_every_node_type(aws):
    """Every resource a RunInstances of each node type touches, as EC2 reports the launched instance,
    is granted by the head's policy as AWS holds it after aws_setup.py. The resource types: those AWS's
    table (policy_sentry) marks required for RunInstances, the boot volume, Ray's key pair, and the
    spot request of a spot node type."""
    pytest.importorskip("policy_sentry")
    import boto3
    from policy_sentry.shared.iam_data import get_service_prefix_data

    run_instances = get_service_prefix_data("ec2")["privileges"]["RunInstances"]["resource_types"]
    required = {name for name, t in run_instances.items() if t["required"]}
    made, prepared, instances = _aws_launch()
    iam = boto3.client("iam")
    assert iam.list_roles(PathPrefix="/aws-service-role/spot.amazonaws.com/")["Roles"]   # EC2 needs it for spot
    head_role = "tlcore-aws-head"
    (policy_name,) = iam.list_role_policies(RoleName=head_role)["PolicyNames"]
    document = iam.get_role_policy(RoleName=head_role, PolicyName=policy_name)["PolicyDocument"]
    statements = (document if isinstance(document, dict) else json.loads(document))["Statement"]
    region, account = prepared["provider"]["region"], made["head_profile_arn"].split(":")[4]

    def arn(kind, rid, acct=account):
        return f"arn:aws:ec2:{region}:{acct}:{kind}/{rid}"

    for name, i in instances.items():
        node_config = prepared["available_node_types"][name]["node_config"]
        assert not {"LaunchTemplate", "Placement", "CapacityReservationSpecification", "LicenseSpecifications"} & set(
            node_config), name  # each would add a resource type to check here
        spot = node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        touched = {
            "instance": [arn("instance", i["InstanceId"])],
            "image": [arn("image", i["ImageId"], "")],
            "subnet": [arn("subnet", i["SubnetId"])],
            "network-interface": [arn("network-interface", n["NetworkInterfaceId"]) for n in i["NetworkInterfaces"]],
            "security-group": [arn("security-group", g["GroupId"]) for g in i["SecurityGroups"]],
            "volume": [arn("volume", b["Ebs"]["VolumeId"]) for b in i["BlockDeviceMappings"]],
            "key-pair": [arn("key-pair", i["KeyName"])] if "KeyName" in node_config else [],
            # moto makes no spot request; EC2 gives each spot launch one (sir-...)
            SPOT_REQUEST: [arn(SPOT_REQUEST, i.get("SpotInstanceRequestId") or "sir-0123abcd")] if spot else [],
        }
        assert required <= {kind for kind, arns in touched.items() if arns}, (name, required)
        tags = {t["Key"]: t["Value"] for t in i["Tags"]}   # Ray tags at launch (TagSpecifications)
        denied = [a for arns in touched.values() for a in arns if not _allows(statements, "ec2:RunInstances", a, tags)]
        assert denied == [], f"the head may not launch {name}: {denied}"


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

    run = lambda *a: subprocess.run(["bash", str(CLUSTER / "gcp_setup.sh"), "--project", "p", "--region", "europe-west4",
                                     "--bucket", "tlcore-data", "--dry-run", *a], capture_output=True, text=True)
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
    for wide in ("0.0.0.0/0", "10.0.0.0/4", "3.0.0.0/8", "10.0.0.0/12", "2001:db8::/32", "everyone"):
        refused = run("--ssh-cidr", wide)
        assert refused.returncode == 2 and "--ssh-cidr" in refused.stderr and not refused.stdout, wide
    assert "warning" in run("--ssh-cidr", "10.1.0.0/16").stderr and "warning" not in out.stderr
    ipv6 = run("--ssh-cidr", "2001:db8:1234::/48")
    assert ipv6.returncode == 0 and "--source-ranges=2001:db8:1234::/48" in ipv6.stdout


def _gcp_dry_run(*extra, cidr="198.51.100.0/24", bucket="tlcore-data", cluster="tlcore-gcp"):
    import shlex
    import subprocess

    out = subprocess.run(["bash", str(CLUSTER / "gcp_setup.sh"), "--project", "p", "--region", "europe-west4",
                          "--ssh-cidr", cidr, "--bucket", bucket, "--cluster-name", cluster, "--dry-run", *extra],
                         capture_output=True, text=True)
    return out, [shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ ")]


def test_gcp_setup_run_again_brings_rules_role_and_binding_back_to_the_files():
    """Every create is followed by the update that applies the file (a rerun with a narrower
    --ssh-cidr replaces the old network; an earlier, wider condition is removed before binding)."""
    out, commands = _gcp_dry_run(cidr="198.51.100.7/32")
    assert out.returncode == 0, out.stderr
    verbs = [" ".join(c[3:6]) for c in commands]
    for created in ("compute firewall-rules create", "iam roles create"):
        assert verbs[verbs.index(created) + 1] == created.replace("create", "update"), verbs
    flags = lambda c: dict(a.split("=", 1) for a in c if a.startswith("--") and "=" in a)
    ssh = [flags(c) for c in commands if c[3:7] in (["compute", "firewall-rules", "create", "tlcore-ssh"],
                                                     ["compute", "firewall-rules", "update", "tlcore-ssh"])]
    assert [r["--source-ranges"] for r in ssh] == ["198.51.100.7/32"] * 2 and ssh[1]["--source-tags"] == ""
    assert verbs.index("projects remove-iam-policy-binding p") < verbs.index("projects add-iam-policy-binding p")


def test_gcp_head_role_reaches_this_clusters_vms_and_tlcore_subnet_only():
    """The condition of the head's role, evaluated on the names GCP would check: Ray's own names
    for this cluster's VMs (from its node-naming code), not another cluster's with a longer name;
    tlcore-subnet, not another VPC's subnet."""
    import re

    from ray.autoscaler._private.gcp.node import _generate_node_name
    from ray.autoscaler.tags import TAG_RAY_NODE_NAME

    out, commands = _gcp_dry_run(cluster="tlcore-gcp")
    (binding,) = [c for c in commands if c[3:5] == ["projects", "add-iam-policy-binding"]]
    condition = next(a for a in binding if a.startswith("--condition="))[len("--condition="):]
    title, expression = condition.split(",", 1)
    assert title == "title=only-tlcore-gcp" and "," not in expression.removeprefix("expression=")  # gcloud splits at commas
    expression = expression.removeprefix("expression=")
    instance_re = re.search(r"matches\('([^']+)'\)", expression)[1]
    subnet_suffix = re.search(r"endsWith\('([^']+)'\)", expression)[1]
    name = lambda cluster, kind: _generate_node_name({TAG_RAY_NODE_NAME: f"ray-{cluster}-{kind}"}, "compute")
    assert re.match(instance_re, name("tlcore-gcp", "head")) and re.match(instance_re, name("tlcore-gcp", "worker"))
    for other in (name("tlcore-gcp-2", "worker"), name("tlcore-gcp-head", "head"), "ray-tlcore-gcp-worker-x", "db-prod-1"):
        assert not re.match(instance_re, other), other
    assert "projects/p/regions/europe-west4/subnetworks/tlcore-subnet".endswith(subnet_suffix)
    assert not "projects/p/regions/europe-west4/subnetworks/other-vpc-subnet".endswith(subnet_suffix)
    role = yaml.safe_load((CLUSTER / "gcp-head-role.yaml").read_text())["includedPermissions"]
    assert "compute.subnetworks.use" in role and not any(p.startswith("compute.images.") for p in role)
    for bad in ("tlcore_gcp", "Tlcore", "-x", "a" * 45):
        refused, _ = _gcp_dry_run(cluster=bad)
        assert refused.returncode == 2 and "--cluster-name" in refused.stderr, bad


@pytest.mark.parametrize("provider", ["aws", "gcp"])
def test_setup_scripts_take_one_bucket_by_the_providers_naming_rules(provider, monkeypatch):
    monkeypatch.syspath_prepend(str(CLUSTER))
    from checks import SetupInputError, check_bucket

    for good in ("my-tlcore-data", "lab.data.2026", "abc"):
        assert check_bucket(good, provider) == good
    for bad in ("*", "my-*", "ab", "My-Bucket", "-data", "a..b", "192.168.1.1", "x" * 64,
                *(["xn--data", "data-s3alias"] if provider == "aws" else ["goog-data", "my-google-data"])):
        with pytest.raises(SetupInputError, match="--bucket"):
            check_bucket(bad, provider)
    if provider == "gcp":
        refused, _ = _gcp_dry_run(bucket="*")
        assert refused.returncode == 2 and "--bucket" in refused.stderr and not refused.stdout


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

"""`ray up cluster/onprem.yaml` for real: Ray's own launcher over SSH onto hosts made on this
machine (tests/cluster_hosts.py: network namespaces, each with its own sshd, processes, home and
/tmp), then, on the head as a user would, the team MLflow server with auth and a sweep with
`--address auto`; then `ray down`.

Of onprem.yaml only what must differ here is changed: the addresses, the key, and the environment
step (the hosts cannot reach a package registry: their venv takes its packages from this checkout's
and installs the copied tlcore on top, editable). file_mounts, rsync_exclude, rsync_filter, the
token set-up and the start commands run exactly as shipped."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import cluster_hosts
import pytest
import yaml
from helpers import REPO, SWEEP_VOLUME

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

RAY = str(Path(sys.executable).parent / "ray")
PASSWORD = "tlcore-test-" + os.urandom(6).hex()   # the team server's admin password, never on a command line


def environment_step() -> list[str]:
    """onprem.yaml's venv + pip lines, offline: a venv whose packages are this checkout's, with the
    rsynced ~/tlcore installed on top (so the hosts import the code `ray up` copied, not ours)."""
    site = sysconfig.get_paths()["purelib"]
    venv_site = "~/tlcore-venv/lib/python{}.{}/site-packages".format(*sys.version_info[:2])
    scripts = Path(sys.executable).parent
    # console scripts of the checkout's venv with the host venv's python (single quotes: the
    # launcher's shell is interactive, where "#!" would be a history expansion)
    wrappers = "; ".join(f"sed '1s|.*|#!'\"$HOME\"'/tlcore-venv/bin/python|' {scripts / b} > ~/tlcore-venv/bin/{b}"
                         f" && chmod +x ~/tlcore-venv/bin/{b}" for b in ("ray", "mlflow"))
    return [f"{sys._base_executable} -m venv --without-pip ~/tlcore-venv && echo {site} > {venv_site}/checkout-env.pth"
            f" && {wrappers}",
            "~/tlcore-venv/bin/python -m pip install -q --no-index --no-deps --no-build-isolation -e ~/tlcore"]


def cluster_config(hosts: cluster_hosts.TestHosts) -> dict:
    config = yaml.safe_load((REPO / "cluster" / "onprem.yaml").read_text())
    head, *workers = hosts.hosts
    config["provider"].update(head_ip=head.ip, worker_ips=[w.ip for w in workers])
    config["auth"]["ssh_private_key"] = str(hosts.key)
    shipped = config["setup_commands"]
    environment = [c for c in shipped if "pip install" in c]
    assert len(environment) == 2, shipped  # the venv and the editable install: what we replace
    at = shipped.index(environment[0])
    config["setup_commands"] = shipped[:at] + environment_step() + [c for c in shipped[at:] if c not in environment]
    return config


@pytest.fixture()
def hosts():
    why = cluster_hosts.missing()
    if why:
        pytest.skip(why)
    base = Path(f"/var/tmp/tlup-{os.getpid()}")  # not under /tmp: every host mounts its own /tmp
    shutil.rmtree(base, ignore_errors=True)
    made = cluster_hosts.TestHosts(base, base / "shared", names=("head", "worker1"))
    try:
        yield made.start()
    finally:
        made.close()
        shutil.rmtree(base, ignore_errors=True)


def _ok(proc: subprocess.CompletedProcess, what: str) -> str:
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _wait_for_nodes(hosts, head, n: int, timeout: float) -> None:
    """Until the head's Ray has `n` live nodes (the autoscaler starts workers after `ray up` returns)."""
    count = "python -c \"import ray; ray.init(address='auto', log_to_driver=False); print('NODES', sum(x['Alive'] for x in ray.nodes()))\""
    deadline, out = time.time() + timeout, None
    while time.time() < deadline:
        out = hosts.ssh(head, count, timeout=120)
        if f"NODES {n}" in out.stdout:
            return
        time.sleep(5)
    status = hosts.ssh(head, "ray status 2>&1; tail -30 /tmp/ray/session_latest/logs/monitor.log", timeout=60).stdout
    pytest.fail(f"the cluster did not reach {n} nodes in {timeout:.0f} s:\n{out.stdout[-1000:]}{out.stderr[-2000:]}\n{status}")


def test_ray_up_over_ssh_runs_a_sweep_on_two_nodes_and_ray_down_stops_everything(hosts):
    from tlcore.data.synthetic import ensure_synthetic
    from tlcore.tracking import registry, store

    head, worker = hosts.hosts
    laptop_home = hosts.base / "laptop-home"
    laptop_home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    # cluster/README.md step 1: a token, once, on the machine `ray up` runs from
    _ok(hosts.on_laptop([RAY, "get-auth-token", "--generate"], laptop_home, env=env, capture_output=True, text=True),
        "ray get-auth-token")
    config_path = hosts.base / "onprem-test.yaml"
    config_path.write_text(yaml.safe_dump(cluster_config(hosts)))

    started = time.time()
    up = hosts.on_laptop([RAY, "up", "-y", "--no-config-cache", str(config_path)], laptop_home, env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    _ok(up, "ray up")
    _wait_for_nodes(hosts, head, 2, timeout=300)
    up_s = time.time() - started

    # the copied code is whole (rsync_exclude once dropped tlcore/data/) and is what the hosts import
    probe = "cd / && python -c 'import tlcore, tlcore.data.layouts; print(tlcore.__file__)'"  # not from ~: ~/tlcore would shadow
    for host in (head, worker):
        imported = _ok(hosts.ssh(host, probe), f"import tlcore on {host.name}").strip().splitlines()[-1]
        assert imported == str(host.home / "tlcore" / "tlcore" / "__init__.py"), imported
        token = host.home / ".ray" / "auth_token"
        assert token.read_text() == (laptop_home / ".ray" / "auth_token").read_text()
        assert token.stat().st_mode & 0o777 == 0o600
    tracked = set(subprocess.run(["git", "ls-files", "tlcore", "sweeps"], cwd=REPO, capture_output=True, text=True,
                                 check=True).stdout.split())
    copied = {str(p.relative_to(worker.home / "tlcore")) for p in (worker.home / "tlcore").rglob("*") if p.is_file()}
    assert tracked <= copied, sorted(tracked - copied)

    # a driver without the token, from elsewhere on the network, is refused
    stranger = hosts.base / "stranger"
    stranger.mkdir()
    refused = hosts.on_laptop([sys.executable, "-c", "import ray; ray.init(address='%s:6379', log_to_driver=False)" % head.ip],
                              stranger, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and re.search(r"token|auth", refused.stderr, re.I), refused.stderr[-3000:]

    # data on the shared file system; the team MLflow server on the head, auth on
    ensure_synthetic(hosts.shared / "data" / "brats", "brats", seed=0, n_hgg=8, n_lgg=0, shape=SWEEP_VOLUME)
    ini = (f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{head.home}/mlflow-auth.db\n"
           f"admin_username = admin\nadmin_password = {PASSWORD}\nauth_cache_ttl_seconds = 60\n")  # mlflow/README.md
    _ok(hosts.ssh(head, "umask 077 && cat > ~/basic_auth.ini", stdin=ini), "write basic_auth.ini")
    # (one server process, --workers 1: the default four each load MLflow, and one sweep needs one)
    server = (f"cd ~/tlcore; MLFLOW_BACKEND_URI=sqlite:///$HOME/mlflow.db MLFLOW_ARTIFACTS=/shared/mlflow-artifacts "
              f"MLFLOW_AUTH_CONFIG_PATH=$HOME/basic_auth.ini setsid nohup mlflow/server.sh --host {head.ip} --workers 1 "
              "> ~/mlflow-server.log 2>&1 < /dev/null & echo $! > ~/mlflow-server.pid")
    _ok(hosts.ssh(head, server), "start the MLflow server")
    uri = f"http://{head.ip}:5000"
    as_admin = {**env, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": PASSWORD, "PYTHONPATH": str(REPO / "tests")}
    register = ("import sys, time, pathlib, urllib.request\n"
                "for _ in range(120):\n"
                "    try: urllib.request.urlopen(sys.argv[1] + '/health', timeout=2); break\n"
                "    except urllib.error.HTTPError: break\n"
                "    except OSError: time.sleep(1)\n"
                "from tlcore.tracking import store\nfrom helpers import register_untrained_source\n"
                "store.prepare_store(sys.argv[1])\nregister_untrained_source(sys.argv[1], pathlib.Path(sys.argv[2]))\n")
    _ok(hosts.on_laptop([sys.executable, "-c", register, uri, str(hosts.base / "laptop-tmp")], laptop_home, env=as_admin,
                        capture_output=True, text=True, timeout=300), "register the source model through the server")

    # the sweep, on the head, as cluster/README.md says: credentials typed into the shell, not argv
    sweep = ("cd ~/tlcore && read -r MLFLOW_TRACKING_PASSWORD && export MLFLOW_TRACKING_PASSWORD MLFLOW_TRACKING_USERNAME=admin"
             f" && python sweeps/brats_layers.py --address auto --data-dir /shared/data/brats --storage-path /shared/ray_results"
             f" --shared-storage --mlflow-uri {uri} --smoke-test --max-iterations 4 --report-every 4 --scheduler none"
             " --frozen-layers 0 --controls scratch --cpus-per-trial 2")
    started, ran = time.time(), []
    sweeping = threading.Thread(target=lambda: ran.append(hosts.ssh(head, sweep, stdin=PASSWORD + "\n", timeout=900)))
    sweeping.start()
    # meanwhile, every process of both hosts: only the driver may hold the password in its environment
    # (trials, evaluation tasks and Ray's own processes get none: the driver is the only MLflow client)
    holding = set()
    while sweeping.is_alive():
        holding |= {cmd for h in hosts.hosts for cmd in h.environ_holding(PASSWORD.encode())
                    if "sweeps/brats_layers.py" not in cmd}
        sweeping.join(timeout=1)
    sweep_s, ran = time.time() - started, ran[0]
    _ok(ran, "the sweep on the head")
    assert PASSWORD not in ran.stdout + ran.stderr
    assert not holding, holding
    # nor does Ray's key-value store (the function table holds every pickled trainable and task)
    kv = _ok(hosts.ssh(head, "cd ~/tlcore && python tests/gcs_kv_search.py auto", stdin=PASSWORD + "\n"), "search the GCS")
    assert re.search(r"scanned [1-9]\d* entries", kv) and not re.search(r"^found ", kv, re.M), kv
    assert re.search(rf"Connecting to existing Ray cluster at address: {re.escape(head.ip)}:6379", ran.stdout + ran.stderr)

    # what the server holds (its SQLite store, read from this machine)
    store_uri = f"sqlite:///{head.home}/mlflow.db"
    exp = store.client(store_uri).get_experiment_by_name("brats_layers")
    runs = store.client(store_uri).search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.data.tags.get("role") != "seed_aggregate"]
    children = [r for r in runs if r.data.tags.get("trial_id")]
    assert len(parents) == 1 and len(children) == 2, [(r.info.run_name, r.data.tags.get("role")) for r in runs]
    source = registry.resolve_model(store_uri, "models:/ixi_hippocampus/1")
    nodes = {}
    for r in children:
        assert r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert "test_dice" in r.data.metrics  # the evaluation task (a Ray task on either node) logged too
        nodes[r.data.params["source_model"]] = (r.data.tags["runtime.node"], r.data.tags["runtime.node_ip"])
        if r.data.params["source_model"] != "scratch":  # the transferred trial loaded the registered source
            assert r.data.tags["source_run_id"] == source.run_id and int(r.data.params["transfer.loaded_tensors"]) > 0
    assert {ip for _, ip in nodes.values()} == {head.ip, worker.ip}, nodes  # trials ran on both machines
    assert all(r.info.status != "RUNNING" for r in runs)
    assert all(PASSWORD not in json.dumps([r.data.params, r.data.tags]) for r in runs)
    # no host holds the password: not the results and artifacts on /shared, not Ray's logs in each
    # host's /tmp, not a home (but the server's own admin file, basic_auth.ini, which holds it by design)
    leaked = [f for root in (hosts.shared, *(h.root for h in hosts.hosts)) for f in root.rglob("*")
              if f.is_file() and not f.is_symlink() and f.name != "basic_auth.ini" and "tlcore-venv" not in f.parts
              and PASSWORD.encode() in f.read_bytes()]
    assert not leaked, leaked

    # tear down: the server, then `ray down`; nothing of Ray (or ours) is left on any host
    hosts.ssh(head, "kill -- -$(cat ~/mlflow-server.pid) 2>/dev/null; kill $(cat ~/mlflow-server.pid) 2>/dev/null; true")
    started = time.time()
    _ok(hosts.on_laptop([RAY, "down", "-y", str(config_path)], laptop_home, env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=300), "ray down")
    down_s = time.time() - started
    timings = {"ray_up_s": round(up_s, 1), "sweep_s": round(sweep_s, 1), "ray_down_s": round(down_s, 1),
               "nodes": {k: list(v) for k, v in nodes.items()}}
    print("cluster launch:", json.dumps(timings))
    # the head at once; each worker stops its own Ray once the head has stopped answering (onprem.yaml)
    deadline, left = time.time() + 120, {}
    while time.time() < deadline:
        left = {h.name: [p for p in h.processes() if not p.startswith("sshd")] for h in hosts.hosts}
        if not any(left.values()):
            break
        time.sleep(3)
    assert not any(left.values()), left
    print("cluster launch: every host's Ray stopped", round(time.time() - started, 1), "s after `ray down` began")

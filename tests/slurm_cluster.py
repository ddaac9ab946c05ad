"""A real Slurm cluster made on this machine for tests: munged, slurmctld and slurmd (Debian's
Slurm 22.05), each with its own files under the test's folder and its own socket, ports and
ClusterName, so that nothing touches a Slurm or munge the machine may run.

Two nodes where Linux network namespaces can be made (root): the controller, node n1 and node n2
each in a namespace `tlsl-<tag>-{c,n1,n2}` on a private bridge (10.231.0.0/24, inside the
controller's namespace; nothing beyond the namespaces made here is reachable). The slurmds enter
their namespace with `nsenter --net` only: they keep the machine's /sys/fs/cgroup (slurmd 22.05
will not start without it, and `ip netns exec` remounts /sys). The nodes share the whole file
system, as nodes share a home and NFS: the checkout, the data, the storage path, and here /tmp
too (Ray's /tmp/ray-<job id> is one folder for both nodes' Ray, which Ray allows).
One node on 127.0.0.1 where namespaces cannot be made (`SlurmCluster(nodes=1)`, or
TLCORE_SLURM_NODES=1).

Slurm here: no cgroups (proctrack/linuxproc, task/none), no accounting daemon (sacct has nothing:
`scontrol show job` keeps a finished job for MinJobAge, and jobcomp/filetxt records every end).
`close()` cancels every job, SIGKILLs every process in the namespaces (slurmstepd, Ray, drivers,
the MLflow server), then the daemons by PID, and deletes the namespaces.
"""

from __future__ import annotations

import ctypes
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from helpers import processes_with_cmdline

REPO = Path(__file__).resolve().parents[1]
SUBNET = "10.231.0"
CLONE_NEWNET = 0x40000000
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "sinfo", "srun")


class SlurmUnavailable(RuntimeError):
    """Slurm (or munge) cannot run on this machine: a reason to skip, not a failure."""


def missing() -> str | None:
    """Why this machine cannot run a test Slurm, or None."""
    if os.geteuid() != 0:
        return "a test Slurm (munged, slurmctld, slurmd as SlurmUser=root) needs root"
    for tool in TOOLS:
        if not shutil.which(tool) and not Path("/usr/sbin", tool).exists():
            return f"{tool} is not installed (apt-get install slurmctld slurmd slurm-client munge)"
    return None


def netns_possible() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    for tool in ("ip", "nsenter"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    probe = f"tlsl-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None if made.returncode == 0 else f"ip netns add: {made.stderr.strip()}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _enter_netns(name: str) -> None:
    """Move the calling thread (only it) into network namespace `name`."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
    finally:
        os.close(fd)


class SlurmCluster:
    def __init__(self, base: Path, nodes: int | None = None):
        self.base = Path(base)
        self.tag = secrets.token_hex(3)
        self.name = f"tlsl{self.tag}"                      # ClusterName
        want = nodes or int(os.environ.get("TLCORE_SLURM_NODES", "2"))
        self.why_one_node = None if want >= 2 else "one node asked for"
        if want >= 2:
            self.why_one_node = netns_possible()
        self.two = self.why_one_node is None
        self.nodes = ["n1", "n2"] if self.two else ["n1"]
        self.ctl_ns = f"tlsl-{self.tag}-c"
        self.node_ns = {n: f"tlsl-{self.tag}-{n}" for n in self.nodes}
        self.ctl_ip = f"{SUBNET}.1" if self.two else "127.0.0.1"
        self.node_ip = {n: f"{SUBNET}.{10 + i + 1}" if self.two else "127.0.0.1" for i, n in enumerate(self.nodes)}
        self.conf = self.base / "slurm.conf"
        self.first_job_id = random.randint(100_000, 899_999)  # Ray's temp dir is /tmp/ray-<job id>
        self.jobs: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._made_ns: list[str] = []
        self._sock_dir: Path | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.servers: list[subprocess.Popen] = []
        self.leftover: list[int] = []

    # ------------------------------------------------------------------ set-up
    def start(self) -> "SlurmCluster":
        self.base.mkdir(parents=True, exist_ok=True)
        for d in ("state", "log", "munge"):
            (self.base / d).mkdir(exist_ok=True)
        (self.base / "munge").chmod(0o700)
        if self.two:
            self._network()
        self._start_munge()
        # slurmd's spool holds the job steps' Unix sockets (<spool>/<node>_<job>.<step>): a pytest
        # folder is too long for them (108 bytes) with 6-digit job ids, and the job fails to launch
        self.spool = self._sock_dir / "spool"
        self.spool.mkdir()
        self._write_conf()
        self._procs.append(self._spawn("slurmctld", ["slurmctld", "-D", "-c"], self.ctl_ns if self.two else None))
        for n in self.nodes:
            (self.spool / n).mkdir(exist_ok=True)
            self._procs.append(self._spawn(f"slurmd.{n}", ["slurmd", "-D", "-N", n],
                                           self.node_ns[n] if self.two else None))
        self._wait_idle(timeout=40)
        return self

    def _network(self) -> None:
        """A bridge in the controller's namespace; one veth from it into each node's namespace.
        Each namespace's default route points at the bridge, so that Ray's 'which address reaches
        8.8.8.8' probe (a UDP connect: nothing is sent) finds the node's address."""
        _ip("netns", "add", self.ctl_ns)
        self._made_ns.append(self.ctl_ns)
        _ip("-n", self.ctl_ns, "link", "set", "lo", "up")
        _ip("-n", self.ctl_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.ctl_ns, "addr", "add", f"{self.ctl_ip}/24", "dev", "br0")
        _ip("-n", self.ctl_ns, "link", "set", "br0", "up")
        _ip("-n", self.ctl_ns, "route", "add", "default", "dev", "br0")
        for n, ns in self.node_ns.items():
            _ip("netns", "add", ns)
            self._made_ns.append(ns)
            _ip("-n", self.ctl_ns, "link", "add", f"v{n}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.ctl_ns, "link", "set", f"v{n}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.node_ip[n]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "default", "dev", "eth0")

    def _start_munge(self) -> None:
        # munged wants every directory above its socket searchable by all: not the test's tmp_path
        self._sock_dir = Path(tempfile.mkdtemp(prefix=f"tlsl-{self.tag}-", dir="/tmp"))
        self._sock_dir.chmod(0o755)
        self.munge_socket = self._sock_dir / "munge.sock"
        key = self.base / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        m = self.base / "munge"
        proc = self._spawn("munged", ["munged", "-F", f"--socket={self.munge_socket}", f"--key-file={key}",
                                      f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}",
                                      f"--seed-file={m / 'munged.seed'}"], None)
        self._procs.append(proc)
        deadline = time.time() + 15
        while not self.munge_socket.exists():
            if proc.poll() is not None or time.time() > deadline:
                raise SlurmUnavailable(f"munged did not start: {self._tail('munged')}")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        b = self.base
        host = socket.gethostname().split(".")[0]  # slurmctld runs only where SlurmctldHost names this host
        ctld_port, slurmd_port = (6817, 6818) if self.two else (_free_port(), _free_port())
        nodes = "".join(f"NodeName={n} NodeAddr={self.node_ip[n]} CPUs=1 RealMemory=2000 State=UNKNOWN"
                        + ("" if self.two else f" Port={slurmd_port}") + "\n" for n in self.nodes)
        (b / "plugstack.conf").write_text("")
        self.conf.write_text(f"""\
ClusterName={self.name}
SlurmctldHost={host}({self.ctl_ip})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={b / 'state'}
SlurmdSpoolDir={self.spool}/%n
SlurmctldPidFile={b / 'slurmctld.pid'}
SlurmdPidFile={b / 'slurmd.%n.pid'}
SlurmctldLogFile={b / 'log' / 'slurmctld.log'}
SlurmdLogFile={b / 'log' / 'slurmd.%n.log'}
PlugStackConfig={b / 'plugstack.conf'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={b / 'log' / 'jobcomp.txt'}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
KillWait=5
MinJobAge=900
FirstJobId={self.first_job_id}
{nodes}PartitionName=tlsl Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, label: str, argv: list[str], netns: str | None, env: dict | None = None) -> subprocess.Popen:
        """A daemon in the foreground, in its own session, in `netns` (network only) if given."""
        prefix = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
        out = (self.base / "log" / f"{label}.out").open("ab")
        return subprocess.Popen(prefix + argv, env=env if env is not None else self.env(), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        states = ""
        while time.time() < deadline:
            for p in self._procs:
                if p.poll() is not None:
                    raise SlurmUnavailable(f"{' '.join(map(str, p.args[-4:]))} exited ({p.returncode}): "
                                           f"{self._tail('slurmctld')}{self._tail('slurmd.n1')}")
            r = self.slurm("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            states = r.stdout.strip()
            if r.returncode == 0 and len(states.splitlines()) == len(self.nodes) and all(
                    line.split()[1] == "idle" for line in states.splitlines()):
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"the Slurm nodes did not come up: {states!r} {self._tail('slurmctld')}")

    def _tail(self, label: str) -> str:
        for f in (self.base / "log" / f"{label}.out", self.base / "munge" / f"{label}.log"):
            if f.exists():
                return f"\n--- {f.name}:\n" + f.read_text(errors="replace")[-1500:]
        return ""

    # ------------------------------------------------------------------ use
    def env(self, base: dict | None = None, **extra: str) -> dict:
        return {**(base if base is not None else os.environ), "SLURM_CONF": str(self.conf), **extra}

    def slurm(self, *argv: str, env: dict | None = None, check: bool = True,
              timeout: float = 30) -> subprocess.CompletedProcess:
        """A Slurm client command (sbatch, squeue, ...) where the controller is reachable."""
        prefix = ["nsenter", f"--net=/run/netns/{self.ctl_ns}"] if self.two else []
        r = subprocess.run(prefix + list(argv), env=self.env(env), capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)}: exit {r.returncode}\n{r.stdout}{r.stderr}")
        return r

    def on_node(self, node: str, argv: list[str], env: dict, timeout: float = 90) -> subprocess.CompletedProcess:
        """A command in node `node`'s network (as a process on that machine outside Slurm would run)."""
        prefix = ["nsenter", f"--net=/run/netns/{self.node_ns[node]}"] if self.two else []
        return subprocess.run(prefix + argv, env=env, capture_output=True, text=True, timeout=timeout)

    def sbatch(self, script: Path, *options: str, env: dict) -> str:
        r = self.slurm("sbatch", "--parsable", *options, str(script), env=env)
        job = r.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def job(self, job: str) -> dict:
        """`scontrol show job` as a dict ({} once Slurm has forgotten the job)."""
        r = self.slurm("scontrol", "show", "job", "-o", job, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout)) if r.returncode == 0 else {}

    def state(self, job: str) -> str:
        return self.job(job).get("JobState", "")

    def wait_state(self, job: str, states: set[str], timeout: float, output: Path | None = None) -> str:
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            state = self.state(job)
            if state in states:
                return state
            time.sleep(1)
        tail = output.read_text(errors="replace")[-4000:] if output and output.exists() else ""
        nodes = self.slurm("sinfo", "-h", "-N", "-o", "%N %t %E", check=False).stdout.strip()
        raise AssertionError(f"job {job} still {state or 'unknown'} (reason {self.job(job).get('Reason', '?')}) after "
                             f"{timeout:.0f} s (want {states}); nodes: {nodes}\n{tail}")

    def in_queue(self) -> list[str]:
        return self.slurm("squeue", "-h", "-o", "%i", check=False).stdout.split()

    def call(self, fn, *args, **kwargs):
        """fn(*args) in a thread inside the controller's network namespace (where the nodes and
        the MLflow server are reachable); in this thread where there is no namespace."""
        if not self.two:
            return fn(*args, **kwargs)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, initializer=_enter_netns, initargs=(self.ctl_ns,))
        return self._executor.submit(fn, *args, **kwargs).result()

    def start_mlflow(self, workdir: Path, admin_password: str | None = None) -> str:
        """mlflow/server.sh (SQLite backend, artifacts in `workdir`; with `admin_password`,
        basic-auth with user admin) on the controller's address, where every node reaches it;
        returns its URI without waiting for it: call wait_mlflow()."""
        port = 5000 if self.two else _free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update({"MLFLOW_BACKEND_URI": f"sqlite:///{workdir / 'server.db'}",
                    "MLFLOW_ARTIFACTS": str(workdir / "artifacts"),
                    "MLFLOW_AUTH": "off", "MLFLOW_BIN": str(Path(sys.executable).parent / "mlflow"),
                    "MLFLOW_WORKERS": "1"})  # `mlflow server` starts 4 by default: a minute of CPU on 2 cores
        if admin_password is not None:
            ini = workdir / "basic_auth.ini"
            ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{workdir / 'auth.db'}\n"
                           f"admin_username = admin\nadmin_password = {admin_password}\nauth_cache_ttl_seconds = 60\n")
            ini.chmod(0o600)
            env.update({"MLFLOW_AUTH": "on", "MLFLOW_AUTH_CONFIG_PATH": str(ini),
                        "XDG_CONFIG_HOME": str(workdir / "config")})
        proc = self._spawn("mlflow",
                           ["bash", str(REPO / "mlflow" / "server.sh"), "--host", self.ctl_ip, "--port", str(port),
                            "--workers", "1"],
                           self.ctl_ns if self.two else None, env=env)
        self.servers.append(proc)
        self.mlflow_uri = f"http://{self.ctl_ip}:{port}"
        return self.mlflow_uri

    def wait_mlflow(self, timeout: float = 120) -> None:
        def answers() -> bool:
            try:
                return urllib.request.urlopen(f"{self.mlflow_uri}/health", timeout=2).status == 200
            except urllib.error.HTTPError:
                return True  # basic-auth may guard /health too
            except OSError:
                return False
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.call(answers):
                return
            if self.servers[-1].poll() is not None:
                break
            time.sleep(0.5)
        raise AssertionError(f"the MLflow server at {self.mlflow_uri} did not answer: {self._tail('mlflow')}")

    def namespace_pids(self) -> list[int]:
        pids = []
        for ns in self._made_ns:
            r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            pids += [int(p) for p in r.stdout.split()]
        return pids

    def netns_of(self, pid: int) -> str | None:
        """Which of this cluster's namespaces process `pid` is in (None: another)."""
        try:
            target = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            return None
        for ns in self._made_ns:
            if os.stat(f"/run/netns/{ns}").st_ino == target:
                return ns
        return None

    # ------------------------------------------------------------------ tear-down
    def close(self) -> None:
        try:
            if self.jobs and self._procs:
                for job in self.in_queue():
                    self.slurm("scancel", job, check=False)
                deadline = time.time() + 20
                while self.in_queue() and time.time() < deadline:
                    time.sleep(0.5)
        except Exception:  # noqa: BLE001 -- tear down the rest regardless
            pass
        if self._executor is not None:
            self._executor.shutdown(wait=True)  # its thread holds the controller namespace open
        # everything in the namespaces (slurmstepd, Ray, drivers, the MLflow server), then the daemons
        for _ in range(10):
            pids = self.namespace_pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.3)
        self.leftover = self.namespace_pids()  # what even SIGKILL did not end (the fixture checks)
        if not self.two:  # one node: the jobs' processes carry the cluster's name in their environment
            marker = f"SLURM_CLUSTER_NAME={self.name}".encode()
            for proc in Path("/proc").iterdir():
                try:
                    if proc.name.isdigit() and marker in (proc / "environ").read_bytes():
                        os.kill(int(proc.name), signal.SIGKILL)
                except OSError:
                    pass
        for p in self._procs + self.servers:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for ns in self._made_ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for job in self.jobs:  # Ray's logs stay with the test's files (pytest keeps the last few)
            if Path(f"/tmp/ray-{job}").exists():
                try:
                    shutil.move(f"/tmp/ray-{job}", self.base / f"ray-{job}")
                except OSError:
                    shutil.rmtree(f"/tmp/ray-{job}", ignore_errors=True)
        if self._sock_dir:
            shutil.rmtree(self._sock_dir, ignore_errors=True)


def ray_processes(job: str) -> list[tuple[int, str]]:
    """(pid, command line) of every process of job `job`'s Ray: their command lines name its
    temp dir, /tmp/ray-<job>."""
    return processes_with_cmdline(f"/tmp/ray-{job}")


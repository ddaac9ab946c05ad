"""Machines for `ray up`, made on this one: each host is a Linux network namespace on a private
bridge, with its own PID namespace (so the YAML's `ray stop` ends only that host's Ray), hostname,
home, /tmp, /etc/passwd and /etc/hosts, the shared folder mounted at /shared, and its own sshd
(Debian's openssh-server) that accepts one key made for the test. A "laptop" namespace on the same
bridge runs the launcher. Nothing here reaches beyond the namespaces it made; `close()` ends every
process of every host (a PID namespace dies with its first process) and deletes the namespaces.

Needs root, `ip`, `unshare`, `sshd`, `rsync`: `missing()` says what is absent, for a skip."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUBNET = "10.77.0"   # a private range, as a cluster's network is (MLflow's server accepts private Host headers only)
LAPTOP_IP = f"{SUBNET}.2"
USER = "researcher"  # cluster/onprem.yaml's ssh_user


def missing() -> str | None:
    """Why this machine cannot make test hosts, or None."""
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    for tool in ("ip", "unshare", "nsenter", "/usr/sbin/sshd", "ssh", "ssh-keygen", "rsync"):
        if not shutil.which(tool):
            return f"{tool} is not installed (make cluster-deps: apt-get install openssh-server rsync iproute2)"
    probe = f"tlup-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if made.returncode != 0:
        return f"cannot make a network namespace here: {made.stderr.strip()}"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Host:
    name: str          # its hostname, e.g. tlup-head
    ip: str
    root: Path         # its private folders: home/, tmp/, etc/
    netns: str
    sshd: subprocess.Popen | None = None

    @property
    def home(self) -> Path:
        return self.root / "home"

    def pid(self) -> int:
        """The host's first process (sshd), as this machine numbers it: the handle for nsenter."""
        out = subprocess.run(["pgrep", "-P", str(self.sshd.pid)], capture_output=True, text=True).stdout.split()
        return int(out[0]) if out else self.sshd.pid

    def environ_holding(self, secret: bytes) -> list[str]:
        """Command lines of this host's processes whose environment holds `secret`."""
        ns, found = os.readlink(f"/proc/{self.pid()}/ns/pid"), []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    if os.readlink(proc / "ns" / "pid") == ns and secret in (proc / "environ").read_bytes():
                        found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore").strip())
                except OSError:
                    pass
        return found

    def processes(self) -> list[str]:
        """Command lines of every process running on this host (its PID namespace)."""
        ns = os.readlink(f"/proc/{self.pid()}/ns/pid")
        found = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    if os.readlink(proc / "ns" / "pid") == ns:
                        found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore").strip())
                except OSError:
                    pass
        return found


@dataclass
class TestHosts:
    base: Path         # outside /tmp: each host mounts its own folder over /tmp
    shared: Path       # mounted at /shared on every host
    names: tuple = ("head", "worker1")
    hosts: list = field(default_factory=list)
    key: Path | None = None

    def __post_init__(self) -> None:
        self.tag = f"tlup{os.getpid() % 100000}"
        self.lan, self.laptop = f"{self.tag}-lan", f"{self.tag}-laptop"

    # ------------------------------------------------------------------ set-up
    def start(self) -> "TestHosts":
        self.base.mkdir(parents=True, exist_ok=True)
        self.shared.mkdir(parents=True, exist_ok=True)
        Path("/shared").mkdir(exist_ok=True)   # the mount point on every host (empty on this machine)
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        self.key = self.base / "cluster_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "tlcore-test", "-f", str(self.key)], check=True)
        (self.base / "authorized_keys").write_text((self.base / "cluster_ed25519.pub").read_text())
        _ip("netns", "add", self.lan)
        _ip("-n", self.lan, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.lan, "link", "set", "br0", "up")
        self._plug(self.laptop, LAPTOP_IP, "laptop")
        hosts_file = "127.0.0.1 localhost\n" + "".join(
            f"{SUBNET}.{10 + i} {self.tag}-{n}\n" for i, n in enumerate(self.names))
        for i, n in enumerate(self.names):
            host = Host(f"{self.tag}-{n}", f"{SUBNET}.{10 + i}", self.base / n, f"{self.tag}-{n}")
            self._plug(host.netns, host.ip, f"v{i}")
            self._start_sshd(host, hosts_file)
            self.hosts.append(host)
        for host in self.hosts:
            self._wait_for_ssh(host)
        return self

    def _plug(self, netns: str, ip: str, port: str) -> None:
        """A namespace with one interface on the bridge; its default route points at the bridge
        too, so that Ray's 'which address reaches 8.8.8.8' probe picks this interface (a UDP
        connect: nothing is sent, and nothing beyond the bridge would carry it)."""
        _ip("netns", "add", netns)
        _ip("link", "add", port, "netns", self.lan, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("-n", self.lan, "link", "set", port, "master", "br0", "up")
        _ip("-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "route", "add", "default", "dev", "eth0")

    def _start_sshd(self, host: Host, hosts_file: str) -> None:
        for d in ("home", "tmp", "etc"):
            (host.root / d).mkdir(parents=True, exist_ok=True)
        (host.root / "tmp").chmod(0o1777)
        etc = host.root / "etc"
        passwd = Path("/etc/passwd").read_text()
        # uid 0 named as the YAML's user, home in the host's own folder: the checkout's Python
        # (under /root) stays reachable, and each host has its own ~ as separate machines do.
        # First line: ssh expands ~ (ray_bootstrap_key.pem) from the uid's entry, not $HOME.
        (etc / "passwd").write_text(f"{USER}:x:0:0:tlcore test:{host.home}:/bin/bash\n" + passwd)
        (etc / "hosts").write_text(hosts_file)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")  # no DNS: fail at once, not after timeouts
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(etc / "ssh_host_ed25519_key")], check=True)
        (etc / "sshd_config").write_text(
            f"ListenAddress {host.ip}\nHostKey {etc / 'ssh_host_ed25519_key'}\nPidFile {etc / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.base / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "PrintMotd no\nMaxStartups 50\nMaxSessions 50\nSubsystem sftp internal-sftp\n")
        mounts = " && ".join([
            f"hostname {host.name}",
            f"mount --bind {self.shared} /shared",
            *(f"mount --bind {etc / f} /etc/{f}" for f in ("passwd", "hosts", "resolv.conf")),
            self.cover_tmp(host.root / "tmp"),   # last: the paths above may lie under /tmp
        ])
        host.sshd = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, "unshare", "--pid", "--fork", "--mount-proc", "--uts", "--mount",
             "--propagation", "private", "--kill-child", "bash", "-c",
             f"{mounts} && exec /usr/sbin/sshd -D -e -f {etc / 'sshd_config'}"],
            stdout=(host.root / "sshd.log").open("ab"), stderr=subprocess.STDOUT, start_new_session=True)

    def cover_tmp(self, own_tmp: Path) -> str:
        """Shell commands that mount `own_tmp` over /tmp, keeping this checkout (and its venv)
        where it was when it lies under /tmp (a clone in /tmp, as CI may make)."""
        keep = REPO if str(REPO).startswith("/tmp/") else None
        if keep is None:
            return f"mount --bind {own_tmp} /tmp"
        stage = self.base / "checkout"
        stage.mkdir(exist_ok=True)
        return (f"mount --bind {keep} {stage} && mount --bind {own_tmp} /tmp && mkdir -p {keep}"
                f" && mount --bind {stage} {keep}")

    def _wait_for_ssh(self, host: Host, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.ssh(host, "true", timeout=10).returncode == 0:
                return
            if host.sshd.poll() is not None:
                break
            time.sleep(0.3)
        raise RuntimeError(f"sshd on {host.name} did not answer: {(host.root / 'sshd.log').read_text()[-2000:]}")

    # ------------------------------------------------------------------ use
    def ssh_argv(self, host: Host, command: str) -> list[str]:
        """ssh from the laptop to `host` as the YAML's user, `command` in an interactive shell (~/.bashrc:
        the venv on PATH, token auth), as `ray attach` gives."""
        return ["ip", "netns", "exec", self.laptop, "ssh", "-i", str(self.key), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes",
                "-o", "ConnectTimeout=5", f"{USER}@{host.ip}", f"bash -ic {_quote(command)}"]

    def ssh(self, host: Host, command: str, timeout: float = 120, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.ssh_argv(host, command), input=stdin, capture_output=True, text=True, timeout=timeout)

    def on_laptop(self, argv: list[str], home: Path, **kw) -> subprocess.CompletedProcess:
        """A command on the laptop: its own network, /tmp and processes (what a launcher leaves
        running, such as ssh control masters, ends with it), HOME=`home`."""
        tmp = self.base / "laptop-tmp"
        tmp.mkdir(exist_ok=True)
        tmp.chmod(0o1777)
        inner = f"{self.cover_tmp(tmp)} && exec \"$@\""
        env = {**kw.pop("env", os.environ), "HOME": str(home)}
        return subprocess.run(["ip", "netns", "exec", self.laptop, "unshare", "--pid", "--fork", "--mount-proc",
                               "--mount", "--propagation", "private", "--kill-child", "bash", "-c", inner, "laptop", *argv],
                              env=env, **kw)

    # ------------------------------------------------------------------ tear-down
    def close(self) -> None:
        for host in self.hosts:
            if host.sshd and host.sshd.poll() is None:
                try:
                    os.killpg(host.sshd.pid, signal.SIGKILL)  # the namespace's first process: all of it ends
                except ProcessLookupError:
                    pass
                host.sshd.wait(timeout=30)
        for netns in [h.netns for h in self.hosts] + [self.laptop, self.lan]:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"

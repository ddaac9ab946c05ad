"""Ray for a sweep: connect to a cluster (or start a private local Ray) and check, before any trial,
that the sweep fits it (GPUs, CPUs, and storage every node can reach).
Ray's core only; no ray.tune here.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import ray

from tlcore.tracking.credentials import without_credentials


class ClusterMismatch(ValueError):
    """The sweep's flags ask for what this Ray cluster cannot give; the message says what to change."""


NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "ceph", "glusterfs", "beegfs",
                       "9p", "virtiofs")


def is_shared_path(path: str) -> bool:
    """Whether `path` lies on a network file system (by the longest matching mount point)."""
    target = os.path.realpath(path)
    while not os.path.exists(target) and target != "/":
        target = os.path.dirname(target)
    best, fstype = "", ""
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fs = line.split()[:3]
            if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, fstype = mount, fs
    except OSError:
        return True  # cannot tell (not Linux): do not block the user
    return fstype in NETWORK_FILESYSTEMS or fstype.startswith("fuse.")


def private_ray_token() -> Path | None:
    """Ray's token for a private local Ray (token authentication is on unless RAY_AUTH_MODE says
    otherwise), made here if missing: mode 0600 in a 0700 folder. Ray itself writes
    ~/.ray/auth_token with the process's umask (0644 in a 0755 folder: any user of the machine
    could read it and drive the sweep's Ray)."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return None
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    token.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token.parent.chmod(0o700)
    if not token.exists():
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # 256 bits, as Ray's own generator
    token.chmod(0o600)
    return token


def start_private_ray(runtime_env: dict) -> None:
    """A private local Ray for this machine: no dashboard, every process listening on 127.0.0.1
    only (Ray would otherwise bind every interface and advertise the host's routable address),
    its token 0600, and no MLflow credential in the environment its processes (and so every
    worker) inherit. address="local": never join a cluster `ray start` left on this machine."""
    import ray._private.ray_constants as ray_constants

    private_ray_token()
    # Ray's own switch for a single-machine Ray (its default on macOS and Windows): the node's
    # address is the loopback one; read here at ray.init, and by the processes it starts (they
    # inherit it then). Restored afterwards: a `ray start` or `sbatch` this process runs later
    # would refuse to join a multi-node cluster.
    ray_constants.ENABLE_RAY_CLUSTER = False
    switch = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    before = os.environ.get(switch)
    os.environ[switch] = "0"
    held = without_credentials()
    try:
        # no idle workers started ahead: they would lack the sweep's runtime env (its setup hook),
        # so no trial or task could use them (~0.5 CPU-s each, one per CPU)
        ray.init(address="local", include_dashboard=False, log_to_driver=True, configure_logging=False,
                 runtime_env=runtime_env, _system_config={"prestart_worker_first_driver": False})
    finally:
        os.environ.update(held)
        if before is None:
            os.environ.pop(switch, None)
        else:
            os.environ[switch] = before


def worker_runtime_env(deterministic: bool, volumes: bool = False) -> dict:
    """What every Ray worker of a sweep starts with: tlcore's setup hook (progress.prepare_ray_worker,
    or prepare_3d_ray_worker for a sweep over `volumes`)."""
    hook = "prepare_3d_ray_worker" if volumes else "prepare_ray_worker"
    runtime_env = {"worker_process_setup_hook": f"tlcore.sweep.progress.{hook}"}
    # cuBLAS reads its workspace setting when CUDA starts in a worker: too late inside a trial.
    # (No secret goes here: Ray's runtime-env agent logs these values. Trials need none: the
    # driver is the only MLflow client.)
    if deterministic:
        runtime_env["env_vars"] = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    return runtime_env


ADDRESS_TIMEOUT_S = 2.0


def check_address_answers(address: str) -> None:
    """A `host:port` (or `ray://host:port`) that nothing answers is refused in seconds: ray.init
    would retry it for minutes. `auto` is left to Ray, which fails at once when no cluster runs here."""
    import socket

    if address == "auto":
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise ClusterMismatch(f"--address {address}: give auto (the Ray cluster this machine belongs to) or "
                              "host:port of its head node, e.g. 10.0.0.5:6379")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=ADDRESS_TIMEOUT_S).close()
    except OSError as e:
        why = "no answer" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__).lower()
        raise ClusterMismatch(f"--address {address}: nothing answers there ({why} within {ADDRESS_TIMEOUT_S:g} s). "
                              "Start the cluster first (ray start --head, or ray up cluster/<yours>.yaml), check "
                              "the head's address and port, or leave --address out for a Ray on this machine. "
                              "No trial was started.") from None


def connect(args, volumes: bool = False) -> float:
    """Connect to (or start) Ray and check the sweep fits the cluster; returns GPUs per trial.
    `args` has the sweep flags (flags.sweep_parser); `volumes`: a 3D sweep (worker_runtime_env);
    a mismatch raises ClusterMismatch."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    runtime_env = worker_runtime_env(args.deterministic, volumes)
    if args.address is None:
        start_private_ray(runtime_env)
    else:
        check_address_answers(args.address)
        ray.init(address=args.address, runtime_env=runtime_env)
    resources = ray.cluster_resources()
    have_gpus = resources.get("GPU", 0)
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else (1.0 if have_gpus or args.autoscale else 0.0)
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes > 1 or args.autoscale:
        # (The MLflow store may be a SQLite file on this node: the driver is its only client.)
        local = []  # what the other nodes could not reach, all of it in one message
        if not (args.shared_storage or is_shared_path(args.storage_path)):
            local.append(f"--storage-path {args.storage_path} is on a local disk: trials on other nodes could not "
                         "write their checkpoints there, and a resumed trial could not find them. Use a path on a "
                         "shared file system (NFS, EFS, Filestore) that every node mounts at the same place.")
        if local:
            raise ClusterMismatch(f"this Ray cluster has {nodes} nodes{' (autoscaling)' if args.autoscale else ''}, but\n  - "
                 + "\n  - ".join(local) + "\nPass --shared-storage if these paths are shared in a way tlcore "
                 "cannot detect. No trial was started.")
    if gpus > have_gpus and not args.autoscale:
        # Ray would otherwise wait forever with a repeated warning.
        raise ClusterMismatch(f"--gpus-per-trial {gpus} but the Ray cluster has {have_gpus:g} GPUs; "
             "use --gpus-per-trial 0 (CPU) or a fraction, add GPU nodes, or pass --autoscale "
             "if the cluster starts GPU workers on demand")
    if args.cpus_per_trial > resources.get("CPU", 0):
        raise ClusterMismatch(f"--cpus-per-trial {args.cpus_per_trial} but the cluster has {resources.get('CPU', 0):g} CPUs")
    return gpus

"""MLflow credentials: taken out of a tracking URI (which is recorded everywhere), redacted from
any line that is printed, and carried to trials and Ray tasks inside the function Ray ships.
No MLflow or Ray import here.
"""

from __future__ import annotations

import functools
import os
import re
from urllib.parse import unquote, urlparse

CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^/@:\s]*):(?P<password>[^/@\s]*)@")


def redact(text: str) -> str:
    """`scheme://user:password@host` -> `scheme://user:***@host`, anywhere in `text`."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))


def take_credentials(uri: str) -> str:
    """The tracking URI without its `user:password@`, which go where MLflow's client reads them:
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in this process's environment (and,
    through with_credentials, in every trial's). The URI itself ends up in
    run params, trial configs, Tune's result files and printed lines, so it must hold no secret.

    A database URI with a password (postgresql://user:pw@host/db as the tracking store itself)
    cannot shed it: refused, with the ways that keep it out of the command line.
    """
    parsed = urlparse(uri)
    if parsed.password is None and not (parsed.username and parsed.scheme in ("http", "https")):
        return uri
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"--mlflow-uri {redact(uri)}: a password in a database URI would be recorded with "
                         "every run. Keep it out of the URI (PostgreSQL: ~/.pgpass or PGPASSWORD), or log "
                         "through the team server (mlflow/server.sh) with MLFLOW_TRACKING_USERNAME / "
                         "MLFLOW_TRACKING_PASSWORD set.")
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parsed.username or "")
    if parsed.password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parsed.password)
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname  # IPv6 keeps its brackets
    host += f":{parsed.port}" if parsed.port else ""
    return parsed._replace(netloc=host).geturl()


def credentials_env() -> dict[str, str]:
    """The MLflow credentials this process has, for the sweep's trials (with_credentials):
    trials on nodes whose Ray was started without them still reach the registry."""
    return {k: os.environ[k] for k in CREDENTIAL_VARS if os.environ.get(k)}


def with_credentials(fn):
    """`fn` (a trainable or a Ray task), first putting the driver's MLflow credentials
    (credentials_env) into the worker's environment, where MLflow's client reads them:
    trials and evaluation tasks on nodes whose Ray was started without them still reach the
    registry and their runs. They travel inside the function Ray ships to the workers; not in the
    config (recorded as params and in Tune's result files) and not in a Ray runtime environment
    (Ray's runtime-env agent writes those values to its log)."""
    credentials = credentials_env()
    if not credentials:
        return fn

    @functools.wraps(fn)
    def with_env(*args, **kwargs):
        os.environ.update(credentials)
        return fn(*args, **kwargs)

    return with_env

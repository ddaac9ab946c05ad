"""MLflow credentials stay in the driver's environment: never in a command line or a URI (which
are recorded everywhere), never shipped to a Ray worker. One check for every entry point that
takes `--mlflow-uri`, the default store's URI, and redaction of any line that is printed. No MLflow
or Ray import here: a sweep script's flags are read with this module alone.
"""

from __future__ import annotations

import argparse
import os
import re
from urllib.parse import unquote, urlparse

from tlcore.config import REPO_ROOT

STORE_DIR = REPO_ROOT / "mlflow"

CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^/@:\s]*):(?P<password>[^/@\s]*)@")
HOW_TO_LOG_IN = ("keep it out of the command line: `read -rs MLFLOW_TRACKING_PASSWORD && export "
                 "MLFLOW_TRACKING_PASSWORD MLFLOW_TRACKING_USERNAME=<user>`, then pass the URI without it")


def default_tracking_uri() -> str:
    """The embedded store: SQLite under `mlflow/` in the repository."""
    return f"sqlite:///{STORE_DIR / 'mlflow.db'}"


class PasswordInURI(ValueError):
    """A tracking URI with a password: refused before anything runs (the message holds no password)."""


def redact(text: str) -> str:
    """`scheme://user:password@host` -> `scheme://user:***@host`, anywhere in `text`."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))


def check_tracking_uri(uri: str, flag: str = "--mlflow-uri") -> str:
    """`uri` if it holds no password; else PasswordInURI naming MLFLOW_TRACKING_USERNAME /
    MLFLOW_TRACKING_PASSWORD. Stripping the password after parsing would be too late: a program's
    command line is in every process list (/proc/<pid>/cmdline is world-readable) before it runs a
    line, and Ray records a driver's command line as its job's entrypoint (`ray list jobs`)."""
    parsed = urlparse(uri)
    if parsed.password is None:
        return uri
    if parsed.scheme in ("http", "https"):
        raise PasswordInURI(f"{flag} {redact(uri)}: a password in the URI is visible to every user of this "
                            f"machine (ps) and in Ray's job table; {HOW_TO_LOG_IN}.")
    raise PasswordInURI(f"{flag} {redact(uri)}: a password in a database URI would be visible in ps and recorded "
                        "with every run. Keep it out of the URI (PostgreSQL: ~/.pgpass or PGPASSWORD), or log "
                        f"through the team server (mlflow/server.sh) with MLFLOW_TRACKING_USERNAME / "
                        f"MLFLOW_TRACKING_PASSWORD set ({HOW_TO_LOG_IN}).")


def tracking_uri_flag(text: str) -> str:
    """argparse `type=` of every --mlflow-uri: a password is refused while the flags are parsed,
    before Ray, MLflow or torch is imported (argparse prints the message, never the value)."""
    try:
        return check_tracking_uri(text)
    except PasswordInURI as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--mlflow-uri ")) from None


def take_credentials(uri: str, flag: str = "--mlflow-uri") -> str:
    """The tracking URI the sweep records: no password (check_tracking_uri), and a `user@` of an
    http(s) URI moved to MLFLOW_TRACKING_USERNAME, where MLflow's client reads it."""
    check_tracking_uri(uri, flag)
    parsed = urlparse(uri)
    if not (parsed.username and parsed.scheme in ("http", "https")):
        return uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parsed.username)
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname  # IPv6 keeps its brackets
    host += f":{parsed.port}" if parsed.port else ""
    return parsed._replace(netloc=host).geturl()


def without_credentials() -> dict[str, str]:
    """Remove the MLflow credentials from this process's environment; returns them (to put back).
    Processes started meanwhile (a private local Ray's GCS and raylet, whose workers inherit their
    environment) never see them."""
    return {k: os.environ.pop(k) for k in CREDENTIAL_VARS if k in os.environ}

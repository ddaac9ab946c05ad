"""Accounts on the team MLflow server (mlflow/server.sh, basic-auth): a person or a sweep account,
and what it may do on named experiments and registered models. Run it as the admin:

    read -rs MLFLOW_TRACKING_PASSWORD && export MLFLOW_TRACKING_PASSWORD MLFLOW_TRACKING_USERNAME=admin
    python -m tlcore.tracking.accounts add bob --mlflow-uri http://10.0.0.5:5000        # bob's password on stdin
    python -m tlcore.tracking.accounts grant bob EDIT --experiment brats_layers --mlflow-uri http://10.0.0.5:5000
    python -m tlcore.tracking.accounts grant bob READ --model ixi_hippocampus --mlflow-uri http://10.0.0.5:5000

Passwords are read from standard input (typed without echo on a terminal), never from the
command line. Whoever creates an experiment or a registered model manages it; with the server's
`default_permission = NO_PERMISSIONS` (mlflow/README.md) nobody else sees it until granted.
A sweep needs EDIT on its experiment and READ on the source model it fine-tunes.
"""

from __future__ import annotations

import argparse
import getpass
import sys
import warnings

from mlflow.exceptions import MlflowException

from tlcore.tracking import store
from tlcore.tracking.credentials import redact, tracking_uri_flag

PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE")


def _auth(uri: str):
    from mlflow.server import get_app_client

    return get_app_client("basic-auth", tracking_uri=uri)


def add_user(uri: str, username: str, password: str) -> bool:
    """A new account on the server (the caller's credentials must be an admin's); False if it
    exists (its password is then set to `password`)."""
    auth = _auth(uri)
    try:
        auth.create_user(username, password)
        return True
    except MlflowException as e:
        if "already exists" not in str(e).lower() and getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
        auth.update_user_password(username, password)
        return False


def grant(uri: str, username: str, permission: str, experiments=(), models=()) -> list[str]:
    """`permission` for `username` on each named experiment and registered model, creating the
    ones that do not exist yet (a sweep account may then log to an experiment its first sweep
    has not made). Returns what was granted, one line each."""
    if permission not in PERMISSIONS:
        raise ValueError(f"permission {permission!r}: choose from {', '.join(PERMISSIONS)}")
    auth, c, done = _auth(uri), store.client(uri), []

    def put(resource_type: str, resource_id: str) -> None:  # a grant replaces an earlier one
        try:
            auth.grant_user_permission(username, resource_type, resource_id, permission)
        except MlflowException as e:
            if "already exists" not in str(e).lower():
                raise
            auth.revoke_user_permission(username, resource_type, resource_id)
            auth.grant_user_permission(username, resource_type, resource_id, permission)

    for name in experiments:
        exp_id = store.experiment_id(uri, name)
        put("experiment", exp_id)
        done.append(f"{permission} on experiment {name} (id {exp_id})")
    for name in models:
        try:
            c.get_registered_model(name)
        except MlflowException:
            c.create_registered_model(name)
        put("registered_model", name)
        done.append(f"{permission} on registered model {name}")
    return done


def read_password(username: str) -> str:
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {username}: ")
        if getpass.getpass("again: ") != password:
            raise SystemExit("error: the two passwords differ; nothing was changed")
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < 12:
        raise SystemExit("error: give a password of at least 12 characters (e.g. `openssl rand -base64 18`); "
                         "nothing was changed")
    return password


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tlcore.tracking.accounts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mlflow-uri", type=tracking_uri_flag, help="the team server, e.g. http://10.0.0.5:5000 (required)")
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="a new account (or a new password for one); the password on stdin")
    add.add_argument("username")
    give = sub.add_parser("grant", help="a permission on experiments and registered models (made if missing)")
    give.add_argument("username")
    give.add_argument("permission", choices=PERMISSIONS)
    give.add_argument("--experiment", action="append", default=[], help="an experiment (= sweep) name; repeatable")
    give.add_argument("--model", action="append", default=[], help="a registered model name; repeatable")
    # the global flag also after the subcommand (where people type it)
    for sp in (add, give):
        sp.add_argument("--mlflow-uri", type=tracking_uri_flag, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", module=r"mlflow\.server")  # the server package's own deprecation notices
    if not args.mlflow_uri:
        p.error("--mlflow-uri: name the team server, e.g. --mlflow-uri http://10.0.0.5:5000")
    try:
        store.check_server(args.mlflow_uri)
        if args.command == "add":
            made = add_user(args.mlflow_uri, args.username, read_password(args.username))
            print(f"[tlcore] account {args.username} {'created' if made else 'exists: password changed'}")
        else:
            if not (args.experiment or args.model):
                p.error("grant: name at least one --experiment or --model")
            for line in grant(args.mlflow_uri, args.username, args.permission, args.experiment, args.model):
                print(f"[tlcore] {args.username}: {line}")
    except (RuntimeError, store.MlflowException) as e:
        print(f"error: {redact(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

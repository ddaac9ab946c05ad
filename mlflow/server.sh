#!/usr/bin/env bash
# A team MLflow tracking server (on the Ray head node): PostgreSQL backend store, artifacts on
# S3 / MinIO or an NFS path, basic-auth, bound to 127.0.0.1 unless told otherwise.
#
#   export MLFLOW_BACKEND_URI=postgresql://mlflow@127.0.0.1:5432/mlflow   # password in ~/.pgpass, not here
#     (or MLFLOW_BACKEND_URI_FILE=~/.mlflow_backend_uri, a mode-0600 file holding the URI)
#   export MLFLOW_ARTIFACTS=s3://my-bucket/mlflow                          # or /shared/mlflow-artifacts (NFS)
#   export MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:9000                    # only for MinIO
#   mlflow/server.sh                       # http://127.0.0.1:5000, basic-auth on
#   mlflow/server.sh --host 10.0.0.5       # reachable from the cluster's private network (never 0.0.0.0 on a public IP)
#   mlflow/server.sh --workers 1           # one server process (MLflow's default is 4; each loads MLflow, ~10 CPU-s)
#
# Basic-auth (needs `pip install -e '.[server]'`: mlflow[auth]): the admin account comes from
# $MLFLOW_AUTH_CONFIG_PATH (an .ini outside the repo, see mlflow/README.md); the Flask session
# key from $MLFLOW_FLASK_SERVER_SECRET_KEY, else from a mode-0600 file created once under
# ~/.config/tlcore. MLFLOW_AUTH=off turns auth off for a single-user machine.
# Secrets travel in the environment only: nothing here puts them on a command line (visible in
# `ps` to every user of the node) or prints them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
host=127.0.0.1
port=5000
workers=4
while [ $# -gt 0 ]; do
  case "$1" in
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    *) echo "unknown option $1 (use --host, --port, --workers)" >&2; exit 2 ;;
  esac
done
case "$workers" in ''|*[!0-9]*|0) echo "--workers $workers: a number of server processes, 1 or more" >&2; exit 2 ;; esac
if [ -z "${MLFLOW_BACKEND_URI:-}" ] && [ -n "${MLFLOW_BACKEND_URI_FILE:-}" ]; then
  MLFLOW_BACKEND_URI="$(tr -d '\n' < "$MLFLOW_BACKEND_URI_FILE")"
fi
: "${MLFLOW_BACKEND_URI:?set MLFLOW_BACKEND_URI (or MLFLOW_BACKEND_URI_FILE), e.g. postgresql://mlflow@127.0.0.1:5432/mlflow}"
: "${MLFLOW_ARTIFACTS:?set MLFLOW_ARTIFACTS, e.g. s3://my-bucket/mlflow or /shared/mlflow-artifacts}"
# the checkout's venv (make demo / make test), else the mlflow on PATH (a cluster node's venv)
mlflow_bin="${MLFLOW_BIN:-}"
if [ -z "$mlflow_bin" ]; then
  if [ -x "$here/../.venv/bin/mlflow" ]; then mlflow_bin="$here/../.venv/bin/mlflow"; else mlflow_bin="$(command -v mlflow || true)"; fi
fi
[ -x "$mlflow_bin" ] || { echo "no mlflow found: run 'make test' once (it makes .venv), activate the venv tlcore is installed in, or set MLFLOW_BIN" >&2; exit 2; }
# `mlflow server` reads these two from the environment
export MLFLOW_BACKEND_STORE_URI="$MLFLOW_BACKEND_URI" MLFLOW_ARTIFACTS_DESTINATION="$MLFLOW_ARTIFACTS"
# MLflow 3's job runner (huey consumers for GenAI evaluation and trace jobs, about ten processes
# of ~240 MB each) serves nothing tlcore logs: off unless asked for
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
args=(server --serve-artifacts --host "$host" --port "$port" --workers "$workers")
scheme=http
if [ -n "${MLFLOW_TLS_CERT:-}" ] || [ -n "${MLFLOW_TLS_KEY:-}" ]; then
  # HTTPS (uvicorn's own TLS): the basic-auth password and the patients' artifacts never cross
  # the network in clear. Certificates: cluster/tls_certs.sh; clients set
  # MLFLOW_TRACKING_SERVER_CERT_PATH to its ca.crt.
  [ -r "${MLFLOW_TLS_CERT:-}" ] && [ -r "${MLFLOW_TLS_KEY:-}" ] || {
    echo "MLFLOW_TLS_CERT and MLFLOW_TLS_KEY must both name readable files (cluster/tls_certs.sh makes them)" >&2; exit 2; }
  args+=(--uvicorn-opts "--ssl-certfile $MLFLOW_TLS_CERT --ssl-keyfile $MLFLOW_TLS_KEY")
  scheme=https
fi
auth=off
if [ "${MLFLOW_AUTH:-on}" != "off" ]; then
  : "${MLFLOW_AUTH_CONFIG_PATH:?set MLFLOW_AUTH_CONFIG_PATH to your basic_auth.ini (or MLFLOW_AUTH=off)}"
  python_bin="$(dirname "$mlflow_bin")/python"
  if ! "$python_bin" -c "import flask_wtf" 2>/dev/null; then
    echo "MLflow's basic-auth needs Flask-WTF: pip install -e '.[server]' (mlflow[auth])" >&2
    exit 2
  fi
  if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
    key_file="${XDG_CONFIG_HOME:-$HOME/.config}/tlcore/mlflow-flask-secret-key"
    if [ ! -s "$key_file" ]; then
      (umask 077 && mkdir -p "$(dirname "$key_file")" && "$python_bin" -c "import secrets; print(secrets.token_hex(32))" > "$key_file")
    fi
    MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$key_file")"
    export MLFLOW_FLASK_SERVER_SECRET_KEY
  fi
  args+=(--app-name basic-auth)
  auth=on
fi
# what the backend is, without its user and password
backend="${MLFLOW_BACKEND_URI%%://*}://${MLFLOW_BACKEND_URI#*://}"
case "${MLFLOW_BACKEND_URI#*://}" in *@*) backend="${MLFLOW_BACKEND_URI%%://*}://***@${MLFLOW_BACKEND_URI##*@}" ;; esac
echo "MLflow tracking server on $scheme://$host:$port (basic-auth $auth; backend $backend, artifacts ${MLFLOW_ARTIFACTS##*@})"
# what the server creates (the auth database with every password hash, a SQLite store, local
# artifacts) is this user's alone
umask 077
exec "$mlflow_bin" "${args[@]}"

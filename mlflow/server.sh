#!/usr/bin/env bash
# A team MLflow tracking server (on the Ray head node): PostgreSQL backend store, artifacts on
# S3 / MinIO or an NFS path, basic-auth, bound to 127.0.0.1 unless told otherwise.
#
#   export MLFLOW_BACKEND_URI=postgresql://mlflow@127.0.0.1:5432/mlflow   # password in ~/.pgpass, not here
#   export MLFLOW_ARTIFACTS=s3://my-bucket/mlflow                          # or /shared/mlflow-artifacts (NFS)
#   export MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:9000                    # only for MinIO
#   mlflow/server.sh                       # http://127.0.0.1:5000, basic-auth on
#   mlflow/server.sh --host 10.0.0.5       # reachable from the cluster's private network (never 0.0.0.0 on a public IP)
#
# Basic-auth: the admin account comes from $MLFLOW_AUTH_CONFIG_PATH (an .ini outside the repo,
# see mlflow/README.md); MLFLOW_AUTH=off turns it off for a single-user machine.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
host=127.0.0.1
port=5000
while [ $# -gt 0 ]; do
  case "$1" in
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    *) echo "unknown option $1 (use --host, --port)" >&2; exit 2 ;;
  esac
done
: "${MLFLOW_BACKEND_URI:?set MLFLOW_BACKEND_URI, e.g. postgresql://mlflow@127.0.0.1:5432/mlflow}"
: "${MLFLOW_ARTIFACTS:?set MLFLOW_ARTIFACTS, e.g. s3://my-bucket/mlflow or /shared/mlflow-artifacts}"
mlflow_bin="${MLFLOW_BIN:-$here/../.venv/bin/mlflow}"
args=(server --backend-store-uri "$MLFLOW_BACKEND_URI" --artifacts-destination "$MLFLOW_ARTIFACTS"
      --serve-artifacts --host "$host" --port "$port")
if [ "${MLFLOW_AUTH:-on}" != "off" ]; then
  : "${MLFLOW_AUTH_CONFIG_PATH:?set MLFLOW_AUTH_CONFIG_PATH to your basic_auth.ini (or MLFLOW_AUTH=off)}"
  args+=(--app-name basic-auth)
fi
echo "MLflow tracking server on http://$host:$port (backend ${MLFLOW_BACKEND_URI%%@*}@..., artifacts $MLFLOW_ARTIFACTS)"
exec "$mlflow_bin" "${args[@]}"

#!/usr/bin/env bash
# MLflow UI over the embedded store, on 127.0.0.1 only. Usage: mlflow/ui.sh [port]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
echo "[tlcore] MLflow UI on http://127.0.0.1:${1:-5000}: open the link a sweep prints (its runs table, in the" \
     "model-training view: workflowType=machine_learning; MLflow 3 otherwise opens experiments on its GenAI view)" >&2
exec "$here/../.venv/bin/mlflow" ui --backend-store-uri "sqlite:///$here/mlflow.db" \
    --default-artifact-root "$here/artifacts" --host 127.0.0.1 --port "${1:-5000}" --workers 1  # one reader: MLflow starts 4

#!/usr/bin/env bash
# The one command for a lent GPU machine (H100/H200), run from the repository root there with
# .whl carried (bench/gpu_wheels.sh made it here). Writes the log, the JSON lines and the updated
# RESULTS.md under $OUT; copy the last two back into bench/ here.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # what --deterministic sets for sweep workers (bench deterministic)
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/bench.log"
timeout "${BENCH_TIMEOUT:-480}" python3 bench/run.py --full --only "${BENCH_ONLY:-train3d,inference,precision,deterministic,packing,train2d,analysis}" \
    2>&1 | tee -a "$OUT/bench.log"
cp bench/results-cuda.jsonl bench/RESULTS.md "$OUT/" 2>/dev/null

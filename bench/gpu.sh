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
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())' | tee -a "$OUT/bench.log"
# Keep one call under the device's per-call limit: the whole list is ~15 minutes, so pick. On an
# H200 (2026-12-04): experiment_a ~500 s, monai_gpu ~200 s, report_parts ~120 s, compile ~60 s,
# analysis ~50 s. The default re-measures what experiment A's figure moves with most cheaply.
timeout "${BENCH_TIMEOUT:-540}" python3 bench/run.py --full --only "${BENCH_ONLY:-report_parts,compile,analysis}" \
    2>&1 | tee -a "$OUT/bench.log"
cp bench/results-cuda.jsonl bench/RESULTS.md "$OUT/" 2>/dev/null

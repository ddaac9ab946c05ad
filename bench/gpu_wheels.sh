#!/usr/bin/env bash
# Fetch (here, where PyPI is reachable) the wheels that a lent GPU machine lacks for the GPU
# benchmarks: its image has PyTorch, NumPy, SciPy, scikit-learn, matplotlib and pandas, but not
# MONAI, nibabel or fastai, and it cannot download anything. fastprogress (fastai's progress bars)
# imports python-fasthtml, which brings its web stack: all pure Python, all carried. Ray and
# MLflow are not carried (Ray's wheel alone is over the 64 MiB a call may carry): the Tune, ASHA
# and MLflow figures come from the CPU run. Versions: the ones this project's environment resolves to.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .whl && mkdir .whl
pins=$($PY -m pip list --format=freeze 2>/dev/null | grep -iE '^(monai|nibabel|fastai|fastcore|fastprogress|fastdownload|fasttransform|plum-dispatch|beartype|python-fasthtml|anyio|beautifulsoup4|click|h11|httpcore2|httpx2|idna|itsdangerous|oauthlib|python-dateutil|python-multipart|six|soupsieve|starlette|truststore|typing[-_]extensions|uvicorn)==')
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $pins
ls -la .whl
du -sh .whl

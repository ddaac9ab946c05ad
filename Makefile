# The two commands of the README:  make demo   and   make test
# Both create the virtual environment on first use (about 2 minutes).
PY := .venv/bin/python

.PHONY: demo test test-fast lint cluster-test cluster-deps bench clean-results

.venv/.installed: pyproject.toml constraints.txt
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	# torch first, pinned (constraints.txt): other versions download gigabytes on machines that have these on disk
	.venv/bin/pip install -q -c constraints.txt torch torchvision
	.venv/bin/pip install -q -c constraints.txt -e '.[test,server]'
	touch $@

# synchronous early stopping: two demo runs make the same decisions and print the same tables
demo: .venv/.installed
	$(PY) sweeps/ixi_source.py --scheduler asha-sync
	$(PY) sweeps/brats_layers.py --scheduler asha-sync

# the linter first: a name error or a broken import fails in seconds, not after the suite
lint: .venv/.installed
	.venv/bin/ruff check .

test: lint cluster-deps
	# two workers, one per core: the suite is CPU-bound (docs/testing.md: where the time goes)
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15

# the unit tests: no sweep, no cluster, no whole trial in a fresh process (a first check while editing)
test-fast: .venv/.installed
	$(PY) -m pytest -q -n 2 -m "not slow and not cluster"

# the multi-node paths, run for real on this machine (root): `ray up` over SSH onto hosts made as
# network namespaces, and a Slurm job through sbatch (also part of `make test`)
cluster-test: .venv/.installed cluster-deps
	$(PY) -m pytest -q -m cluster -s

cluster-deps:
	@bash tests/cluster_deps.sh

bench: .venv/.installed
	$(PY) bench/run.py

clean-results:
	rm -rf results mlflow/mlflow.db mlflow/artifacts

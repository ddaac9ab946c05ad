# The two commands of the README:  make demo   and   make test
# Both create the virtual environment on first use (about 1.5 minutes).
PY := .venv/bin/python

.PHONY: demo test test-fast lint cluster-test cluster-deps bench clean-results

.venv/.installed: pyproject.toml constraints.txt
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	# torch first, pinned (constraints.txt): other versions download gigabytes on machines that have these on disk
	.venv/bin/pip install -q --no-compile -c constraints.txt torch torchvision
	.venv/bin/pip install -q --no-compile -c constraints.txt -e '.[test,server]'
	# the bytecode pip would write one file at a time, on every core (2 cores: 27 s instead of ~75 s).
	# Not optional: where PYTHONDONTWRITEBYTECODE is set, every process would compile torch from source.
	# (Exit 1 names the few files no Python 3 compiles, templates and such, which pip skips as well.)
	.venv/bin/python -m compileall -qq -j 0 .venv/lib || true
	touch $@

# synchronous early stopping: two demo runs make the same decisions and print the same tables
demo: .venv/.installed
	$(PY) sweeps/ixi_source.py --scheduler asha-sync
	$(PY) sweeps/brats_layers.py --scheduler asha-sync

# the linter first: a name error or a broken import fails in seconds, not after the suite
lint: .venv/.installed
	.venv/bin/ruff check .

test: lint cluster-deps
	# tlcore's bytecode once, not in each of the suite's ~400 processes (PYTHONDONTWRITEBYTECODE machines)
	$(PY) -m compileall -qq -j 0 tlcore sweeps tests
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

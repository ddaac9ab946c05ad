import atexit
import os
import re
import shutil
import tempfile

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# tlcore's caches (validated files, downloaded source models) stay out of the user's ~/.cache
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="tlcore-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)  # one per test process


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """Small synthetic BraTS and IXI datasets in their real layouts (helpers.SWEEP_VOLUME)."""
    from helpers import SWEEP_VOLUME

    from tlcore.data.synthetic import ensure_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    ensure_synthetic(root / "brats", "brats", seed=0, n_hgg=12, n_lgg=2, shape=SWEEP_VOLUME)
    ensure_synthetic(root / "ixi", "ixi", seed=0, n=10, shape=SWEEP_VOLUME)
    return root


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory):
    """A new SQLite MLflow store, made (migrated) once: MLflow's schema migrations take ~2 CPU-s
    per store, and a copy of the file is the same store."""
    from tlcore.tracking import store

    db = tmp_path_factory.mktemp("empty_store") / "mlflow.db"
    store.prepare_store(f"sqlite:///{db}")
    store.client.cache_clear()  # no connection left open on the template
    return db


@pytest.fixture()
def mlflow_uri(tmp_path, empty_store):
    import shutil

    db = tmp_path / "mlflow" / "mlflow.db"
    db.parent.mkdir()
    shutil.copyfile(empty_store, db)
    return f"sqlite:///{db}"


@pytest.fixture(scope="module")
def local_ray(request):
    """A private local Ray for one test module whose trainables are defined in the module itself."""
    import ray

    ray.cloudpickle.register_pickle_by_value(request.module)  # workers cannot import tests/
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


# Session-scoped (per xdist worker): a module-scoped fixture is built again whenever the worker
# interleaves another module's tests, and the source sweep behind `source_model` takes a minute.
@pytest.fixture(scope="session")
def workspace(tmp_path_factory, synthetic_root):
    tmp = tmp_path_factory.mktemp("sweeps")
    uri = f"sqlite:///{tmp / 'mlflow' / 'mlflow.db'}"
    common = ["--mlflow-uri", uri, "--storage-path", str(tmp / "results"), "--smoke-test"]
    return {"tmp": tmp, "uri": uri, "common": common, "data": synthetic_root}


@pytest.fixture(scope="session")
def source_sweep(workspace):
    """The IXI source sweep (smoke, helpers.SOURCE_SWEEP_FLAGS), run once per worker: what it printed."""
    from helpers import SOURCE_SWEEP_FLAGS, run_script

    w = workspace
    src = run_script("ixi_source.py", "--data-dir", str(w["data"] / "ixi"), "--mlflow-uri", w["uri"],
                     "--storage-path", str(w["tmp"] / "results"), *SOURCE_SWEEP_FLAGS)
    assert src.returncode == 0, src.stdout[-3000:] + src.stderr[-3000:]
    assert "registered models:/ixi_hippocampus/1" in src.stdout and "test_dice" in src.stdout
    # what the researcher reads: a line per trial report, no configuration dumps or Ray chatter
    out = src.stdout + src.stderr
    assert len(out.splitlines()) <= 80, out
    for chatter in ("Checkpoint successfully created", "params={", "Trial status:", "tensorboard", "data_dir"):
        assert chatter not in out, chatter
    assert len(re.findall(r"iteration \d+/\d+ +val_dice \d\.\d{3} \(best", out)) >= 2, out
    assert re.search(r"2/2 trials ended .* best val_dice", out), out
    # Ray's own messages are in the sweep's log file, not on the console
    ray_log = (w["tmp"] / "results" / "ixi_source" / "ray.log").read_text()
    assert "ray.tune" in ray_log and "Wrote the latest version" not in out
    return src


@pytest.fixture(scope="session")
def source_model(workspace, source_sweep):
    """The source sweep's registered model."""
    from tlcore.tracking import registry

    return registry.resolve_model(workspace["uri"], "models:/ixi_hippocampus/latest")

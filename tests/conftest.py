import os
import tempfile

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# tlcore's caches (validated files, downloaded source models) stay out of the user's ~/.cache
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="tlcore-test-cache-")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """Small synthetic BraTS and IXI datasets in their real layouts (32^3 volumes)."""
    from tlcore.data.synthetic import ensure_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    ensure_synthetic(root / "brats", "brats", seed=0, n_hgg=12, n_lgg=2)
    ensure_synthetic(root / "ixi", "ixi", seed=0, n=10)
    return root


@pytest.fixture()
def mlflow_uri(tmp_path):
    from tlcore import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    tracking.prepare_store(uri)
    return uri


@pytest.fixture(scope="module")
def local_ray(request):
    """A private local Ray for one test module whose trainables are defined in the module itself."""
    import ray

    ray.cloudpickle.register_pickle_by_value(request.module)  # workers cannot import tests/
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()

"""Runs, metrics and artifacts in an MLflow store, and reaching the store (registry.py holds the
model registry, accounts.py the team server's users).

Runs are addressed by id through `MlflowClient`, never through mlflow's global "active run"
state, so the same code serves the sweep driver, Tune callbacks and trials on other nodes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.time import get_current_time_millis

from tlcore.tracking.credentials import STORE_DIR, default_tracking_uri, redact  # noqa: F401 (store's names)

PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LEN = 6000

# Progress bars from trials flood the Ray driver's console.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)


@lru_cache(maxsize=8)
def client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def prepare_store(uri: str) -> None:
    """Create (and migrate) the store once, in the driver, before any trial opens it.

    Many processes opening a fresh SQLite store at once race on the schema migration.
    """
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    try:
        client(uri).search_experiments(max_results=1)
    except MlflowException as e:
        raise RuntimeError(f"MLflow tracking store {uri} is not usable: {e}. "
                           "Check --mlflow-uri (or start the server, see mlflow/README.md).") from e


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds when a tracking server does not answer (the client would retry for minutes)."""
    import urllib.error
    import urllib.request

    context = None
    if uri.startswith("https://"):  # the CA MLflow's client trusts (a team server's own, cluster/tls_certs.sh)
        import ssl

        context = ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None)
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout, context=context)
    except urllib.error.HTTPError:
        return  # it answered (an auth proxy may refuse /health): reachable
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(f"MLflow tracking server {uri} is not reachable ({getattr(e, 'reason', e)}). "
                           "Start it (mlflow/server.sh on the head node) or fix --mlflow-uri; "
                           "no trial was started and nothing was written.") from e


def server_reachable(uri: str, timeout: float = 3.0) -> bool:
    """False when an http(s) tracking server does not answer; always True for local stores."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        check_server(uri, timeout)
        return True
    except RuntimeError:
        return False


_TRANSIENT = ("max retries exceeded", "connection refused", "connection aborted", "connectionerror",
              "timed out", "read timeout", "database is locked", "temporarily_unavailable",
              "502", "503", "504", "remote end closed")


def is_transient(exc: BaseException) -> bool:
    """An error that goes away when the store comes back (server down, SQLite locked)."""
    import requests

    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError)):
        return True
    return isinstance(exc, MlflowException) and any(t in str(exc).lower() for t in _TRANSIENT)


class StoreUnreachable(RuntimeError):
    """The tracking store stopped answering after trials had started (see driver.run)."""


def require_store(uri: str, attempts: int = 3, wait_s: float = 2.0) -> None:
    """Return once the store answers; StoreUnreachable after `attempts` quick tries (seconds,
    not MLflow's minutes of retries). Other errors (a wrong password) are raised as they are."""
    import time

    for attempt in range(attempts):
        try:
            with short_retries():
                client(uri).search_experiments(max_results=1)
            return
        except Exception as e:
            if not is_transient(e):
                raise
            if attempt == attempts - 1:
                reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:160]
                raise StoreUnreachable(f"the MLflow store {redact(uri)} does not answer ({redact(reason)})") from e
            time.sleep(wait_s)


def unreachable_cause(exc: BaseException) -> BaseException | None:
    """`exc`, or the error it wraps (a Ray task's, a chained one), when it means the store is
    unreachable; None for any other error."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, StoreUnreachable) or is_transient(exc):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def short_retries(retries: int = 1, timeout: int = 20):
    """Fail within seconds instead of MLflow's minutes of retries, for callers with their own
    buffer (the sweep's logging callback must not stall Tune's event loop)."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout)}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: v for k, v in keys.items() if old[k] is None})  # a user's setting wins
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)


# MLflow 3 opens an experiment without this tag on its GenAI overview; with it, on the runs
# table of model training.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


# MLflow 3's UI opens an experiment in its GenAI view (traces, token usage) unless the URL or the
# browser's stored choice says otherwise; the experimentKind tag is read only when that switch is off.
ML_VIEW = "workflowType=machine_learning"


def runs_page(ui: str, uri: str, experiment: str) -> str:
    """The link to an experiment's runs table, in the model-training view, on the UI at `ui`."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id(uri, experiment)}/runs?{ML_VIEW}"


def experiment_id(uri: str, name: str) -> str:
    """Id of experiment `name`, created if missing (artifacts beside a SQLite store), tagged as
    model training (older experiments get the tag when next used)."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND["mlflow.experimentKind"]:
            c.set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        return exp.experiment_id
    location = None
    db = _sqlite_path(uri)
    if db is not None:  # default would be ./mlartifacts relative to whichever process logs first
        location = (db.parent / "artifacts" / name).absolute().as_uri()
    try:
        return c.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except MlflowException:  # created concurrently (by a creator that tags it)
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _params(params: dict) -> list[Param]:
    out = []
    for k, v in params.items():
        s = v if isinstance(v, str) else json.dumps(v, default=str)
        out.append(Param(k, s[:MAX_PARAM_LEN]))
    return out


def start_run(uri: str, experiment: str, run_name: str, params: dict | None = None,
              tags: dict | None = None, parent_run_id: str | None = None) -> str:
    tags = dict(tags or {})
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    run = client(uri).create_run(experiment_id(uri, experiment), run_name=run_name,
                                 tags={k: str(v) for k, v in tags.items()})
    if params:
        log_params(uri, run.info.run_id, params)
    return run.info.run_id


def find_child_run(uri: str, experiment: str, parent_run_id: str, trial_id: str) -> str | None:
    """The child run already logged for a trial (so a resumed trial keeps its run)."""
    runs = client(uri).search_runs(
        [experiment_id(uri, experiment)],
        filter_string=f"tags.trial_id = '{trial_id}' and tags.`{PARENT_TAG}` = '{parent_run_id}'",
        max_results=1)
    return runs[0].info.run_id if runs else None


def log_params(uri: str, run_id: str, params: dict) -> None:
    existing = client(uri).get_run(run_id).data.params
    new = [p for p in _params(params) if p.key not in existing]
    for i in range(0, len(new), 100):  # MLflow caps a batch at 100 params
        client(uri).log_batch(run_id, params=new[i:i + 100])


def log_metrics(uri: str, run_id: str, metrics: dict, step: int) -> None:
    ts = get_current_time_millis()
    batch = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if batch:
        client(uri).log_batch(run_id, metrics=batch)


def log_metric_rows(uri: str, run_id: str, rows: list[tuple[str, float, int, int]]) -> None:
    """Log (key, value, step, timestamp in ms) rows, e.g. a history replayed from files."""
    batch = [Metric(k, float(v), int(ts), int(step)) for k, v, step, ts in rows]
    for i in range(0, len(batch), 1000):  # MLflow caps a batch at 1000 metrics
        client(uri).log_batch(run_id, metrics=batch[i:i + 1000])


def set_tags(uri: str, run_id: str, tags: dict) -> None:
    client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_dict(uri: str, run_id: str, obj, artifact_file: str) -> None:
    client(uri).log_dict(run_id, obj, artifact_file)


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    client(uri).log_text(run_id, text, artifact_file)


def log_artifacts(uri: str, run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
    client(uri).log_artifacts(run_id, str(local_dir), artifact_path)


def load_json(uri: str, run_id: str, artifact_file: str, listed: set[str] | None = None):
    """A JSON artifact of a run, or None when the run has none by that name. `listed`: the
    artifact paths of its folder, when the caller has them already (one request fewer)."""
    names = listed if listed is not None else {
        a.path for a in client(uri).list_artifacts(run_id, str(Path(artifact_file).parent).strip("."))}
    if artifact_file not in names:
        return None
    with tempfile.TemporaryDirectory() as d:
        return json.loads(Path(client(uri).download_artifacts(run_id, artifact_file, d)).read_text())


def newest_parent_run(uri: str, experiment: str) -> str | None:
    exp = client(uri).get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client(uri).search_runs([exp.experiment_id], "tags.role = 'parent'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def reopen_run(uri: str, run_id: str) -> None:
    """Mark a run RUNNING again (a resumed trial continues its own run)."""
    client(uri).update_run(run_id, status="RUNNING")


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


def delete_run(uri: str, run_id: str) -> None:
    """Mark a run deleted (MLflow keeps it restorable until the store is garbage-collected)."""
    client(uri).delete_run(run_id)


@dataclass(frozen=True)
class RunRecord:
    """A run as the rest of tlcore sees it: plain values, no MLflow objects."""
    run_id: str
    name: str
    experiment: str               # the experiment's name
    status: str                   # RUNNING, FINISHED, FAILED, KILLED
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]     # the latest value of each


def _record(uri: str, run) -> RunRecord:
    return RunRecord(run.info.run_id, run.info.run_name or "", _experiment_name(uri, run.info.experiment_id),
                     run.info.status, dict(run.data.params), dict(run.data.tags), dict(run.data.metrics))


@lru_cache(maxsize=64)
def _experiment_name(uri: str, exp_id: str) -> str:
    return client(uri).get_experiment(exp_id).name


class RunNotFoundError(LookupError):
    """A run id the store does not hold (mistyped, or from another store)."""


def get_run(uri: str, run_id: str) -> RunRecord:
    try:
        return _record(uri, client(uri).get_run(run_id))
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise RunNotFoundError(f"no run {run_id!r} in {redact(uri)}: check the id (the MLflow UI shows it on the "
                               "run's page) and --mlflow-uri") from None


def child_runs(uri: str, experiment: str, parent_run_id: str, where: str = "") -> list[RunRecord]:
    """The child runs of a parent run (trials, mean-over-seeds runs), optionally filtered further
    (`where`: an MLflow search filter such as "tags.role = 'seed_aggregate'")."""
    found = client(uri).search_runs([experiment_id(uri, experiment)],
                                    filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
                                    + (f" and {where}" if where else ""), max_results=10_000)
    return [_record(uri, r) for r in found]


def find_run(uri: str, experiment: str, where: str) -> str | None:
    """The id of one run of `experiment` matching an MLflow search filter, or None."""
    found = client(uri).search_runs([experiment_id(uri, experiment)], where, max_results=1)
    return found[0].info.run_id if found else None


def artifact_files(uri: str, run_id: str, path: str | None = None) -> list[str]:
    """Paths of a run's artifact files directly under `path` (folders left out)."""
    return [a.path for a in client(uri).list_artifacts(run_id, path) if not a.is_dir]


def download_artifact(uri: str, run_id: str, path: str, dst: str | Path) -> Path:
    return Path(client(uri).download_artifacts(run_id, path, str(dst)))


def map_runs(uri: str, fn, items) -> list:
    """[fn(item) for item in items], eight at a time against a tracking server (each item is a
    handful of requests; bench/RESULTS.md scale.server.*), one at a time against a local store
    (SQLite gains nothing from threads and takes one writer at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1 if local_store_path(uri) is not None else 8) as pool:
        return list(pool.map(fn, items))


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) by step: a step replayed later (tlcore.tracking.sync) takes its place in the curve."""
    history = sorted(client(uri).get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return [(m.step, m.value) for m in history]


def local_store_path(uri: str) -> Path | None:
    """The file or folder of a store that lives on this machine's disk (sqlite, file, a bare
    path); None for a server or a database reached over the network."""
    if urlparse(uri).scheme not in ("sqlite", "file", ""):
        return None
    if _sqlite_path(uri) is not None:
        return _sqlite_path(uri)
    parsed = urlparse(uri)
    return Path(parsed.path if parsed.scheme == "file" else uri)

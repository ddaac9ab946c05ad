"""What a sweep costs as it grows: 100 and 1,000 trials of a near-empty trainable (a few reports,
no model) through tlcore's own sweep path: `run_sweep` (Tune, StratifiedASHA, the MLflow
callback, the progress view, Tune's result files), `finish_trial_runs`, the seed aggregates, the HTML
report, `tlcore.tracking.sync` and `summary.collect`; against SQLite and against a local MLflow server.

    .venv/bin/python bench/run.py --only scale                 # 100 and 1,000 trials
    TLCORE_SCALE_SIZES=50,200 TLCORE_SCALE_STORES=server .venv/bin/python bench/run.py --only scale

Per-trial overhead is the sweep's wall time over its trials (2 trials at a time, as many as this
machine has cores); `scale.growth_ratio` is that figure at 1,000 over the one at 100 (1.0: the
cost grows linearly with the sweep).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

REPORTS, REPORT_EVERY = 4, 10   # four reports per trial: rungs at report 1 and 3 (grace 1, factor 3)


def empty_trial(config: dict) -> None:
    """Four reports of a made-up curve, no model: what remains is orchestration."""
    from ray import tune

    quality = ((config["seed"] * 7919) % 1000) / 1000
    for i in range(1, REPORTS + 1):
        tune.report({"iteration": i * REPORT_EVERY, "train_loss": 1 - quality * i / REPORTS,
                     "val_dice": quality * i / REPORTS, "lr": 1e-3})


class Timed:
    """Wraps a method of a class and adds up its calls and seconds."""

    def __init__(self, owner, name: str):
        self.owner, self.name, self.inner = owner, name, getattr(owner, name)
        self.calls, self.seconds = 0, 0.0
        setattr(owner, name, self)

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.calls += 1
            self.seconds += time.perf_counter() - t0

    def __get__(self, obj, objtype=None):  # a method of the class it wraps
        import functools

        return self if obj is None else functools.partial(self.__call__, obj)

    def restore(self) -> None:
        setattr(self.owner, self.name, self.inner)


def sweep_once(n: int, uri: str, storage: Path, name: str) -> dict:
    from ray import tune

    from tlcore.report.page import build
    from tlcore.report.summary import collect, log_seed_aggregates
    from tlcore.sweep import trainables
    from tlcore.sweep.results import trial_rows
    from tlcore.tracking import store
    from tlcore.tracking.sync import sync

    store.prepare_store(uri)
    parent = store.start_run(uri, name, name, {"trials": n}, {"sweep": name, "role": "parent"})
    (storage / name).mkdir(parents=True, exist_ok=True)
    (storage / name / "tlcore_sweep.json").write_text(json.dumps({
        "name": name, "parent_run_id": parent, "tracking_uri": uri, "max_iterations": REPORTS * REPORT_EVERY}))
    from tlcore.sweep.halving import SuccessiveHalving

    on_result = Timed(trainables.StratifiedASHA, "on_trial_result")  # with what it does to Tune's trials
    decide = Timed(SuccessiveHalving, "report")                        # the book's decision alone
    write = Timed(trainables.TrialRunLog, "_write")
    try:
        t0 = time.perf_counter()
        results = trainables.run_sweep(
            name, {"seed": tune.grid_search(list(range(n)))},
            trainable=empty_trial, tracking_uri=uri, parent_run_id=parent, storage_path=str(storage),
            max_iterations=REPORTS * REPORT_EVERY, report_every=REPORT_EVERY, scheduler="asha-sync",
            grace_period=1, reduction_factor=3)
        sweep_s = time.perf_counter() - t0
    finally:
        for timer in (on_result, decide, write):
            timer.restore()
    objective = SimpleNamespace(max_iterations=REPORTS * REPORT_EVERY, metric="val_dice", mode="max")
    rows = trial_rows(results, objective)
    assert len(rows) == n and not results.errors, results.errors
    t0 = time.perf_counter()
    log_seed_aggregates(uri, name, parent)
    aggregates_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    build(uri, name, parent, storage / name / "report")
    report_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    synced = sync(storage / name, uri)
    sync_s = time.perf_counter() - t0
    assert sum(r["metric_values_added"] for r in synced) == 0, "the callback missed metric values"
    t0 = time.perf_counter()
    runs = collect(uri, name, parent, artifacts=False)
    collect_s = time.perf_counter() - t0
    assert len(runs) == n
    return {"trials": n, "sweep_s": sweep_s, "per_trial_s": sweep_s / n,
            "decision_ms_per_report": 1000 * decide.seconds / max(decide.calls, 1), "reports": decide.calls,
            "scheduler_ms_per_result": 1000 * on_result.seconds / max(on_result.calls, 1),
            "mlflow_records": write.calls, "mlflow_records_per_s": write.calls / max(write.seconds, 1e-9),
            "mlflow_s_in_driver": write.seconds,
            "aggregates_s": aggregates_s, "report_s": report_s, "sync_s": sync_s, "collect_s": collect_s}


def start_server(tmp: Path) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    proc = subprocess.Popen([mlflow, "server", "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}",
                             "--artifacts-destination", str(tmp / "server-artifacts"), "--host", "127.0.0.1",
                             "--port", str(port)],  # the server's own defaults, as mlflow/server.sh starts it
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    from tlcore.tracking import store
    deadline = time.time() + 120
    while not store.server_reachable(uri) and time.time() < deadline:
        time.sleep(1)
    return proc, uri


def bench_scale(p, device, tmp: Path, emit) -> None:
    import ray

    sizes = [int(x) for x in os.environ.get("TLCORE_SCALE_SIZES", "100,1000").split(",")]
    ray.init(num_cpus=min(os.cpu_count() or 2, 2), include_dashboard=False, log_to_driver=False)
    os.environ.setdefault("TLCORE_MLFLOW_WAIT_S", "30")
    server, out = None, {}
    try:
        server, server_uri = start_server(tmp)
        stores = os.environ.get("TLCORE_SCALE_STORES", "sqlite,server").split(",")
        for store_kind, uri_of in (("sqlite", lambda n: f"sqlite:///{tmp / f'scale{n}.db'}"),
                              ("server", lambda n: server_uri)):
            if store_kind not in stores:
                continue
            by_size = {}
            for n in sizes:
                by_size[n] = sweep_once(n, uri_of(n), tmp / f"{store_kind}-results", f"scale{n}")
                print(f"[bench] scale {store_kind} {n}: {by_size[n]}", file=sys.stderr, flush=True)
                out.update({f"scale.{store_kind}.{k}_at_{n}": v for k, v in by_size[n].items() if k != "trials"})
            small, large = min(sizes), max(sizes)
            out[f"scale.{store_kind}.growth_ratio"] = by_size[large]["per_trial_s"] / by_size[small]["per_trial_s"]
        emit("scale", {"scale.cpus": min(os.cpu_count() or 2, 2), **out})
    finally:
        ray.shutdown()
        if server is not None:
            server.terminate()
            server.wait(timeout=30)

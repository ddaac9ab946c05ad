"""What every sweep script does around `run_sweep`: the checks before Ray (preflight.py), Ray start-up,
the MLflow parent run, the forecast, and the results table and report at the end. A sweep that
stalls or loses its store ends with what to do, nothing left RUNNING. No ray.tune here.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import tlcore
from tlcore.config import DATASETS_2D
from tlcore.data.splits import write_splits
from tlcore.report.summary import log_seed_aggregates, seeds_note, verdict
from tlcore.sweep.halving import SweepStalled
from tlcore.sweep.invocation import Sweep, fail
from tlcore.sweep.preflight import check_imagenet, prepare, resolve_source
from tlcore.sweep.results import TrialRow
from tlcore.sweep.worker_tasks import forecast_task
from tlcore.text import format_table
from tlcore.tracking import store
from tlcore.tracking.credentials import redact

__all__ = ["Sweep", "begin", "check_imagenet", "fail", "finish", "log_forecast", "log_table", "prepare",
           "resolve_source", "run", "start_ray"]


# Exit status of a sweep stopped by a tracking-store outage after its trials started (EX_TEMPFAIL:
# try again later): distinct from 2 (fix the input) so that a job system can retry it.
EXIT_STORE_DOWN = 75


_running: dict = {}  # the sweep being run (begin()), for run()'s message


def run(main, *args) -> None:
    """Run a sweep script's main(*args) (its flags, read before this module loaded); whatever
    ends it, nothing is left RUNNING in MLflow and the last line says what to do.

    - Ctrl-C or SIGTERM (Slurm's scancel, a job's time limit): open runs end KILLED, exit 130 /
      143; --resume continues from Tune's last saved state (no finished trial is trained again).
    - A tracking store that stops answering once trials have started: exit 75 with what to do
      (every result is in Ray's files; --resume writes what MLflow lacks).
    - A stalled rung: exit 2. Any other error: open runs end FAILED, one line with the
      traceback's file, exit 1."""
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C interrupts at once (Tune would wait to save)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        main(*args)
    except KeyboardInterrupt as e:
        code = 143 if str(e) == "SIGTERM" else 130
        if _running:
            close_open_runs(_running, "KILLED", {"interrupted": str(e) or "SIGINT"})
        print(f"\n[tlcore] interrupted ({str(e) or 'Ctrl-C'}): nothing is left RUNNING in MLflow"
              + (f"; rerun the same command with --resume to continue from {_running['exp_dir']}" if _running else ""),
              file=sys.stderr)
        end_process(code)
    except Exception as e:
        stalled = _stalled_cause(e)
        if stalled is not None and _running:
            close_open_runs(_running, "FAILED", {"stalled": "true"})
            print(f"\n[tlcore] error: {stalled}", file=sys.stderr)
            raise SystemExit(2) from None
        cause = store.unreachable_cause(e)
        if cause is None:
            _unexpected(e)
        if not _running:
            raise
        reason = redact((str(cause).strip().splitlines() or [type(cause).__name__])[-1][:200])
        print(f"\n[tlcore] error: the MLflow store {_running['uri']} stopped answering ({reason}).\n"
              f"Nothing is lost: every trial's results and checkpoints are in {_running['exp_dir']}.\n"
              "When the store answers again, rerun the same command with --resume: no trial is trained again;\n"
              "the records the sweep kept for MLflow are written (Tune saved them), then it evaluates,\n"
              "registers and builds the report.", file=sys.stderr)
        raise SystemExit(EXIT_STORE_DOWN) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    end_process()


def _raise_interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _unexpected(e: Exception) -> None:
    """An error tlcore did not foresee (a bug, a full disk): the open runs fail, the traceback
    goes to a file (beside the sweep's results when it has begun) and the terminal gets one line."""
    folder = Path(_running["exp_dir"]) if _running else Path(tempfile.gettempdir())
    path = folder / f"tlcore-error-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    path.write_text(redact("".join(traceback.format_exception(e))))
    if _running:
        close_open_runs(_running, "FAILED", {"error": f"{type(e).__name__}: {e}"[:500]})
    said = redact((str(e).strip().splitlines() or [""])[0][:300])
    print(f"\n[tlcore] error: {type(e).__name__}: {said} (the traceback: {path})"
          + ("; --resume continues the sweep once it is fixed" if _running else ""), file=sys.stderr)
    raise SystemExit(1) from None


def end_process(code: int = 0) -> None:
    """End a finished sweep's process without the interpreter's teardown. The exit handlers run
    first (Ray's shutdown stops the processes this driver started; MLflow flushes its queues), so
    nothing is lost. Why: a finished layer sweep here once died of SIGSEGV (exit -11) in that
    teardown, after its last line was printed (Ray's native threads outliving Python's modules, as
    in ray-project/ray#34508), and a job system reads -11 as a failed sweep."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _stalled_cause(exc: BaseException | None) -> SweepStalled | None:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, SweepStalled):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def close_open_runs(running: dict, status: str, tags: dict) -> None:
    """Nothing left RUNNING in MLflow: the sweep's open trial runs and its parent end as `status`
    (FAILED, KILLED), tagged with why."""
    uri, pid, name = running["uri"], running.get("parent_run_id"), running.get("name")
    if not pid:
        return
    for run in store.child_runs(uri, name, pid, "attributes.status = 'RUNNING'"):
        store.set_tags(uri, run.run_id, tags)
        store.end_run(uri, run.run_id, status)
    store.set_tags(uri, pid, tags)
    store.end_run(uri, pid, status)


def start_ray(sweep: Sweep) -> float:
    """Connect to (or start) Ray and check the sweep fits it (cluster.py); sets and returns
    the GPUs per trial."""
    from tlcore.sweep.cluster import ClusterMismatch, connect

    ours = signal.getsignal(signal.SIGTERM) is _raise_interrupt  # under run()
    try:
        sweep.gpus_per_trial = connect(sweep.args, volumes=sweep.base_config["dataset"] not in DATASETS_2D)
    except ClusterMismatch as e:
        fail(str(e))
    if ours:  # ray.init put in its own handler (sys.exit: the runs would stay RUNNING)
        signal.signal(signal.SIGTERM, _raise_interrupt)
    return sweep.gpus_per_trial


def begin(sweep: Sweep) -> None:
    """After every check passed: set the results folder aside or reuse it, open the parent run."""
    uri, args, name = sweep.tracking_uri, sweep.args, sweep.name
    exp_dir = Path(sweep.storage_path) / name
    previous, splits = sweep.previous, sweep.splits
    if exp_dir.exists() and previous is None:
        aside = exp_dir.with_name(f"{name}.{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(exp_dir), aside)  # never overwrite an earlier sweep's results
        print(f"[tlcore] earlier results of {name} moved to {aside}")
    # 0700: checkpoints and predictions are patient data, and --resume unpickles Tune's state from here
    Path(sweep.storage_path).mkdir(mode=0o700, parents=True, exist_ok=True)
    exp_dir.mkdir(mode=0o700, exist_ok=True)
    exp_dir.chmod(0o700)
    write_splits(sweep.splits_file, splits)
    _running.update(uri=uri, exp_dir=str(exp_dir), name=name)
    if previous:
        sweep.parent_run_id = previous["parent_run_id"]
        store.set_tags(uri, sweep.parent_run_id, {"resumed_at": time.strftime("%Y-%m-%d %H:%M:%S")})
    else:
        params = {k: v for k, v in vars(args).items()}
        params.update({f"base.{k}": v for k, v in sweep.base_config.items()})
        sweep.parent_run_id = store.start_run(uri, name, f"{name} {time.strftime('%Y-%m-%d %H:%M')}",
                                                 params, {"sweep": name, "role": "parent"})
        store.log_dict(uri, sweep.parent_run_id, splits, "splits.json")
        # what `python -m tlcore.tracking.sync` and `--resume` need to find this sweep's runs again
        (exp_dir / "tlcore_sweep.json").write_text(json.dumps({
            "name": name, "parent_run_id": sweep.parent_run_id, "splits_file": sweep.splits_file,
            "tracking_uri": uri, "max_iterations": sweep.max_iterations,
            "tlcore_version": tlcore.__version__}, indent=1))
    _running["parent_run_id"] = sweep.parent_run_id
    print(f"[tlcore] {name}: {len(splits['train'])} train / {len(splits['val'])} val / "
          f"{len(splits['test'])} test subjects from {sweep.data_dir}")
    print(f"[tlcore] MLflow parent run {sweep.parent_run_id} in {uri}")


# On the parent run, one per freeze depth k and kind (report/page.py reads them back): the source's
# LogME, the untrained networks' (baseline), their difference (gain: the forecast), Mean-Var's.
FORECAST_METRIC = "forecast_{}.k{}"
FORECAST_KINDS = ("logme", "baseline", "gain")


def log_forecast(sweep: Sweep, source: str, depths, meanvar: bool = False) -> dict[int, float]:
    """Before any trial: the transferability forecast per freeze depth (analysis/forecast.py),
    printed and logged to the parent run; returns the gain per depth. A resumed sweep keeps the
    scores it had. A forecast that fails (it is advice, not a result) is a warning; the sweep
    goes on."""
    import ray

    uri, pid = sweep.tracking_uri, sweep.parent_run_id
    logged = store.get_run(uri, pid).metrics
    if all(FORECAST_METRIC.format(kind, k) in logged for kind in FORECAST_KINDS for k in depths):
        return {k: logged[FORECAST_METRIC.format("gain", k)] for k in depths}
    t0 = time.perf_counter()
    try:
        # in a Ray task, like the trials: the driver loads no network code (MONAI, torch)
        task = sweep.remote(forecast_task)
        scores = ray.get(task.remote({**sweep.base_config, "source_model": source}, list(depths),
                                     sweep.source_weights, meanvar))
    except Exception as e:  # noqa: BLE001
        print(f"[tlcore] WARNING: no transferability forecast ({type(e).__name__}: {e})", file=sys.stderr)
        return {}
    store.log_metrics(uri, pid, {FORECAST_METRIC.format(kind, k): v for kind, per_k in scores.items()
                                 for k, v in per_k.items()}, step=0)
    gain = scores["gain"]
    best = max(gain, key=gain.get)
    print(f"[tlcore] transferability forecast ({time.perf_counter() - t0:.0f} s): LogME of what the trained layers "
          "receive, minus that of untrained networks of the same architecture: "
          + ", ".join(f"k={k} {v:+.3f}" for k, v in gain.items()) + f"; forecast best k={best}")
    return gain


NOTE_LIMIT = 7_500  # MLflow keeps a tag (the run's description is one) up to 8,000 characters


def parent_description(sweep: Sweep, table: str, rows: list[dict], said: str = "") -> str:
    """The parent run's description in MLflow (its Overview page): the report's verdict, the
    results table, what one seed can and cannot say, where the rest is."""
    head = (f"**{sweep.name}**: {len(rows)} trial(s); the HTML report is under this run's artifacts, report/.\n\n"
            + (f"**Verdict**: {said}\n\n" if said else ""))
    note = "\n\n" + seeds_note(rows, synthetic=not sweep.args.data_dir).replace("[tlcore] ", "")
    if len(head) + len(table) + len(note) > NOTE_LIMIT:
        table = "(the table is in results.md: too long for a description)"
    return head + table + note


def finish(sweep: Sweep, rows: list[TrialRow], table_rows: list[dict] | None = None, errors: int = 0) -> str:
    """Print the results table (`table_rows`, a thesis-shaped view of `rows`; else the rows
    themselves), log it to the parent run, close the parent run (FAILED when a trial errored, or
    `errors` says so), and build the report."""
    failed = [r for r in rows if r.failed]
    errors = max(errors, len(failed))
    as_dicts = [r.as_dict() for r in rows]
    table_rows = table_rows if table_rows is not None else as_dicts
    table = format_table(table_rows)
    uri, pid = sweep.tracking_uri, sweep.parent_run_id
    store.log_text(uri, pid, table + "\n", "results.md")
    store.log_dict(uri, pid, table_rows, "results.json")
    store.set_tags(uri, pid, {"trials": len(rows), "errored_trials": errors})
    aggregates = log_seed_aggregates(uri, sweep.name, pid)
    report = write_report(sweep)
    said = verdict(report.rows) if report else ""
    store.set_tags(uri, pid, {"mlflow.note.content": parent_description(sweep, table, as_dicts, said)})
    store.end_run(uri, pid, "FAILED" if errors else "FINISHED")
    print(f"\n{sweep.name} results\n{table}\n")
    print(seeds_note(as_dicts, synthetic=not sweep.args.data_dir))
    if said:
        print(f"[tlcore] verdict: {said}")
    if report:
        print(f"[tlcore] report: {report.html}  (also in the MLflow parent run, under report/)")
    print(f"[tlcore] MLflow: experiment '{sweep.name}', parent run {pid}"
          + (f"; {len(aggregates)} run(s) 'mean of n seeds' (mean, _sd, _min, _max of every metric)"
             if aggregates else ""))
    if uri.startswith("sqlite:///"):
        start = ("mlflow/ui.sh" if uri == store.default_tracking_uri() else
                 f".venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000 --workers 1")
        print(f"[tlcore] open the UI:  {start}\n         then {store.runs_page('http://127.0.0.1:5000', uri, sweep.name)}")
    elif uri.startswith(("http://", "https://")):
        print(f"[tlcore] open the UI:  {store.runs_page(redact(uri), uri, sweep.name)}")
    else:  # a database URI: the UI is whichever `mlflow server` serves that database
        print(f"[tlcore] open the UI:  mlflow server --backend-store-uri <this store>, then experiment "
              f"{sweep.name!r} (add ?{store.ML_VIEW} to its runs page for the model-training view)")
    if errors:
        names = "\n".join(f"  trial {r.trial_id} ({r.source_model} k={r.frozen_layers} lr={r.lr}): "
                          f"{r.error or 'failed'}\n    {r.error_file}" for r in failed)
        fail(f"{errors} trial(s) failed after {sweep.args.max_failures} retr"
             f"{'y' if sweep.args.max_failures == 1 else 'ies'}:\n{names}\n"
             f"Rerun the same command with --resume to retry only these; finished trials are kept.")
    return table


def write_report(sweep: Sweep):
    """The sweep's HTML report (tables, statistics, figures; a report.page.Report), logged to the
    parent run; None if it could not be built."""
    from tlcore.report.page import build

    try:
        return build(sweep.tracking_uri, sweep.name, sweep.parent_run_id, Path(sweep.storage_path) / sweep.name / "report")
    except Exception as e:  # noqa: BLE001 -- the sweep's results are safe; say how to retry
        print(f"[tlcore] WARNING: the report could not be built ({type(e).__name__}: {e}); retry with\n"
              f"    python -m tlcore.report {sweep.name} --parent-run {sweep.parent_run_id}", file=sys.stderr)
        return None


def log_table(sweep: Sweep, rows: list[dict], artifact: str, title: str) -> None:
    """Print a small table and log it to the parent run."""
    table = format_table(rows)
    print(f"\n{title}\n{table}\n")
    store.log_text(sweep.tracking_uri, sweep.parent_run_id, f"{title}\n\n{table}\n", artifact)

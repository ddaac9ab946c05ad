"""Replay a sweep's results from Ray's files into MLflow.

    python -m tlcore.tracking.sync results/brats_layers                 # into the store the sweep used
    python -m tlcore.tracking.sync results/brats_layers --mlflow-uri sqlite:///copy.db   # into another store

Every reported result of every trial is in `<storage-path>/<sweep>/<trial>/result.json`. When
the tracking store was unreachable as a sweep ended (the sweep says so and prints this
command), or a driver died with records still buffered, this writes what MLflow lacks: the
trial's child run (found by its `trial_id` tag, or created), each metric step not yet logged
(with its original time), the transfer report, the runtime tags, and the final status of finished or failed
trials. Steps already present are skipped, so running it twice adds nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from tlcore.text import format_table
from tlcore.tracking import store
from tlcore.tracking.credentials import tracking_uri_flag
from tlcore.tracking.trial_runs import end_trial_run, iteration_tags, logged_metrics, open_trial_run, reported_dict


@dataclass
class RecordedTrial:
    trial_id: str
    status: str          # Tune's: TERMINATED, ERROR, RUNNING, PENDING, PAUSED
    config: dict
    results: list[dict]
    error_file: str


def read_sweep(exp_dir: Path) -> dict:
    meta_file = exp_dir / "tlcore_sweep.json"
    if not meta_file.exists():
        raise SystemExit(f"error: {meta_file} not found: {exp_dir} is not a tlcore sweep folder "
                         "(give <storage-path>/<sweep name>, e.g. results/brats_layers)")
    meta = json.loads(meta_file.read_text())
    meta.setdefault("name", exp_dir.name)
    return meta


def read_trials(exp_dir: Path) -> list[RecordedTrial]:
    """Trials of a sweep from Tune's newest experiment state and each trial's result.json."""
    states = sorted(exp_dir.glob("experiment_state-*.json"))
    if not states:
        raise SystemExit(f"error: no experiment_state-*.json in {exp_dir}: Tune never saved this sweep")
    trials = []
    for trial_json, meta_json in json.loads(states[-1].read_text())["trial_data"]:
        t, m = json.loads(trial_json), json.loads(meta_json)
        trial_dir = exp_dir / t["relative_logdir"]
        config = t["config"]
        if (trial_dir / "params.json").exists():  # plain JSON, as the trial saw it
            config = json.loads((trial_dir / "params.json").read_text())
        results = []
        if (trial_dir / "result.json").exists():
            results = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()
                       if line.strip()]
        error = m.get("error_filename") or ""
        trials.append(RecordedTrial(t["trial_id"], t["status"], config, results,
                                    str(trial_dir / error) if error else ""))
    return trials


def parent_run(uri: str, meta: dict, exp_dir: Path) -> str:
    """The sweep's parent run in `uri`: the original one, or one made for a copy."""
    pid = meta["parent_run_id"]
    try:
        store.get_run(uri, pid)
        return pid
    except Exception:  # noqa: BLE001 -- not in this store
        pass
    found = store.find_run(uri, meta["name"], f"tags.synced_from_parent = '{pid}'")
    if found:
        return found
    return store.start_run(uri, meta["name"], f"{meta['name']} (synced from {exp_dir})", None,
                              {"sweep": meta["name"], "role": "parent", "synced_from_parent": pid,
                               "synced_from": str(exp_dir)})


def sync_trial(uri: str, name: str, parent: str, trial: RecordedTrial, max_iterations: int) -> dict:
    run_id = open_trial_run(uri, name, parent, trial.trial_id, trial.config, reopen=False)
    rows = []
    for key in sorted({k for r in trial.results for k in logged_metrics(r)}):
        logged = {step for step, _ in store.metric_history(uri, run_id, key)}
        for r in trial.results:
            step = int(r.get("iteration", r.get("training_iteration", 0)))
            if key in logged_metrics(r) and step not in logged:
                rows.append((key, r[key], step, int(r.get("timestamp", 0) * 1000)))
                logged.add(step)
    store.log_metric_rows(uri, run_id, rows)
    transfer = next((t for t in (reported_dict(r, "transfer") for r in trial.results) if t), None)
    if transfer:
        store.log_params(uri, run_id, {f"transfer.{k}": v for k, v in transfer.items()})
    runtime = next((t for t in (reported_dict(r, "runtime") for r in reversed(trial.results)) if t), None)
    if runtime:  # the last start's
        store.set_tags(uri, run_id, {f"runtime.{k}": v for k, v in runtime.items()})
    status = store.get_run(uri, run_id).status
    done = int(trial.results[-1].get("iteration", 0)) if trial.results else 0
    if trial.status == "TERMINATED" and status != "FINISHED":
        status = "FINISHED"
        end_trial_run(uri, run_id, status, iteration_tags(done, max_iterations))
    elif trial.status == "ERROR" and status != "FAILED":
        status = "FAILED"
        end_trial_run(uri, run_id, status, {"error_file": trial.error_file})
    return {"trial_id": trial.trial_id, "run_id": run_id, "tune_status": trial.status,
            "reported": len(trial.results), "metric_values_added": len(rows), "mlflow_status": status}


def replay(uri: str, experiment: str, parent_run_id: str, exp_dir: str | Path, max_iterations: int) -> list[dict]:
    """Write what MLflow lacks of every trial of the sweep in `exp_dir` under its parent run.
    Against a tracking server, eight trials at a time (each takes about ten requests: 1,000
    trials one at a time took 98 s, bench/RESULTS.md scale.server.sync_s); each writes only its
    own run."""
    return store.map_runs(uri, lambda t: sync_trial(uri, experiment, parent_run_id, t, max_iterations),
                             read_trials(Path(exp_dir)))


def sync(exp_dir: str | Path, uri: str | None = None) -> list[dict]:
    """Write what MLflow lacks of sweep `exp_dir`; one row per trial."""
    exp_dir = Path(exp_dir).resolve()
    meta = read_sweep(exp_dir)
    uri = uri or meta.get("tracking_uri")
    if not uri:
        raise SystemExit(f"error: {exp_dir / 'tlcore_sweep.json'} names no tracking store; pass --mlflow-uri")
    read_trials(exp_dir)  # no Tune state: say so before touching the store
    store.prepare_store(uri)
    parent = parent_run(uri, meta, exp_dir)
    return replay(uri, meta["name"], parent, exp_dir, int(meta.get("max_iterations") or 0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tlcore.tracking.sync", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", help="<storage-path>/<sweep name>, e.g. results/brats_layers")
    p.add_argument("--mlflow-uri", default=None, type=tracking_uri_flag, help="tracking store (default: the one the sweep used)")
    args = p.parse_args(argv)
    try:
        rows = sync(args.sweep_dir, args.mlflow_uri)
    except RuntimeError as e:  # store unreachable
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    added = sum(r["metric_values_added"] for r in rows)
    print(f"\n[tlcore] {len(rows)} trial(s), {added} metric value(s) added")
    unfinished = [r["trial_id"] for r in rows if r["tune_status"] not in ("TERMINATED", "ERROR")]
    if unfinished:
        print(f"[tlcore] {len(unfinished)} trial(s) did not finish ({', '.join(unfinished)}): "
              "rerun the sweep with --resume to complete them")
    return 0


if __name__ == "__main__":
    sys.exit(main())

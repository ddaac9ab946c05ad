"""What every sweep script does around `run_sweep`: Ray start-up, data and splits (flags.py: the
command line), the MLflow parent run, checks that fail before any trial starts, and the
results table at the end. No ray.tune here (see trainables.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NoReturn

from tlcore import tracking
from tlcore.config import DATASETS_2D, RunConfig
from tlcore.credentials import redact, take_credentials
from tlcore.data.layouts import BRATS_TARGETS, find_subjects
from tlcore.data.splits import (
    DEFAULT_FRACTIONS,
    nested_subsets,
    read_splits,
    split_patients,
    split_subjects,
    write_splits,
)
from tlcore.data.synthetic import ensure_synthetic
from tlcore.flags import REPO_ROOT, SMOKE, SMOKE_2D, SYNTHETIC, SYNTHETIC_2D, SYNTHETIC_SIZES
from tlcore.halving import SweepStalled
from tlcore.progress import format_table
from tlcore.summary import log_seed_aggregates, seeds_note
from tlcore.trial_runs import SweepRuns
from tlcore.validate import validate_dataset

@dataclass
class Sweep:
    """What the driver knows about one sweep invocation."""
    name: str
    args: argparse.Namespace
    tracking_uri: str
    storage_path: str
    data_dir: str
    splits_file: str
    base_config: dict
    splits: dict                      # train / val / test (and 3D: nested training subsets S1..S4)
    previous: dict | None = None      # tlcore_sweep.json of the sweep --resume continues
    default_strata: tuple = ()        # config keys early stopping compares within (the sweep's choice)
    parent_run_id: str = ""           # set by begin()
    gpus_per_trial: float = 0         # set by start_ray()
    source_weights: dict = field(default_factory=dict)  # set by resolve_source(): for the trials

    @property
    def runs(self) -> SweepRuns:
        return SweepRuns(self.tracking_uri, self.name, self.parent_run_id)

    @property
    def max_iterations(self) -> int:
        return self.base_config["max_iterations"]

    @property
    def report_every(self) -> int:
        return self.base_config["report_every"]

    def tune_kwargs(self) -> dict:
        """The `run_sweep` arguments every sweep passes the same way."""
        a = self.args
        return {"tracking_uri": self.tracking_uri, "parent_run_id": self.parent_run_id,
                "storage_path": self.storage_path, "max_iterations": self.max_iterations,
                "report_every": self.report_every, "cpus_per_trial": a.cpus_per_trial,
                "gpus_per_trial": self.gpus_per_trial, "max_failures": a.max_failures, "resume": a.resume,
                "scheduler": a.scheduler, "strata": self.strata, "seed": a.seed, "num_samples": a.num_samples,
                "source_weights": self.source_weights}

    @property
    def strata(self) -> tuple:
        """Config keys that early stopping compares within: --strata, else the sweep's own."""
        if self.args.strata is not None:
            return tuple(k.strip() for k in self.args.strata.split(",") if k.strip())
        return tuple(self.default_strata)


def writable_by_others(exp_dir: Path) -> str:
    """Why someone but this user could have written the state a --resume unpickles ('' if no one):
    the sweep folder or a file of Tune's in it owned by another user, or group/world-writable."""
    for path in (exp_dir, *exp_dir.glob("tuner.pkl"), *exp_dir.glob("experiment_state*.json")):
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            return f"{path} is a symbolic link"
        if st.st_uid != os.getuid():
            return f"{path} belongs to another user (uid {st.st_uid})"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"{path} is writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'}"
    return ""


def fail(msg: str) -> NoReturn:
    print(f"\n[tlcore] error: {redact(msg)}", file=sys.stderr)
    raise SystemExit(2)


# Exit status of a sweep stopped by a tracking-store outage after its trials started (EX_TEMPFAIL:
# try again later): distinct from 2 (fix the input) so that a job system can retry it.
EXIT_STORE_DOWN = 75
_running: dict = {}  # the sweep being run (begin()), for run()'s message


def run(main) -> None:
    """Run a sweep script's main(). A tracking store that stops answering once trials have started
    ends the sweep with what to do instead of a traceback: every result is in Ray's files, and
    --resume (no trial retrained) writes what MLflow lacks, then evaluates, registers and reports."""
    try:
        main()
    except Exception as e:  # noqa: BLE001 -- anything else is re-raised unchanged
        stalled = _stalled_cause(e)
        if stalled is not None and _running:
            close_stalled_sweep(_running)
            print(f"\n[tlcore] error: {stalled}", file=sys.stderr)
            raise SystemExit(2) from None
        cause = tracking.unreachable_cause(e)
        if cause is None or not _running:
            raise
        reason = redact((str(cause).strip().splitlines() or [type(cause).__name__])[-1][:200])
        print(f"\n[tlcore] error: the MLflow store {_running['uri']} stopped answering ({reason}).\n"
              f"Nothing is lost: every trial's results and checkpoints are in {_running['exp_dir']}.\n"
              "When the store answers again, rerun the same command with --resume: no trial is trained again;\n"
              "the records the sweep kept for MLflow are written (Tune saved them), then it evaluates,\n"
              "registers and builds the report.", file=sys.stderr)
        raise SystemExit(EXIT_STORE_DOWN) from None


def _stalled_cause(exc: BaseException | None) -> SweepStalled | None:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, SweepStalled):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def close_stalled_sweep(running: dict) -> None:
    """A stalled sweep leaves nothing RUNNING in MLflow: its open trial runs and parent fail."""
    uri, pid, name = running["uri"], running.get("parent_run_id"), running.get("name")
    if not pid:
        return
    for run in tracking.child_runs(uri, name, pid, "attributes.status = 'RUNNING'"):
        tracking.set_tags(uri, run.run_id, {"stalled": "true"})
        tracking.end_run(uri, run.run_id, "FAILED")
    tracking.end_run(uri, pid, "FAILED")


def start_ray(sweep: Sweep) -> float:
    """Connect to (or start) Ray and check the sweep fits it (ray_cluster.py); sets and returns
    the GPUs per trial."""
    from tlcore.ray_cluster import ClusterMismatch, connect

    try:
        sweep.gpus_per_trial = connect(sweep.args)
    except ClusterMismatch as e:
        fail(str(e))
    return sweep.gpus_per_trial


def prepare(name: str, dataset: str, args: argparse.Namespace, label_map: dict | None = None,
            subset_sizes=None, default_strata: tuple = ()) -> Sweep:
    """Checks that can fail before anything is written: data, splits, the tracking store.
    `args` are the flags of sweep_parser(dataset=dataset)."""
    try:  # user:password@ leave the URI here, before it (or args) is recorded anywhere
        uri = take_credentials(args.mlflow_uri or tracking.default_tracking_uri())
    except ValueError as e:
        fail(str(e))
    if args.mlflow_uri:
        args.mlflow_uri = uri
    storage = str(Path(args.storage_path).absolute())
    exp_dir = Path(storage) / name
    state_file = exp_dir / "tlcore_sweep.json"

    if args.strata:  # a typo would silently compare everything with everything
        known = {f.name for f in fields(RunConfig)}
        unknown = [k for k in args.strata.split(",") if k.strip() and k.strip() not in known]
        if unknown:
            fail(f"--strata {args.strata}: {unknown} are not run-config keys; use keys the sweep varies, "
                 "e.g. train_subset, lr_schedule, source_model, frozen_layers")
    is_2d = dataset in DATASETS_2D
    if args.data_dir:
        data_dir = str(Path(args.data_dir).absolute())
        profile = {"image_size": 299, "batch_size": 16, "max_iterations": 10} if is_2d else {}
    else:
        data_dir = str(ensure_synthetic(REPO_ROOT / "data" / "synthetic" / dataset, dataset, seed=0,
                                        shape=(64,) if is_2d else (32, 32, 32), **SYNTHETIC_SIZES[dataset]))
        profile = dict(SYNTHETIC_2D if is_2d else SYNTHETIC)
    if args.smoke_test:
        profile = dict(SMOKE_2D if is_2d else SMOKE)
    # the flags sweep_parser adds for this dataset
    modalities, grades, finding = ("t1", "t2"), ("HGG",), "Pneumothorax"
    if dataset == "brats":
        modalities = tuple(m.strip() for m in args.modalities.split(","))
        label_map, grades = BRATS_TARGETS[args.target], tuple(args.grades.split(","))
    elif dataset == "chestxray":
        finding = args.finding
    report = validate_dataset(dataset, data_dir, modalities, label_map, grades=grades, finding=finding)
    if not report.ok:
        fail("the dataset has problems; no trial was started and nothing was written.\n" + report.format())
    print("[tlcore] " + report.format())
    if is_2d:  # subjects are patients; the official test patients stay the test split
        images = _images_2d(dataset, data_dir, finding)
        subjects = sorted({i.patient for i in images})
        official_test = sorted({i.patient for i in images if i.split in ("valid", "test")})
    else:
        subjects = find_subjects(dataset, data_dir, modalities, grades=grades)

    if args.resume and exp_dir.exists():
        unsafe = writable_by_others(exp_dir)
        if unsafe:
            fail(f"--resume: {unsafe}. Resuming unpickles Tune's state in {exp_dir} (tuner.pkl and the "
                 "experiment state), so whoever can write there could run code as you. Check the folder, "
                 f"then make it yours alone: chmod -R go-w {exp_dir} (or chown it).")
    previous = json.loads(state_file.read_text()) if args.resume and state_file.exists() else None
    if args.splits:
        splits = read_splits(args.splits)
    elif previous:
        splits = read_splits(previous["splits_file"])
    elif is_2d:
        splits = split_patients(subjects, official_test, 0.1, seed=args.seed)
    else:
        splits = split_subjects(subjects, DEFAULT_FRACTIONS[dataset], seed=args.seed)
    if not is_2d and ("subsets" not in splits or subset_sizes):
        try:
            splits["subsets"] = nested_subsets(splits["train"], subset_sizes, seed=args.seed)
        except ValueError as e:
            fail(str(e))
    unknown = sorted(set(splits["train"] + splits["val"] + splits["test"]) - set(subjects))
    if unknown:
        fail(f"split lists name subjects not found in {data_dir}: {unknown[:10]}")
    splits_file = str(exp_dir / "splits.json")

    try:
        tracking.prepare_store(uri)
    except RuntimeError as e:
        fail(str(e))
    base = {"dataset": dataset, "data_dir": data_dir, "splits_file": splits_file, "tracking_uri": uri,
            "seed": args.seed, "num_threads": max(1, int(args.cpus_per_trial)), **profile}
    if is_2d and args.gpus_per_trial != 0:  # a GPU eats images faster than one process decodes PNGs
        base["data_workers"] = max(0, int(args.cpus_per_trial) - 1)
    if is_2d:
        base.update(finding=finding, report_every=1)
    if label_map:
        base["label_map"] = label_map
    if modalities != ("t1", "t2"):
        base["modalities"] = modalities
    if args.deterministic:
        base["deterministic"] = True
    if dataset in ("brats", "ixi") and args.head:
        base["head"] = args.head
    if dataset in ("brats", "ixi") and args.spacing:
        try:
            base["spacing"] = tuple(float(x) for x in args.spacing.split(","))
            RunConfig(spacing=base["spacing"])
        except ValueError:
            fail(f"--spacing {args.spacing}: give three positive voxel sizes in mm, e.g. --spacing 1,1,1")
    if args.max_iterations:
        base["max_iterations"] = args.max_iterations
    if args.report_every and is_2d:
        fail(f"--report-every {args.report_every}: a 2D sweep reports once per epoch; its budget is "
             "--max-iterations, in epochs")
    if args.report_every:
        base["report_every"] = args.report_every
    base.setdefault("max_iterations", 10_000)
    base.setdefault("report_every", 250)
    return Sweep(name, args, uri, storage, data_dir, splits_file, base, splits, previous, tuple(default_strata))


def _images_2d(dataset: str, data_dir: str, finding: str) -> list:
    if dataset == "mura":
        from tlcore.data.mura import find_mura
        return find_mura(data_dir)[0]
    from tlcore.data.chestxray import find_chestxray
    return find_chestxray(data_dir, finding)[0]


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
        tracking.set_tags(uri, sweep.parent_run_id, {"resumed_at": time.strftime("%Y-%m-%d %H:%M:%S")})
    else:
        params = {k: v for k, v in vars(args).items()}
        params.update({f"base.{k}": v for k, v in sweep.base_config.items()})
        sweep.parent_run_id = tracking.start_run(uri, name, f"{name} {time.strftime('%Y-%m-%d %H:%M')}",
                                                 params, {"sweep": name, "role": "parent"})
        tracking.log_dict(uri, sweep.parent_run_id, splits, "splits.json")
        # what `python -m tlcore.sync` and `--resume` need to find this sweep's runs again
        (exp_dir / "tlcore_sweep.json").write_text(json.dumps({
            "name": name, "parent_run_id": sweep.parent_run_id, "splits_file": sweep.splits_file,
            "tracking_uri": uri, "max_iterations": sweep.max_iterations}, indent=1))
    _running["parent_run_id"] = sweep.parent_run_id
    print(f"[tlcore] {name}: {len(splits['train'])} train / {len(splits['val'])} val / "
          f"{len(splits['test'])} test subjects from {sweep.data_dir}")
    print(f"[tlcore] MLflow parent run {sweep.parent_run_id} in {uri}")


FORECAST_METRIC = "forecast_logme.k{}"  # on the parent run, one per freeze depth (report.py reads them back)


def log_forecast(sweep: Sweep, source: str, depths) -> dict[int, float]:
    """Before any trial: the transferability forecast per freeze depth (forecast.py), printed and
    logged to the parent run; a resumed sweep keeps the scores it had. A forecast that fails
    (it is advice, not a result) is a warning; the sweep goes on."""
    from tlcore.forecast import forecast_sweep

    uri, pid = sweep.tracking_uri, sweep.parent_run_id
    logged = tracking.get_run(uri, pid).metrics
    if all(FORECAST_METRIC.format(k) in logged for k in depths):
        return {k: logged[FORECAST_METRIC.format(k)] for k in depths}
    t0 = time.perf_counter()
    try:
        scores = forecast_sweep({**sweep.base_config, "source_model": source}, depths)
    except Exception as e:  # noqa: BLE001
        print(f"[tlcore] WARNING: no transferability forecast ({type(e).__name__}: {e})", file=sys.stderr)
        return {}
    tracking.log_metrics(uri, pid, {FORECAST_METRIC.format(k): v for k, v in scores.items()}, step=0)
    best = max(scores, key=scores.get)
    print(f"[tlcore] transferability forecast (LogME of what the trained layers receive, {time.perf_counter() - t0:.0f} s): "
          + ", ".join(f"k={k} {v:.3f}" for k, v in scores.items()) + f"; forecast best k={best}")
    return scores


def resolve_source(sweep: Sweep, model_uri: str, how_to_make: str) -> tracking.ModelRef:
    """The registered source model, or an error saying how to produce it (call before `begin`).
    Its weights are read here, once, for the trials (sweep.source_weights): trials never ask the
    registry, so no node but this one needs an MLflow credential."""
    from tlcore.model_cache import cached_model

    try:
        ref, folder = cached_model(sweep.tracking_uri, model_uri)  # resolved and downloaded once
        sweep.source_weights[ref.uri] = (folder / "model.safetensors").read_bytes()
        return ref
    except tracking.ModelNotFoundError as e:
        if sweep.tracking_uri != tracking.default_tracking_uri():
            how_to_make += f" --mlflow-uri {sweep.tracking_uri}"
        fail(f"source model {model_uri} is not available: {e}\nProduce the source model first:\n    {how_to_make}\n"
             f"or pass --source models:/<name>/<version> of a model in this registry.")


def finish(sweep: Sweep, rows: list[dict], errors: int = 0) -> str:
    """Print the results table, log it to the parent run, close the parent run."""
    table = format_table(rows)
    uri, pid = sweep.tracking_uri, sweep.parent_run_id
    tracking.log_text(uri, pid, table + "\n", "results.md")
    tracking.log_dict(uri, pid, rows, "results.json")
    tracking.set_tags(uri, pid, {"trials": len(rows), "errored_trials": errors})
    aggregates = log_seed_aggregates(uri, sweep.name, pid)
    report = write_report(sweep)
    tracking.end_run(uri, pid, "FAILED" if errors else "FINISHED")
    print(f"\n{sweep.name} results\n{table}\n")
    print(seeds_note(rows, synthetic=not sweep.args.data_dir))
    if report:
        print(f"[tlcore] report: {report}  (also in the MLflow parent run, under report/)")
    print(f"[tlcore] MLflow: experiment '{sweep.name}', parent run {pid}"
          + (f"; {len(aggregates)} run(s) 'mean of n seeds' (mean, _sd, _min, _max of every metric)"
             if aggregates else ""))
    if uri.startswith("sqlite:///"):
        print(f"[tlcore] open the UI:  .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    else:
        print(f"[tlcore] open the UI:  {uri}")
    failed = [r for r in rows if r.get("status") == "ERROR"]
    if errors or failed:
        names = "\n".join(f"  trial {r['trial_id']} ({r.get('source_model', '')} k={r.get('frozen_layers', '')} "
                          f"lr={r.get('lr', '')}): {r.get('error', 'failed')}\n    {r.get('error_file', '')}"
                          for r in failed)
        fail(f"{max(errors, len(failed))} trial(s) failed after {sweep.args.max_failures} retr"
             f"{'y' if sweep.args.max_failures == 1 else 'ies'}:\n{names}\n"
             f"Rerun the same command with --resume to retry only these; finished trials are kept.")
    return table


def write_report(sweep: Sweep) -> Path | None:
    """The sweep's HTML report (tables, statistics, figures), logged to the parent run."""
    from tlcore.report import build

    try:
        return build(sweep.tracking_uri, sweep.name, sweep.parent_run_id,
                     Path(sweep.storage_path) / sweep.name / "report").html
    except Exception as e:  # noqa: BLE001 -- the sweep's results are safe; say how to retry
        print(f"[tlcore] WARNING: the report could not be built ({type(e).__name__}: {e}); retry with\n"
              f"    python -m tlcore.report {sweep.name} --parent-run {sweep.parent_run_id}", file=sys.stderr)
        return None


def check_imagenet(source: str) -> None:
    """Fail before any trial when ImageNet weights are asked for but cannot be had."""
    if source != "imagenet" and (source in ("scratch",) or source.startswith("models:/")):
        return
    from tlcore.train2d import imagenet_state
    try:
        imagenet_state(None if source == "imagenet" else source)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        fail(f"--source {source}: {e}")


def log_table(sweep: Sweep, rows: list[dict], artifact: str, title: str) -> None:
    """Print a small table and log it to the parent run."""
    table = format_table(rows)
    print(f"\n{title}\n{table}\n")
    tracking.log_text(sweep.tracking_uri, sweep.parent_run_id, f"{title}\n\n{table}\n", artifact)

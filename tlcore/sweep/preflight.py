"""Everything a user can get wrong, checked before Ray starts or anything is written: flags, the
tracking store, the dataset and its splits, a --resume's folder and the tlcore version that made
it, and the source model. Each check is a small function; `prepare` runs them in order and
returns the `Sweep`.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
from dataclasses import dataclass, fields
from pathlib import Path

import tlcore
from tlcore.config import DATASETS_2D, REPO_ROOT, TrialConfig
from tlcore.data.layouts import BRATS_TARGETS, find_subjects
from tlcore.data.splits import DEFAULT_FRACTIONS, nested_subsets, read_splits, split_patients, split_subjects
from tlcore.data.synthetic import ensure_synthetic
from tlcore.data.validate import validate_dataset
from tlcore.sweep.flags import REAL_2D, SMOKE, SMOKE_2D, SYNTHETIC, SYNTHETIC_2D, SYNTHETIC_SIZES
from tlcore.sweep.invocation import Sweep, fail
from tlcore.tracking import registry, store
from tlcore.tracking.credentials import take_credentials


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


def prepare(name: str, dataset: str, args: argparse.Namespace, label_map: dict | None = None,
            subset_sizes=None, default_strata: tuple = (), objective: tuple[str, str] = ("val_dice", "max")) -> Sweep:
    """Every check that can fail before anything is written, in the order a user meets them; returns
    the `Sweep`. `args` are the flags of sweep_parser(dataset=dataset)."""
    uri = tracking_uri_of(args)
    exp_dir = Path(args.storage_path).absolute() / name
    check_strata(args.strata)
    data_dir, profile = data_and_profile(dataset, args)
    what = DataChoice.of(dataset, args, label_map)
    subjects, official_test = check_dataset(dataset, data_dir, what)
    previous = previous_sweep(exp_dir) if args.resume else None
    splits = choose_splits(dataset, args, subjects, official_test, previous, subset_sizes, data_dir)
    try:
        store.prepare_store(uri)
    except RuntimeError as e:
        fail(str(e))
    base = base_config(dataset, args, uri, data_dir, str(exp_dir / "splits.json"), profile, what)
    metric, mode = objective
    return Sweep(name, args, uri, str(exp_dir.parent), data_dir, str(exp_dir / "splits.json"), base, splits,
                 previous, tuple(default_strata), metric=metric, mode=mode)


def tracking_uri_of(args: argparse.Namespace) -> str:
    """The store's URI, with a user@ moved to the environment before it (or args) is recorded anywhere."""
    try:
        uri = take_credentials(args.mlflow_uri or store.default_tracking_uri())
    except ValueError as e:
        fail(str(e))
    if args.mlflow_uri:
        args.mlflow_uri = uri
    return uri


def check_strata(strata: str | None) -> None:
    """--strata names run-config keys: a typo would silently compare everything with everything."""
    if not strata:
        return
    known = {f.name for f in fields(TrialConfig)}
    unknown = [k for k in strata.split(",") if k.strip() and k.strip() not in known]
    if unknown:
        fail(f"--strata {strata}: {unknown} are not run-config keys; use keys the sweep varies, "
             "e.g. train_subset, lr_schedule, source_model, frozen_layers")


def data_and_profile(dataset: str, args: argparse.Namespace) -> tuple[str, dict]:
    """The data folder (--data-dir, else the synthetic stand-in, made once) and the run-config
    profile that fits it (real data, synthetic, or --smoke-test)."""
    is_2d = dataset in DATASETS_2D
    if args.data_dir:
        data_dir = str(Path(args.data_dir).absolute())
        profile = dict(REAL_2D) if is_2d else {}
    else:
        data_dir = str(ensure_synthetic(REPO_ROOT / "data" / "synthetic" / dataset, dataset, seed=0,
                                        shape=(64,) if is_2d else (32, 32, 32), **SYNTHETIC_SIZES[dataset]))
        profile = dict(SYNTHETIC_2D if is_2d else SYNTHETIC)
    if args.smoke_test:
        profile = dict(SMOKE_2D if is_2d else SMOKE)
    return data_dir, profile


@dataclass(frozen=True)
class DataChoice:
    """What of a dataset a sweep uses: the flags sweep_parser adds for it."""
    modalities: tuple = ("t1", "t2")
    label_map: dict | None = None
    grades: tuple = ("HGG",)
    finding: str = "Pneumothorax"

    @classmethod
    def of(cls, dataset: str, args: argparse.Namespace, label_map: dict | None) -> DataChoice:
        if dataset == "brats":
            return cls(tuple(m.strip() for m in args.modalities.split(",")), BRATS_TARGETS[args.target],
                       tuple(args.grades.split(",")))
        if dataset == "chestxray":
            return cls(label_map=label_map, finding=args.finding)
        return cls(label_map=label_map)


def check_dataset(dataset: str, data_dir: str, what: DataChoice) -> tuple[list[str], list[str]]:
    """Validate every file (data.validate) and list the subjects; for 2D, subjects are patients and
    the official test patients are returned too (they stay the test split)."""
    report = validate_dataset(dataset, data_dir, what.modalities, what.label_map, grades=what.grades,
                              finding=what.finding)
    if not report.ok:
        fail("the dataset has problems; no trial was started and nothing was written.\n" + report.format())
    print("[tlcore] " + report.format())
    if dataset in DATASETS_2D:
        images = _images_2d(dataset, data_dir, what.finding)
        return sorted({i.patient for i in images}), sorted({i.patient for i in images if i.split in ("valid", "test")})
    return find_subjects(dataset, data_dir, what.modalities, grades=what.grades), []


def previous_sweep(exp_dir: Path) -> dict | None:
    """The tlcore_sweep.json of the sweep a --resume continues (None: nothing to resume), after
    checking that nobody else could have written what resuming unpickles, and that this tlcore
    can read it (Tune's state names tlcore's classes by their module)."""
    if not exp_dir.exists():
        return None
    unsafe = writable_by_others(exp_dir)
    if unsafe:
        fail(f"--resume: {unsafe}. Resuming unpickles Tune's state in {exp_dir} (tuner.pkl and the "
             "experiment state), so whoever can write there could run code as you. Check the folder, "
             f"then make it yours alone: chmod -R go-w {exp_dir} (or chown it).")
    state_file = exp_dir / "tlcore_sweep.json"
    if not state_file.exists():
        return None
    previous = json.loads(state_file.read_text())
    started_by = previous.get("tlcore_version", "0.1.0")  # 0.1.0 did not write its version
    if started_by.split(".")[:2] != tlcore.__version__.split(".")[:2]:
        fail(f"--resume: {exp_dir} was started by tlcore {started_by}, whose saved Tune state this tlcore "
             f"{tlcore.__version__} cannot load (its modules moved); resume it with tlcore {started_by} "
             f"(pip install tlcore=={started_by}, or check out v{started_by}), or start afresh without --resume.")
    return previous


def choose_splits(dataset: str, args: argparse.Namespace, subjects: list[str], official_test: list[str],
                  previous: dict | None, subset_sizes, data_dir: str) -> dict:
    """--splits, else the resumed sweep's, else new ones from --seed; 3D adds the nested training
    subsets S1..S4. Every subject named must exist."""
    if args.splits:
        splits = read_splits(args.splits)
    elif previous:
        splits = read_splits(previous["splits_file"])
    elif dataset in DATASETS_2D:
        splits = split_patients(subjects, official_test, 0.1, seed=args.seed)
    else:
        splits = split_subjects(subjects, DEFAULT_FRACTIONS[dataset], seed=args.seed)
    if dataset not in DATASETS_2D and ("subsets" not in splits or subset_sizes):
        try:
            splits["subsets"] = nested_subsets(splits["train"], subset_sizes, seed=args.seed)
        except ValueError as e:
            fail(str(e))
    unknown = sorted(set(splits["train"] + splits["val"] + splits["test"]) - set(subjects))
    if unknown:
        fail(f"split lists name subjects not found in {data_dir}: {unknown[:10]}")
    return splits


def base_config(dataset: str, args: argparse.Namespace, uri: str, data_dir: str, splits_file: str,
                profile: dict, what: DataChoice) -> dict:
    """The run-config keys every trial of the sweep shares (the search space adds the rest)."""
    is_2d = dataset in DATASETS_2D
    base = {"dataset": dataset, "data_dir": data_dir, "splits_file": splits_file, "tracking_uri": uri,
            "seed": args.seed, "num_threads": max(1, int(args.cpus_per_trial)), **profile}
    if is_2d and args.gpus_per_trial != 0:  # a GPU eats images faster than one process decodes PNGs
        base["data_workers"] = max(0, int(args.cpus_per_trial) - 1)
    if is_2d:
        base.update(finding=what.finding, report_every=1)
    if what.label_map:
        base["label_map"] = what.label_map
    if what.modalities != ("t1", "t2"):
        base["modalities"] = what.modalities
    if args.deterministic:
        base["deterministic"] = True
    if dataset in ("brats", "ixi") and args.head:
        base["head"] = args.head
    if dataset in ("brats", "ixi") and args.spacing:
        try:
            base["spacing"] = tuple(float(x) for x in args.spacing.split(","))
            TrialConfig(spacing=base["spacing"])
        except ValueError:
            fail(f"--spacing {args.spacing}: give three positive voxel sizes in mm, e.g. --spacing 1,1,1")
    if getattr(args, "val_subjects", None) is not None:  # (>= 1: flags.count)
        base["max_val_subjects"] = args.val_subjects
    if args.max_iterations:
        base["max_iterations"] = args.max_iterations
    if args.report_every and is_2d:
        fail(f"--report-every {args.report_every}: a 2D sweep reports once per epoch; its budget is "
             "--max-iterations, in epochs")
    if args.report_every:
        base["report_every"] = args.report_every
    base.setdefault("max_iterations", 10_000)
    base.setdefault("report_every", 250)
    return base


def _images_2d(dataset: str, data_dir: str, finding: str) -> list:
    if dataset == "mura":
        from tlcore.data.mura import find_mura
        return find_mura(data_dir)[0]
    from tlcore.data.chestxray import find_chestxray
    return find_chestxray(data_dir, finding)[0]


def resolve_source(sweep: Sweep, model_uri: str, how_to_make: str) -> registry.ModelRef:
    """The registered source model, or an error saying how to produce it (call before `begin`).
    Its weights are read here, once, for the trials (sweep.source_weights): trials never ask the
    registry, so no node but this one needs an MLflow credential."""
    from tlcore.tracking.model_cache import cached_model

    try:
        ref, folder = cached_model(sweep.tracking_uri, model_uri)  # resolved and downloaded once
        sweep.source_weights[ref.uri] = (folder / "model.safetensors").read_bytes()
        return ref
    except registry.ModelNotFoundError as e:
        if sweep.tracking_uri != store.default_tracking_uri():
            how_to_make += f" --mlflow-uri {sweep.tracking_uri}"
        fail(f"source model {model_uri} is not available: {e}\nProduce the source model first:\n    {how_to_make}\n"
             f"or pass --source models:/<name>/<version> of a model in this registry.")


def check_imagenet(source: str) -> None:
    """Fail before any trial when ImageNet weights are asked for but cannot be had."""
    if source != "imagenet" and (source in ("scratch",) or source.startswith("models:/")):
        return
    from tlcore.training.classification import imagenet_state
    try:
        imagenet_state(None if source == "imagenet" else source)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        fail(f"--source {source}: {e}")

"""A sweep script's command line: the flags every script shares, those of its dataset, and the
run-config profiles they select (real data keeps the thesis regime; synthetic and smoke-test
data get small shapes).
"""

from __future__ import annotations

import argparse

from tlcore.config import DATASETS_2D, HEADS, MEANVAR, NUM_LAYER_GROUPS, REPO_ROOT
from tlcore.data.layouts import BRATS_TARGETS
from tlcore.tracking.credentials import default_tracking_uri, tracking_uri_flag

# Run-config overrides per data situation. Real data keeps the thesis regime (TrialConfig defaults).
SYNTHETIC = {"patch_size": (16, 16, 16), "batch_size": 2, "inference_roi": (32, 32, 32),
             "max_iterations": 120, "report_every": 20}
# --smoke-test checks the plumbing, not the learning: 12^3 patches cost 2.3x less CPU a step than 16^3
# (and a quarter of CKA's probe: its interval is about twice as wide as at the defaults)
SMOKE = {"patch_size": (12, 12, 12), "batch_size": 1, "inference_roi": (32, 32, 32),
         "max_iterations": 12, "report_every": 4, "max_val_subjects": 2, "precise_bn_batches": 2, "probe_patches": 32}
SYNTHETIC_SIZES = {"brats": {"n_hgg": 20, "n_lgg": 4}, "ixi": {"n": 24},
                   "mura": {"n_patients": 40}, "chestxray": {"n_patients": 80}}
# 2D: "iterations" are epochs, one report each. Real data: 299x299, batch 16 (thesis).
SYNTHETIC_2D = {"image_size": 64, "batch_size": 8, "max_iterations": 4}
SMOKE_2D = {"image_size": 32, "batch_size": 8, "max_iterations": 2}
REAL_2D = {"image_size": 299, "batch_size": 16, "max_iterations": 10}  # the thesis's radiograph regime


def sweep_parser(doc: str, source: str | None = None, dataset: str | None = None) -> argparse.ArgumentParser:
    p = OneLineErrors(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if dataset == "brats":
        p.add_argument("--modalities", default="t1,t2", help="comma-separated of t1,t1ce,t2,flair (thesis: t1,t2 to match IXI)")
        p.add_argument("--target", default="tumour_core", choices=sorted(BRATS_TARGETS),
                       help="tumour_core = labels 1+4 (thesis), whole_tumour = 1+2+4, enhancing = 4")
        p.add_argument("--grades", default="HGG", help="grade folders, comma-separated (thesis: HGG)")
    if dataset == "chestxray":
        p.add_argument("--finding", default="Pneumothorax", help="the finding against 'No Finding'")
    if dataset in ("brats", "ixi"):  # 3D: every volume is brought to RAS; optionally one voxel size
        p.add_argument("--head", default=None, choices=HEADS,
                       help="HighRes3DNet's output block: conv (default: logits from a 1x1x1 conv), bn (NiftyNet, "
                            "the thesis's network), bn_relu (MONAI); see bench/RESULTS.md")
        p.add_argument("--spacing", default=None,
                       help="resample every volume to this voxel size in mm, e.g. 1,1,1 (default: keep each "
                            "volume's own); predictions are written back on each input's grid")
        p.add_argument("--val-subjects", type=count(1), default=None,
                       help="validation subjects scored at every report (ASHA's decisions, the best checkpoint); "
                            "default all. The final evaluation always scores every subject. 16 of BraTS's 63 cut "
                            "experiment A from 2.4 to 1.5 GPU-hours (docs/speed.md)")
    p.add_argument("--address", default=None, help="Ray address, e.g. 'auto' for a running cluster; omitted = start a local Ray")
    p.add_argument("--data-dir", default=None, help="dataset root in its real layout; omitted = synthetic demo data")
    p.add_argument("--mlflow-uri", default=None, type=tracking_uri_flag,
                   help=f"MLflow tracking URI, no password in it (MLFLOW_TRACKING_USERNAME / _PASSWORD); "
                        f"omitted = {default_tracking_uri()}")
    p.add_argument("--storage-path", default=str(REPO_ROOT / "results"),
                   help="Ray results and checkpoints (shared storage on multi-node clusters)")
    p.add_argument("--num-samples", type=count(1), default=1, help="repeats per grid point (each with its own seed), or trials of a search")
    p.add_argument("--gpus-per-trial", type=amount(0), default=None, help="fractions allowed; default 1 if the cluster has GPUs, else 0")
    p.add_argument("--cpus-per-trial", type=amount(0, above=True), default=1)
    p.add_argument("--shared-storage", action="store_true",
                   help="--storage-path is shared by every node although tlcore cannot "
                        "tell (e.g. one machine, several Ray nodes)")
    p.add_argument("--autoscale", action="store_true",
                   help="the cluster adds GPU nodes on demand: don't require the GPUs to be up already")
    is_2d = dataset in DATASETS_2D
    p.add_argument("--max-iterations", type=count(1), default=None,
                   help=("epochs per trial, one report each (ASHA may stop earlier; default 10 on real data)" if is_2d
                         else "training iterations per trial (ASHA may stop earlier)"))
    p.add_argument("--report-every", type=count(1), default=None,
                   help="2D: not used (a report per epoch)" if is_2d else "iterations between validation reports / checkpoints")
    p.add_argument("--max-failures", type=count(0), default=1, help="retries of a failed trial from its last checkpoint")
    p.add_argument("--scheduler", choices=["asha", "asha-sync", "none"], default="asha",
                   help="asha: stop poor trials early, deciding on the results in as they arrive; asha-sync: "
                        "decide once every trial of the stratum reached the rung (same results, same decisions); "
                        "none: run every trial to --max-iterations")
    p.add_argument("--strata", default=None,
                   help="comma-separated config keys; early stopping compares a trial only with trials sharing "
                        "their values (default: the sweep's own, e.g. train_subset in brats_subsets)")
    p.add_argument("--deterministic", action="store_true",
                   help="GPU: deterministic kernels only (slower, see bench/RESULTS.md); CPU runs are already")
    p.add_argument("--smoke-test", action="store_true", help="tiny everything: seconds per trial on a laptop")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep in --storage-path")
    p.add_argument("--seed", type=int, default=0, help="seed of splits, sampling and initialisation")
    p.add_argument("--splits", default=None, help="JSON file with train/val/test subject lists (default: seeded split)")
    if source is not None:
        p.add_argument("--source", default=source, help="source model URI in the MLflow registry")
        p.add_argument("--controls", type=controls, default="scratch,meanvar",
                       help="baselines beside the transferred starts, comma-separated: scratch (random "
                            "initialisation), meanvar (each source tensor's mean and variance, none of its "
                            "features; Raghu et al. 2019), or none")
    return p


class OneLineErrors(argparse.ArgumentParser):
    """A mistyped flag ends like every other refusal of a sweep: one line naming the flag and what
    it takes, exit 2 (argparse would print the whole usage of twenty flags first)."""

    def error(self, message: str):
        self.exit(2, f"[tlcore] error: {message} ({self.prog} --help lists every flag)\n")


def count(least: int):
    """An argparse type: a whole number >= `least`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value}: give {least} or more")
        return value
    return parse


def amount(least: float, above: bool = False):
    """An argparse type: a number >= `least` (> with `above`); fractions allowed."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < least or (above and value == least):
            raise argparse.ArgumentTypeError(f"{value:g}: give {'more than' if above else 'at least'} {least:g}")
        return value
    return parse


def frozen_layers(text: str) -> list[int]:
    """--frozen-layers: comma-separated counts of HighRes3DNet's leading layer groups to freeze
    (0..5: the sixth, the head, always trains)."""
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        ks = None
    if not ks or not all(0 <= k < NUM_LAYER_GROUPS for k in ks):
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated counts of frozen layer groups from 0 to "
                                         f"{NUM_LAYER_GROUPS - 1}, e.g. 0,1,2")
    return ks


CONTROLS = ("scratch", "meanvar")


def controls(text: str) -> list[str]:
    """--controls: comma-separated of CONTROLS, or none (argparse reports a bad value with usage)."""
    names = [c.strip() for c in text.split(",") if c.strip() and c.strip() != "none"]
    unknown = sorted(set(names) - set(CONTROLS))
    if unknown:
        raise argparse.ArgumentTypeError(f"{unknown} unknown; choose from {', '.join(CONTROLS)} or none")
    return [c for c in CONTROLS if c in names]


def control_starts(names: list[str], source: str) -> list[dict]:
    """The `start` grid entries of --controls: scratch, and meanvar:<source> (both fine-tune every group)."""
    entries = {"scratch": "scratch", "meanvar": MEANVAR + source}
    return [{"source_model": entries[c], "frozen_layers": 0} for c in names]

"""The run configuration of one training trial.

A trial's config arrives from Ray Tune as a plain dict (search space + fixed values). It is
turned into a frozen `TrialConfig` once, at the top of the trainable, so a typo in a sweep
script fails the first trial loudly instead of being silently ignored.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

LR_SCHEDULES = ("constant", "cosine", "poly", "one_cycle")
SAMPLERS = ("weighted", "uniform")
# What the last 1x1x1 conv of HighRes3DNet feeds: BN + ReLU (MONAI's HighResNet), BN (NiftyNet's
# HighRes3DNet, the thesis's network), or nothing (the conv, with a bias, gives the logits).
HEADS = ("bn_relu", "bn", "conv")
PRECISIONS = ("auto", "bf16", "fp32")
DATASETS = ("brats", "ixi", "mura", "chestxray")
DATASETS_2D = ("mura", "chestxray")
MEANVAR = "meanvar:"  # a start "meanvar:<start>": the Mean-Var control of <start> (transfer.mean_var_init)


def weights_of(source_model: str) -> str:
    """The start whose weights a trial uses: "meanvar:models:/x/1" -> "models:/x/1"."""
    return source_model[len(MEANVAR):] if source_model.startswith(MEANVAR) else source_model


# The checkout: where the embedded defaults live (data/synthetic/, results/, mlflow/).
REPO_ROOT = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    """Per-machine caches (validated files, downloaded source models, layout timings)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tlcore"


def read_json_cache(path: Path) -> dict:
    """A JSON cache file's contents; {} when it is missing or unreadable (it is rebuilt)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_json_atomic(path: Path, obj) -> None:
    """Write via a temporary file and a rename: a process killed mid-write, or another one
    writing at the same time, never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# Group names of HighRes3DNet, in network order (thesis Table 6.1).
NUM_LAYER_GROUPS = 6


@dataclass(frozen=True)
class TrialConfig:
    # --- what is trained on
    dataset: str = "brats"                # brats | ixi
    data_dir: str = ""                    # absolute path; trials run in their own folders
    splits_file: str = ""                 # JSON written by the driver: {"train": [...], "val": [...], "test": [...]}
    modalities: tuple = ("t1", "t2")      # the thesis used T1 + T2 so BraTS matches IXI
    label_map: dict = field(default_factory=dict)  # raw label -> class; {} = the dataset's default
    spacing: tuple = ()                   # voxel size (mm) every volume is resampled to; () = keep each one's own
    train_subset: str = "all"             # S1..S4 (nested subsets, data/splits.py) or all

    # --- where the weights come from
    source_model: str = "scratch"         # or a model URI, e.g. models:/ixi_hippocampus/3, or meanvar:<model URI>
    frozen_layers: int = 0                # freeze the first k layer groups (weights and BN stats)
    head: str = "conv"                    # the output block: conv | bn (NiftyNet) | bn_relu (MONAI); bench/RESULTS.md
    tracking_uri: str = ""                # MLflow store holding the source model

    # --- optimisation (thesis: Adam, lr 1e-3, L2, batch 2, 96^3 patches)
    lr: float = 1e-3
    lr_schedule: str = "constant"         # constant | cosine | poly | one_cycle
    weight_decay: float = 1e-5            # Adam's L2 penalty
    batch_size: int = 2
    patch_size: tuple = (96, 96, 96)
    sampler: str = "weighted"             # weighted (rare classes sampled more) | uniform
    augment: bool = True                  # rotation +-10 degrees, scaling +-10 %
    max_iterations: int = 10_000
    report_every: int = 250               # iterations between validation reports (and checkpoints)
    seed: int = 0                         # every random source of the trial derives from it
    deterministic: bool = False           # GPU: deterministic kernels only (slower; CPU runs are deterministic anyway)

    # --- evaluation (whole-volume sliding window)
    inference_roi: tuple = ()             # () = patch_size
    sw_batch_size: int = 2
    sw_overlap: float = 0.25              # bench: 2.7x faster than 0.5 on BraTS-size volumes, Dice within 0.0003 (H200)
    max_val_subjects: int = 0             # 0 = all validation subjects at every report
    precise_bn_batches: int = 16          # BatchNorm statistics re-estimated on this many batches before validation; 0 = off

    # --- analysis at every report (models/probes.py): per-group CKA with the source, weight movement
    probe_patches: int = 128              # fixed validation patches (or 2D images) the CKA is measured on; 0 = no analysis

    # --- speed
    precision: str = "auto"               # auto = bf16 autocast on a GPU, fp32 on CPU
    channels_last: str = "auto"           # auto = channels-last-3d where measured faster on this GPU; off on CPU
    torch_compile: str = "auto"           # training steps through torch.compile: auto = on a GPU unless deterministic (bench: 1.36x on an H200)
    num_threads: int = 0                  # torch CPU threads; 0 = the trial's CPUs
    data_workers: int = 0                 # 2D: image-decoding worker processes (0 = in the training process)

    # --- 2D chain (DenseNet121 + fastai head; thesis: 299x299, batch 16, Adam lr 1e-4)
    image_size: int = 299
    lr_ratio: float = 100.0               # the first layer group trains at lr / lr_ratio, the head at lr
    finding: str = "Pneumothorax"         # ChestX-ray14: this finding vs No Finding
    oversample: float = 0.0               # minority class repeated this often; 0 = balance (thesis 18)

    def __post_init__(self) -> None:
        # Tune and JSON hand us lists; tuples keep the dataclass hashable-ish and comparable.
        for name in ("modalities", "patch_size", "inference_roi", "spacing"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "label_map", {int(k): int(v) for k, v in dict(self.label_map).items()})
        problems = []
        if self.dataset not in DATASETS:
            problems.append(f"dataset={self.dataset!r} (choose from {DATASETS})")
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"lr_schedule={self.lr_schedule!r} (choose from {LR_SCHEDULES})")
        if self.sampler not in SAMPLERS:
            problems.append(f"sampler={self.sampler!r} (choose from {SAMPLERS})")
        if self.head not in HEADS:
            problems.append(f"head={self.head!r} (choose from {HEADS})")
        if self.spacing and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            problems.append(f"spacing={self.spacing} (three positive voxel sizes in mm, or () to keep each volume's own)")
        if self.precision not in PRECISIONS:
            problems.append(f"precision={self.precision!r} (choose from {PRECISIONS})")
        if self.channels_last not in ("auto", "on", "off"):
            problems.append(f"channels_last={self.channels_last!r} (choose from auto, on, off)")
        if self.torch_compile not in ("auto", "on", "off"):
            problems.append(f"torch_compile={self.torch_compile!r} (choose from auto, on, off)")
        groups = 3 if self.dataset in DATASETS_2D else NUM_LAYER_GROUPS
        if not 0 <= int(self.frozen_layers) < groups:  # the head always trains
            problems.append(f"frozen_layers={self.frozen_layers} (0..{groups - 1})")
        if (self.source_model == "scratch" or self.source_model.startswith(MEANVAR)) and self.frozen_layers:
            problems.append(f"frozen_layers > 0 with source_model={self.source_model!r} would freeze random weights")
        if self.source_model.startswith(MEANVAR) and weights_of(self.source_model) in ("", "scratch"):
            problems.append(f"source_model={self.source_model!r}: meanvar: needs a start with weights, "
                            "e.g. meanvar:models:/ixi_hippocampus/1")
        if self.probe_patches and self.probe_patches < 4:
            problems.append(f"probe_patches={self.probe_patches} (0 = no analysis, or at least 4 for unbiased CKA)")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            problems.append(f"patch_size={self.patch_size} (three positive ints)")
        if self.lr <= 0 or self.batch_size < 1 or self.max_iterations < 1 or self.report_every < 1:
            problems.append("lr, batch_size, max_iterations and report_every must be positive")
        if problems:
            raise ValueError("invalid run config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrialConfig":
        """Build from a Tune config; nested `start` dicts (source + frozen layers) are merged."""
        flat = {k: v for k, v in flatten_config(d).items() if k not in RETIRED_KEYS}
        unknown = set(flat) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(
                f"unknown config keys: {sorted(unknown)}; known keys are "
                f"{sorted(f.name for f in fields(cls))}"
            )
        return cls(**flat)

    @property
    def roi(self) -> tuple:
        return self.inference_roi or self.patch_size

    def to_params(self) -> dict[str, Any]:
        """Flat, string-friendly view of every key (what a checkpoint's run_config.json holds)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def logged_params(self) -> dict[str, Any]:
        """The keys that apply to this run, for MLflow's params: a 3D run shows no image size or
        ChestX-ray finding, a 2D run no patch size or sliding window."""
        other = ONLY_3D if self.dataset in DATASETS_2D else ONLY_2D
        if self.dataset != "chestxray":
            other = other | {"finding"}
        return {k: v for k, v in self.to_params().items() if k not in other}


# Keys that mean nothing to the other kind of run (TrialConfig.logged_params leaves them out).
ONLY_2D = {"image_size", "lr_ratio", "finding", "oversample", "data_workers"}
ONLY_3D = {"modalities", "label_map", "spacing", "head", "patch_size", "sampler", "inference_roi", "sw_batch_size",
           "sw_overlap", "max_val_subjects", "precise_bn_batches", "channels_last", "torch_compile"}

# Keys an older tlcore wrote into trial configs (a sweep started with it can still be resumed):
# ignored on reading, never written.
RETIRED_KEYS = {"max_epochs"}  # 2D trials now train max_iterations epochs, the sweep's one budget


def flatten_config(d: dict[str, Any]) -> dict[str, Any]:
    """Merge a grid-searched `start` dict ({source_model, frozen_layers}) into the top level.

    Sweeps grid over *pairs* (scratch has no frozen layers), which Tune expresses as a grid
    over dicts; everything downstream wants flat keys.
    """
    flat = {k: v for k, v in d.items() if k != "start"}
    start = d.get("start")
    if isinstance(start, dict):
        flat.update(start)
    return flat


RUN_CONFIG_FILE = "run_config.json"  # in every checkpoint and registered model: what it was trained with


def write_run_config(cfg: TrialConfig, directory: Path) -> None:
    (Path(directory) / RUN_CONFIG_FILE).write_text(json.dumps(cfg.to_params(), indent=1))


def read_run_config(directory: Path) -> TrialConfig:
    """The TrialConfig a checkpoint or registered model folder was trained with."""
    path = Path(directory) / RUN_CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the checkpoint was written by an older tlcore; "
                                "pass its configuration explicitly")
    return TrialConfig.from_dict(json.loads(path.read_text()))

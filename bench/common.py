"""What every benchmark shares: the shapes (Profile), fixed batches, synthetic subjects, the
model's own steady speed, and the device and package versions a figure was taken with."""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from tlcore.config import TrialConfig  # noqa: E402
from tlcore.data.layouts import default_label_map, find_brats  # noqa: E402
from tlcore.data.pipeline import load_subject  # noqa: E402
from tlcore.data.synthetic import write_brats  # noqa: E402
from tlcore.models.networks import build_model  # noqa: E402
from tlcore.training.segmentation import train_segmentation  # noqa: E402

# Reports per trial of a real sweep (10,000 iterations, a report every 250): ASHA's rungs sit on
# reports, so the recorded grid reports as often, whatever its length.
SWEEP_REPORTS = TrialConfig().max_iterations // TrialConfig().report_every


@dataclass(frozen=True)
class Profile:
    name: str
    volume: tuple          # BraTS-like subject size
    subjects: int
    patch: tuple
    batch: int
    steps: int             # timed steps per measurement (after warm-up)
    roi: tuple             # sliding-window size
    image_size: int        # 2D
    batch_2d: int
    steps_2d: int
    tune_trials: int
    sweep_iterations: int  # ASHA: iterations per trial of the recorded grid (SWEEP_REPORTS reports)


SMALL = Profile("small", (64, 64, 48), 4, (24, 24, 24), 2, 12, (32, 32, 32), 64, 8, 6, 4, 80)
FULL = Profile("full", (240, 240, 155), 8, (96, 96, 96), 2, 40, (96, 96, 96), 299, 16, 40, 4, 2000)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class FixedBatch:
    """A sampler that hands out one pre-staged batch: the model's own speed, no data pipeline."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def reseed(self, seed: int) -> None:
        pass

    def next_batch(self):
        return self.images, self.labels


def random_batch(p: Profile, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed training batch (2 modalities, ~10 % foreground) for pure-compute timings."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(p.batch, 2, *p.patch, generator=g), (torch.rand(p.batch, 1, *p.patch, generator=g) > 0.9).long()


def synthetic_subjects(root: Path, p: Profile):
    data = write_brats(root / "brats", n_hgg=p.subjects + 1, n_lgg=0, shape=p.volume, seed=0)
    files = find_brats(data)
    t0 = time.perf_counter()
    subjects = [load_subject(sid, f, ("t1", "t2"), default_label_map("brats"), 2, p.patch)
                for sid, f in sorted(files.items())]
    load_s = (time.perf_counter() - t0) / len(subjects)
    return subjects[:-1], subjects[-1], files, load_s


def steady_patches_per_s(cfg: TrialConfig, sampler, val, device) -> tuple[float, float]:
    """train_segmentation's own patches/s over `cfg.max_iterations / 2` steps after as many
    warm-up steps, and the seconds per step."""
    reports = []
    torch.manual_seed(0)
    model = build_model(in_channels=2, num_classes=2)
    train_segmentation(cfg, model, sampler, val, 2, report=lambda m, s: reports.append(m), device=device)
    pps = reports[-1]["patches_per_s"]
    return pps, cfg.batch_size / pps


def stage(p: Profile, device, tmp: Path) -> dict:
    """What bench_train3d hands the other benchmarks, without its comparisons: the subjects and
    the model's own seconds per step on a pre-staged batch."""
    subjects, val, files, _ = synthetic_subjects(tmp, p)
    cfg = TrialConfig(patch_size=p.patch, batch_size=p.batch, inference_roi=p.roi, torch_compile="off", max_iterations=2 * p.steps,
                      report_every=p.steps, max_val_subjects=1, precise_bn_batches=0,
                      num_threads=torch.get_num_threads())
    x, y = random_batch(p)
    step_s = steady_patches_per_s(cfg, FixedBatch(x.to(device), y.to(device)), [val], device)[1]
    return {"subjects": subjects, "val": val, "files": files, "step_s": step_s}


def newest_records(log: Path, device: str | None = None, profile: str | None = None) -> dict[str, dict]:
    """Each benchmark's newest values in a results log, for one device and profile (None: any);
    a partial rerun replaces its own keys and keeps the others."""
    import json

    newest: dict[str, dict] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        rec = json.loads(line)
        if device in (None, rec.get("device")) and profile in (None, rec.get("profile")):
            newest[rec["bench"]] = {**newest.get(rec["bench"], {}), **rec}
    return newest


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    v = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("monai", "ray", "mlflow", "fastai"):
        try:
            v[package] = version(package)
        except PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
        v["cudnn"] = str(torch.backends.cudnn.version())
    return v


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"

"""Load subjects into memory and draw augmented training patches (MONAI transforms).

Volumes are loaded and normalised once per trial and kept in memory: the thesis's training
time was dominated by re-reading and re-sampling windows on the CPU. The weighted sampler's
per-voxel weights are precomputed per subject, so drawing a patch is a crop + an affine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import (
    ConcatItemsd,
    LoadImaged,
    NormalizeIntensityd,
    RandAffined,
    RandSpatialCropd,
    RandWeightedCropd,
    SpatialPadd,
)


@dataclass
class Subject:
    id: str
    image: torch.Tensor        # (C, H, W, D) float32, z-scored per modality inside the brain
    label: torch.Tensor        # (1, H, W, D) int64 class indices
    affine: np.ndarray         # of the first modality, for writing predictions aligned
    weight: torch.Tensor | None = None  # (1, H, W, D) sampling weight of each voxel as a window centre


class SubjectLoadError(ValueError):
    """A subject's files cannot be turned into a training example."""


def map_labels(label: torch.Tensor, mapping: dict[int, int]) -> torch.Tensor:
    """Raw label codes -> class indices; codes not in `mapping` become background (0)."""
    out = torch.zeros_like(label, dtype=torch.int64)
    for raw, cls in mapping.items():
        out[label == raw] = cls
    return out


def class_balanced_weights(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-voxel weight 1 / frequency of its class (NiftyNet's balanced/weighted window sampling).

    Every class present then gets the same total probability of holding the patch centre.
    """
    counts = torch.bincount(label.flatten(), minlength=num_classes).float()
    inv = torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
    return inv[label].float()


def _plain(t) -> torch.Tensor:
    """MetaTensor -> torch.Tensor: cached volumes don't need MONAI's per-op metadata tracking."""
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


def load_subject(sid: str, files: dict[str, str], modalities, label_map: dict[int, int],
                 num_classes: int, min_size=None, with_weights: bool = True) -> Subject:
    keys = [*modalities, "label"]
    try:
        d = LoadImaged(keys=keys, image_only=True, ensure_channel_first=True)({k: files[k] for k in keys})
    except Exception as e:  # nibabel / gzip errors name neither subject nor the fix
        raise SubjectLoadError(
            f"subject {sid}: cannot read one of {[files[k] for k in keys]}: {e}. "
            "Re-extract the file from the dataset archive or remove the subject.") from e
    shapes = {k: tuple(d[k].shape[1:]) for k in keys}
    if len(set(shapes.values())) != 1:
        raise SubjectLoadError(
            f"subject {sid}: image and label shapes differ {shapes} "
            f"({files['label']}); co-register / resample them to one grid first")
    affine = np.asarray(d[modalities[0]].affine)
    d = ConcatItemsd(keys=list(modalities), name="image")(d)
    d = NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)(d)
    d["label"] = map_labels(torch.as_tensor(d["label"]).round().long(), label_map)
    if min_size is not None:  # volumes smaller than a patch are padded once, here
        d = SpatialPadd(keys=["image", "label"], spatial_size=min_size)(d)
    image = _plain(d["image"]).float().contiguous()
    label = _plain(d["label"]).long().contiguous()
    weight = class_balanced_weights(label, num_classes) if with_weights else None
    return Subject(sid, image, label, affine, weight)


class PatchSampler:
    """Draws batches of (image, label) patches from in-memory subjects.

    sampler="weighted": window centres drawn with probability 1/frequency of the centre
    voxel's class; "uniform": centres uniform over the volume. Augmentation: random rotation
    up to `rotate_deg` about each axis and scaling by up to `scale` (thesis: 10 deg, 10 %).
    """

    def __init__(self, subjects: list[Subject], patch_size, batch_size: int, sampler: str = "weighted",
                 augment: bool = True, seed: int = 0, rotate_deg: float = 10.0, scale: float = 0.1):
        if not subjects:
            raise ValueError("PatchSampler needs at least one training subject")
        self.subjects, self.batch_size = subjects, batch_size
        self.rng = np.random.default_rng(seed)
        keys = ["image", "label"]
        if sampler == "weighted":
            self.crop = RandWeightedCropd(keys=keys, w_key="weight", spatial_size=patch_size)
        elif sampler == "uniform":
            self.crop = RandSpatialCropd(keys=keys, roi_size=patch_size, random_size=False)
        else:
            raise ValueError(f"sampler={sampler!r}: choose 'weighted' or 'uniform'")
        self.crop.set_random_state(seed)
        self.augment = None
        if augment:
            r = math.radians(rotate_deg)
            self.augment = RandAffined(keys=keys, prob=1.0, rotate_range=(r, r, r), scale_range=(scale,) * 3,
                                       mode=("bilinear", "nearest"), padding_mode="border")
            self.augment.set_random_state(seed + 1)

    def reseed(self, seed: int) -> None:
        """Deterministic restart point (used when a trial resumes from a checkpoint)."""
        self.rng = np.random.default_rng(seed)
        self.crop.set_random_state(seed)
        if self.augment is not None:
            self.augment.set_random_state(seed + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for i in self.rng.integers(len(self.subjects), size=self.batch_size):
            s = self.subjects[i]
            item = {"image": s.image, "label": s.label, "weight": s.weight if s.weight is not None else torch.ones_like(s.label, dtype=torch.float32)}
            patch = self.crop(item)
            patch = patch[0] if isinstance(patch, list) else patch
            patch = {"image": patch["image"], "label": patch["label"]}
            if self.augment is not None:
                patch = self.augment(patch)
            images.append(_plain(patch["image"]))
            labels.append(_plain(patch["label"]).round().long())
        return torch.stack(images), torch.stack(labels)

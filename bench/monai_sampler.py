"""The reference the tlcore sampler is measured against: MONAI's RandWeightedCropd on a per-voxel
1 / class-frequency weight map, then RandAffined, on the CPU (how the thesis's NiftyNet
pipeline, and a straightforward MONAI port of it, draw patches)."""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.transforms import RandAffined, RandWeightedCropd


class MonaiPatchSampler:
    def __init__(self, subjects, patch_size, batch_size: int, seed: int = 0, rotate_deg: float = 10.0,
                 scale: float = 0.1):
        self.subjects, self.batch_size = subjects, batch_size
        self.weights = []
        for s in subjects:  # computed once, as a careful port would
            counts = torch.bincount(s.label.flatten()).float()
            self.weights.append(torch.where(counts > 0, 1 / counts.clamp(min=1), 0.0)[s.label])
        self.rng = np.random.default_rng(seed)
        self.crop = RandWeightedCropd(keys=["image", "label"], w_key="weight", spatial_size=patch_size)
        self.crop.set_random_state(seed)
        r = math.radians(rotate_deg)
        self.augment = RandAffined(keys=["image", "label"], prob=1.0, rotate_range=(r, r, r),
                                   scale_range=(scale,) * 3, mode=("bilinear", "nearest"), padding_mode="border")
        self.augment.set_random_state(seed + 1)

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def next_batch(self):
        images, labels = [], []
        for i in self.rng.integers(len(self.subjects), size=self.batch_size):
            s = self.subjects[i]
            patch = self.crop({"image": s.image, "label": s.label, "weight": self.weights[i]})[0]
            patch = self.augment({"image": patch["image"], "label": patch["label"]})
            images.append(torch.as_tensor(patch["image"]))
            labels.append(torch.as_tensor(patch["label"]).round().long())
        return torch.stack(images), torch.stack(labels)

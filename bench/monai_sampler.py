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


class MonaiGpuPatchSampler:
    """MONAI's fast-training path on the volumes' device (its "fast training" tutorial): the
    volumes cached on the GPU with their class indices computed once (ClassesToIndicesd), then
    per patch RandCropByLabelClassesd (classes drawn equally, as tlcore's weighted sampler) and
    RandAffined on the device. mode: "eager" (one transform after the other), "lazy" (MONAI's
    lazy resampling: crop and affine become one resample, as in tlcore's sampler), "thread"
    (eager, drawn ahead in a background thread by MONAI's ThreadBuffer, as ThreadDataLoader does)."""

    def __init__(self, subjects, patch_size, batch_size: int, seed: int = 0, device=None, mode: str = "eager",
                 rotate_deg: float = 10.0, scale: float = 0.1):
        from monai.data import ThreadBuffer
        from monai.transforms import ClassesToIndicesd, Compose, RandCropByLabelClassesd

        device = torch.device(device or "cpu")
        to_indices = ClassesToIndicesd(keys="label", num_classes=2)
        self.items = [to_indices({"image": s.image.to(device), "label": s.label.to(device, torch.float32)})
                      for s in subjects]
        lazy = mode == "lazy"
        r = math.radians(rotate_deg)
        self.transform = Compose([
            RandCropByLabelClassesd(keys=["image", "label"], label_key="label", spatial_size=patch_size,
                                    ratios=[1, 1], num_classes=2, num_samples=1, indices_key="label_cls_indices",
                                    lazy=lazy),
            RandAffined(keys=["image", "label"], prob=1.0, rotate_range=(r, r, r), scale_range=(scale,) * 3,
                        mode=("bilinear", "nearest"), padding_mode="border", device=device, lazy=lazy),
        ], lazy=lazy)
        self.batch_size, self.mode = batch_size, mode
        self.reseed(seed)
        self.buffer = ThreadBuffer(self._batches(), buffer_size=2) if mode == "thread" else None
        self.stream = iter(self.buffer) if self.buffer is not None else None

    def reseed(self, seed: int) -> None:
        if getattr(self, "buffer", None) is not None:
            return  # the thread draws ahead: a restart point would race it (speed only)
        self.rng = np.random.default_rng(seed)
        self.transform.set_random_state(seed)

    def _draw(self):
        images, labels = [], []
        for i in self.rng.integers(len(self.items), size=self.batch_size):
            patch = self.transform(self.items[i])
            patch = patch[0] if isinstance(patch, list) else patch
            images.append(torch.as_tensor(patch["image"]).as_subclass(torch.Tensor))
            labels.append(torch.as_tensor(patch["label"]).as_subclass(torch.Tensor))
        return torch.stack(images), torch.stack(labels).round().long()

    def _batches(self):
        while True:
            yield self._draw()

    def next_batch(self):
        return next(self.stream) if self.stream is not None else self._draw()

    def close(self) -> None:
        if self.buffer is not None:
            self.buffer.stop()

"""Radiographs as tensors for the 2D chain (DenseNet121): loading, flips, class balancing."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RadiographDataset(torch.utils.data.Dataset):
    """(image, label) pairs; grey PNGs become 3-channel `size` x `size` tensors normalised with
    the ImageNet statistics (the body was pre-trained on them). Training adds random
    horizontal flips (thesis regime)."""

    def __init__(self, paths: list[str], labels: list[int], size: int = 299, train: bool = False, seed: int = 0):
        self.paths, self.labels, self.size, self.train = list(paths), list(labels), size, train
        self.rng = np.random.default_rng(seed)
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as im:
            im = im.convert("L").resize((self.size, self.size), Image.BILINEAR)
            x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
        x = x.expand(3, -1, -1)
        if self.train and self.rng.random() < 0.5:
            x = x.flip(-1)
        return (x - self.mean) / self.std, torch.tensor(self.labels[i])


def oversample(labels: list[int], factor: float = 0, seed: int = 0) -> list[int]:
    """Indices with the minority class repeated `factor` times (0 = as often as balances the
    classes; the thesis used 18x for pneumothorax). Shuffled, reproducible."""
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=2)
    minority = int(np.argmin(counts))
    if counts[minority] == 0:
        raise ValueError("no example of one class: cannot oversample")
    factor = factor or counts[1 - minority] / counts[minority]
    idx = np.flatnonzero(labels != minority).tolist()
    minority_idx = np.flatnonzero(labels == minority)
    whole, frac = int(factor), factor - int(factor)
    idx += minority_idx.tolist() * whole
    rng = np.random.default_rng(seed)
    idx += rng.choice(minority_idx, size=int(round(frac * len(minority_idx))), replace=False).tolist()
    return rng.permutation(idx).tolist()

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
    horizontal flips (thesis regime), drawn from the per-sample seed that `SeededSampler`
    hands over with each index: DataLoader workers each get a copy of the dataset, so a
    generator kept here would give another flip stream for another number of workers."""

    def __init__(self, paths: list[str], labels: list[int], size: int = 299, train: bool = False):
        self.paths, self.labels, self.size, self.train = list(paths), list(labels), size, train
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item):
        i, flip_seed = item if isinstance(item, tuple) else (item, None)
        with Image.open(self.paths[i]) as im:
            im = im.convert("L").resize((self.size, self.size), Image.BILINEAR)
            x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
        x = x.expand(3, -1, -1)
        if self.train and flip_seed is not None and np.random.default_rng(flip_seed).random() < 0.5:
            x = x.flip(-1)
        return (x - self.mean) / self.std, torch.tensor(self.labels[i])


class SeededSampler(torch.utils.data.Sampler):
    """Yields (index, augmentation seed) pairs in an order and with seeds that depend only on
    (seed, epoch): the main process decides every random draw of an epoch, the workers only
    execute them, so the images and flips of a batch do not depend on the number of workers."""

    def __init__(self, indices: list[int], seed: int, epoch: int = 0):
        self.indices, self.seed, self.epoch = list(indices), seed, epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1  # the next pass is the next epoch (set `epoch` when resuming)
        order = rng.permutation(self.indices).tolist()
        seeds = rng.integers(0, 2**63 - 1, size=len(order)).tolist()
        return iter(zip(order, seeds))


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

"""Subject-wise train / val / test splits, reproducible from a seed and written as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Thesis splits: BraTS HGG 105 / 63 / 42 of 210; IXI 364 / 44 / 44 of 452.
DEFAULT_FRACTIONS = {"brats": (0.5, 0.3, 0.2), "ixi": (0.8, 0.1, 0.1)}


def split_subjects(ids, fractions=(0.5, 0.3, 0.2), seed: int = 0) -> dict[str, list[str]]:
    """Shuffle sorted ids with `seed` and cut them by `fractions`; each split non-empty."""
    ids = sorted(set(ids))
    if len(ids) < 3:
        raise ValueError(f"need at least 3 subjects to split into train/val/test, got {len(ids)}")
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    n_val = max(1, round(fractions[1] * len(ids)))
    n_test = max(1, round(fractions[2] * len(ids)))
    n_train = len(ids) - n_val - n_test
    return {"train": sorted(order[:n_train]),
            "val": sorted(order[n_train:n_train + n_val]),
            "test": sorted(order[n_train + n_val:])}


def write_splits(path: str | Path, splits: dict[str, list[str]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(splits, indent=1))
    return path


def read_splits(path: str | Path) -> dict[str, list[str]]:
    splits = json.loads(Path(path).read_text())
    missing = {"train", "val", "test"} - set(splits)
    if missing:
        raise ValueError(f"split file {path} lacks {sorted(missing)}; it needs train, val and test lists")
    return splits

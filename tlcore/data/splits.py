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


def read_splits(path: str | Path) -> dict:
    try:
        splits = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"split file {path} cannot be read as JSON: {e}") from e
    problems = check_splits(splits)
    if problems:
        raise ValueError(f"split file {path}: " + "; ".join(problems))
    return splits


def check_splits(splits: dict) -> list[str]:
    """Problems with a split: missing lists, a subject in two splits, subsets not nested."""
    missing = {"train", "val", "test"} - set(splits)
    if missing:
        return [f"lacks {sorted(missing)} (it needs train, val and test lists of subject ids)"]
    problems = []
    names = ("train", "val", "test")
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = sorted(set(splits[a]) & set(splits[b]))
            if both:
                problems.append(f"{len(both)} subject(s) in both {a} and {b}: {both[:5]}")
    previous, train = set(), set(splits["train"])
    for name, ids in sorted(splits.get("subsets", {}).items(), key=lambda kv: len(kv[1])):
        if not set(ids) <= train:
            problems.append(f"subset {name} has subjects outside train: {sorted(set(ids) - train)[:5]}")
        if not previous <= set(ids):
            problems.append(f"subset {name} does not contain the smaller subsets (subsets must be nested)")
        previous = set(ids)
    return problems


def default_subset_sizes(n_train: int, first: int = 26, count: int = 4) -> list[int]:
    """Thesis: S1 = 26 of 105 training subjects, S4 = all, the sizes between evenly spaced.

    Smaller training sets (synthetic data, tests) start at a quarter instead.
    """
    first = first if n_train >= first * count else max(1, n_train // count)
    return [round(first + i * (n_train - first) / (count - 1)) for i in range(count)]


def nested_subsets(train_ids, sizes=None, seed: int = 0) -> dict[str, list[str]]:
    """S1 < S2 < ... : prefixes of one seeded permutation, so each contains the previous one."""
    ids = sorted(set(train_ids))
    sizes = list(sizes or default_subset_sizes(len(ids)))
    if sizes != sorted(sizes) or sizes[-1] > len(ids) or sizes[0] < 1:
        raise ValueError(f"subset sizes {sizes} must increase from >= 1 to <= {len(ids)} training subjects")
    order = [ids[i] for i in np.random.default_rng([seed, 7]).permutation(len(ids))]
    return {f"S{k + 1}": sorted(order[:n]) for k, n in enumerate(sizes)}


def training_ids(splits: dict, subset: str = "all") -> list[str]:
    """The training subjects of a run: the whole training split or one nested subset."""
    if subset == "all":
        return splits["train"]
    subsets = splits.get("subsets", {})
    if subset not in subsets:
        raise KeyError(f"train_subset {subset!r} is not in the split file (has {sorted(subsets) or 'no subsets'})")
    return subsets[subset]


def split_patients(pool: list[str], test: list[str], val_fraction: float = 0.1, seed: int = 0) -> dict[str, list[str]]:
    """2D datasets: the official test patients stay the test split; the official training pool
    is cut into train / val by patient, so no patient's images are in two splits."""
    pool = sorted(set(pool) - set(test))
    order = [pool[i] for i in np.random.default_rng([seed, 11]).permutation(len(pool))]
    n_val = max(1, round(val_fraction * len(pool)))
    return {"train": sorted(order[n_val:]), "val": sorted(order[:n_val]), "test": sorted(set(test))}

"""MURA v1.1 (Stanford bone radiographs): images, studies, body parts and labels from its CSVs.

Layout (README: Real data): `<root>/MURA-v1.1/{train,valid}_image_paths.csv` (one path a line,
relative to <root>, e.g. `MURA-v1.1/train/XR_SHOULDER/patient00001/study1_positive/image1.png`)
and `<root>/MURA-v1.1/{train,valid}_labeled_studies.csv` (`<study dir>/,<0|1>`).
`--data-dir` may be <root> or the MURA-v1.1 folder itself.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from tlcore.data.layouts import DatasetLayoutError

BODY_PARTS = ("XR_ELBOW", "XR_FINGER", "XR_FOREARM", "XR_HAND", "XR_HUMERUS", "XR_SHOULDER", "XR_WRIST")


@dataclass(frozen=True)
class MuraImage:
    path: str        # absolute
    study: str       # e.g. MURA-v1.1/train/XR_SHOULDER/patient00001/study1_positive
    patient: str     # patient00001
    body_part: str   # XR_SHOULDER
    split: str       # official split: train | valid
    label: int       # 1 = abnormal study


def mura_root(data_dir: str | Path) -> Path:
    d = Path(data_dir).absolute()
    if (d / "MURA-v1.1").is_dir():
        return d
    if d.name == "MURA-v1.1" and d.is_dir():
        return d.parent
    raise DatasetLayoutError(f"{d} holds no MURA-v1.1 folder; point --data-dir at the folder that contains it")


def find_mura(data_dir: str | Path) -> tuple[list[MuraImage], list[tuple[str, str]]]:
    """All images with study labels, and the problems found as (path, message) pairs."""
    root = mura_root(data_dir)
    base = root / "MURA-v1.1"
    images, problems = [], []
    for split in ("train", "valid"):
        paths_csv, studies_csv = base / f"{split}_image_paths.csv", base / f"{split}_labeled_studies.csv"
        for f in (paths_csv, studies_csv):
            if not f.exists():
                problems.append((str(f), "missing MURA CSV: restore it from the MURA-v1.1 archive"))
        if not paths_csv.exists() or not studies_csv.exists():
            continue
        labels = {}
        with open(studies_csv, newline="") as fh:
            for n, row in enumerate(csv.reader(fh), 1):
                if len(row) != 2 or row[1].strip() not in ("0", "1"):
                    problems.append((f"{studies_csv}:{n}", f"expected '<study dir>/,<0|1>', got {row}"))
                    continue
                labels[row[0].strip().rstrip("/")] = int(row[1])
        listed = set()
        with open(paths_csv, newline="") as fh:
            for n, row in enumerate(csv.reader(fh), 1):
                if not row:
                    continue
                rel = row[0].strip()
                parts = Path(rel).parts
                if ".." in parts or Path(rel).is_absolute():
                    problems.append((f"{paths_csv}:{n}", f"{rel!r} points outside the dataset folder: MURA paths are "
                                                         "relative, MURA-v1.1/<split>/...; fix the line"))
                    continue
                path = root / rel
                if path in listed:
                    problems.append((f"{paths_csv}:{n}", f"{rel} listed twice: keep one line"))
                    continue
                listed.add(path)
                if len(parts) < 6 or parts[2] not in BODY_PARTS:
                    problems.append((f"{paths_csv}:{n}", f"{rel!r} is not MURA-v1.1/<split>/XR_<PART>/<patient>/<study>/<image>"))
                    continue
                study = str(Path(rel).parent)
                if not path.exists():
                    problems.append((str(path), f"listed in {paths_csv.name} line {n} but missing on disk: "
                                                "restore it or remove the line"))
                    continue
                if study not in labels:
                    problems.append((str(path), f"its study {study}/ has no row in {studies_csv.name}: add '{study}/,<0|1>'"))
                    continue
                images.append(MuraImage(str(path), study, parts[3], parts[2], split, labels[study]))
        on_disk = set((base / split).rglob("*.png")) if (base / split).is_dir() else set()
        for path in sorted(on_disk - listed):
            problems.append((str(path), f"image on disk but not in {paths_csv.name}: add it to the CSV or move it out"))
    if not images and not problems:
        problems.append((str(base), "no images listed in the MURA CSVs"))
    return images, problems

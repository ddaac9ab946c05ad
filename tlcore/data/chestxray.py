"""NIH ChestX-ray14: one finding (e.g. Pneumothorax) vs `No Finding`, patient-wise official split.

Layout (README: Real data): `<root>/Data_Entry_2017.csv` (columns `Image Index`,
`Finding Labels` (`|`-separated or `No Finding`), `Patient ID`, ...), PNG images under
`<root>/images*/` (also `images_001/images/...` as the Kaggle copy has it), and the official
patient-wise lists `<root>/train_val_list.txt` and `<root>/test_list.txt`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from tlcore.data.layouts import DatasetLayoutError

ENTRY_CSV = "Data_Entry_2017.csv"
NO_FINDING = "No Finding"


@dataclass(frozen=True)
class ChestImage:
    path: str
    patient: str
    split: str       # official: train_val | test
    label: int       # 1 = the finding, 0 = No Finding


def find_chestxray(data_dir: str | Path, finding: str = "Pneumothorax") -> tuple[list[ChestImage], list[tuple[str, str]]]:
    """Images labelled `finding` (1) or `No Finding` (0); images with only other findings are left out."""
    root = Path(data_dir).absolute()
    entry = root / ENTRY_CSV
    if not entry.exists():
        raise DatasetLayoutError(f"{entry} not found; point --data-dir at the ChestX-ray14 folder holding {ENTRY_CSV}")
    problems = []
    on_disk = {p.name: p for p in root.glob("images*/**/*.png")}
    rows = {}
    with open(entry, newline="") as fh:
        reader = csv.DictReader(fh)
        needed = {"Image Index", "Finding Labels", "Patient ID"}
        if not needed <= set(reader.fieldnames or []):
            raise DatasetLayoutError(f"{entry} lacks the columns {sorted(needed - set(reader.fieldnames or []))}")
        for n, row in enumerate(reader, 2):
            missing = sorted(c for c in needed if not isinstance(row.get(c), str))
            if missing:  # a short row: DictReader fills the absent cells with None
                cells = sum(v is not None for v in row.values())
                problems.append((f"{entry}:{n}", f"row without {missing} (it has {cells} cells): complete or delete it"))
                continue
            name = row["Image Index"].strip()
            if name in rows:
                problems.append((f"{entry}:{n}", f"image {name} listed twice: keep one row"))
            rows[name] = row
    split_of = {}
    for split, fname in (("train_val", "train_val_list.txt"), ("test", "test_list.txt")):
        f = root / fname
        if not f.exists():
            problems.append((str(f), "missing official split list: restore it from the ChestX-ray14 release"))
            continue
        for name in (line.strip() for line in f.read_text().splitlines()):
            if name:
                if name not in rows:
                    problems.append((str(f), f"{name} is not in {ENTRY_CSV}"))
                split_of[name] = split
    for name in rows:
        if name not in on_disk:
            problems.append((str(root / "images" / name), f"row of {ENTRY_CSV} but the image is missing under images*/: "
                                                          "restore it or remove the row"))
    for name, path in sorted(on_disk.items()):
        if name not in rows:
            problems.append((str(path), f"image on disk but not in {ENTRY_CSV}: add its row or move it out"))
    patients = {}
    for name, split in split_of.items():
        if name in rows:
            patients.setdefault(rows[name]["Patient ID"].strip(), set()).add(split)
    leaked = sorted(p for p, s in patients.items() if len(s) > 1)
    if leaked:
        problems.append((str(root / "test_list.txt"), f"{len(leaked)} patient(s) in both train_val and test "
                                                      f"(e.g. {leaked[:3]}): the split must be patient-wise"))
    images = []
    for name, row in sorted(rows.items()):
        found = {x.strip() for x in row["Finding Labels"].split("|")}
        label = 1 if finding in found else 0 if found == {NO_FINDING} else None
        if label is None or name not in on_disk or name not in split_of:
            continue
        images.append(ChestImage(str(on_disk[name]), row["Patient ID"].strip(), split_of[name], label))
    return images, problems

"""Find subjects in the real on-disk layouts of BraTS 2018 and IXI (shared/SPEC.md §2).

Each finder returns `{subject_id: {"<modality>": path, ..., "label": path}}` with absolute
paths, and raises one error listing every missing file, with what to do about it.
"""

from __future__ import annotations

import re
from pathlib import Path

BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")
IXI_MODALITIES = ("t1", "t2")

# target name -> {raw label: class}; labels not listed become background.
BRATS_TARGETS = {
    "tumour_core": {1: 1, 4: 1},          # necrotic/non-enhancing + enhancing; edema (2) is background
    "whole_tumour": {1: 1, 2: 1, 4: 1},
    "enhancing": {4: 1},
}
IXI_HIPPOCAMPUS = {17: 1, 53: 2}          # FreeSurfer left / right hippocampus

_IXI_NAME = re.compile(r"^(IXI\d{3})-([A-Za-z]+)-(\d{4})-(T1|T2)\.nii(\.gz)?$")


class DatasetLayoutError(ValueError):
    """The data folder does not look like the dataset it was given as."""


def default_label_map(dataset: str) -> dict[int, int]:
    return dict(BRATS_TARGETS["tumour_core"] if dataset == "brats" else IXI_HIPPOCAMPUS)


def find_subjects(dataset: str, data_dir: str | Path, modalities=("t1", "t2"),
                  strict: bool = True) -> dict[str, dict[str, str]]:
    """Subject id -> files. strict=False keeps subjects with missing files (their expected
    paths are listed) so that validation can report every problem at once."""
    if dataset == "brats":
        return find_brats(data_dir, modalities, strict=strict)
    if dataset == "ixi":
        return find_ixi(data_dir, modalities, strict=strict)
    raise DatasetLayoutError(f"unknown dataset {dataset!r}: expected 'brats' or 'ixi'")


def find_brats(root: str | Path, modalities=("t1", "t2"), grades=("HGG",), strict: bool = True) -> dict[str, dict[str, str]]:
    """`<root>/HGG/<ID>/<ID>_{t1,t1ce,t2,flair,seg}.nii.gz` (the thesis used HGG only)."""
    root = Path(root).absolute()
    bad = [m for m in modalities if m not in BRATS_MODALITIES]
    if bad:
        raise DatasetLayoutError(f"BraTS has no modality {bad}; choose from {BRATS_MODALITIES}")
    folders = [root / g for g in grades if (root / g).is_dir()]
    if not folders:
        raise DatasetLayoutError(
            f"{root} has none of the BraTS 2018 grade folders {list(grades)}; point --data-dir at "
            "the folder that holds HGG/ and LGG/ (e.g. MICCAI_BraTS_2018_Data_Training)")
    subjects, missing = {}, []
    for folder in folders:
        for case in sorted(p for p in folder.iterdir() if p.is_dir()):
            files = {}
            for key in (*modalities, "label"):
                suffix = "seg" if key == "label" else key
                path = case / f"{case.name}_{suffix}.nii.gz"
                if not path.exists() and path.with_suffix("").exists():  # uncompressed .nii
                    path = path.with_suffix("")
                if not path.exists():
                    missing.append(str(path))
                files[key] = str(path)
            subjects[case.name] = files
    if missing and strict:
        raise DatasetLayoutError(
            f"{len(missing)} BraTS file(s) missing under {root}:\n  " + "\n  ".join(missing)
            + "\nRestore them from the BraTS 2018 archive or remove those subject folders.")
    if not subjects:
        raise DatasetLayoutError(f"no subject folders in {', '.join(map(str, folders))}")
    return subjects


def find_ixi(root: str | Path, modalities=("t1", "t2"), label_dir: str = "labels",
             strict: bool = True) -> dict[str, dict[str, str]]:
    """IXI files `IXI002-Guys-0828-T1.nii.gz` anywhere under root, labels under `<root>/<label_dir>`.

    Labels are the user's own segmentations (e.g. FreeSurfer aseg resampled to the T1): one
    file per subject whose name starts with the subject id (`IXI002...nii.gz`).
    """
    root = Path(root).absolute()
    bad = [m for m in modalities if m not in IXI_MODALITIES]
    if bad:
        raise DatasetLayoutError(f"IXI has no modality {bad}; choose from {IXI_MODALITIES}")
    images: dict[str, dict[str, str]] = {}
    for path in sorted(root.rglob("IXI*.nii*")):
        m = _IXI_NAME.match(path.name)
        if m and root / label_dir not in path.parents:
            images.setdefault(m.group(1), {})[m.group(4).lower()] = str(path)
    if not images:
        raise DatasetLayoutError(
            f"no IXI images (IXI###-Site-####-T1.nii.gz) under {root}; extract IXI-T1.tar and IXI-T2.tar there")
    labels = {}
    if (root / label_dir).is_dir():
        for path in sorted((root / label_dir).glob("IXI*.nii*")):
            labels.setdefault(path.name[:6], str(path))
    subjects, missing = {}, []
    for sid, files in images.items():
        for m in modalities:
            if m not in files:
                missing.append(f"{sid}: no {m.upper()} image (expected {sid}-<Site>-<####>-{m.upper()}.nii.gz)")
        if sid not in labels:
            missing.append(f"{sid}: no label file {root / label_dir / (sid + '-seg.nii.gz')}")
        subjects[sid] = {**{m: files.get(m, str(root / f"IXI-{m.upper()}" / f"{sid}-<Site>-<####>-{m.upper()}.nii.gz"))
                            for m in modalities},
                         "label": labels.get(sid, str(root / label_dir / f"{sid}-seg.nii.gz"))}
    if missing and strict:
        raise DatasetLayoutError(
            f"{len(missing)} IXI problem(s) under {root}:\n  " + "\n  ".join(missing)
            + "\nAdd the files, or move incomplete subjects out of the data folder.")
    return subjects

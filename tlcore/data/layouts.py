"""Find subjects in the real on-disk layouts of BraTS 2018 and IXI (README: Real data).

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


def class_indices(label, mapping: dict[int, int]):
    """Raw label codes (a numpy array) -> class indices (int64); codes not in `mapping` become
    background (0). numpy, not torch: the report draws ground truth without loading torch."""
    import numpy as np

    out = np.zeros(np.shape(label), dtype=np.int64)
    for raw, cls in mapping.items():
        out[label == raw] = cls
    return out


def num_classes(cfg) -> int:
    """Output classes of a run's network (background included), from its label map."""
    return max((cfg.label_map or default_label_map(cfg.dataset)).values()) + 1


def find_subjects(dataset: str, data_dir: str | Path, modalities=("t1", "t2"),
                  strict: bool = True, grades=("HGG",)) -> dict[str, dict[str, str]]:
    """Subject id -> files. strict=False keeps subjects with missing files (their expected
    paths are listed) so that validation can report every problem at once.

    `data_dir` may also be a dataset description (.json / .yaml) listing each subject's files,
    for layouts that are not the standard one.
    """
    if Path(data_dir).suffix.lower() in (".json", ".yaml", ".yml"):
        return checked_ids(read_description(data_dir, modalities, strict), data_dir)
    if dataset == "brats":
        return checked_ids(find_brats(data_dir, modalities, grades, strict=strict), data_dir)
    if dataset == "ixi":
        return checked_ids(find_ixi(data_dir, modalities, strict=strict), data_dir)
    raise DatasetLayoutError(f"unknown dataset {dataset!r}: expected 'brats' or 'ixi'")


def checked_ids(subjects: dict[str, dict[str, str]], source) -> dict[str, dict[str, str]]:
    """`subjects`, if every id is safe as a file name: ids name the files written for a subject
    (predictions/<id>_pred.nii.gz), so `../x` would write outside the output folder and `.x` hide it."""
    for sid, files in subjects.items():
        if not sid or "/" in sid or "\\" in sid or ".." in sid or sid.startswith(".") or "\0" in sid:
            where = next(iter(files.values()), "") if Path(source).is_dir() else source
            raise DatasetLayoutError(
                f"subject id {sid!r} (from {where}) cannot name a file: ids may not contain '/', '\\' or '..', "
                "nor start with '.'. Rename that subject (its folder or file names, or its key in the "
                "dataset description), or remove it.")
    return subjects


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


def read_description(path: str | Path, modalities=("t1", "t2"), strict: bool = True) -> dict[str, dict[str, str]]:
    """Subjects of a non-standard layout, listed in a small JSON or YAML file::

        root: /data/my_scans          # optional; default: the folder of this file
        subjects:
          case001: {t1: case001/T1.nii.gz, t2: case001/T2.nii.gz, label: case001/seg.nii.gz}

    Relative paths resolve against `root`.
    """
    path = Path(path).absolute()
    if not path.exists():
        raise DatasetLayoutError(f"dataset description {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            import json
            desc = json.loads(text)
        else:
            import yaml
            desc = yaml.safe_load(text)
    except Exception as e:
        raise DatasetLayoutError(f"dataset description {path} cannot be parsed: {e}") from e
    if not isinstance(desc, dict) or not isinstance(desc.get("subjects"), dict) or not desc["subjects"]:
        raise DatasetLayoutError(f"dataset description {path} needs a 'subjects' mapping: "
                                 "{<id>: {<modality>: <file>, ..., label: <file>}}")
    root = Path(desc.get("root") or path.parent)
    root = root if root.is_absolute() else path.parent / root
    subjects, missing = {}, []
    for sid, files in desc["subjects"].items():
        files = files or {}
        entry = {}
        for key in (*modalities, "label"):
            if key not in files:
                missing.append(f"{sid}: no '{key}' entry")
                entry[key] = str(root / f"{sid}-{key}-not-listed.nii.gz")
                continue
            p = Path(files[key])
            entry[key] = str(p if p.is_absolute() else root / p)
            if strict and not Path(entry[key]).exists():
                missing.append(f"{sid}: {entry[key]} does not exist")
        subjects[str(sid)] = entry
    if missing and strict:
        raise DatasetLayoutError(f"{len(missing)} problem(s) in {path}:\n  " + "\n  ".join(missing))
    return subjects

"""What a prediction runs on: the scans under an input path, grouped into subjects by modality
(BraTS `<id>_t1.nii.gz`, IXI `<id>-T1.nii.gz`), or the radiographs under it. Only file names are
read here, so every mistake (a missing modality, an empty folder) is reported before any model
loads.
"""

from __future__ import annotations

import re
from pathlib import Path

NIFTI = (".nii", ".nii.gz")
IMAGES = (".png", ".jpg", ".jpeg")
# `<id>_t1.nii.gz` (BraTS) or `<id>-T1.nii.gz` (IXI); t1ce before t1, so that t1 does not match it
_MODALITY = re.compile(r"^(?P<id>.+?)[_-](?P<modality>t1ce|t1|t2|flair)\.nii(\.gz)?$", re.I)
_NOT_SCANS = re.compile(r"[_-](seg|pred|label|mask)\.nii(\.gz)?$", re.I)  # labels and earlier predictions


class InputError(ValueError):
    """Input that cannot be predicted on, with the fix (the command line prints it as one line)."""


def _stem(path: Path) -> str:
    return path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem


def find_scans(path: str | Path, modalities: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """{subject id: {modality: file}} for every subject under `path` (a NIfTI file, whose other
    modalities are found beside it, or a folder searched recursively). A one-modality model also
    takes files with no modality in their name, one subject each."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist: pass a NIfTI file or a folder of them")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.name.lower().endswith(NIFTI))
    if path.is_file():
        if not path.name.lower().endswith(NIFTI):
            raise InputError(f"{path} is not a NIfTI file (.nii or .nii.gz)")
        m = _MODALITY.match(path.name)
        if m:  # its other modalities beside it
            files = sorted(p for p in path.parent.iterdir() if p.name.lower().endswith(NIFTI)
                           and (n := _MODALITY.match(p.name)) and n["id"] == m["id"])
    subjects: dict[str, dict[str, str]] = {}
    plain = []
    for f in files:
        if _NOT_SCANS.search(f.name):
            continue
        m = _MODALITY.match(f.name)
        if m:
            subjects.setdefault(m["id"], {})[m["modality"].lower()] = str(f)
        else:
            plain.append(f)
    if len(modalities) == 1:
        for f in plain:
            subjects.setdefault(_stem(f), {})[modalities[0]] = str(f)
    if not subjects:
        raise InputError(f"no scans under {path}: expected NIfTI files named <id>_{modalities[0]}.nii.gz "
                         f"(BraTS) or <id>-{modalities[0].upper()}.nii.gz (IXI)")
    missing = {sid: [m for m in modalities if m not in found] for sid, found in subjects.items()}
    missing = {sid: ms for sid, ms in missing.items() if ms}
    if missing:
        sid, ms = next(iter(missing.items()))
        have = ", ".join(Path(f).name for f in subjects[sid].values())
        raise InputError(f"subject {sid} lacks {', '.join(ms)} (has {have}); the model reads "
                         f"{', '.join(modalities)}: add {sid}_{ms[0]}.nii.gz beside the others"
                         + (f" ({len(missing) - 1} more subjects lack a modality)" if len(missing) > 1 else ""))
    return {sid: {m: subjects[sid][m] for m in modalities} for sid in sorted(subjects)}


def find_images(path: str | Path) -> list[str]:
    """The radiographs (PNG or JPEG) at or under `path`."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist: pass an image or a folder of them")
    images = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGES)
    if not images or any(p.suffix.lower() not in IMAGES for p in images):
        raise InputError(f"no radiographs (PNG or JPEG) at {path}")
    return [str(p) for p in images]

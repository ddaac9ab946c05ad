"""Preflight validation of a dataset: every problem, with the file and the fix, before any trial.

    python -m tlcore.data.validate brats --data-dir /data/MICCAI_BraTS_2018_Data_Training
    python -m tlcore.data.validate ixi   --data-dir /data/IXI
    python -m tlcore.data.validate mura  --data-dir /data            # the folder holding MURA-v1.1/
    python -m tlcore.data.validate chestxray --data-dir /data/ChestX-ray14 --finding Pneumothorax

Every image is decompressed in full (nibabel stops reading before the gzip CRC, so a bit flip
inside a .nii.gz would otherwise pass). Per-file results are cached by path, size and mtime
under ~/.cache/tlcore, so the second start of a sweep over unchanged files takes a moment.
Sweeps run this automatically and refuse to start on any error.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import sys
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from tlcore.config import cache_dir, read_json_cache, write_json_atomic
from tlcore.data.layouts import (
    BRATS_MODALITIES,
    DatasetLayoutError,
    default_label_map,
    find_subjects,
)

CACHE_VERSION = 2  # 2: blank volumes, PNG pixels decoded
INTERNAL_ERROR = 3  # exit code: the validator failed (1: the data has errors)
EXPECTED_LABELS = {"brats": {0, 1, 2, 4}}  # IXI labels are the user's own (e.g. FreeSurfer aseg)


@dataclass
class Problem:
    path: str
    message: str   # what is wrong, then what to do

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class ValidationReport:
    dataset: str
    data_dir: str
    subjects: int = 0
    files: int = 0
    cached: int = 0
    seconds: float = 0.0
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self) -> str:
        head = (f"{self.dataset} at {self.data_dir}: {self.subjects} subjects, {self.files} files "
                f"({self.cached} unchanged since the last check) in {self.seconds:.1f} s: "
                f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)")
        lines = [head]
        lines += [f"  ERROR   {p}" for p in self.errors]
        lines += [f"  warning {p}" for p in self.warnings]
        return "\n".join(lines)


def inspect_png(path: str) -> dict:
    """Check a radiograph's structure and chunk CRCs without decoding every pixel."""
    from PIL import Image

    p = Path(path)
    if not p.exists():
        return {"error": "file missing: restore it, or remove it from the CSV"}
    if p.stat().st_size == 0:
        return {"error": "empty file (0 bytes): the copy or download was interrupted; copy it again"}
    if p.is_dir():
        return {"error": "a folder where a PNG is expected: put the image file here"}
    try:
        with Image.open(p) as im:
            size = im.size
            im.verify()  # chunk structure and CRCs
        with Image.open(p) as im:
            im.load()  # and the pixels: a PNG with valid CRCs can still hold data that does not decode
    except Exception as e:  # noqa: BLE001 -- PIL raises many types for a bad file: all are a data error
        return {"error": f"unreadable or truncated image ({type(e).__name__}: {e}); copy it again"}
    return {"size": list(size)}


def inspect_file(path: str, is_label: bool) -> dict:
    """Read one NIfTI file completely; a summary, or {'error': what is wrong and what to do}."""
    p = Path(path)
    if not p.exists():
        return {"error": "file missing: restore it from the dataset archive, or move the subject out of the data folder"}
    if p.is_dir():
        return {"error": "a folder where a NIfTI file is expected: put the image file here (unpacked archives "
                         "sometimes nest one more level)"}
    try:
        raw = p.read_bytes()
    except OSError as e:
        return {"error": f"cannot be read ({e.strerror or e}): check its permissions (chmod a+r) or copy it again"}
    if not raw:
        return {"error": "empty file (0 bytes): the copy or download was interrupted; copy it again"}
    if p.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except gzip.BadGzipFile as e:
            if raw[:2] != b"\x1f\x8b":
                return {"error": "named .gz but not gzip-compressed: rename it to .nii or compress it with gzip"}
            return {"error": f"truncated or corrupt gzip data ({e}): the file is damaged; extract or download it again"}
        except (EOFError, zlib.error, OSError) as e:
            return {"error": f"truncated or corrupt gzip data ({e or 'ended early'}): the file is damaged; "
                             "extract or download it again"}
    try:
        img = nib.Nifti1Image.from_bytes(raw)
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # noqa: BLE001 -- nibabel raises several types for bad headers and short data
        return {"error": f"not a readable NIfTI-1 image ({type(e).__name__}: {e}); export it again as NIfTI"}
    out = {"shape": list(data.shape), "zooms": [float(z) for z in img.header.get_zooms()[:3]],
           "affine": np.asarray(img.affine).round(4).tolist(), "dtype": str(data.dtype)}
    if data.size == 0:  # an empty axis (reported with the shape checks); nibabel's shape drops it
        dim = [int(x) for x in img.header["dim"]]
        out["shape"] = dim[1:1 + max(1, min(dim[0], 7))]
        return out
    finite = data
    if np.issubdtype(data.dtype, np.floating):
        mask = np.isfinite(data)
        bad = int(np.size(data) - np.count_nonzero(mask))
        if bad:
            out["nonfinite"] = bad
            finite = data[mask]
    if finite.size and not is_label and float(finite.min()) == float(finite.max()):
        out["constant"] = float(finite.min())
    if is_label:
        values = np.unique(finite)  # NaN voxels are reported as such, not as a label value
        out["non_integer"] = bool(np.any(values != np.round(values)))
        out["values"] = [float(v) for v in values[:256]]
    return out


def _inspect(path: str, is_label: bool) -> dict:
    return inspect_png(path) if path.lower().endswith(".png") else inspect_file(path, is_label)


def _cached_inspect(files: list[tuple[str, bool]], cache_file: Path) -> tuple[dict, int]:
    cache = read_json_cache(cache_file)
    if cache.get("version") != CACHE_VERSION:
        cache = {"version": CACHE_VERSION, "files": {}}

    def key(path):
        try:
            st = os.stat(path)
            return f"{path}|{st.st_size}|{st.st_mtime_ns}"
        except OSError:
            return None

    results, todo, hits = {}, [], 0
    for path, is_label in files:
        k = key(path)
        if k and k in cache["files"]:
            results[path], hits = cache["files"][k], hits + 1
        else:
            todo.append((path, is_label, k))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # zlib releases the GIL
        for (path, _, k), res in zip(todo, pool.map(lambda t: _inspect(t[0], t[1]), todo)):
            results[path] = res
            if k and "error" not in res:  # only cache good files: a broken one is re-read after a fix
                cache["files"][k] = res
    try:
        write_json_atomic(cache_file, cache)
    except OSError:
        pass  # a read-only home must not stop validation
    return results, hits


def _duplicates(dataset: str, root: Path) -> list[Problem]:
    """The same subject id twice (BraTS: in HGG and LGG; IXI: two images of one modality)."""
    problems = []
    if dataset == "brats":
        seen = Counter(p.name for g in ("HGG", "LGG") if (root / g).is_dir() for p in (root / g).iterdir() if p.is_dir())
        for sid, n in sorted(seen.items()):
            if n > 1:
                problems.append(Problem(str(root / "*" / sid), "subject id in both HGG and LGG: keep one copy"))
    else:
        from tlcore.data.layouts import _IXI_NAME
        seen: dict = {}
        for p in root.rglob("IXI*.nii*"):
            m = _IXI_NAME.match(p.name)
            if m:
                seen.setdefault((m.group(1), m.group(4)), []).append(str(p))
        for (sid, mod), paths in sorted(seen.items()):
            if len(paths) > 1:
                problems.append(Problem(", ".join(sorted(paths)),
                                        f"{len(paths)} {mod} images for subject {sid}: keep one file per subject id"))
    return problems


def _mixed_geometry(root: str, refs: dict[str, dict]) -> list[Problem]:
    """One note when the subjects' first modalities differ in orientation or voxel size: not an
    error, training handles it, but the user should know what it does."""
    orientations = Counter("".join(nib.aff2axcodes(np.array(v["affine"]))) for v in refs.values())
    sizes = Counter(tuple(round(z, 2) for z in v["zooms"]) for v in refs.values())
    differ = [f"{what} {dict(seen)}" for what, seen in (("orientation", orientations), ("voxel size (mm)", sizes))
              if len(seen) > 1]
    if not differ:
        return []
    return [Problem(root, f"subjects differ in {' and '.join(differ)}: tlcore brings every volume to RAS at load; "
                          "set `spacing` in the run config (--spacing) to resample them to one voxel size")]


def validate_images_2d(dataset: str, data_dir: str | Path, finding: str = "Pneumothorax",
                       use_cache: bool = True) -> ValidationReport:
    """Check MURA or ChestX-ray14: CSVs against the images on disk, split lists, every PNG."""
    t0 = time.perf_counter()
    root = Path(data_dir).absolute()
    report = ValidationReport(dataset, str(root))
    try:
        if dataset == "mura":
            from tlcore.data.mura import find_mura
            images, problems = find_mura(root)
            report.subjects = len({i.patient for i in images})
        else:
            from tlcore.data.chestxray import find_chestxray
            images, problems = find_chestxray(root, finding)
            report.subjects = len({i.patient for i in images})
    except DatasetLayoutError as e:
        report.errors.append(Problem(str(root), str(e)))
        return report
    report.errors += [Problem(p, m) for p, m in problems]
    files = [(i.path, False) for i in images]
    report.files = len(files)
    digest = hashlib.sha1(f"{dataset}|{root}".encode()).hexdigest()[:16]
    results, report.cached = _cached_inspect(files, cache_dir() / "validate" / f"{digest}.json") if use_cache else \
        ({f: inspect_png(f) for f, _ in files}, 0)
    report.errors += [Problem(f, r["error"]) for f, r in results.items() if "error" in r]
    if dataset == "chestxray" and images and not any(i.label for i in images):
        report.errors.append(Problem(str(root), f"no image labelled {finding!r}: check the finding's spelling"))
    report.seconds = time.perf_counter() - t0
    return report


def validate_dataset(dataset: str, data_dir: str | Path, modalities=("t1", "t2"),
                     label_map: dict | None = None, use_cache: bool = True,
                     finding: str = "Pneumothorax", grades=("HGG",)) -> ValidationReport:
    """Check a dataset (brats, ixi, mura, chestxray); never raises for a data problem, reports it."""
    if dataset in ("mura", "chestxray"):
        return validate_images_2d(dataset, data_dir, finding, use_cache)
    t0 = time.perf_counter()
    root = Path(data_dir).absolute()
    report = ValidationReport(dataset, str(root))
    try:
        subjects = find_subjects(dataset, root, modalities, strict=False, grades=grades)
    except DatasetLayoutError as e:
        report.errors.append(Problem(str(root), str(e)))
        return report
    label_map = label_map or default_label_map(dataset)
    report.subjects = len(subjects)
    if root.is_dir():
        report.errors += _duplicates(dataset, root)

    files = [(f, key == "label") for s in subjects.values() for key, f in s.items()]
    report.files = len(files)
    digest = hashlib.sha1(f"{dataset}|{root}".encode()).hexdigest()[:16]
    results, report.cached = _cached_inspect(files, cache_dir() / "validate" / f"{digest}.json") if use_cache else \
        ({f: inspect_file(f, lab) for f, lab in files}, 0)

    expected = EXPECTED_LABELS.get(dataset)
    refs = {}
    for sid, paths in sorted(subjects.items()):
        info = {k: results[p] for k, p in paths.items()}
        good = {k: v for k, v in info.items() if "error" not in v}
        for k, v in info.items():
            if "error" in v:
                report.errors.append(Problem(paths[k], v["error"]))
        for k, v in good.items():
            shape = v["shape"]
            if len(shape) == 4 and shape[3] > 1 or len(shape) > 4:
                report.errors.append(Problem(paths[k], f"{len(shape)}D image {shape} where a 3D volume is expected: "
                                                       "extract the one volume you want (e.g. fslroi) or remove the subject"))
            elif len(shape) < 3:
                report.errors.append(Problem(paths[k], f"{len(shape)}D image {shape}: a 3D volume is expected"))
            if 0 in shape:
                report.errors.append(Problem(paths[k], f"no voxels (shape {shape}): the export failed; export the "
                                                       "volume again or remove the subject"))
            if "constant" in v:
                report.errors.append(Problem(paths[k], f"every voxel is {v['constant']:g}: a blank {k} image (a failed "
                                                       "export or conversion); export it again or remove the subject"))
            if v.get("nonfinite"):
                report.errors.append(Problem(paths[k], f"{v['nonfinite']} NaN/Inf voxels: replace them "
                                                       "(e.g. numpy.nan_to_num) or remove the subject"))
        ref_key = next((m for m in modalities if m in good), None)
        if ref_key is None:
            continue
        ref = refs[sid] = good[ref_key]
        for k, v in good.items():
            if k == ref_key:
                continue
            if v["shape"][:3] != ref["shape"][:3]:
                report.errors.append(Problem(paths[k], f"shape {v['shape'][:3]} differs from {paths[ref_key]} "
                                                       f"{ref['shape'][:3]}: resample both to one grid (co-register)"))
            elif not np.allclose(v["zooms"], ref["zooms"], atol=1e-3):
                report.errors.append(Problem(paths[k], f"voxel spacing {v['zooms']} differs from {ref_key} {ref['zooms']}: "
                                                       "resample to one spacing"))
            elif not np.allclose(v["affine"], ref["affine"], atol=1e-2):
                report.errors.append(Problem(paths[k], f"affine differs from {paths[ref_key]}: the images are not in the "
                                                       "same space; co-register them"))
        lab = good.get("label")
        if lab is not None and "values" in lab:  # (an empty label volume is reported above)
            values = {int(x) for x in lab["values"] if x == int(x)}
            if lab["non_integer"]:
                report.errors.append(Problem(paths["label"], "non-integer label values: a label map must hold class "
                                                             "codes; re-export it with nearest-neighbour interpolation"))
            elif expected is not None and not values <= expected:
                report.errors.append(Problem(paths["label"], f"label values {sorted(values - expected)} outside the "
                                                             f"expected {sorted(expected)}: fix the segmentation"))
            elif not values & set(label_map):
                report.warnings.append(Problem(paths["label"], f"no voxel of the target labels {sorted(label_map)} "
                                                               f"(empty target) in subject {sid}"))
    report.warnings += _mixed_geometry(str(root), refs)
    report.seconds = time.perf_counter() - t0
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=["brats", "ixi", "mura", "chestxray"])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--modalities", default="t1,t2", help=f"comma-separated (BraTS: {','.join(BRATS_MODALITIES)})")
    p.add_argument("--finding", default="Pneumothorax", help="ChestX-ray14 finding against 'No Finding'")
    p.add_argument("--grades", default="HGG", help="BraTS grade folders, comma-separated (HGG,LGG)")
    p.add_argument("--no-cache", action="store_true", help="re-read every file")
    a = p.parse_args(argv)
    try:
        report = validate_dataset(a.dataset, a.data_dir, tuple(a.modalities.split(",")), use_cache=not a.no_cache,
                                  finding=a.finding, grades=tuple(a.grades.split(",")))
    except Exception as e:  # noqa: BLE001 -- a data problem is reported, never raised: this is a bug of the validator
        import traceback
        traceback.print_exc()
        print(f"\n[tlcore] internal error of the validator ({type(e).__name__}: {e}): a bug in tlcore, not "
              f"necessarily in your data. Please report it with the traceback above. Exit code {INTERNAL_ERROR}.",
              file=sys.stderr)
        return INTERNAL_ERROR
    print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Small, learnable, brain-like volumes written in the real BraTS 2018 and IXI layouts.

The demo and the tests need data that exercises the real loading code (same folders, file
names, label codes) and that a network can learn in a few hundred CPU steps, so tests can
check that learning happened. Every volume is a function of (seed, subject index): the same
seed writes byte-identical files (gzip timestamps are zeroed).

    python -m tlcore.data.synthetic /tmp/synth --seed 0
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

MANIFEST = "tlcore_synthetic.json"
IXI_SITES = ("Guys", "HH", "IOP")
# FreeSurfer aseg codes used in the synthetic IXI labels (only 17/53 are targets).
ASEG = {"left_wm": 2, "left_cortex": 3, "left_hippocampus": 17,
        "right_wm": 41, "right_cortex": 42, "right_hippocampus": 53}


def _grid(shape):
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    return np.meshgrid(*axes, indexing="ij")


def _ellipsoid(shape, centre, radii):
    """Boolean ellipsoid; centre and radii in voxels."""
    idx = np.indices(shape, dtype=np.float32)
    d = sum(((idx[i] - centre[i]) / radii[i]) ** 2 for i in range(3))
    return d <= 1.0


def _brain(shape, rng):
    """Brain mask, tissue texture in [0, 1] and a left/right hemisphere map."""
    x, y, z = _grid(shape)
    wobble = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=3) * 0.6
    mask = (x / 0.82) ** 2 + (y / 0.88) ** 2 + (z / 0.8) ** 2 + wobble <= 1.0
    texture = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=1.5)
    texture = (texture - texture.min()) / (np.ptp(texture) + 1e-6)
    return mask, texture, x < 0


def _save(array, affine, path: Path, dtype) -> None:
    """Write a .nii.gz whose bytes depend only on the data (gzip mtime 0)."""
    img = nib.Nifti1Image(np.asarray(array).astype(dtype), affine)
    img.header.set_xyzt_units("mm", "sec")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(img.to_bytes(), mtime=0))


def _to_scanner_units(image, mask, rng, scale=1000.0, noise=0.04):
    image = image + rng.normal(0.0, noise, image.shape).astype(np.float32)
    return np.where(mask, np.clip(image, 0, None) * scale, 0.0)


def make_ixi_subject(shape, rng):
    """T1, T2 and an aseg-style label volume with left/right hippocampus (17/53)."""
    mask, texture, left = _brain(shape, rng)
    wm = mask & (texture > 0.5)
    t1 = np.where(wm, 0.8, 0.55) + 0.1 * texture
    t2 = np.where(wm, 0.45, 0.6) - 0.05 * texture
    label = np.zeros(shape, np.uint8)
    label[mask & wm & left] = ASEG["left_wm"]
    label[mask & ~wm & left] = ASEG["left_cortex"]
    label[mask & wm & ~left] = ASEG["right_wm"]
    label[mask & ~wm & ~left] = ASEG["right_cortex"]
    s = np.array(shape, np.float32)
    radii = np.maximum(s * np.array([0.09, 0.14, 0.09]), 1.5) * rng.uniform(0.85, 1.15, 3)
    for _side, code, sign in (("left", ASEG["left_hippocampus"], -1), ("right", ASEG["right_hippocampus"], 1)):
        centre = s / 2 + np.array([sign * 0.22, 0.05, -0.12]) * s + rng.normal(0, 0.02, 3) * s
        hippo = _ellipsoid(shape, centre, radii) & mask
        label[hippo] = code
        t1 = np.where(hippo, 0.3, t1)   # grey-matter dark on T1
        t2 = np.where(hippo, 1.0, t2)   # bright on T2
    return _to_scanner_units(t1, mask, rng), _to_scanner_units(t2, mask, rng), np.where(mask, label, 0)


def make_brats_subject(shape, rng):
    """T1, T1ce, T2, FLAIR and a BraTS label volume (1 necrotic, 2 edema, 4 enhancing)."""
    mask, texture, _ = _brain(shape, rng)
    s = np.array(shape, np.float32)
    centre = s / 2 + rng.uniform(-0.18, 0.18, 3) * s
    r_edema = s * rng.uniform(0.17, 0.24)
    r_core = r_edema * rng.uniform(0.45, 0.65)
    edema = _ellipsoid(shape, centre, r_edema) & mask
    core = _ellipsoid(shape, centre + rng.normal(0, 0.5, 3), r_core) & mask
    necrotic = _ellipsoid(shape, centre, r_core * 0.55) & core
    enhancing = core & ~necrotic
    label = np.zeros(shape, np.uint8)
    label[edema] = 2
    label[enhancing] = 4
    label[necrotic] = 1
    # Core is dark on T1 and bright on T2, like the IXI hippocampus: a shared low-level cue.
    t1 = np.select([necrotic, enhancing, edema], [0.25, 0.35, 0.5], 0.6 + 0.15 * texture)
    t1ce = np.select([necrotic, enhancing, edema], [0.3, 1.2, 0.5], 0.6 + 0.15 * texture)
    t2 = np.select([necrotic, enhancing, edema], [1.1, 0.95, 0.8], 0.5 - 0.1 * texture)
    flair = np.select([necrotic, enhancing, edema], [0.6, 0.8, 1.0], 0.45 + 0.1 * texture)
    # Noisier than IXI: the target task has less signal, as the thesis's BraTS did.
    images = {m: _to_scanner_units(v, mask, rng, noise=0.12) for m, v in
              (("t1", t1), ("t1ce", t1ce), ("t2", t2), ("flair", flair))}
    return images, label


def brats_ids(n: int, start: int = 0) -> list[str]:
    """Subject IDs in the BraTS 2018 styles (Brats18_CBICA_ABC_1, Brats18_2013_2_1, ...)."""
    ids = []
    for i in range(start, start + n):
        if i % 3 == 0:
            ids.append(f"Brats18_2013_{i}_1")
        elif i % 3 == 1:
            a, b = divmod(i, 26)
            ids.append(f"Brats18_CBICA_A{chr(65 + a % 26)}{chr(65 + b)}_1")
        else:
            ids.append(f"Brats18_TCIA0{1 + i % 9}_{100 + i}_1")
    return ids


def write_brats(root: str | Path, n_hgg: int = 20, n_lgg: int = 4, shape=(32, 32, 32), seed: int = 0) -> Path:
    """Write `<root>/{HGG,LGG}/<ID>/<ID>_{t1,t1ce,t2,flair,seg}.nii.gz`."""
    root = Path(root)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # 1 mm isotropic, as BraTS
    for k, sid in enumerate(brats_ids(n_hgg + n_lgg)):
        grade = "HGG" if k < n_hgg else "LGG"
        rng = np.random.default_rng([seed, 1, k])
        images, label = make_brats_subject(shape, rng)
        folder = root / grade / sid
        for modality, vol in images.items():
            _save(vol, affine, folder / f"{sid}_{modality}.nii.gz", np.int16)
        _save(label, affine, folder / f"{sid}_seg.nii.gz", np.uint8)
    return root


def ixi_names(n: int) -> list[str]:
    return [f"IXI{2 + i:03d}-{IXI_SITES[i % 3]}-{828 + 7 * i:04d}" for i in range(n)]


def write_ixi(root: str | Path, n: int = 24, shape=(32, 32, 32), seed: int = 0) -> Path:
    """Write `<root>/IXI-T1/IXI###-Site-####-T1.nii.gz`, `IXI-T2/...-T2.nii.gz`, `labels/...-seg.nii.gz`."""
    root = Path(root)
    affine = np.diag([0.9375, 0.9375, 1.2, 1.0])  # IXI's typical in-plane / slice spacing
    for k, name in enumerate(ixi_names(n)):
        rng = np.random.default_rng([seed, 2, k])
        t1, t2, label = make_ixi_subject(shape, rng)
        _save(t1, affine, root / "IXI-T1" / f"{name}-T1.nii.gz", np.int16)
        _save(t2, affine, root / "IXI-T2" / f"{name}-T2.nii.gz", np.int16)
        _save(label, affine, root / "labels" / f"{name}-seg.nii.gz", np.uint8)
    return root


def ensure_synthetic(root: str | Path, dataset: str, seed: int = 0, shape=(32, 32, 32), **sizes) -> Path:
    """Write the synthetic dataset under `root` unless the same one is already there."""
    root = Path(root).absolute()
    wanted = {"dataset": dataset, "seed": seed, "shape": list(shape), **sizes}
    manifest = root / MANIFEST
    if manifest.exists() and json.loads(manifest.read_text()) == wanted:
        return root
    if dataset == "brats":
        write_brats(root, shape=shape, seed=seed, **sizes)
    elif dataset == "ixi":
        write_ixi(root, shape=shape, seed=seed, **sizes)
    elif dataset == "mura":
        write_mura(root, seed=seed, size=shape[0], **sizes)
    elif dataset == "chestxray":
        write_chestxray(root, seed=seed, size=shape[0], **sizes)
    else:
        raise ValueError(f"no synthetic generator for dataset {dataset!r} (brats, ixi, mura, chestxray)")
    manifest.write_text(json.dumps(wanted))
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder to write <out>/brats and <out>/ixi into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=32, help="edge length of the cubic volumes")
    a = p.parse_args()
    shape = (a.size,) * 3
    for ds in ("brats", "ixi"):
        print(ensure_synthetic(Path(a.out) / ds, ds, seed=a.seed, shape=shape))


if __name__ == "__main__":
    main()


# ----------------------------------------------------------------------------- 2D radiographs

def _png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(array * 255, 0, 255).astype(np.uint8)).save(path, optimize=False)


def make_radiograph(size: int, rng, abnormal: bool, kind: str) -> np.ndarray:
    """A grey radiograph-like image; abnormal ones carry a thin bright line (a fracture line on
    a bone, the pleural edge of a pneumothorax) the model has to find."""
    y, x = np.mgrid[0:size, 0:size] / size
    img = 0.15 + 0.05 * gaussian_filter(rng.standard_normal((size, size)), 2)
    if kind == "bone":
        cx, w = rng.uniform(0.35, 0.65), rng.uniform(0.12, 0.2)
        img = img + 0.55 * (np.abs(x - cx) < w)
    else:  # chest: two dark lungs in a brighter body
        img = img + 0.45 - 0.3 * ((((x - 0.3) / 0.16) ** 2 + ((y - 0.5) / 0.32) ** 2 < 1)
                                  | (((x - 0.7) / 0.16) ** 2 + ((y - 0.5) / 0.32) ** 2 < 1))
    if abnormal:
        angle, offset = rng.uniform(0, np.pi), rng.uniform(0.3, 0.7)
        d = np.abs((x - 0.5) * np.cos(angle) + (y - offset) * np.sin(angle))
        img = img + 0.35 * (d < 0.02)
    return img + rng.normal(0, 0.03, img.shape)


def write_mura(root: str | Path, n_patients: int = 24, size: int = 64, seed: int = 0) -> Path:
    """`<root>/MURA-v1.1/{train,valid}/XR_<PART>/patientNNNNN/studyK_{positive,negative}/imageI.png` + CSVs."""
    root = Path(root)
    parts = ("XR_ELBOW", "XR_FINGER", "XR_FOREARM", "XR_HAND", "XR_HUMERUS", "XR_SHOULDER", "XR_WRIST")
    rows = {"train": ([], []), "valid": ([], [])}
    for p in range(n_patients):
        rng = np.random.default_rng([seed, 3, p])
        split = "valid" if p % 5 == 4 else "train"
        patient = f"patient{(11185 if split == 'valid' else 1) + p:05d}"
        for s in range(1, 1 + rng.integers(1, 3)):
            part, abnormal = parts[rng.integers(len(parts))], bool(rng.random() < 0.5)
            rel = f"MURA-v1.1/{split}/{part}/{patient}/study{s}_{'positive' if abnormal else 'negative'}"
            for i in range(1, 1 + rng.integers(1, 4)):
                # in an abnormal study most, not all, views show the finding
                _png(make_radiograph(size, rng, abnormal and (i == 1 or rng.random() < 0.7), "bone"),
                     root / rel / f"image{i}.png")
                rows[split][0].append(f"{rel}/image{i}.png")
            rows[split][1].append(f"{rel}/,{int(abnormal)}")
    for split, (paths, studies) in rows.items():
        (root / "MURA-v1.1" / f"{split}_image_paths.csv").write_text("\n".join(paths) + "\n")
        (root / "MURA-v1.1" / f"{split}_labeled_studies.csv").write_text("\n".join(studies) + "\n")
    return root


def write_chestxray(root: str | Path, n_patients: int = 60, size: int = 64, seed: int = 0,
                    finding: str = "Pneumothorax", positive_rate: float = 0.15) -> Path:
    """`<root>/Data_Entry_2017.csv`, `images_001/images/*.png`, `train_val_list.txt`, `test_list.txt`."""
    root = Path(root)
    entries = ["Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
               "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"]
    lists = {"train_val": [], "test": []}
    for p in range(n_patients):
        rng = np.random.default_rng([seed, 4, p])
        split = "test" if p % 5 == 4 else "train_val"
        for k in range(rng.integers(1, 4)):
            name = f"{p + 1:08d}_{k:03d}.png"
            r = rng.random()
            labels = finding if r < positive_rate else ("Effusion" if r < positive_rate + 0.1 else "No Finding")
            if labels == finding and rng.random() < 0.3:
                labels = f"Effusion|{finding}"
            _png(make_radiograph(size, rng, finding in labels, "chest"), root / "images_001" / "images" / name)
            entries.append(f"{name},{labels},{k},{p + 1},{int(rng.integers(20, 80))},{'MF'[p % 2]},PA,"
                           f"{size},{size},0.143,0.143,")
            lists[split].append(name)
    (root / "Data_Entry_2017.csv").write_text("\n".join(entries) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(lists["train_val"]) + "\n")
    (root / "test_list.txt").write_text("\n".join(lists["test"]) + "\n")
    return root

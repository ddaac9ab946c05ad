"""Load subjects into memory and draw augmented training patches.

Volumes are loaded and normalised once per trial (MONAI transforms) and kept in memory, on the
GPU when they fit: the thesis's training time was dominated by re-reading volumes and by
CPU-side weighted window sampling. Drawing a patch here is tensor work on the volumes' device:
pick a centre from per-subject tables built once, then crop, rotate and scale in one
`grid_sample`. MONAI's RandWeightedCropd instead takes a cumulative sum over the whole weight
map for every patch (9 M voxels for a BraTS volume); bench/ measures the difference.

Training space is one geometry for every volume: RAS axes, optionally one voxel size
(`spacing`), padded to at least the patch size. IXI (sagittal) and BraTS (axial) then present
the same axis convention to transferred filters. `to_source_grid` maps a prediction back onto
the input file's own grid, where Dice is scored and predictions are written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import (
    ConcatItemsd,
    LoadImaged,
    NormalizeIntensityd,
    Orientation,
    Orientationd,
    Spacingd,
    SpatialPadd,
    SpatialResample,
)
from nibabel.orientations import aff2axcodes

from tlcore.data.layouts import class_indices


@dataclass(frozen=True)
class SourceGrid:
    """The input file's own voxel grid: where Dice is scored and predictions are written."""
    shape: tuple               # spatial shape of the first modality's file
    affine: np.ndarray         # its voxel -> mm affine
    label: torch.Tensor = field(repr=False)  # (1, *shape) uint8 class indices: the label file, mapped


@dataclass
class Subject:
    id: str
    image: torch.Tensor        # (C, H, W, D) float32, z-scored per modality inside the brain
    label: torch.Tensor        # (1, H, W, D) int64 class indices
    affine: np.ndarray         # training space (RAS, resampled) before padding: voxel -> mm
    centres: dict = field(default_factory=dict, repr=False)  # class -> flat voxel indices (see centre_table)
    source: str = ""           # the first modality's file: predictions are written on its grid
    original_shape: tuple = ()  # training space before padding to the patch size
    source_grid: SourceGrid | None = None  # None: training space is the input's grid (hand-built subjects)


class SubjectLoadError(ValueError):
    """A subject's files cannot be turned into a training example."""


def map_labels(label: torch.Tensor, mapping: dict[int, int]) -> torch.Tensor:
    """Raw label codes -> class indices (layouts.class_indices, on a tensor)."""
    return torch.from_numpy(class_indices(label.cpu().numpy(), mapping))


def centre_table(label: torch.Tensor, num_classes: int, dense: float = 0.25) -> dict[int, torch.Tensor | None]:
    """Per class present: the flat indices of its voxels, or None for a class covering more than
    `dense` of the volume (background), which is drawn by rejection instead of stored.

    Drawing a class uniformly, then one of its voxels, gives each voxel probability
    1 / (n_classes_present * class frequency): NiftyNet's balanced window sampling.
    """
    flat = label.reshape(-1)
    counts = torch.bincount(flat, minlength=num_classes)
    table = {}
    for c in range(num_classes):
        n = int(counts[c])
        if n:
            table[c] = None if n > dense * flat.numel() else torch.nonzero(flat == c).flatten().to(torch.int64)
    return table


def _plain(t) -> torch.Tensor:
    """MetaTensor -> torch.Tensor: cached volumes don't need MONAI's per-op metadata tracking."""
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


def _check_shapes(sid: str, files: dict[str, str], d: dict, keys: list[str], after: str = "") -> None:
    shapes = {k: tuple(d[k].shape[1:]) for k in keys}
    what = "image and label" if "label" in files else "the images'"
    if len(set(shapes.values())) != 1:
        raise SubjectLoadError(
            f"subject {sid}: {after}{what} shapes differ {shapes} "
            f"({files.get('label') or files[keys[0]]}); co-register / resample them to one grid first")


def _to_training_grid(d: dict, modalities, spacing) -> dict:
    """RAS axes for every volume; resampled to `spacing` mm when given (labels by nearest neighbour)."""
    keys = [*modalities, "label"]
    d = Orientationd(keys=keys, axcodes="RAS", labels=None)(d)
    if spacing:
        d = Spacingd(keys=keys, pixdim=tuple(spacing), mode=[*["bilinear"] * len(modalities), "nearest"],
                     dtype=torch.float32)(d)
    return d


def load_subject(sid: str, files: dict[str, str], modalities, label_map: dict[int, int],
                 num_classes: int, min_size=None, with_centres: bool = True, spacing=None) -> Subject:
    """Read, reorient to RAS, resample to `spacing` (mm; None or () keeps each volume's own voxel
    size), z-score, map labels and pad to `min_size`: a subject in training space. Without a
    "label" in `files` (a scan to predict), the label is all background."""
    keys = [*modalities, *(["label"] if "label" in files else [])]
    try:
        d = LoadImaged(keys=keys, image_only=True, ensure_channel_first=True)({k: files[k] for k in keys})
    except Exception as e:  # nibabel / gzip errors name neither subject nor the fix
        raise SubjectLoadError(
            f"subject {sid}: cannot read one of {[files[k] for k in keys]}: {e}. "
            "Re-extract the file from the dataset archive or remove the subject.") from e
    _check_shapes(sid, files, d, keys)
    first = d[modalities[0]]
    if "label" not in d:  # nothing to score against: background everywhere, on the first modality's grid
        d["label"] = MetaTensor(torch.zeros_like(_plain(first), dtype=torch.uint8), affine=first.affine)
        keys.append("label")
    source_label = map_labels(_plain(d["label"]).round().long(), label_map).to(torch.uint8)
    source_grid = SourceGrid(tuple(first.shape[1:]), np.asarray(first.affine), source_label)
    d = _to_training_grid(d, modalities, spacing)
    # equal shapes on disk can part here when the files' affines disagree
    step = f"reorienting to RAS and resampling to {tuple(spacing)} mm" if spacing else "reorienting to RAS"
    _check_shapes(sid, files, d, keys, f"after {step}, ")
    affine = np.asarray(d[modalities[0]].affine)
    d = ConcatItemsd(keys=list(modalities), name="image")(d)
    d = NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)(d)  # statistics of the voxels trained on
    d["label"] = map_labels(torch.as_tensor(d["label"]).round().long(), label_map)
    original_shape = tuple(d["image"].shape[1:])
    if min_size is not None:  # volumes smaller than a patch are padded once, here (centred: see unpad)
        d = SpatialPadd(keys=["image", "label"], spatial_size=min_size)(d)
    image = _plain(d["image"]).float().contiguous()
    label = _plain(d["label"]).long().contiguous()
    centres = centre_table(label, num_classes) if with_centres else {}
    return Subject(sid, image, label, affine, centres, str(files[modalities[0]]), original_shape, source_grid)


class PatchSampler:
    """Draws batches of (image, label) patches from in-memory subjects, on their device.

    sampler="weighted": a class present in the subject is drawn uniformly, then a voxel of
    that class as the window centre (rare classes as often as common ones); "uniform": centres
    uniform over the volume. Augmentation: a random rotation up to `rotate_deg` about each
    axis and a scaling by up to `scale` (thesis: 10 deg, 10 %), applied with the crop in one
    trilinear (image) / nearest (label) `grid_sample`, border values outside the volume.
    Centres are moved inwards where needed so the unrotated window lies inside the volume.
    """

    def __init__(self, subjects: list[Subject], patch_size, batch_size: int, sampler: str = "weighted",
                 augment: bool = True, seed: int = 0, rotate_deg: float = 10.0, scale: float = 0.1,
                 device: torch.device | str | None = None):
        if not subjects:
            raise ValueError("PatchSampler needs at least one training subject")
        if sampler not in ("weighted", "uniform"):
            raise ValueError(f"sampler={sampler!r}: choose 'weighted' or 'uniform'")
        self.patch = tuple(int(p) for p in patch_size)
        self.batch_size, self.sampler, self.augment = batch_size, sampler, augment
        self.rotate, self.scale = math.radians(rotate_deg), scale
        self.subjects = subjects
        for s in subjects:
            if any(v < p for v, p in zip(s.image.shape[1:], self.patch)):
                raise ValueError(f"subject {s.id}: volume {tuple(s.image.shape[1:])} is smaller than the "
                                 f"patch {self.patch}; load it with min_size=patch_size")
            if sampler == "weighted" and not s.centres:
                raise ValueError(f"subject {s.id} was loaded without centre tables (with_centres=False)")
        # Centres are drawn from the CPU tables (no GPU sync per patch); crops read device copies,
        # labels as uint8 (a BraTS volume: 9 MB instead of 71 MB).
        self.device = torch.device(device) if device is not None else subjects[0].image.device
        self.images = [s.image.to(self.device) for s in subjects]
        self.labels = [s.label.to(self.device, torch.uint8) for s in subjects]
        self.centres = [self._valid_centres(s) for s in subjects] if sampler == "weighted" else []
        self.reseed(seed)

    def _valid_lo_hi(self, s: Subject) -> tuple[np.ndarray, np.ndarray]:
        """Centres whose whole window lies inside the volume: lo <= c < hi per axis (as MONAI's
        RandWeightedCrop: border windows would otherwise be drawn far too often)."""
        patch = np.array(self.patch)
        return patch // 2, np.array(s.label.shape[1:]) - (patch - patch // 2) + 1

    def _valid_centres(self, s: Subject) -> dict:
        lo, hi = self._valid_lo_hi(s)
        out = {}
        for cls, idx in s.centres.items():
            if idx is None:
                out[cls] = None
                continue
            coords = np.stack(np.unravel_index(idx.cpu().numpy(), tuple(s.label.shape[1:])), axis=1)
            inside = ((coords >= lo) & (coords < hi)).all(axis=1)
            if inside.any():
                out[cls] = idx[torch.from_numpy(inside)]
        return out or {c: None for c in s.centres}  # nothing inside: centres anywhere, windows clamped

    def reseed(self, seed: int) -> None:
        """Deterministic restart point (used when a trial resumes from a checkpoint)."""
        self.rng = np.random.default_rng(seed)

    def _centre(self, i: int) -> np.ndarray:
        s = self.subjects[i]
        shape = tuple(s.label.shape[1:])
        lo, hi = self._valid_lo_hi(s)
        hi = np.maximum(hi, lo + 1)
        if self.sampler == "uniform":
            return self.rng.integers(lo, hi)
        table = self.centres[i]
        cls = list(table)[self.rng.integers(len(table))]
        idx = table[cls]
        if idx is not None:
            return np.array(np.unravel_index(int(idx[self.rng.integers(idx.numel())]), shape))
        # a dense class: uniform valid centres until one has it (expected < 1 / 0.25 tries)
        for _ in range(10_000):
            c = self.rng.integers(lo, hi)
            if int(s.label[(0, *c)]) == cls:
                return c
        return c

    def _corner(self, i: int) -> np.ndarray:
        """First voxel of the window around a drawn centre, kept inside the volume."""
        shape, patch = np.array(self.subjects[i].label.shape[1:]), np.array(self.patch)
        return np.clip(self._centre(i) - patch // 2, 0, shape - patch)

    def _affine(self, shape, corner) -> torch.Tensor:
        """(3, 4) theta for affine_grid: output patch coordinates -> input volume coordinates,
        both normalised to [-1, 1] (align_corners=False), in grid_sample's (x, y, z) = (s2, s1, s0)
        order. Rotation and scaling act in voxel space about the window centre."""
        dims, patch = np.array(shape, float), np.array(self.patch, float)
        angles = self.rng.uniform(-self.rotate, self.rotate, 3)
        scales = 1 + self.rng.uniform(-self.scale, self.scale, 3)
        rot = np.eye(3)
        for axis, a in enumerate(angles):
            i, j = [k for k in range(3) if k != axis]
            r = np.eye(3)
            r[i, i] = r[j, j] = math.cos(a)
            r[i, j], r[j, i] = -math.sin(a), math.sin(a)
            rot = rot @ r
        linear = np.diag(1 / dims) @ rot @ np.diag(scales) @ np.diag(patch)
        centre = corner + (patch - 1) / 2
        shift = (2 * centre + 1) / dims - 1
        theta = np.concatenate([linear[::-1, ::-1], shift[::-1, None]], axis=1)
        return torch.as_tensor(theta.copy(), dtype=torch.float32, device=self.device)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for i in self.rng.integers(len(self.subjects), size=self.batch_size):
            s, image, label = self.subjects[i], self.images[i], self.labels[i]
            corner = self._corner(i)
            if not self.augment:
                window = (slice(None), *(slice(int(c), int(c) + p) for c, p in zip(corner, self.patch)))
                images.append(image[window])
                labels.append(label[window])
                continue
            theta = self._affine(s.label.shape[1:], corner)[None]
            grid = F.affine_grid(theta, [1, 1, *self.patch], align_corners=False)
            images.append(F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border",
                                        align_corners=False)[0])
            labels.append(F.grid_sample(label[None].float(), grid, mode="nearest", padding_mode="border",
                                        align_corners=False)[0])
        return torch.stack(images), torch.stack(labels).long()


def unpad(volume: torch.Tensor, original_shape: tuple) -> torch.Tensor:
    """Undo SpatialPadd's centred padding on the last three dimensions."""
    if not original_shape or tuple(volume.shape[-3:]) == tuple(original_shape):
        return volume
    starts = [(n - o) // 2 for n, o in zip(volume.shape[-3:], original_shape)]
    return volume[..., starts[0]:starts[0] + original_shape[0], starts[1]:starts[1] + original_shape[1],
                  starts[2]:starts[2] + original_shape[2]]


def to_source_grid(volume: torch.Tensor, s: Subject) -> torch.Tensor:
    """A (C, *training shape) volume of intensities or class probabilities on the subject's
    input grid: (C, *source shape).

    Unpads, turns the RAS axes back into the file's (an exact permutation and flip), then undoes
    the resampling to `spacing` through world coordinates, trilinearly (a no-op without it).
    MONAI's own inverse (Invertd) needs the transform instances that recorded the operations,
    which a cached Subject does not keep; this needs only the two affines.
    """
    volume = unpad(volume, s.original_shape)
    grid = s.source_grid
    if grid is None:
        return volume
    v = MetaTensor(volume, affine=torch.as_tensor(s.affine, dtype=torch.float64))
    v = Orientation(axcodes="".join(aff2axcodes(grid.affine)), labels=None)(v)
    v = SpatialResample(mode="bilinear")(v, dst_affine=torch.as_tensor(grid.affine, dtype=torch.float64),
                                         spatial_size=grid.shape)
    return _plain(v)


def source_label(s: Subject) -> torch.Tensor:
    """The (1, *shape) reference Dice is scored against: the label file on its own grid."""
    return s.source_grid.label if s.source_grid is not None else unpad(s.label, s.original_shape)

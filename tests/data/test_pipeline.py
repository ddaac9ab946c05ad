"""One training geometry (RAS, optional common spacing, padding) and the way back to each input's grid."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.orientations import io_orientation, ornt_transform

from tlcore.data.layouts import default_label_map, find_brats
from tlcore.data.pipeline import SubjectLoadError, load_subject, map_labels, unpad
from tlcore.data.synthetic import write_brats
from tlcore.evaluation.metrics import dice_per_class, evaluate_subjects

MODALITIES = ("t1", "t2")
LABEL_MAP = default_label_map("brats")
WHOLE_TUMOUR = {1: 1, 2: 1, 4: 1}
ROI = (16, 16, 16)
# input axis i -> output axis ORNT[i, 0], flipped where ORNT[i, 1] == -1 (nibabel's convention)
ORNT = np.array([[2, 1], [0, -1], [1, -1]])


class DarkT1BrightT2(torch.nn.Module):
    """Tumour core where z-scored T2 minus T1 is high: a prediction that follows the anatomy with
    no training, so a misplaced prediction scores differently."""

    def forward(self, x):
        score = x[:, 1:2] - x[:, :1] - 4.0
        return torch.cat([-score, score], 1)


class BrightT2(torch.nn.Module):
    """Tumour where z-scored T2 is above its brain mean."""

    def forward(self, x):
        return torch.cat([-x[:, 1:2], x[:, 1:2]], 1)


class Everywhere(torch.nn.Module):
    """Tumour in every voxel: Dice = 2|L| / (voxels scored + |L|) counts the voxels scored."""

    def forward(self, x):
        return torch.cat([torch.zeros_like(x[:, :1]), torch.ones_like(x[:, :1])], 1)


def one_subject(root: Path, shape) -> tuple[str, dict]:
    return next(iter(find_brats(write_brats(root, n_hgg=1, n_lgg=0, shape=shape)).items()))


def reoriented_copy(files: dict, folder: Path) -> dict:
    """The same physical images with permuted and flipped axes (data and affine changed together)."""
    folder.mkdir()
    out = {}
    for key, f in files.items():
        out[key] = str(folder / Path(f).name)
        nib.save(nib.load(f).as_reoriented(ORNT), out[key])
    return out


def evaluate(model, subjects, out: Path) -> dict:
    return evaluate_subjects(model, subjects, 2, ROI, torch.device("cpu"), predictions_dir=out)


def read(path) -> torch.Tensor:
    """A label or prediction file's voxels as stored."""
    return torch.as_tensor(np.asarray(nib.load(path).dataobj)).long()


def dice(pred: torch.Tensor, truth: torch.Tensor) -> float:
    return float(dice_per_class(pred, truth, 2)[0])


def test_reoriented_input_gives_the_same_training_volume_dice_and_aligned_prediction(tmp_path):
    sid, files = one_subject(tmp_path / "brats", (24, 20, 16))
    flipped = reoriented_copy(files, tmp_path / "flipped")
    assert nib.load(flipped["t1"]).shape != nib.load(files["t1"]).shape          # the copy really differs
    a = load_subject(sid, files, MODALITIES, LABEL_MAP, 2, ROI)
    b = load_subject(sid, flipped, MODALITIES, LABEL_MAP, 2, ROI)
    assert torch.equal(a.image, b.image) and torch.equal(a.label, b.label)
    assert np.allclose(a.affine, b.affine) and a.original_shape == b.original_shape == (24, 20, 16)

    dice_a = evaluate(DarkT1BrightT2(), [a], tmp_path / "pred_a")["per_subject"][sid]
    dice_b = evaluate(DarkT1BrightT2(), [b], tmp_path / "pred_b")["per_subject"][sid]
    assert dice_a == dice_b > 0.5                                   # same, and the model finds the tumour
    pred_a = nib.load(tmp_path / "pred_a" / f"{sid}_pred.nii.gz")
    pred_b = nib.load(tmp_path / "pred_b" / f"{sid}_pred.nii.gz")
    ref_b = nib.load(flipped["t1"])
    assert pred_b.shape == ref_b.shape and np.allclose(pred_b.affine, ref_b.affine)
    # back in the original axis order, the flipped file's prediction is the original's, voxel for voxel
    undone = pred_b.as_reoriented(ornt_transform(io_orientation(pred_b.affine), io_orientation(pred_a.affine)))
    assert np.allclose(undone.affine, pred_a.affine)
    assert np.array_equal(np.asarray(undone.dataobj), np.asarray(pred_a.dataobj))
    # and Dice was scored on the flipped file's grid, against its label file
    assert dice(read(pred_b.get_filename()), map_labels(read(flipped["label"]), LABEL_MAP)) == pytest.approx(dice_b)


def test_volume_smaller_than_the_patch_is_scored_and_written_unpadded(tmp_path):
    sid, files = one_subject(tmp_path / "brats", (16, 16, 12))
    s = load_subject(sid, files, MODALITIES, LABEL_MAP, 2, ROI)
    unpadded = load_subject(sid, files, MODALITIES, LABEL_MAP, 2)
    assert tuple(s.image.shape[1:]) == ROI and s.original_shape == (16, 16, 12)
    assert torch.equal(unpad(s.image, s.original_shape), unpadded.image)

    ev = evaluate(Everywhere(), [s], tmp_path / "pred")
    tumour = int((s.label == 1).sum())
    assert ev["dice"] == pytest.approx(2 * tumour / (16 * 16 * 12 + tumour))   # with the padding: 16^3 voxels
    pred = nib.load(tmp_path / "pred" / f"{sid}_pred.nii.gz")
    assert pred.shape == (16, 16, 12) and np.allclose(pred.affine, nib.load(files["t1"]).affine)


def test_common_spacing_halves_training_shape_and_predictions_return_to_the_input_grid(tmp_path):
    sid, files = one_subject(tmp_path / "brats", (32, 32, 24))
    # T2 bright exactly in the tumour: BrightT2 then predicts the label itself at 1 mm
    label, t1 = nib.load(files["label"]), nib.load(files["t1"])
    t2 = np.where(np.asarray(label.dataobj) > 0, 1000, np.where(np.asarray(t1.dataobj) > 0, 100, 0))
    nib.save(nib.Nifti1Image(t2.astype(np.int16), t1.affine), files["t2"])
    native = load_subject(sid, files, MODALITIES, WHOLE_TUMOUR, 2)
    coarse = load_subject(sid, files, MODALITIES, WHOLE_TUMOUR, 2, spacing=(2, 2, 2))
    assert tuple(coarse.image.shape[1:]) == coarse.original_shape == (16, 16, 12)
    assert np.allclose(np.abs(coarse.affine[:3, :3]), 2 * np.eye(3))

    assert evaluate(BrightT2(), [native], tmp_path / "native")["dice"] == 1.0
    ev = evaluate(BrightT2(), [coarse], tmp_path / "coarse")
    written = nib.load(tmp_path / "coarse" / f"{sid}_pred.nii.gz")
    assert written.shape == t1.shape and np.allclose(written.affine, t1.affine)
    pred, truth = read(written.get_filename()), map_labels(read(files["label"]), WHOLE_TUMOUR)
    # Dice is scored on the input grid: it is the written file's Dice against the label file
    assert ev["dice"] == pytest.approx(dice(pred, truth))
    # the 2 mm prediction lands where the tumour is: a voxel's shift along any axis scores worse
    assert ev["dice"] > 0.75
    for axis in range(3):
        for shift in (-1, 1):
            assert dice(torch.roll(pred, shift, axis), truth) < ev["dice"], (axis, shift)


def test_label_whose_axes_disagree_with_the_images_names_the_subject(tmp_path):
    sid, files = one_subject(tmp_path / "brats", (16, 16, 12))
    label = nib.load(files["label"])   # same shape on disk, but its affine swaps the first and last axes
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), label.affine[:, [2, 1, 0, 3]]), files["label"])
    with pytest.raises(SubjectLoadError, match=f"subject {sid}: after reorienting to RAS, image and label shapes"):
        load_subject(sid, files, MODALITIES, LABEL_MAP, 2)


def test_validation_notes_subjects_in_different_orientations(tmp_path):
    from tlcore.data.validate import validate_dataset

    root = write_brats(tmp_path / "brats", n_hgg=2, n_lgg=0, shape=(16, 16, 12))
    assert not validate_dataset("brats", root, use_cache=False).warnings
    sid, files = next(iter(find_brats(root).items()))
    for f in files.values():
        nib.save(nib.load(f).as_reoriented(ORNT), f)
    report = validate_dataset("brats", root, use_cache=False)
    assert report.ok and [w.path for w in report.warnings] == [str(root)]
    note = report.warnings[0].message
    assert note.startswith("subjects differ in orientation {") and "'AIL': 1" in note and "'LPS': 1" in note
    assert "voxel size (mm)" not in note and "RAS" in note

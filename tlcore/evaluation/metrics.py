"""Whole-volume sliding-window inference and Dice (MONAI), pure where possible."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.metrics import compute_dice
from monai.networks.utils import one_hot

from tlcore.data.pipeline import source_label, to_source_grid


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, image: torch.Tensor, roi, device: torch.device,
                   sw_batch_size: int = 2, overlap: float = 0.5, amp_dtype: torch.dtype | None = None,
                   channels_last: bool = False) -> torch.Tensor:
    """Logits (1, K, H, W, D) of a (C, H, W, D) volume, aggregated over roi-sized windows.
    A window larger than the volume is cut to it: MONAI would pad the volume up to the window
    and compute the padding too (a 20^3 volume in a 32^3 window costs 4x)."""
    roi = tuple(min(int(r), int(n)) for r, n in zip(roi, image.shape[-3:]))
    x = image[None].to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with autocast(device, amp_dtype):
        logits = sliding_window_inference(x, roi_size=roi, sw_batch_size=sw_batch_size,
                                          predictor=model, overlap=overlap, mode="gaussian")
    return torch.as_tensor(logits).float()


def dice_per_class(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> np.ndarray:
    """Dice of each foreground class for one subject; a class absent from both is 1.0.

    pred, target: (1, H, W, D) or (H, W, D) class indices.
    """
    pred = pred.reshape(1, 1, *pred.shape[-3:]).long()
    target = target.reshape(1, 1, *target.shape[-3:]).long().to(pred.device)
    d = compute_dice(one_hot(pred, num_classes), one_hot(target, num_classes),
                     include_background=False, ignore_empty=False)
    return d[0].cpu().numpy()


def labels_on_source_grid(logits: torch.Tensor, s) -> torch.Tensor:
    """(1, *input shape) class indices of a subject's (1, K, *training shape) logits, on the grid
    of its input file. Probabilities, not class indices, are resampled: no blocky label edges
    after `spacing`. Evaluation and `python -m tlcore.predict` both go through here."""
    return to_source_grid(torch.softmax(logits[0], 0), s).argmax(0, keepdim=True)


@torch.no_grad()
def evaluate_subjects(model: torch.nn.Module, subjects, num_classes: int, roi, device: torch.device,
                      loss_fn=None, sw_batch_size: int = 2, overlap: float = 0.5,
                      amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                      predictions_dir: str | Path | None = None) -> dict:
    """Mean loss and Dice over subjects, plus each subject's Dice (mean over foreground classes).

    The loss is computed in training space; Dice on each input's own grid (unpadded, original
    orientation and voxel size), against its label file, where predictions are also written.
    """
    was_training = model.training
    model.eval()
    losses, per_subject = [], {}
    for s in subjects:
        logits = predict_logits(model, s.image, roi, device, sw_batch_size, overlap, amp_dtype, channels_last)
        if loss_fn is not None:
            losses.append(float(loss_fn(logits, s.label[None].to(logits.device))))
        pred = labels_on_source_grid(logits, s)
        per_subject[s.id] = float(dice_per_class(pred, source_label(s), num_classes).mean())
        if predictions_dir is not None and s.source:  # on the input's grid, aligned in any viewer
            write_prediction(pred, s.source, Path(predictions_dir) / f"{s.id}_pred.nii.gz")
    model.train(was_training)
    return {"loss": float(np.mean(losses)) if losses else float("nan"),
            "dice": float(np.mean(list(per_subject.values()))) if per_subject else float("nan"),
            "per_subject": per_subject}


def write_prediction(labels: torch.Tensor, reference: str | Path, out: str | Path) -> Path:
    """Save a (H, W, D) or (1, H, W, D) label map as NIfTI with the affine and header of the
    `reference` image it was predicted from, so it opens aligned in ITK-SNAP or 3D Slicer."""
    import nibabel as nib

    ref = nib.load(str(reference))
    array = labels.reshape(labels.shape[-3:]).to(torch.uint8).cpu().numpy()
    if array.shape != ref.shape[:3]:
        raise ValueError(f"prediction shape {array.shape} differs from {reference} {ref.shape[:3]} "
                         "(predict on the unpadded volume)")
    header = ref.header.copy()
    header.set_data_dtype(np.uint8)
    header["scl_slope"], header["scl_inter"] = 1, 0  # class indices, not rescaled intensities
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, ref.affine, header), str(out))
    return out

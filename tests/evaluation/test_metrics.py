"""Segmentation metrics, computed the same way everywhere: Dice per class, sliding-window inference,
predictions written back on the input's grid."""

import numpy as np
import pytest
import torch

from tlcore.evaluation.metrics import dice_per_class


def test_dice_definition():
    a = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    assert dice_per_class(a, a, 2).tolist() == [1.0]            # both empty
    b = a.clone()
    b[0, :4] = 1
    assert dice_per_class(b, b, 2).tolist() == [1.0]
    assert dice_per_class(b, a, 2).tolist() == [0.0]            # prediction where there is nothing
    c = a.clone()
    c[0, :2] = 1
    assert dice_per_class(c, b, 2)[0] == pytest.approx(2 * 128 / (128 + 256))
    three = a.clone()
    three[0, :4] = 2
    assert dice_per_class(three, three, 3).tolist() == [1.0, 1.0]


def test_a_window_larger_than_the_volume_is_cut_to_it_not_padded():
    """Inference on a 20x20x12 volume with a 32^3 window: the network sees the volume's own shape
    (MONAI would pad it to the window and compute the padding too)."""
    from tlcore.evaluation.metrics import predict_logits

    seen = []

    def network(x):
        seen.append(tuple(x.shape[-3:]))
        return x[:, :1].repeat(1, 2, 1, 1, 1)

    logits = predict_logits(network, torch.rand(2, 20, 20, 12), (32, 32, 32), torch.device("cpu"), sw_batch_size=1)
    assert seen == [(20, 20, 12)] and logits.shape == (1, 2, 20, 20, 12)
    predict_logits(network, torch.rand(2, 40, 20, 12), (32, 32, 32), torch.device("cpu"), sw_batch_size=1)
    assert set(seen[1:]) == {(32, 20, 12)}  # only the axis longer than the window is tiled


def test_prediction_nifti_carries_the_input_affine_and_header(tmp_path):
    import nibabel as nib

    from tlcore.evaluation.metrics import write_prediction

    affine = np.array([[-0.9, 0, 0, 90], [0, 1.1, 0, -126], [0, 0, 1.2, -72], [0, 0, 0, 1]])
    ref = nib.Nifti1Image(np.random.default_rng(0).normal(size=(12, 10, 8)).astype(np.float32), affine)
    ref.header.set_xyzt_units("mm", "sec")
    nib.save(ref, tmp_path / "t1.nii.gz")
    pred = torch.zeros(1, 12, 10, 8, dtype=torch.long)
    pred[0, 3:6, 2:4, 1:7] = 1
    out = nib.load(write_prediction(pred, tmp_path / "t1.nii.gz", tmp_path / "out" / "pred.nii.gz"))
    assert np.allclose(out.affine, affine) and out.header.get_xyzt_units() == ("mm", "sec")
    assert out.get_data_dtype() == np.uint8 and np.array_equal(np.asarray(out.dataobj), pred[0].numpy())
    with pytest.raises(ValueError, match="differs from"):
        write_prediction(pred[:, :6], tmp_path / "t1.nii.gz", tmp_path / "bad.nii.gz")

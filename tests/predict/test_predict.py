"""`python -m tlcore.predict`: a model (a checkpoint folder or a registered version) on new
scans writes what the sweep's evaluation writes, on each input's own grid, a reoriented scan
included; radiographs get class scores; every mistake is one line before anything is written."""

import csv
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tlcore.config import TrialConfig, write_run_config
from tlcore.data.layouts import find_subjects, num_classes
from tlcore.predict.__main__ import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ixi_model(synthetic_root, tmp_path_factory):
    """A seeded, untrained HighRes3DNet for IXI T1+T2 saved as a checkpoint folder: its noisy
    output makes any difference between two inference paths visible."""
    from safetensors.torch import save_file

    from tlcore.models.networks import build_network

    cfg = TrialConfig(dataset="ixi", data_dir=str(synthetic_root / "ixi"), patch_size=(16, 16, 16),
                      inference_roi=(16, 16, 16))
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("checkpoint")
    save_file(build_network(cfg, num_classes(cfg)).state_dict(), str(folder / "model.safetensors"))
    write_run_config(cfg, folder)
    return cfg, folder


def test_predictions_are_the_evaluations_on_each_inputs_grid(ixi_model, synthetic_root, tmp_path, capsys):
    from tlcore.data.pipeline import load_subject
    from tlcore.evaluation.metrics import evaluate_subjects
    from tlcore.models.transfer import load_checkpoint

    cfg, folder = ixi_model
    files = find_subjects("ixi", synthetic_root / "ixi", ("t1", "t2"))
    sid = sorted(files)[0]
    subject = load_subject(sid, files[sid], cfg.modalities, {17: 1, 53: 2}, 3, cfg.patch_size)
    evaluate_subjects(load_checkpoint(cfg, folder, 3), [subject], 3, cfg.roi, torch.device("cpu"),
                      predictions_dir=tmp_path / "evaluation")
    # the whole folder (T1 and T2 in IXI-T1/, IXI-T2/; the labels beside them are not scans)
    assert main([str(folder), str(synthetic_root / "ixi"), str(tmp_path / "all")]) == 0
    # named after the scans (IXI: the id with its site, IXI002-Guys-0828)
    predicted = sorted(p.name for p in (tmp_path / "all").glob("*_pred.nii.gz"))
    assert predicted == sorted(Path(files[s]["t1"]).name.replace("-T1.nii.gz", "_pred.nii.gz") for s in files)
    expected = nib.load(tmp_path / "evaluation" / f"{sid}_pred.nii.gz")
    got = nib.load(tmp_path / "all" / Path(files[sid]["t1"]).name.replace("-T1.nii.gz", "_pred.nii.gz"))
    t1 = nib.load(files[sid]["t1"])
    assert np.array_equal(np.asarray(got.dataobj), np.asarray(expected.dataobj))
    assert got.shape == t1.shape and np.allclose(got.affine, t1.affine)
    labels = np.asarray(got.dataobj)
    assert 0 < (labels > 0).sum() < labels.size  # the untrained network's noise: both kinds of voxel
    with (tmp_path / "all" / "volumes.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["subject"].startswith(sid)]
    assert [(r["class"], r["label_code"]) for r in rows] == [("1", "17"), ("2", "53")]
    voxel_ml = abs(np.linalg.det(t1.affine[:3, :3])) / 1000
    assert float(rows[1]["ml"]) == pytest.approx((labels == 2).sum() * voxel_ml, abs=1e-3)
    assert "predict: 100%" in capsys.readouterr().err  # the progress bar


def test_a_reoriented_scan_gets_the_same_segmentation_on_its_own_grid(ixi_model, synthetic_root, tmp_path):
    """The same scan stored with its axes permuted and flipped (another scanner's orientation, the
    same anatomy in world coordinates) is segmented alike, and written on its own grid."""
    cfg, folder = ixi_model
    files = find_subjects("ixi", synthetic_root / "ixi", ("t1", "t2"))
    sid = sorted(files)[1]
    turn = np.array([[2, 1], [0, -1], [1, 1]])  # axis 0 -> 2, axis 1 -> 0 flipped, axis 2 -> 1
    for m in ("t1", "t2"):  # BraTS naming: the T1 file given, its T2 found beside it
        img = nib.load(files[sid][m])
        (tmp_path / "original").mkdir(exist_ok=True)
        (tmp_path / "turned").mkdir(exist_ok=True)
        nib.save(img, tmp_path / "original" / f"{sid}_{m}.nii.gz")
        nib.save(img.as_reoriented(turn), tmp_path / "turned" / f"{sid}_{m}.nii.gz")
    for name in ("original", "turned"):
        assert main([str(folder), str(tmp_path / name / f"{sid}_t1.nii.gz"), str(tmp_path / f"{name}_pred")]) == 0
    original = nib.load(tmp_path / "original_pred" / f"{sid}_pred.nii.gz")
    turned = nib.load(tmp_path / "turned_pred" / f"{sid}_pred.nii.gz")
    turned_scan = nib.load(tmp_path / "turned" / f"{sid}_t1.nii.gz")
    assert turned.shape == turned_scan.shape and np.allclose(turned.affine, turned_scan.affine)
    assert not np.allclose(turned.affine, original.affine)
    as_turned = nib.orientations.apply_orientation(np.asarray(original.dataobj), turn)
    assert np.array_equal(np.asarray(turned.dataobj), as_turned)
    assert (as_turned > 0).any()


def test_a_registered_model_predicts_like_its_checkpoint_folder(ixi_model, synthetic_root, mlflow_uri, tmp_path):
    from tlcore.tracking import registry, store

    cfg, folder = ixi_model
    run = store.start_run(mlflow_uri, "ixi_source", "trial", {"source_model": "scratch"})
    store.log_artifacts(mlflow_uri, run, folder, "model")
    ref = registry.register_model(mlflow_uri, "ixi_hippocampus", run)
    one = sorted(find_subjects("ixi", synthetic_root / "ixi", ("t1", "t2")).items())[2]
    (tmp_path / "in").mkdir()
    for m, f in one[1].items():
        (tmp_path / "in" / f"{one[0]}_{m}.nii.gz").write_bytes(Path(f).read_bytes())
    for model, out in ((ref.uri, "registered"), (str(folder), "folder")):
        assert main([model, str(tmp_path / "in"), str(tmp_path / out), "--mlflow-uri", mlflow_uri]) == 0
    pred = lambda out: np.asarray(nib.load(tmp_path / out / f"{one[0]}_pred.nii.gz").dataobj)
    assert np.array_equal(pred("registered"), pred("folder"))


def test_radiographs_get_class_scores(tmp_path):
    from PIL import Image
    from safetensors.torch import save_file

    from tlcore.data.images2d import RadiographDataset
    from tlcore.models.networks import build_network
    from tlcore.training.classification import predict_probabilities

    cfg = TrialConfig(dataset="mura", image_size=32)
    torch.manual_seed(0)
    model = build_network(cfg, 2)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    write_run_config(cfg, tmp_path)
    rng = np.random.default_rng(0)
    (tmp_path / "xrays" / "wrist").mkdir(parents=True)
    images = []
    for i in range(3):
        images.append(str(tmp_path / "xrays" / "wrist" / f"image{i}.png"))
        Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(images[-1])
    assert main([str(tmp_path), str(tmp_path / "xrays"), str(tmp_path / "out")]) == 0
    with (tmp_path / "out" / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    _, expected = predict_probabilities(model, torch.utils.data.DataLoader(RadiographDataset(images, [0] * 3, 32)),
                                        torch.device("cpu"))
    assert [r["image"] for r in rows] == images
    assert [float(r["p_abnormal"]) for r in rows] == pytest.approx(expected, abs=1e-5)


def test_mistakes_end_in_one_line_before_anything_is_written(ixi_model, synthetic_root, tmp_path, capsys):
    cfg, folder = ixi_model
    files = find_subjects("ixi", synthetic_root / "ixi", ("t1", "t2"))
    sid = sorted(files)[0]
    (tmp_path / "t1_only").mkdir()
    (tmp_path / "t1_only" / f"{sid}_t1.nii.gz").write_bytes(Path(files[sid]["t1"]).read_bytes())
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / f"{sid}_pred.nii.gz").write_bytes(b"an earlier prediction")
    (tmp_path / "in").mkdir()
    for m in ("t1", "t2"):
        (tmp_path / "in" / f"{sid}_{m}.nii.gz").write_bytes(Path(files[sid][m]).read_bytes())
    cases = {
        "missing input": ([str(folder), str(tmp_path / "nowhere"), str(tmp_path / "o1")], "nowhere does not exist"),
        "a modality missing": ([str(folder), str(tmp_path / "t1_only"), str(tmp_path / "o2")],
                               f"subject {sid} lacks t2"),
        "no model": ([str(tmp_path), str(tmp_path / "in"), str(tmp_path / "o3")], "holds no model.safetensors"),
        "unknown version": (["models:/ixi_hippocampus/9", str(tmp_path / "in"), str(tmp_path / "o4"),
                             "--mlflow-uri", f"sqlite:///{tmp_path / 'none.db'}"], "no MLflow store at"),
        "would overwrite": ([str(folder), str(tmp_path / "in"), str(tmp_path / "done")], "--overwrite"),
    }
    for name, (argv, says) in cases.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("[tlcore] error:") and says in err and "\n" not in err, (name, err)
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3", "o4")) and not (tmp_path / "none.db").exists()
    assert (tmp_path / "done" / f"{sid}_pred.nii.gz").read_bytes() == b"an earlier prediction"


def test_the_command_answers_help_without_torch():
    code = ("import sys, runpy\nsys.argv = ['predict', '--help']\n"
            "try:\n    runpy.run_module('tlcore.predict', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'monai', 'mlflow', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip().endswith("[]"), out.stderr

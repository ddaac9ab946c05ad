import gzip
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from tlcore.data.synthetic import write_brats, write_ixi
from tlcore.data.validate import inspect_file, validate_dataset


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture()
def brats(tmp_path, cache):
    root = write_brats(tmp_path / "brats", n_hgg=4, n_lgg=1, shape=(16, 16, 16))
    ids = sorted(p.name for p in (root / "HGG").iterdir())
    return root, ids


def path(root, sid, kind):
    return root / "HGG" / sid / f"{sid}_{kind}.nii.gz"


def save(p, data, affine=None):
    p.write_bytes(gzip.compress(nib.Nifti1Image(data, np.eye(4) if affine is None else affine).to_bytes()))


def errors_of(report):
    return "\n".join(map(str, report.errors))


def test_clean_dataset_passes(brats):
    root, ids = brats
    r = validate_dataset("brats", root)
    assert r.ok and r.subjects == 4 and r.files == 12, r.format()


def test_every_broken_file_is_named_with_a_fix(brats):
    root, ids = brats
    a, b, c, d = ids
    path(root, a, "t2").unlink()                                      # missing modality
    path(root, b, "t1").write_bytes(b"")                              # empty
    raw = path(root, c, "t1").read_bytes()
    path(root, c, "t1").write_bytes(raw[: len(raw) // 2])             # truncated
    plain = gzip.decompress(path(root, d, "t1").read_bytes())
    path(root, d, "t1").write_bytes(plain)                            # .nii.gz that is not gzip
    flipped = bytearray(path(root, d, "t2").read_bytes())
    flipped[len(flipped) // 2] ^= 0x10
    path(root, d, "t2").write_bytes(bytes(flipped))                   # bit flip inside the gzip stream
    r = validate_dataset("brats", root)
    text = errors_of(r)
    assert not r.ok and len(r.errors) == 5, r.format()                 # all of them, not the first
    assert f"{a}_t2.nii.gz: file missing" in text
    assert f"{b}_t1.nii.gz: empty file" in text
    assert f"{c}_t1.nii.gz: truncated or corrupt gzip" in text
    assert f"{d}_t1.nii.gz: named .gz but not gzip-compressed" in text
    assert f"{d}_t2.nii.gz" in text and "damaged" in text.split(f"{d}_t2.nii.gz")[1]


def test_bit_flip_inside_gzip_is_caught(brats):
    """nibabel stops before the gzip CRC, so only a full decompress sees this."""
    root, ids = brats
    p = path(root, ids[0], "t1")
    flipped = bytearray(p.read_bytes())
    flipped[len(flipped) // 2] ^= 0x10
    p.write_bytes(bytes(flipped))
    assert "error" in inspect_file(str(p), False)


def test_geometry_values_and_labels(brats):
    root, ids = brats
    a, b, c, d = ids
    shape = (16, 16, 16)
    save(path(root, a, "t2"), np.ones((16, 16, 12), np.int16))                        # shape
    save(path(root, b, "t2"), np.ones(shape, np.int16), np.diag([-1, -1, 1, 1]) @ np.diag([2, 1, 1, 1]))  # spacing
    t1 = np.ones(shape, np.float32)
    t1[0, 0, 0] = np.nan
    save(path(root, c, "t1"), t1, np.diag([-1.0, -1.0, 1.0, 1.0]))                    # NaN
    seg = np.zeros(shape, np.uint8)
    seg[2:4, 2:4, 2:4] = 3
    save(path(root, d, "seg"), seg, np.diag([-1.0, -1.0, 1.0, 1.0]))                  # label 3 does not exist
    r = validate_dataset("brats", root)
    text = errors_of(r)
    assert f"{a}_t2.nii.gz: shape [16, 16, 12] differs" in text
    assert f"{b}_t2.nii.gz: voxel spacing" in text
    assert f"{c}_t1.nii.gz: 1 NaN/Inf voxels" in text
    assert f"{d}_seg.nii.gz: label values [3] outside the expected [0, 1, 2, 4]" in text


def test_4d_affine_empty_target_and_duplicates(brats):
    root, ids = brats
    a, b, c, _ = ids
    save(path(root, a, "t1"), np.ones((16, 16, 16, 3), np.int16), np.diag([-1.0, -1.0, 1.0, 1.0]))
    shifted = np.diag([-1.0, -1.0, 1.0, 1.0])
    shifted[:3, 3] = 5
    save(path(root, b, "t2"), np.ones((16, 16, 16), np.int16), shifted)
    save(path(root, c, "seg"), np.where(np.arange(16 ** 3).reshape(16, 16, 16) < 50, 2, 0).astype(np.uint8),
         np.diag([-1.0, -1.0, 1.0, 1.0]))                                            # edema only: no tumour core
    shutil.copytree(root / "HGG" / a, root / "LGG" / a)
    r = validate_dataset("brats", root)
    text = errors_of(r)
    assert f"{a}_t1.nii.gz: 4D image [16, 16, 16, 3]" in text
    assert f"{b}_t2.nii.gz: affine differs" in text
    assert f"{a}: subject id in both HGG and LGG" in text
    assert any(f"{c}_seg.nii.gz" in str(w) and "empty target" in str(w) for w in r.warnings)


def test_ixi_duplicates_and_missing_label(tmp_path, cache):
    root = write_ixi(tmp_path / "ixi", n=3, shape=(16, 16, 16))
    first = next((root / "IXI-T1").glob("IXI002-*"))
    shutil.copy(first, root / "IXI-T1" / "IXI002-HH-9999-T1.nii.gz")
    (root / "labels" / "IXI003-HH-0835-seg.nii.gz").unlink()
    text = errors_of(validate_dataset("ixi", root))
    assert "2 T1 images for subject IXI002" in text
    assert "IXI003-seg.nii.gz: file missing" in text


def test_cache_skips_unchanged_files_and_rereads_changed_ones(brats):
    root, ids = brats
    first = validate_dataset("brats", root)
    second = validate_dataset("brats", root)
    assert first.cached == 0 and second.cached == second.files == 12
    path(root, ids[0], "t1").write_bytes(b"")
    third = validate_dataset("brats", root)
    assert third.cached == 11 and "empty file" in errors_of(third)


def test_command_line(brats):
    root, ids = brats
    ok = subprocess.run([sys.executable, "-m", "tlcore.data.validate", "brats", "--data-dir", str(root)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "0 error(s)" in ok.stdout
    path(root, ids[1], "seg").unlink()
    bad = subprocess.run([sys.executable, "-m", "tlcore.data.validate", "brats", "--data-dir", str(root)],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and f"{ids[1]}_seg.nii.gz: file missing" in bad.stdout


def test_a_broken_brats_set_is_named_without_a_traceback(brats):
    """Inputs that used to crash the validator: each is named with its file and a fix."""
    root, ids = brats
    a, b, c, d = ids
    seg = np.zeros((16, 16, 16), np.float32)
    seg[5:8, 5:8, 5:8], seg[2, 2, 2] = 1, np.nan
    save(path(root, a, "seg"), seg)                                   # NaN in a float segmentation
    path(root, b, "t1").unlink()
    path(root, b, "t1").mkdir()                                       # a folder where an image should be
    save(path(root, c, "t2"), np.zeros((16, 0, 16), np.float32))     # an empty axis
    save(path(root, d, "t1"), np.zeros((16, 16, 16), np.float32))    # an all-zero modality
    out = subprocess.run([sys.executable, "-m", "tlcore.data.validate", "brats", "--data-dir", str(root)],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stdout + out.stderr, out.stdout + out.stderr
    assert f"{a}_seg.nii.gz: 1 NaN/Inf voxels" in out.stdout
    assert f"{b}_t1.nii.gz: a folder where a NIfTI file is expected" in out.stdout
    assert f"{c}_t2.nii.gz: no voxels (shape [16, 0, 16])" in out.stdout and "1D image" not in out.stdout
    assert f"{d}_t1.nii.gz: every voxel is 0: a blank t1 image" in out.stdout


def test_an_internal_error_says_so_and_has_its_own_exit_code(brats):
    root, _ = brats
    script = ("import sys, tlcore.data.validate as v\n"
              "def broken(*a, **k): raise KeyError('a bug')\n"
              "v.validate_dataset = broken\n"
              f"sys.exit(v.main(['brats', '--data-dir', {str(root)!r}]))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 3 and "internal error of the validator" in out.stderr and "a bug in tlcore" in out.stderr

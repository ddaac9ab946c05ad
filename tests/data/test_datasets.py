import json

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import SWEEP_VOLUME

from tlcore.data.layouts import DatasetLayoutError, default_label_map, find_brats, find_ixi
from tlcore.data.pipeline import PatchSampler, SubjectLoadError, load_subject, map_labels
from tlcore.data.splits import read_splits, split_subjects, write_splits
from tlcore.data.synthetic import ensure_synthetic, write_brats


def test_brats_layout_and_labels(synthetic_root):
    root = synthetic_root / "brats"
    hgg = sorted(p.name for p in (root / "HGG").iterdir())
    assert len(hgg) == 12 and len(list((root / "LGG").iterdir())) == 2
    sid = hgg[0]
    for suffix in ("t1", "t1ce", "t2", "flair", "seg"):
        assert (root / "HGG" / sid / f"{sid}_{suffix}.nii.gz").exists()
    labels = set()
    for sid in hgg:
        labels |= set(np.unique(nib.load(root / "HGG" / sid / f"{sid}_seg.nii.gz").get_fdata()).astype(int))
    assert labels == {0, 1, 2, 4}
    assert any(s.startswith("Brats18_CBICA_") for s in hgg) and any(s.startswith("Brats18_2013_") for s in hgg)


def test_ixi_layout_and_freesurfer_codes(synthetic_root):
    root = synthetic_root / "ixi"
    t1 = sorted((root / "IXI-T1").glob("*.nii.gz"))
    assert len(t1) == 10 and t1[0].name == "IXI002-Guys-0828-T1.nii.gz"
    assert (root / "IXI-T2" / "IXI002-Guys-0828-T2.nii.gz").exists()
    seg = nib.load(root / "labels" / "IXI002-Guys-0828-seg.nii.gz").get_fdata()
    assert {17, 53} <= set(np.unique(seg).astype(int))


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = write_brats(tmp_path / "a", n_hgg=2, n_lgg=0, shape=(16, 16, 16), seed=3)
    b = write_brats(tmp_path / "b", n_hgg=2, n_lgg=0, shape=(16, 16, 16), seed=3)
    c = write_brats(tmp_path / "c", n_hgg=2, n_lgg=0, shape=(16, 16, 16), seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*.nii.gz"))
    assert files and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)


def test_ensure_synthetic_reuses_matching_data(tmp_path):
    root = ensure_synthetic(tmp_path / "ixi", "ixi", seed=0, shape=(16, 16, 16), n=3)
    f = next(root.rglob("*-T1.nii.gz"))
    mtime = f.stat().st_mtime_ns
    ensure_synthetic(tmp_path / "ixi", "ixi", seed=0, shape=(16, 16, 16), n=3)
    assert f.stat().st_mtime_ns == mtime
    assert json.loads((root / "tlcore_synthetic.json").read_text())["n"] == 3


def test_find_subjects(synthetic_root):
    brats = find_brats(synthetic_root / "brats")
    assert len(brats) == 12  # HGG only, as the thesis
    assert set(next(iter(brats.values()))) == {"t1", "t2", "label"}
    ixi = find_ixi(synthetic_root / "ixi")
    assert sorted(ixi)[:2] == ["IXI002", "IXI003"] and ixi["IXI002"]["label"].endswith("IXI002-Guys-0828-seg.nii.gz")


def test_missing_files_are_all_named(tmp_path):
    root = write_brats(tmp_path, n_hgg=3, n_lgg=0, shape=(16, 16, 16))
    victims = sorted((root / "HGG").iterdir())
    (victims[0] / f"{victims[0].name}_t2.nii.gz").unlink()
    (victims[1] / f"{victims[1].name}_seg.nii.gz").unlink()
    with pytest.raises(DatasetLayoutError) as e:
        find_brats(root)
    assert f"{victims[0].name}_t2.nii.gz" in str(e.value) and f"{victims[1].name}_seg.nii.gz" in str(e.value)
    with pytest.raises(DatasetLayoutError, match="HGG"):
        find_brats(tmp_path / "nowhere")


def test_splits_disjoint_reproducible_and_roundtrip(tmp_path):
    ids = [f"s{i:03d}" for i in range(210)]
    s = split_subjects(ids, (0.5, 0.3, 0.2), seed=1)
    assert [len(s[k]) for k in ("train", "val", "test")] == [105, 63, 42]  # the thesis's BraTS split
    assert not (set(s["train"]) & set(s["val"])) and not (set(s["val"]) & set(s["test"]))
    assert set(s["train"]) | set(s["val"]) | set(s["test"]) == set(ids)
    assert split_subjects(reversed(ids), (0.5, 0.3, 0.2), seed=1) == s
    assert split_subjects(ids, (0.5, 0.3, 0.2), seed=2) != s
    assert read_splits(write_splits(tmp_path / "splits.json", s)) == s


def test_label_maps():
    raw = torch.tensor([0, 1, 2, 4, 17, 53, 3])
    assert map_labels(raw, default_label_map("brats")).tolist() == [0, 1, 0, 1, 0, 0, 0]  # core = 1 + 4
    assert map_labels(raw, default_label_map("ixi")).tolist() == [0, 0, 0, 0, 1, 2, 0]


def _subjects(root, n=4):
    files = find_brats(root)
    return [load_subject(sid, f, ("t1", "t2"), default_label_map("brats"), 2, (16, 16, 16))
            for sid, f in list(files.items())[:n]]


def test_zscore_inside_brain(synthetic_root):
    s = _subjects(synthetic_root / "brats", 1)[0]
    assert s.image.shape == (2, *SWEEP_VOLUME) and s.label.shape == (1, *SWEEP_VOLUME)
    for c in range(2):
        v = s.image[c][s.image[c] != 0]  # each modality's own brain mask
        assert abs(float(v.mean())) < 1e-3 and abs(float(v.std()) - 1) < 1e-2
    assert set(s.label.unique().tolist()) == {0, 1}


def test_weighted_sampler_finds_rare_class_more_often(synthetic_root):
    subjects = _subjects(synthetic_root / "brats")
    fg = {}
    for name in ("weighted", "uniform"):
        sampler = PatchSampler(subjects, (8, 8, 8), 2, name, augment=False, seed=0)  # a fraction of the volume
        hits = [bool((sampler.next_batch()[1][i] > 0).any()) for _ in range(100) for i in range(2)]
        fg[name] = np.mean(hits)
    # weighted: background or tumour core first (1/2 each), then a voxel of it: over half the
    # patches hold tumour, whatever its size; uniform: as often as the tumour's size allows
    assert fg["weighted"] > 0.5 and fg["weighted"] > fg["uniform"] + 0.15, fg


def test_patches_shapes_augmentation_and_seed(synthetic_root):
    subjects = _subjects(synthetic_root / "brats")
    a = PatchSampler(subjects, (16, 12, 8), 3, "weighted", augment=True, seed=5)
    x, y = a.next_batch()
    assert x.shape == (3, 2, 16, 12, 8) and y.shape == (3, 1, 16, 12, 8) and y.dtype == torch.int64
    assert set(y.unique().tolist()) <= {0, 1}  # nearest-neighbour labels survive the affine
    b = PatchSampler(subjects, (16, 12, 8), 3, "weighted", augment=True, seed=5)
    assert torch.equal(b.next_batch()[0], x)
    plain = PatchSampler(subjects, (16, 12, 8), 3, "weighted", augment=False, seed=5)
    assert not torch.equal(plain.next_batch()[0], x)


def test_unaugmented_patch_is_the_window_and_identity_affine_matches_it():
    """The grid_sample path with no rotation and no scaling reproduces a plain crop, voxel for voxel."""
    from tlcore.data.pipeline import Subject, centre_table

    g = torch.Generator().manual_seed(0)
    image, label = torch.randn(2, 20, 18, 16, generator=g), (torch.rand(1, 20, 18, 16, generator=g) > 0.9).long()
    s = Subject("s", image, label, np.eye(4), centre_table(label, 2))
    for seed in range(5):  # fresh samplers: the augmenting one also draws angles from its stream
        crop = PatchSampler([s], (8, 6, 4), 1, "weighted", augment=False, seed=seed)
        same = PatchSampler([s], (8, 6, 4), 1, "weighted", augment=True, seed=seed, rotate_deg=0, scale=0)
        (xa, ya), (xb, yb) = crop.next_batch(), same.next_batch()
        assert torch.allclose(xa, xb, atol=1e-5) and torch.equal(ya, yb)
        hits = [(image[:, i:i + 8, j:j + 6, k:k + 4] == xa[0]).all() for i in range(13) for j in range(13)
                for k in range(13)]
        assert any(hits)  # the patch is a window of the volume


def test_weighted_centres_give_each_class_equal_probability():
    """NiftyNet's balanced sampling: a 1 % class holds the window centre half of the time."""
    from tlcore.data.pipeline import Subject, centre_table

    label = torch.zeros(1, 40, 40, 40, dtype=torch.long)
    label[0, 10:14, 10:30, 10:18] = 1                        # 640 of 64,000 voxels
    s = Subject("s", torch.randn(1, 40, 40, 40), label, np.eye(4), centre_table(label, 2))
    assert s.centres[0] is None and s.centres[1].numel() == 640   # background by rejection, not stored
    sampler = PatchSampler([s], (1, 1, 1), 1, "weighted", augment=False, seed=0)
    centres = [int(sampler.next_batch()[1]) for _ in range(2000)]
    assert abs(np.mean(centres) - 0.5) < 0.05
    uniform = PatchSampler([s], (1, 1, 1), 1, "uniform", augment=False, seed=0)
    assert np.mean([int(uniform.next_batch()[1]) for _ in range(2000)]) < 0.05


def test_shape_mismatch_names_subject(tmp_path):
    root = write_brats(tmp_path, n_hgg=1, n_lgg=0, shape=(16, 16, 16))
    sid, files = next(iter(find_brats(root).items()))
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 12), np.uint8), np.eye(4)), files["label"])
    with pytest.raises(SubjectLoadError, match=f"subject {sid}: image and label shapes differ"):
        load_subject(sid, files, ("t1", "t2"), {1: 1}, 2)


def test_nested_subsets_are_nested_stable_and_inside_train():
    from tlcore.data.splits import check_splits, default_subset_sizes, nested_subsets

    assert default_subset_sizes(105) == [26, 52, 79, 105]  # thesis: S1 = 26, S4 = all
    assert default_subset_sizes(10) == [2, 5, 7, 10]
    train = [f"s{i:03d}" for i in range(105)]
    subsets = nested_subsets(train, seed=3)
    sets = [set(subsets[f"S{k}"]) for k in range(1, 5)]
    assert sets[0] < sets[1] < sets[2] < sets[3] == set(train)
    assert nested_subsets(list(reversed(train)), seed=3) == subsets          # stable across runs
    assert nested_subsets(train, [10, 20, 30, 40], seed=4)["S1"] != nested_subsets(train, [10, 20, 30, 40], seed=3)["S1"]
    with pytest.raises(ValueError, match="must increase"):
        nested_subsets(train, [30, 20, 40, 50])
    bad = {"train": ["a", "b"], "val": ["b"], "test": ["c"], "subsets": {"S1": ["a"], "S2": ["b"]}}
    problems = check_splits(bad)
    assert any("in both train and val" in p for p in problems) and any("nested" in p for p in problems)


def test_dataset_description_for_non_standard_layouts(tmp_path, synthetic_root):
    from tlcore.data.layouts import find_subjects

    src = find_brats(synthetic_root / "brats")
    sid, files = next(iter(src.items()))
    desc = tmp_path / "mydata.yaml"
    desc.write_text(f"root: {synthetic_root / 'brats' / 'HGG'}\n"
                    f"subjects:\n  case1: {{t1: {sid}/{sid}_t1.nii.gz, t2: {files['t2']}, label: {sid}/{sid}_seg.nii.gz}}\n")
    subjects = find_subjects("brats", desc)
    assert subjects == {"case1": files}
    desc.write_text("subjects:\n  case1: {t1: nothere.nii.gz}\n")
    with pytest.raises(DatasetLayoutError, match="case1: no 't2' entry"):
        find_subjects("brats", desc)


@pytest.mark.parametrize("bad", ["../../outside", "a/b", ".hidden", "..", "x\\y"])
def test_subject_ids_that_cannot_name_a_file_are_refused_naming_their_source(tmp_path, synthetic_root, bad):
    """Ids name prediction files (predictions/<id>_pred.nii.gz): `../` would write outside the folder."""
    from tlcore.data.layouts import find_subjects

    files = next(iter(find_brats(synthetic_root / "brats").values()))
    desc = tmp_path / "mydata.json"
    desc.write_text(json.dumps({"subjects": {"ok1": files, bad: files}}))
    with pytest.raises(DatasetLayoutError, match="cannot name a file") as e:
        find_subjects("brats", desc)
    assert str(desc) in str(e.value) and repr(bad) in str(e.value)
    root = write_brats(tmp_path / "brats", n_hgg=2, n_lgg=0, shape=(8, 8, 8))
    case = next((root / "HGG").iterdir())
    hidden = case.rename(case.parent / ".ipynb_checkpoints")
    for f in hidden.iterdir():
        f.rename(hidden / f.name.replace(case.name, hidden.name))
    with pytest.raises(DatasetLayoutError, match="'.ipynb_checkpoints'") as e:
        find_subjects("brats", root)
    assert str(hidden) in str(e.value)

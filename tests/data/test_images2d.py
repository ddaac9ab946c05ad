"""MURA v1.1 and ChestX-ray14 adapters and their validation, on tiny fixtures in the real layouts."""

import numpy as np
import pytest
from PIL import Image

from tlcore.data.chestxray import find_chestxray
from tlcore.data.mura import find_mura
from tlcore.data.splits import split_patients
from tlcore.data.validate import validate_dataset


def png(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 20), dtype=np.uint8)).save(path)


@pytest.fixture()
def mura(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    base = tmp_path / "MURA-v1.1"
    layout = {"train": [("XR_WRIST", "patient00001", "study1_positive", 2), ("XR_WRIST", "patient00002", "study1_negative", 1),
                        ("XR_SHOULDER", "patient00001", "study2_negative", 1), ("XR_SHOULDER", "patient00003", "study1_positive", 2),
                        ("XR_HAND", "patient00004", "study1_negative", 1)],
              "valid": [("XR_WRIST", "patient11185", "study1_positive", 1), ("XR_HAND", "patient11186", "study1_negative", 2)]}
    for split, studies in layout.items():
        paths, labelled = [], []
        for part, patient, study, n in studies:
            rel = f"MURA-v1.1/{split}/{part}/{patient}/{study}"
            for i in range(1, n + 1):
                png(tmp_path / rel / f"image{i}.png", seed=len(paths))
                paths.append(f"{rel}/image{i}.png")
            labelled.append(f"{rel}/,{int(study.endswith('positive'))}")
        (base / f"{split}_image_paths.csv").write_text("\n".join(paths) + "\n")
        (base / f"{split}_labeled_studies.csv").write_text("\n".join(labelled) + "\n")
    return tmp_path


def test_mura_images_studies_and_body_parts(mura):
    images, problems = find_mura(mura)
    assert problems == [] and len(images) == 10
    wrist = [i for i in images if i.body_part == "XR_WRIST" and i.split == "train"]
    assert {(i.patient, i.label) for i in wrist} == {("patient00001", 1), ("patient00002", 0)}
    assert find_mura(mura / "MURA-v1.1")[0] == images  # either folder works as --data-dir
    train_patients = [i.patient for i in images if i.split == "train"]
    s = split_patients(train_patients, [i.patient for i in images if i.split == "valid"], 0.25, seed=0)
    assert not set(s["train"]) & set(s["val"]) and not (set(s["train"]) | set(s["val"])) & set(s["test"])
    assert sorted(s["train"] + s["val"]) == sorted(set(train_patients))
    assert validate_dataset("mura", mura).ok


def test_mura_validation_names_every_problem(mura):
    base = mura / "MURA-v1.1"
    (base / "train/XR_WRIST/patient00002/study1_negative/image1.png").unlink()           # row -> missing image
    png(base / "train/XR_HAND/patient00004/study1_negative/image9.png")                  # image not in CSV
    with open(base / "train_image_paths.csv", "a") as f:
        f.write("MURA-v1.1/train/XR_HAND/patient00004/study1_negative/image1.png\n")     # duplicate line
    studies = (base / "valid_labeled_studies.csv").read_text().splitlines()
    (base / "valid_labeled_studies.csv").write_text(studies[1] + "\n")                   # study without label
    p = base / "train/XR_SHOULDER/patient00003/study1_positive/image2.png"
    p.write_bytes(p.read_bytes()[:60])                                                   # truncated PNG
    r = validate_dataset("mura", mura)
    text = "\n".join(map(str, r.errors))
    assert "patient00002/study1_negative/image1.png: listed in train_image_paths.csv line 3 but missing" in text
    assert "image9.png: image on disk but not in train_image_paths.csv" in text
    assert "listed twice" in text
    assert "patient11185/study1_positive/image1.png: its study" in text and "has no row in valid_labeled_studies.csv" in text
    assert "patient00003/study1_positive/image2.png: unreadable or truncated image" in text
    assert len(r.errors) == 5, r.format()


@pytest.fixture()
def chest(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rows = [("00000001_000.png", "No Finding", "1"), ("00000001_001.png", "Pneumothorax", "1"),
            ("00000002_000.png", "Effusion|Pneumothorax", "2"), ("00000003_000.png", "Effusion", "3"),
            ("00000004_000.png", "No Finding", "4"), ("00000005_000.png", "Pneumothorax", "5"),
            ("00000006_000.png", "No Finding", "6")]
    lines = ["Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position"]
    for k, (name, finding, patient) in enumerate(rows):
        lines.append(f"{name},{finding},0,{patient},50,M,PA")
        png(tmp_path / ("images_001/images" if k % 2 else "images_002/images") / name, seed=k)
    (tmp_path / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "train_val_list.txt").write_text("\n".join(r[0] for r in rows[:5]) + "\n")
    (tmp_path / "test_list.txt").write_text("\n".join(r[0] for r in rows[5:]) + "\n")
    return tmp_path


def test_chestxray_finding_vs_no_finding(chest):
    images, problems = find_chestxray(chest, "Pneumothorax")
    assert problems == []
    by_name = {i.path.rsplit("/", 1)[1]: i for i in images}
    assert "00000003_000.png" not in by_name  # only another finding: neither class
    assert by_name["00000002_000.png"].label == 1 and by_name["00000004_000.png"].label == 0
    assert {i.split for i in images if i.patient == "5"} == {"test"}
    assert validate_dataset("chestxray", chest).ok
    typo = validate_dataset("chestxray", chest, finding="Pneumothrax")
    assert [str(e) for e in typo.errors] == [f"{chest}: no image labelled 'Pneumothrax': check the finding's spelling"]


def test_chestxray_validation(chest):
    (chest / "images_002/images/00000004_000.png").unlink()                    # CSV row, no image
    png(chest / "images_001/images/00000099_000.png")                          # image, no CSV row
    with open(chest / "test_list.txt", "a") as f:
        f.write("00000001_000.png\n")                                          # patient 1 in both splits
    r = validate_dataset("chestxray", chest)
    text = "\n".join(map(str, r.errors))
    assert "00000004_000.png: row of Data_Entry_2017.csv but the image is missing" in text
    assert "00000099_000.png: image on disk but not in Data_Entry_2017.csv" in text
    assert "1 patient(s) in both train_val and test" in text


def _undecodable_png(path):
    """A PNG whose chunks and CRCs are all valid but whose pixel data does not inflate."""
    import struct
    import zlib

    raw, out, pos = path.read_bytes(), bytearray(), 8
    out += raw[:8]
    while pos < len(raw):
        length, kind = struct.unpack(">I4s", raw[pos:pos + 8])
        data = raw[pos + 8:pos + 8 + length]
        if kind == b"IDAT":
            data = b"\x78\x9c" + bytes((i * 37 + 7) % 256 for i in range(len(data) - 2))  # zlib header, garbage
        out += struct.pack(">I4s", len(data), kind) + data + struct.pack(">I", zlib.crc32(kind + data))
        pos += 12 + length
    path.write_bytes(bytes(out))


def test_inputs_that_used_to_pass_or_crash_are_named(mura, chest):
    base = mura / "MURA-v1.1"
    with open(base / "train_image_paths.csv", "a") as f:
        f.write("MURA-v1.1/train/XR_HAND/../../../../outside.png\n")                 # leaves the dataset
    _undecodable_png(base / "train/XR_HAND/patient00004/study1_negative/image1.png")
    text = "\n".join(map(str, validate_dataset("mura", mura).errors))
    assert "outside.png' points outside the dataset folder" in text
    assert "patient00004/study1_negative/image1.png: unreadable or truncated image" in text

    with open(chest / "Data_Entry_2017.csv", "a") as f:
        f.write("00000007_000.png,No Finding\n")                                       # a short row
    r = validate_dataset("chestxray", chest)
    assert "Data_Entry_2017.csv:9: row without ['Patient ID']" in "\n".join(map(str, r.errors)), r.format()

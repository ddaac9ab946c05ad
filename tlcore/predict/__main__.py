"""A trained model on new scans: segmentations on each input's own grid, or class scores.

    python -m tlcore.predict models:/ixi_hippocampus/1 /data/new_t1_t2 predictions/
    python -m tlcore.predict results/brats_layers/<trial>/checkpoint_000006 case_t1.nii.gz out/
    python -m tlcore.predict models:/mura_densenet121/2 xrays/ out/          # 2D: out/scores.csv

MODEL is a registered model (`models:/<name>/<version>`, an alias or `latest`) in --mlflow-uri, or
a checkpoint folder (model.safetensors beside run_config.json). INPUT is a NIfTI file (its other
modalities are found beside it: `<id>_t2.nii.gz` next to `<id>_t1.nii.gz`) or a folder searched
for them; for a 2D model, a PNG / JPEG or a folder of them. A 3D model writes
`<id>_pred.nii.gz` per subject (class indices 0..K-1 on the input's grid, with its affine, so it
opens aligned in ITK-SNAP or 3D Slicer) and `volumes.csv` (voxels and millilitres per class); a
2D model writes `scores.csv`. Every mistake ends in one line before anything is written.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from tlcore.config import DATASETS_2D, TrialConfig, read_run_config
from tlcore.data.layouts import default_label_map, num_classes
from tlcore.predict.inputs import InputError, find_images, find_scans
from tlcore.tracking.credentials import default_tracking_uri, redact, tracking_uri_flag


def model_folder(model: str, uri: str) -> Path:
    """The folder holding model.safetensors and run_config.json: a registered model's, downloaded
    once per machine, or the checkpoint folder given."""
    if model.startswith("models:/"):
        from tlcore.tracking.model_cache import cached_model

        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():  # reading would create it
            raise InputError(f"no MLflow store at {uri}: train a model first (python sweeps/ixi_source.py) or pass "
                             "--mlflow-uri of the store that registered it")
        return cached_model(uri, model)[1]
    folder = Path(model)
    if not (folder / "model.safetensors").is_file():
        raise InputError(f"{folder} holds no model.safetensors: pass models:/<name>/<version> or a checkpoint "
                         "folder (results/<sweep>/<trial>/checkpoint_*)")
    return folder


def segment(cfg: TrialConfig, folder: Path, subjects: dict[str, dict[str, str]], out: Path) -> list[dict]:
    """Each subject through the evaluation's inference (sliding windows, the network's own
    preprocessing, back onto the input's grid); the rows of volumes.csv."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from tlcore.data.pipeline import load_subject
    from tlcore.evaluation.metrics import labels_on_source_grid, predict_logits, write_prediction
    from tlcore.models.transfer import load_checkpoint
    from tlcore.training.segmentation import amp_dtype, ready_for_inference

    classes = num_classes(cfg)
    model = load_checkpoint(cfg, folder, classes).eval()
    device, channels_last = ready_for_inference(cfg, model, classes)
    codes = {index: code for code, index in (cfg.label_map or default_label_map(cfg.dataset)).items()}
    rows = []
    for sid, files in tqdm(subjects.items(), desc="predict", unit="subject", file=sys.stderr):
        s = load_subject(sid, files, cfg.modalities, {}, classes, cfg.patch_size, with_centres=False,
                         spacing=cfg.spacing or None)
        logits = predict_logits(model, s.image, cfg.roi, device, cfg.sw_batch_size, cfg.sw_overlap,
                                amp_dtype(cfg, device), channels_last)
        pred = labels_on_source_grid(logits, s)
        written = write_prediction(pred, s.source, out / f"{sid}_pred.nii.gz")
        voxel_ml = abs(float(np.linalg.det(s.source_grid.affine[:3, :3]))) / 1000
        counts = torch.bincount(pred.flatten().long().cpu(), minlength=classes)
        rows += [{"subject": sid, "input": s.source, "prediction": str(written), "class": c,
                  "label_code": codes.get(c, ""), "voxels": int(counts[c]), "ml": round(int(counts[c]) * voxel_ml, 3)}
                 for c in range(1, classes)]
    return rows


def score(cfg: TrialConfig, folder: Path, images: list[str]) -> list[dict]:
    """P(positive) of every radiograph, as the evaluation computes it; the rows of scores.csv."""
    import torch
    from tqdm import tqdm

    from tlcore.data.images2d import RadiographDataset
    from tlcore.models.transfer import load_checkpoint
    from tlcore.training.classification import predict_probabilities
    from tlcore.training.device import pick_device

    model = load_checkpoint(cfg, folder, 2)
    loader = torch.utils.data.DataLoader(RadiographDataset(images, [0] * len(images), cfg.image_size), batch_size=16)
    _, probabilities = predict_probabilities(model, tqdm(loader, desc="predict", unit="batch", file=sys.stderr),
                                             pick_device())
    positive = "abnormal" if cfg.dataset == "mura" else cfg.finding.lower().replace(" ", "_")
    return [{"image": i, f"p_{positive}": round(p, 6)} for i, p in zip(images, probabilities)]


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tlcore.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="models:/<name>/<version> (or @alias, /latest), or a checkpoint folder")
    p.add_argument("input", help="a NIfTI file or a folder of them (2D: an image or a folder of PNG / JPEG)")
    p.add_argument("output", help="folder for the predictions (created)")
    p.add_argument("--mlflow-uri", default=None, type=tracking_uri_flag, help=f"registry of MODEL; default {default_tracking_uri()}")
    p.add_argument("--overwrite", action="store_true", help="replace predictions already in OUTPUT")
    args = p.parse_args(argv)
    out = Path(args.output)
    try:
        folder = model_folder(args.model, args.mlflow_uri or default_tracking_uri())
        cfg = read_run_config(folder)
        two_d = cfg.dataset in DATASETS_2D
        inputs = find_images(args.input) if two_d else find_scans(args.input, tuple(cfg.modalities))
        targets = [out / "scores.csv"] if two_d else [out / f"{sid}_pred.nii.gz" for sid in inputs] + [out / "volumes.csv"]
        already = [t for t in targets if t.exists()]
        if already and not args.overwrite:
            raise InputError(f"{already[0]} exists ({len(already)} of the outputs do): pass another output folder, "
                             "or --overwrite to replace them")
        out.mkdir(parents=True, exist_ok=True)
        if two_d:
            write_csv(score(cfg, folder, inputs), out / "scores.csv")
            print(f"[tlcore] {len(inputs)} images scored by {args.model}: {out / 'scores.csv'}")
        else:
            write_csv(segment(cfg, folder, inputs, out), out / "volumes.csv")
            print(f"[tlcore] {len(inputs)} subjects segmented by {args.model}: {out}/<id>_pred.nii.gz "
                  f"(class indices on each input's grid), volumes in {out / 'volumes.csv'}")
    except (InputError, LookupError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"[tlcore] error: {redact(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

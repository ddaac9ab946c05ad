"""What a sweep's Ray tasks run on a worker: the transferability forecast before the trials (on
the source weights the driver hands over), and after them a checkpoint's network rebuilt, its
Dice on whole volumes (with the predictions as bytes), a classifier's probabilities, CKA against
the scratch baseline, the re-initialisation test. A worker never talks to MLflow (it holds no
credential, and progress.prepare_ray_worker keeps mlflow out of it): the tasks return what the driver logs
(sweep.driver, sweep.evaluation). torch, MONAI and the pipeline are imported inside the functions,
in the worker: the driver, which only sends the tasks, never loads them (~7 CPU-s for MONAI).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tlcore.config import TrialConfig
from tlcore.data.layouts import num_classes


def checkpoint_model(cfg: TrialConfig, directory, classes: int):
    """The network saved in a checkpoint folder, built in the task's worker with the trial's threads."""
    import torch

    from tlcore.models.transfer import load_checkpoint

    torch.set_num_threads(cfg.num_threads or 1)
    return load_checkpoint(cfg, directory, classes)


def evaluate_checkpoint(config: dict, checkpoint_dir: str, split: str = "test", predictions: bool = False) -> dict:
    """Whole-volume Dice of a checkpoint on one split (run as a Ray task next to the data).
    With `predictions`, also the NIfTI predictions of a val or test split (on each input's grid,
    with its affine and header) as {file name: bytes}, for the driver to log: a task never talks
    to MLflow (no credential on the nodes)."""
    from tlcore.evaluation.metrics import evaluate_subjects
    from tlcore.training.segmentation import amp_dtype, ready_for_inference
    from tlcore.training.trial_start import load_split

    cfg = TrialConfig.from_dict(config)
    model = checkpoint_model(cfg, checkpoint_dir, num_classes(cfg))
    device, channels_last = ready_for_inference(cfg, model, num_classes(cfg))
    with tempfile.TemporaryDirectory() as out:
        keep = out if predictions and split != "train" else None
        ev = evaluate_subjects(model, load_split(cfg, split), num_classes(cfg), cfg.roi, device, None,
                               cfg.sw_batch_size, cfg.sw_overlap, amp_dtype(cfg, device),
                               channels_last, keep)
        files = {f.name: f.read_bytes() for f in sorted(Path(out).iterdir()) if f.is_file()} if keep else {}
    return {f"{split}_dice": ev["dice"], "per_subject": ev["per_subject"], **({"predictions": files} if predictions else {})}


def evaluate_classifier(config: dict, checkpoint_dir: str, split: str = "test") -> dict:
    """P(positive) of every image of a split, with the ids needed for study-wise metrics."""
    import torch

    from tlcore.data.images2d import RadiographDataset
    from tlcore.training.classification import predict_probabilities
    from tlcore.training.device import pick_device
    from tlcore.training.trial_start import load_images

    cfg = TrialConfig.from_dict(config)
    model = checkpoint_model(cfg, checkpoint_dir, classes=2)
    images = load_images(cfg, split)
    ds = RadiographDataset([i.path for i in images], [i.label for i in images], cfg.image_size)
    y, p = predict_probabilities(model, torch.utils.data.DataLoader(ds, batch_size=32), pick_device())
    return {"label": y, "prob": p, "path": [i.path for i in images],
            "study": [getattr(i, "study", i.path) for i in images],
            "body_part": [getattr(i, "body_part", "") for i in images]}


def evaluate_segmentation_task(config: dict, checkpoint, split: str, predictions: bool = False) -> dict:
    """The Ray task: a Tune checkpoint's Dice on one split (evaluate_checkpoint)."""
    with checkpoint.as_directory() as d:
        return evaluate_checkpoint(config, d, split, predictions)


def evaluate_classifier_task(config: dict, checkpoint, split: str = "test") -> dict:
    """The Ray task: a Tune checkpoint's probabilities on one split (evaluate_classifier)."""
    with checkpoint.as_directory() as d:
        return evaluate_classifier(config, d, split)


def cka_with_scratch_task(config: dict, checkpoint, scratch_config: dict, scratch_checkpoint) -> dict:
    """The Ray task: every group's CKA between a trial's and its scratch baseline's best checkpoints."""
    import torch

    from tlcore.training.device import pick_device
    from tlcore.training.trial_start import load_split, make_probe, probe_inputs

    def load(cfg: TrialConfig, ckpt):
        with ckpt.as_directory() as d:
            return checkpoint_model(cfg, d, num_classes(cfg)).to(device)

    cfg, scratch_cfg, device = TrialConfig.from_dict(config), TrialConfig.from_dict(scratch_config), pick_device()
    torch.set_num_threads(cfg.num_threads or 1)  # before the probe volumes are loaded and normalised
    inputs = probe_inputs(cfg, load_split(cfg, "val"))
    probe = make_probe(cfg, load(scratch_cfg, scratch_checkpoint), inputs, device)
    return {k.replace("cka.", "cka_vs_scratch."): v for k, v in probe.cka(load(cfg, checkpoint)).items()
            if k.startswith("cka.")}


def reinit_drops_task(config: dict, checkpoint, source_weights: dict[str, bytes],
                      trained_dice: float | None = None) -> dict[str, float]:
    """The Ray task: the re-initialisation test (analysis.reuse) of a trial's best checkpoint on
    the validation subjects, each group reset to the trial's start (rebuilt from its config and
    the source weights the driver read). `trained_dice`: the checkpoint's whole-volume validation
    Dice, when the evaluation measured it already."""
    from tlcore.analysis.reuse import reinit_drops
    from tlcore.evaluation.metrics import evaluate_subjects
    from tlcore.training.segmentation import amp_dtype, ready_for_inference
    from tlcore.training.trial_start import load_split, start_model, use_source_weights

    cfg = TrialConfig.from_dict(config)
    classes = num_classes(cfg)
    use_source_weights(source_weights)
    start = start_model(cfg)
    with checkpoint.as_directory() as d:
        model = checkpoint_model(cfg, d, classes)
    device, channels_last = ready_for_inference(cfg, model, classes)
    val = load_split(cfg, "val")

    def dice(m) -> float:
        return evaluate_subjects(m, val, classes, cfg.roi, device, None, cfg.sw_batch_size, cfg.sw_overlap,
                                 amp_dtype(cfg, device), channels_last)["dice"]

    return reinit_drops(model, start, dice, trained_dice)


def forecast_task(config: dict, depths: list[int], source_weights: dict[str, bytes],
                  meanvar: bool = False) -> dict[str, dict[int, float]]:
    """The Ray task: the layer sweep's forecast per freeze depth (analysis.forecast.forecast_sweep:
    the source's LogME, its untrained baseline and the gain), with the trial's resources (a GPU
    node on clusters), from the source weights the driver read."""
    from tlcore.analysis.forecast import forecast_sweep
    from tlcore.training.trial_start import use_source_weights

    use_source_weights(source_weights)
    return forecast_sweep(config, depths, meanvar=meanvar)

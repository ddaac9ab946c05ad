"""What a trial starts from, a function of its run config alone: the subjects or images of its
splits, the network (scratch, ImageNet or a registered source, k layer groups frozen), the
patch sampler or data loaders. No Ray here: trials (trainables) and evaluation (results) use it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, NamedTuple

import torch

from tlcore.config import DATASETS_2D, MEANVAR, TrialConfig, weights_of
from tlcore.data.layouts import default_label_map, find_subjects, num_classes
from tlcore.data.splits import read_splits, training_ids
from tlcore.models.networks import build_network
from tlcore.models.probes import LayerProbe, WeightMovement, probe_patches
from tlcore.models.transfer import TransferReport, freeze_first, load_source, mean_var_init, read_weights
from tlcore.training.device import pick_device, seed_everything, staging_device

if TYPE_CHECKING:  # the 3D pipeline is MONAI's: imported where a 3D trial needs it, never in a 2D one
    from tlcore.data.pipeline import PatchSampler

_SUBJECT_CACHE: dict = {}  # per worker process; reuse_actors=True keeps it across trials
_SOURCE_WEIGHTS: dict[str, bytes] = {}  # use_source_weights


def load_split(cfg: TrialConfig, split: str, limit: int | None = None, cache: bool = True) -> list:
    """Subjects of one split (the first `limit`), loaded and normalised once per worker process
    (`cache=False`: loaded for this call only, e.g. in the driver, which keeps running)."""
    from tlcore.data.pipeline import load_subject

    label_map = cfg.label_map or default_label_map(cfg.dataset)
    splits = read_splits(cfg.splits_file)
    ids = (training_ids(splits, cfg.train_subset) if split == "train" else splits[split])[:limit]
    # every grade: the driver's split file decides which subjects take part
    files = find_subjects(cfg.dataset, cfg.data_dir, cfg.modalities, grades=("HGG", "LGG"))
    out = []
    for sid in ids:
        key = (cfg.data_dir, sid, cfg.modalities, tuple(sorted(label_map.items())), cfg.patch_size, cfg.spacing)
        if key not in _SUBJECT_CACHE:
            if sid not in files:
                raise KeyError(f"subject {sid} of {cfg.splits_file} is not in {cfg.data_dir}")
            subject = load_subject(sid, files[sid], cfg.modalities, label_map, num_classes(cfg), cfg.patch_size,
                                   spacing=cfg.spacing or None)
            if not cache:
                out.append(subject)
                continue
            _SUBJECT_CACHE[key] = subject
        out.append(_SUBJECT_CACHE[key])
    return out


def build_start_model(cfg: TrialConfig) -> tuple[torch.nn.Module, TransferReport]:
    """The network a trial starts from: scratch, the source's weights with k groups frozen, or
    the source's Mean-Var control."""
    model = build_network(cfg, num_classes(cfg))
    report = TransferReport(source="scratch")
    if cfg.source_model != "scratch":
        report = load_registered(model, cfg)
    return model, freeze_first(model, cfg.frozen_layers, report)


def start_model(cfg: TrialConfig) -> torch.nn.Module:
    """The network a trial started from, rebuilt after the trial as start_segmentation built it
    (seeded the same way first): the re-initialisation test's reference."""
    seed_everything(cfg.seed, cfg.deterministic)
    return build_start_model(cfg)[0]


def use_source_weights(sources: dict[str, bytes] | None) -> None:
    """The source models the driver read (pinned model URI -> safetensors bytes, driver.resolve_source);
    a trial gets them from Ray's object store (tune.with_parameters). Trials never ask the registry,
    so no node needs an MLflow credential (the driver is the only MLflow client)."""
    _SOURCE_WEIGHTS.update(sources or {})


def registered_weights(cfg: TrialConfig) -> tuple[str, dict[str, torch.Tensor]]:
    """(pinned URI, state dict) of the registered model a start uses: the weights the driver
    handed the trial (or the forecast task), else (notebooks, a process with MLflow) from the registry."""
    model_uri = weights_of(cfg.source_model)
    if model_uri in _SOURCE_WEIGHTS:  # a trial's config names the pinned version the driver read
        from safetensors.torch import load

        return model_uri, load(_SOURCE_WEIGHTS[model_uri])
    # imported here: it is MLflow's client, and a trial's worker never loads MLflow (progress.prepare_ray_worker)
    from tlcore.tracking.model_cache import cached_model

    ref, folder = cached_model(cfg.tracking_uri, model_uri)
    return ref.uri, read_weights(folder / "model.safetensors")


def load_registered(model: torch.nn.Module, cfg: TrialConfig) -> TransferReport:
    """Copy the registered source model's weights into `model`, or, for a meanvar: start, draw
    them from each source tensor's mean and variance (seeded by the trial's seed)."""
    uri, state = registered_weights(cfg)
    if cfg.source_model.startswith(MEANVAR):
        return mean_var_init(model, state, cfg.seed, source=MEANVAR + uri)
    return load_source(model, state, source=uri)


# Probe patches are at most 16^3. CKA's uncertainty is mostly which patches were drawn, not which
# voxels in them: 128 patches (TrialConfig.probe_patches) narrow the interval to at most 0.06, and
# at 16^3 their forward pass stays under 3 % of a report interval even with 24^3 training patches
# on a CPU (at 24^3: 5.1 %). bench/RESULTS.md, "CKA's interval".
PROBE_SIZE = 16


def probe_inputs(cfg: TrialConfig, val) -> torch.Tensor:
    """The fixed validation inputs CKA is measured on, the same for every trial of a sweep: 3D,
    patches from the validation subjects (`val`); 2D, evenly spaced validation images (`val` is
    the validation DataLoader)."""
    if cfg.dataset in DATASETS_2D:
        n = min(cfg.probe_patches, len(val.dataset))
        return torch.stack([val.dataset[i * len(val.dataset) // n][0] for i in range(n)])
    return probe_patches(val, tuple(min(p, PROBE_SIZE) for p in cfg.patch_size), cfg.probe_patches)


def layer_analysis(cfg: TrialConfig, model: torch.nn.Module, val, device: torch.device):
    """What each report measures besides its metric, as a function model -> metrics: every
    group's weight movement from `model`'s starting weights, and with a source, every group's CKA
    with the source model (a meanvar: start's too: how far is it from the features it lacks?) on
    `probe_inputs`. None when cfg.probe_patches is 0."""
    if not cfg.probe_patches:
        return None
    movement, probe = WeightMovement(model), None
    if cfg.source_model != "scratch":
        build = build_start_classifier if cfg.dataset in DATASETS_2D else build_start_model
        with torch.random.fork_rng(devices=[]):  # building the reference must not shift the trial's random stream
            source = build(replace(cfg, source_model=weights_of(cfg.source_model), frozen_layers=0))[0]
        probe = make_probe(cfg, source.to(device), probe_inputs(cfg, val), device)
    return lambda m: {**movement(m), **(probe.cka(m) if probe else {})}


def make_probe(cfg: TrialConfig, reference: torch.nn.Module, inputs: torch.Tensor, device: torch.device) -> LayerProbe:
    """The CKA probe on `inputs` (probe_inputs): 3D patches alternate foreground-centred and
    anywhere (probe_patches), and the bootstrap keeps that half-and-half in every resample. 2D:
    the value only (DenseNet's groups have up to 1,024 channels: the interval's per-image
    channel x channel sums would take gigabytes)."""
    if cfg.dataset in DATASETS_2D:
        return LayerProbe(reference, inputs, device, minibatch=min(8, len(inputs)), resamples=0)
    return LayerProbe(reference, inputs, device, minibatch=min(8, len(inputs)), strata=torch.arange(len(inputs)) % 2)


class SegmentationStart(NamedTuple):
    """What a 3D trial starts from."""
    model: torch.nn.Module
    transfer: TransferReport     # what was loaded, re-initialised and frozen
    sampler: PatchSampler        # training patches, seeded by the trial
    val: list                    # validation subjects
    device: torch.device


class ClassifierStart(NamedTuple):
    """What a 2D trial starts from."""
    model: torch.nn.Module
    transfer: TransferReport
    train_dl: object             # fastai / torch DataLoaders, seeded by the trial
    val_dl: object


def start_segmentation(cfg: TrialConfig) -> SegmentationStart:
    """What a 3D trial starts from, a function of its config alone (the seed first: Ray reuses
    worker processes, and the model's initial weights come from the random state)."""
    from tlcore.data.pipeline import PatchSampler

    torch.set_num_threads(cfg.num_threads or 1)
    seed_everything(cfg.seed, cfg.deterministic)
    model, transfer = build_start_model(cfg)
    train = load_split(cfg, "train")
    device = pick_device()
    sampler = PatchSampler(train, cfg.patch_size, cfg.batch_size, cfg.sampler, cfg.augment, cfg.seed,
                           device=staging_device(train, device))
    return SegmentationStart(model, transfer, sampler, load_split(cfg, "val"), device)


def runtime_summary(device: torch.device, bf16: bool, layout: str, **more) -> dict:
    """Where and how a trial ran, for its run's tags (runs of one sweep may differ by node)."""
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "precision": "bf16 autocast" if bf16 else "fp32", "layout": layout, **more}


def transfer_summary(r: TransferReport) -> dict:
    return {**r.counts(), "source": r.source, "frozen": ",".join(r.frozen_groups) or "none",
            "reinitialised": ",".join(r.reinitialised) or "none"}


def load_images(cfg: TrialConfig, split: str) -> list:
    """Images (MuraImage / ChestImage records) of the patients in one split."""
    patients = set(read_splits(cfg.splits_file)[split])
    if cfg.dataset == "mura":
        from tlcore.data.mura import find_mura
        images = find_mura(cfg.data_dir)[0]
    else:
        from tlcore.data.chestxray import find_chestxray
        images = find_chestxray(cfg.data_dir, cfg.finding)[0]
    return [i for i in images if i.patient in patients]


def build_start_classifier(cfg: TrialConfig) -> tuple[torch.nn.Module, TransferReport]:
    """DenseNet121 + fastai head from scratch, ImageNet (hub cache or a local file) or a registered model."""
    from tlcore.training.classification import load_imagenet

    model = build_network(cfg, num_classes=2)
    src, mean_var_seed = weights_of(cfg.source_model), cfg.seed if cfg.source_model.startswith(MEANVAR) else None
    if src == "scratch":
        report = TransferReport(source="scratch")
    elif src.startswith("models:/"):
        report = load_registered(model, cfg)
    else:  # ImageNet: the hub cache, or a local file of torchvision's DenseNet121 weights
        report = load_imagenet(model, None if src == "imagenet" else src, mean_var_seed)
    return model, freeze_first(model, cfg.frozen_layers, report)


def start_classifier(cfg: TrialConfig, start_epoch: int = 0) -> ClassifierStart:
    """What a 2D trial starts from, a function of its config alone (seeded before the model is
    built: the fastai head's weights and dropout come from the random state)."""
    from tlcore.training.classification import image_loaders

    torch.set_num_threads(cfg.num_threads or 1)
    seed_everything(cfg.seed, cfg.deterministic)
    model, transfer = build_start_classifier(cfg)
    train_dl, val_dl = image_loaders(cfg, load_images(cfg, "train"), load_images(cfg, "val"), start_epoch)
    return ClassifierStart(model, transfer, train_dl, val_dl)  # fit_classifier seeds dropout per epoch


"""The functions Ray Tune runs as trials: one segmentation (3D) or classification (2D) trial each,
from its start (training.trial_start) to its reports and checkpoints. A trial never talks to
MLflow: its reports reach the driver, whose callbacks (callbacks.py) log them.
"""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import ray.util
from ray import tune

from tlcore.config import TrialConfig
from tlcore.data.layouts import num_classes
from tlcore.sweep.progress import quiet_ray_workers

# Training is imported inside each trial function, in the worker that runs it: the driver imports
# this module only to hand Tune the functions, and importing MONAI costs ~7 CPU-s per process.


def this_node() -> dict:
    """The Ray node a trial (re)starts on, for its run's `runtime.node` / `runtime.node_ip` tags:
    on a cluster, which machine trained it (a restored trial may land elsewhere)."""
    return {"node": socket.gethostname(), "node_ip": ray.util.get_node_ip_address()}


def train_segmentation_trial(config: dict, source_weights: dict | None = None) -> None:
    """Function trainable: train one configuration, report every `report_every` iterations.
    `source_weights`: the registered source models, from the driver (trial_start.use_source_weights)."""
    from tlcore.training.segmentation import (
        amp_dtype,
        choose_channels_last,
        choose_torch_compile,
        read_segmentation_state,
        train_segmentation,
        write_segmentation_checkpoint,
    )
    from tlcore.training.trial_start import (
        layer_analysis,
        runtime_summary,
        start_segmentation,
        transfer_summary,
        use_source_weights,
    )

    quiet_ray_workers()  # also when Ray was initialised without tlcore's setup hook (notebooks, tests)
    use_source_weights(source_weights)
    cfg = TrialConfig.from_dict(config)
    model, transfer, sampler, val, device = start_segmentation(cfg)
    analysis = layer_analysis(cfg, model, val, device)  # before a resume: movement is from the start
    staged_on = sampler.device
    channels_last, layout_choice = choose_channels_last(cfg, device, model, num_classes(cfg))
    compiled, compile_choice = choose_torch_compile(cfg, device)

    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            resume = read_segmentation_state(Path(d))
    # The transfer report (first start) and where this start runs (every start: a restored trial
    # may land on another node) ride along with the first result; the driver's callback logs them.
    first = {"runtime": runtime_summary(device, amp_dtype(cfg, device) is not None, layout_choice,
                                        volumes_on=staged_on.type, torch_compile=compile_choice,
                                        **this_node())}
    if resume is None:
        first["transfer"] = transfer_summary(transfer)

    def report(metrics: dict, state: dict) -> None:
        metrics = {**metrics, **(analysis(model) if analysis else {})}
        with tempfile.TemporaryDirectory() as d:
            write_segmentation_checkpoint(Path(d), cfg, model, state)
            tune.report({**metrics, **first}, checkpoint=tune.Checkpoint.from_directory(d))
        first.clear()

    train_segmentation(cfg, model, sampler, val, num_classes(cfg), report, resume, device, channels_last,
                       compiled)


def train_classifier_trial(config: dict, source_weights: dict | None = None) -> None:
    """Function trainable for the 2D chain: one report (and checkpoint) per epoch."""
    from tlcore.training.classification import (
        ReportEachEpoch,
        build_learner,
        classifier_checkpoint_epoch,
        fit_classifier,
        load_classifier_state,
        uses_bf16,
        uses_channels_last,
        write_classifier_checkpoint,
    )
    from tlcore.training.device import pick_device
    from tlcore.training.trial_start import (
        layer_analysis,
        runtime_summary,
        start_classifier,
        transfer_summary,
        use_source_weights,
    )

    quiet_ray_workers()  # also when Ray was initialised without tlcore's setup hook (notebooks, tests)
    use_source_weights(source_weights)
    cfg = TrialConfig.from_dict(config)
    start_epoch = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            start_epoch = classifier_checkpoint_epoch(Path(d))
    model, transfer, train_dl, val_dl = start_classifier(cfg, start_epoch)
    device = pick_device()
    analysis = layer_analysis(cfg, model, val_dl, device)  # before a resume: movement is from the start
    first = {"runtime": runtime_summary(device, uses_bf16(cfg, device),
                                        "channels-last" if uses_channels_last(cfg, device) else "NCHW", **this_node())}
    if not checkpoint:
        first["transfer"] = transfer_summary(transfer)

    def report(metrics: dict, learn) -> None:
        metrics = {**metrics, **(analysis(learn.model) if analysis else {})}
        with tempfile.TemporaryDirectory() as d:
            write_classifier_checkpoint(Path(d), cfg, learn, epoch=metrics["iteration"])
            tune.report({**metrics, **first}, checkpoint=tune.Checkpoint.from_directory(d))
        first.clear()

    each_epoch = ReportEachEpoch(report, start_epoch, len(train_dl), cfg.batch_size)
    learn = build_learner(cfg, model, train_dl, val_dl, device, cbs=[each_epoch])
    if checkpoint:
        with checkpoint.as_directory() as d:
            load_classifier_state(learn, Path(d))
    fit_classifier(learn, cfg, start_epoch)

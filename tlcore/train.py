"""The training loop for patch-based 3D segmentation: no Ray, no MLflow.

`train_segmentation` reads top to bottom: sample a batch, step, and every `report_every`
iterations evaluate the validation volumes and hand metrics plus a state to `report`, which
the caller (a Tune trainable, a test, a notebook) turns into a checkpoint and logs.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
from monai.losses import DiceCELoss
from torch import nn

from tlcore.config import RunConfig
from tlcore.evaluate import autocast, evaluate_subjects


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def staging_device(subjects, device: torch.device, share: float = 0.4) -> torch.device:
    """Where the training volumes live while patches are drawn: the GPU when image + uint8 label
    of every subject fit in `share` of its free memory (the rest is for the model and the
    activations; fractional trials share the device), else the CPU."""
    if device.type != "cuda":
        return torch.device("cpu")
    need = sum(s.image.numel() * s.image.element_size() + s.label.numel() for s in subjects)
    free, _ = torch.cuda.mem_get_info(device)
    return device if need < share * free else torch.device("cpu")


def amp_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype | None:
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def use_channels_last(cfg: RunConfig, device: torch.device) -> bool:
    return cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cuda")


def build_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """Adam with an L2 penalty (coupled weight decay) on the parameters that train."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig):
    """Per-iteration schedule over `max_iterations` (the thesis used a constant rate)."""
    n = cfg.max_iterations
    if cfg.lr_schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=n, eta_min=cfg.lr * 1e-2)
    if cfg.lr_schedule == "poly":  # nnU-Net's (1 - t/T)^0.9
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: (1 - min(it, n - 1) / n) ** 0.9)
    if cfg.lr_schedule == "one_cycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=n + 1)
    raise ValueError(f"lr_schedule={cfg.lr_schedule!r}: choose constant, cosine, poly or one_cycle")


def build_loss() -> nn.Module:
    return DiceCELoss(to_onehot_y=True, softmax=True)


def train_segmentation(cfg: RunConfig, model: nn.Module, sampler, val_subjects, num_classes: int,
                       report: Callable[[dict, dict], None], resume: dict | None = None,
                       device: torch.device | None = None) -> dict:
    """Train until `cfg.max_iterations`; call `report(metrics, state)` every `report_every`.

    `state` holds model / optimizer / scheduler state dicts and the iteration; passing it
    back as `resume` continues where it stopped. Returns the last metrics.
    """
    device = device or pick_device()
    dtype, cl = amp_dtype(cfg, device), use_channels_last(cfg, device)
    model.to(device)
    if cl:
        model.to(memory_format=torch.channels_last_3d)
    optimizer, loss_fn = build_optimizer(model, cfg), build_loss()
    scheduler = build_scheduler(optimizer, cfg)
    iteration = 0
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        iteration = int(resume["iteration"])
    # A resumed trial draws a fresh but reproducible patch stream from where it stopped.
    sampler.reseed(cfg.seed * 1_000_003 + iteration)
    torch.manual_seed(cfg.seed * 1_000_003 + iteration)

    val = val_subjects[: cfg.max_val_subjects] if cfg.max_val_subjects else val_subjects
    metrics, losses, t0 = {}, [], time.perf_counter()
    while iteration < cfg.max_iterations:
        model.train()
        images, labels = sampler.next_batch()
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if cl:
            images = images.contiguous(memory_format=torch.channels_last_3d)
        with autocast(device, dtype):
            loss = loss_fn(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        iteration += 1
        losses.append(loss.detach())  # no float() here: it would wait for the GPU every step
        if iteration % cfg.report_every == 0 or iteration == cfg.max_iterations:
            train_loss = float(torch.stack(losses).mean())
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"training loss became {train_loss} before iteration {iteration} "
                                         f"(lr={cfg.lr}); lower the learning rate")
            elapsed = time.perf_counter() - t0
            ev = evaluate_subjects(model, val, num_classes, cfg.roi, device, loss_fn,
                                   cfg.sw_batch_size, cfg.sw_overlap, dtype, cl)
            metrics = {"iteration": iteration, "train_loss": train_loss,
                       "val_loss": ev["loss"], "val_dice": ev["dice"],
                       "lr": scheduler.get_last_lr()[0],
                       "patches_per_s": len(losses) * cfg.batch_size / max(elapsed, 1e-9)}
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "iteration": iteration,
                     "val_per_subject": ev["per_subject"]}
            report(metrics, state)
            losses, t0 = [], time.perf_counter()
    return metrics

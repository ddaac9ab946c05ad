"""The training loop for patch-based 3D segmentation: no Ray, no MLflow.

`train_segmentation` reads top to bottom: sample a batch, step, and every `report_every`
iterations evaluate the validation volumes and hand metrics plus a state to `report`, which
the caller (a Tune trainable, a test, a notebook) turns into a checkpoint and logs.
"""

from __future__ import annotations

import copy
import fcntl
import json
import math
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Callable

import torch
from monai.losses import DiceCELoss
from torch import nn

from tlcore.config import TrialConfig, cache_dir, read_json_cache, write_json_atomic, write_run_config
from tlcore.evaluation.metrics import autocast, evaluate_subjects
from tlcore.training.device import pick_device, stream_seed
from tlcore.training.schedules import Schedule


def amp_dtype(cfg: TrialConfig, device: torch.device) -> torch.dtype | None:
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


# Devices where channels_last="auto" measures both layouts; on CPUs it stays off (CPU runs are
# tests and demos, and timings taken next to other trials on a few cores would pick at random).
LAYOUT_MEASURED_ON = ("cuda",)
LAYOUT_MIN_SPEEDUP = 1.05  # channels-last-3d must win clearly: a coin-flip choice would vary between runs


def time_layouts(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                 dtype: torch.dtype | None, steps: int = 3) -> dict[str, float]:
    """Median seconds of a forward + backward training step of a copy of `model` (`model`
    itself is untouched) in NCDHW and channels-last-3d layouts, after one warm-up step."""
    loss_fn, out = build_loss(), {}
    for name, layout in (("ncdhw", torch.contiguous_format), ("channels_last_3d", torch.channels_last_3d)):
        trial_model = copy.deepcopy(model).to(device).to(memory_format=layout).train()
        x, y = images.to(device).contiguous(memory_format=layout), labels.to(device)
        times = []
        for _ in range(steps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with autocast(device, dtype):
                loss = loss_fn(trial_model(x).float(), y)
            loss.backward()
            loss.detach().item()  # waits for the step
            times.append(time.perf_counter() - t0)
            trial_model.zero_grad(set_to_none=True)
        out[name] = statistics.median(times[1:])
        del trial_model
    return out


def layout_key(device: torch.device, model: nn.Module, batch_shape: tuple, dtype: torch.dtype | None) -> str:
    """What the layout timings depend on: the chip, the PyTorch / cuDNN build, the net, the shape."""
    chip = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{os.cpu_count()}"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return (f"{chip} | torch {torch.__version__} cudnn {cudnn} | {type(model).__name__} "
            f"{sum(p.numel() for p in model.parameters())} params | batch {tuple(batch_shape)} | "
            f"{str(dtype).replace('torch.', '') if dtype else 'fp32'}")


def choose_torch_compile(cfg: TrialConfig, device: torch.device) -> tuple[bool, str]:
    """Whether training steps run through torch.compile, and why. `auto`: on a GPU, where it
    paid (bench/RESULTS.md, H200: 1.36x per step after a 16 s compile, predictions as close to
    fp32 as eager bf16's), except under `deterministic` (Inductor's generated kernels are not
    covered by PyTorch's deterministic switch); off on CPU, where it was slower (0.93x)."""
    if cfg.torch_compile != "auto":
        return cfg.torch_compile == "on", f"torch_compile={cfg.torch_compile}"
    if device.type != "cuda":
        return False, f"auto: eager on {device.type}"
    if cfg.deterministic:
        return False, "auto: eager (deterministic)"
    return True, "auto: compiled on cuda"


def choose_channels_last(cfg: TrialConfig, device: torch.device, model: nn.Module,
                         num_classes: int) -> tuple[bool, str]:
    """Whether to train and infer in channels-last-3d, and why.

    `on` / `off` are obeyed. `auto` on a GPU times both layouts once per chip, PyTorch / cuDNN
    build, network and batch shape (a few seconds) and keeps channels-last-3d only when it is
    clearly faster: some cuDNN versions run HighRes3DNet's dilated 3D convolutions slower in it.
    The timings are cached per machine in <cache>/tlcore/layouts.json, so the trials of a sweep
    that share a node agree and only the first one pays.
    """
    if cfg.channels_last != "auto":
        return cfg.channels_last == "on", f"channels_last={cfg.channels_last}"
    if device.type not in LAYOUT_MEASURED_ON:
        return False, f"auto: NCDHW on {device.type}"
    dtype = amp_dtype(cfg, device)
    batch_shape = (cfg.batch_size, len(cfg.modalities), *cfg.patch_size)
    key, path = layout_key(device, model, batch_shape, dtype), cache_dir() / "layouts.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # One trial measures while the node's other trials wait for its answer: trials packed on one
    # GPU would otherwise time each other and could choose differently.
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache = read_json_cache(path)
        if key in cache:
            seen, how = cache[key], "cached"
        else:
            gen = torch.Generator().manual_seed(0)  # not the trial's RNG: its patch stream stays the same
            images = torch.randn(batch_shape, generator=gen)
            labels = torch.randint(0, num_classes, (batch_shape[0], 1, *batch_shape[2:]), generator=gen)
            seen, how = {"s_per_step": time_layouts(model, images, labels, device, dtype),
                         "measured": date.today().isoformat()}, "measured"
            write_json_atomic(path, {**cache, key: seen})
    t = seen["s_per_step"]
    speedup = t["ncdhw"] / t["channels_last_3d"]
    use = speedup >= LAYOUT_MIN_SPEEDUP
    return use, (f"auto: {'channels-last-3d' if use else 'NCDHW'} (channels-last-3d {speedup:.2f}x the "
                 f"speed of NCDHW, {how} {seen['measured']})")


def ready_for_inference(cfg: TrialConfig, model: nn.Module, classes: int) -> tuple[torch.device, bool]:
    """Move a trained network to the device it infers on, in the memory layout its trial trained
    with (choose_channels_last); returns (device, channels_last). The sweep's evaluation task and
    `python -m tlcore.predict` both set up here."""
    device = pick_device()
    channels_last = choose_channels_last(cfg, device, model, classes)[0]
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
    return device, channels_last


def build_optimizer(model: nn.Module, cfg: TrialConfig) -> torch.optim.Optimizer:
    """Adam with decoupled weight decay (AdamW) on the parameters that train: the same rule as
    the 2D chain's fastai optimizer (tlcore/training/schedules.py)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrialConfig) -> Schedule:
    """Per-iteration schedule over `max_iterations` (the thesis used a constant rate)."""
    return Schedule(optimizer, cfg.lr_schedule, cfg.max_iterations)


def build_loss() -> nn.Module:
    return DiceCELoss(to_onehot_y=True, softmax=True)


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, sampler, batches: int, device: torch.device,
                            dtype: torch.dtype | None = None, channels_last: bool = False) -> None:
    """Precise BatchNorm (Wu & Johnson 2021): before validation, replace the running statistics of
    every trainable BatchNorm by their average over `batches` fresh training batches.

    With 2-patch batches, momentum-0.1 running statistics average the last ~10 batches and
    wander with how much tumour those few patches held; validation Dice then jumps between
    reports on the same kind of weights (bench/RESULTS.md, "Validation-curve noise"). Frozen
    BatchNorm layers keep the source's statistics.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and m.track_running_stats and any(p.requires_grad for p in m.parameters())]
    if not layers or batches < 1:
        return
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches below
    was_training = model.training
    model.train()
    for _ in range(batches):
        images, _ = sampler.next_batch()
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last_3d)
        with autocast(device, dtype):
            model(images)
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    model.train(was_training)


def train_segmentation(cfg: TrialConfig, model: nn.Module, sampler, val_subjects, num_classes: int,
                       report: Callable[[dict, dict], None], resume: dict | None = None,
                       device: torch.device | None = None, channels_last: bool | None = None,
                       compiled: bool | None = None) -> dict:
    """Train until `cfg.max_iterations`; call `report(metrics, state)` every `report_every`.

    `state` holds model / optimizer / scheduler state dicts and the iteration; passing it
    back as `resume` continues where it stopped. `channels_last`: None = `choose_channels_last`;
    `compiled`: None = `choose_torch_compile`.
    Returns the last metrics.
    """
    device = device or pick_device()
    dtype = amp_dtype(cfg, device)
    cl = choose_channels_last(cfg, device, model, num_classes)[0] if channels_last is None else channels_last
    model.to(device)
    if cl:
        model.to(memory_format=torch.channels_last_3d)
    if compiled is None:
        compiled = choose_torch_compile(cfg, device)[0]
    # the training step only: it shares `model`'s parameters, so checkpoints, precise BN and the
    # sliding window (whose last batch of windows varies in size) stay on the eager module
    step_model = torch.compile(model) if compiled else model
    optimizer, loss_fn = build_optimizer(model, cfg), build_loss()
    scheduler = build_scheduler(optimizer, cfg)
    iteration = 0
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        iteration = int(resume["iteration"])
    val = val_subjects[: cfg.max_val_subjects] if cfg.max_val_subjects else val_subjects

    def forward_backward(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = loss_fn(net(images).float(), labels)
        loss.backward()  # a compiled net compiles its backward here, at the first step
        return loss

    metrics, losses, t0, compile_tried = {}, [], time.perf_counter(), False
    while iteration < cfg.max_iterations:
        if not losses:  # the start of a stretch between reports
            # Each stretch between reports draws its patches from (seed, iteration): a trial
            # resumed from a checkpoint (a lost node, a pause) goes on exactly as if uninterrupted.
            sampler.reseed(stream_seed(cfg.seed, iteration))
            torch.manual_seed(stream_seed(cfg.seed, iteration))
        model.train()
        images, labels = sampler.next_batch()
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if cl:
            images = images.contiguous(memory_format=torch.channels_last_3d)
        try:
            loss = forward_backward(step_model, images, labels)
        except Exception as e:  # only the first compiled step falls back; anything later is raised
            if step_model is model or compile_tried:
                raise
            # A node that cannot compile (Inductor needs a C compiler; Triton, a GPU it supports)
            # trains eagerly, more slowly, instead of failing every trial on it.
            first_line = (str(e).strip().splitlines() or [""])[0][:200]
            print(f"[tlcore] torch.compile failed on this node, training eagerly instead: {type(e).__name__}: "
                  f"{first_line}", file=sys.stderr, flush=True)
            step_model = model
            loss = forward_backward(model, images, labels)
        compile_tried = True
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
            # from the sampler's stream of this stretch: the next stretch reseeds, so resumes stay exact
            t_bn = time.perf_counter()
            recompute_bn_statistics(model, sampler, cfg.precise_bn_batches, device, dtype, cl)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # BN's kernels counted as BN's, not validation's
            t_val = time.perf_counter()
            ev = evaluate_subjects(model, val, num_classes, cfg.roi, device, loss_fn,
                                   cfg.sw_batch_size, cfg.sw_overlap, dtype, cl)
            metrics = {"iteration": iteration, "train_loss": train_loss,
                       "val_loss": ev["loss"], "val_dice": ev["dice"],
                       "lr": scheduler.get_last_lr()[0],
                       "patches_per_s": len(losses) * cfg.batch_size / max(elapsed, 1e-9),
                       # where a report's time goes, beside the training's: what max_val_subjects,
                       # sw_overlap and precise_bn_batches trade against
                       "precise_bn_s": t_val - t_bn, "val_s": time.perf_counter() - t_val}
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "iteration": iteration,
                     "val_per_subject": ev["per_subject"]}
            report(metrics, state)
            losses, t0 = [], time.perf_counter()
    return metrics


# A 3D checkpoint (a folder; Tune keeps and moves it): the weights as safetensors (what
# evaluation and the registry read), the training state for a resume (loaded weights_only), the
# per-subject validation Dice (the report's box plots) and the run configuration.
def write_segmentation_checkpoint(directory: Path, cfg: TrialConfig, model: nn.Module, state: dict) -> None:
    from safetensors.torch import save_file

    per_subject = state.pop("val_per_subject")
    torch.save(state, directory / "state.pt")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(directory / "model.safetensors"))
    (directory / "val_per_subject.json").write_text(json.dumps(per_subject, indent=1))
    write_run_config(cfg, directory)


def read_segmentation_state(directory: Path) -> dict:
    return torch.load(directory / "state.pt", map_location="cpu", weights_only=True)

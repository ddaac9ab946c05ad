"""Training the 2D chain with fastai: DenseNet121 + fastai head, discriminative learning rates.

No Ray and no MLflow here: `fit_classifier` takes fastai callbacks (the trainable passes one
that reports to Tune after each epoch).
"""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path
from urllib.error import URLError

import numpy as np
import torch
from torch import nn

from tlcore.config import MEANVAR, TrialConfig, write_run_config
from tlcore.models.networks import layer_groups
from tlcore.models.transfer import TransferReport, load_source, mean_var_init
from tlcore.training.device import stream_seed
from tlcore.training.schedules import beta1, lr_factor

DENSENET121_URL = "https://download.pytorch.org/models/densenet121-a639ec97.pth"
# torchvision's old checkpoints name DenseNet layers "norm.1"; the modules are now "norm1".
_LEGACY_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def imagenet_state(path: str | None = None) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet DenseNet121 weights, from a local file or the torch hub cache."""
    if path:
        from tlcore.models.transfer import read_weights
        state = read_weights(path)
    else:
        try:
            state = torch.hub.load_state_dict_from_url(DENSENET121_URL, progress=False, check_hash=True,
                                                       weights_only=True)
        except (URLError, OSError, RuntimeError) as e:
            cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(DENSENET121_URL).name
            raise RuntimeError(
                f"ImageNet weights for DenseNet121 are not in the torch cache ({cache}) and cannot be "
                f"downloaded here ({e}). On a machine with internet run\n"
                "    python -c \"import torchvision; torchvision.models.densenet121(weights='IMAGENET1K_V1')\"\n"
                f"and copy the file to {cache}, or pass the file as --source /path/to/{cache.name}") from e
    return {_LEGACY_KEY.sub(r"\1\2", k): v for k, v in state.items()}


def load_imagenet(model: nn.Module, path: str | None = None, mean_var_seed: int | None = None) -> TransferReport:
    """Copy the ImageNet body into model[0][0] (torchvision `features.*`); the head stays new.
    With `mean_var_seed`, the Mean-Var control of those weights instead (transfer.mean_var_init)."""
    state = {f"0.0.{k[len('features.'):]}": v for k, v in imagenet_state(path).items() if k.startswith("features.")}
    if not state:
        raise ValueError(f"{path or DENSENET121_URL} holds no DenseNet 'features.*' tensors: "
                         "pass torchvision's densenet121 ImageNet weights")
    if mean_var_seed is not None:
        return mean_var_init(model, state, mean_var_seed, source=MEANVAR + (path or "imagenet"))
    return load_source(model, state, source=path or "imagenet")


def splitter(model: nn.Module) -> list[list[nn.Parameter]]:
    """fastai parameter groups = tlcore layer groups (earliest first)."""
    return [[p for m in mods for p in m.parameters()] for mods in layer_groups(model).values()]


def lr_slice(cfg: TrialConfig) -> slice:
    """Discriminative learning rates: `lr` for the head, `lr / lr_ratio` for the first group."""
    return slice(cfg.lr / cfg.lr_ratio, cfg.lr)


def uses_bf16(cfg: TrialConfig, device: torch.device) -> bool:
    return device.type == "cuda" and cfg.precision in ("auto", "bf16")


def uses_channels_last(cfg: TrialConfig, device: torch.device) -> bool:
    """2D channels-last is cuDNN's fast path for DenseNet on GPUs; unlike the dilated 3D convs it
    needs no measuring."""
    return device.type == "cuda" and cfg.channels_last != "off"


def build_learner(cfg: TrialConfig, model: nn.Module, train_dl, valid_dl, device: torch.device, cbs=()):
    from fastai.callback.core import Callback
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    from fastai.optimizer import OptimWrapper

    channels_last = uses_channels_last(cfg, device)

    class ToDevice(Callback):  # plain torch DataLoaders: fastai does not move their batches
        order = -10

        def before_batch(self):
            self.learn.xb = tuple(x.to(device, non_blocking=True) for x in self.xb)
            self.learn.yb = tuple(y.to(device, non_blocking=True) for y in self.yb)
            if channels_last:
                self.learn.xb = tuple(x.contiguous(memory_format=torch.channels_last) for x in self.learn.xb)

    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    dls = DataLoaders(train_dl, valid_dl, device=device)
    # torch's AdamW (fused on a GPU) through fastai's OptimWrapper, not fastai's own Adam: fastai
    # updates one tensor at a time in Python, which halved DenseNet121's step rate on an H100
    # (bench/RESULTS.md, train2d.torch_adamw_over_fastai_adam). Same update rule: decoupled
    # weight decay on every trainable tensor (wd_bn_bias), fastai's constants (betas 0.9/0.99,
    # eps 1e-5, as the thesis's fastai had); fastai's schedulers set lr and beta1 through it.
    adamw = partial(torch.optim.AdamW, betas=(0.9, 0.99), eps=1e-5, fused=device.type == "cuda")
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=partial(OptimWrapper, opt=adamw),
                    splitter=splitter, metrics=[accuracy], wd=cfg.weight_decay, wd_bn_bias=True,
                    train_bn=False, cbs=[ToDevice(), *cbs])
    if uses_bf16(cfg, device):
        from fastai.callback.fp16 import MixedPrecision
        learn.add_cb(MixedPrecision(amp_mode="bf16"))
    return learn


def fit_classifier(learn, cfg: TrialConfig, start_epoch: int = 0) -> None:
    """Train for `max_iterations` epochs (the sweep's budget: a 2D report is an epoch) with the
    run's schedule spanning them (tlcore/training/schedules.py: the same curves as the 3D loop) and
    discriminative learning rates."""
    from fastai.callback.schedule import ParamScheduler
    from fastcore.basics import even_mults

    if learn.opt is None:
        learn.create_opt()
    lrs = lr_slice(cfg)  # one peak rate per layer group, geometric from the first to the head
    rates = np.array(even_mults(lrs.start, lrs.stop, len(learn.opt.param_lists)))
    scheds = {"lr": lambda pct: rates * lr_factor(cfg.lr_schedule, pct)}
    if beta1(cfg.lr_schedule, 0.0) is not None:
        scheds["mom"] = lambda pct: beta1(cfg.lr_schedule, pct)  # fastai's name for Adam's beta1
    with learn.no_bar(), learn.no_logging():  # progress bars would flood the Ray driver
        learn.fit(cfg.max_iterations, lr=rates, cbs=[ParamScheduler(scheds), SeedEachEpoch(cfg.seed)],
                  start_epoch=start_epoch)


def SeedEachEpoch(seed: int):
    """A fastai callback: dropout draws from (seed, epoch), so a trial resumed at an epoch
    (Tune pauses trials at asha-sync rungs) goes on exactly as the uninterrupted one."""
    from fastai.callback.core import Callback

    class _SeedEachEpoch(Callback):
        order = -30  # before the epoch's first batch, whoever else starts it

        def before_epoch(self):
            torch.manual_seed(stream_seed(seed, self.epoch))

    return _SeedEachEpoch()


def ReportEachEpoch(report, start_epoch: int, batches: int, batch_size: int):
    """A fastai callback: after each epoch, `report(metrics, learn)` with the epoch's mean training
    loss, validation loss and accuracy, learning rate and throughput."""
    import time

    from fastai.callback.core import Callback

    class _ReportEachEpoch(Callback):
        order = 60  # after fastai's Recorder has the epoch's values

        def before_epoch(self):
            self.t0, self.losses = time.perf_counter(), []

        def after_loss(self):
            if self.training:
                self.losses.append(float(self.loss.detach()))

        def after_epoch(self):
            if self.epoch < start_epoch:
                return  # fastai still fires after_epoch for the epochs it skips on resume
            # the epoch's mean training loss: fastai's own train_loss is smoothed across epochs,
            # so it would differ between a resumed trial and an uninterrupted one
            train_loss = sum(self.losses) / max(len(self.losses), 1)
            val_loss, val_acc = (float(v) for v in self.learn.recorder.values[-1][1:3])
            epoch = self.epoch + 1
            report({"iteration": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_acc,
                    "step": epoch * batches, "lr": float(self.opt.hypers[-1]["lr"]),
                    "images_per_s": batches * batch_size / (time.perf_counter() - self.t0)}, self.learn)

    return _ReportEachEpoch()


def _plain(value):
    """NumPy scalars (fastai's schedulers set them as hyper-parameters) as Python numbers, so
    that the optimizer state loads with torch.load(weights_only=True)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def save_classifier_state(learn, directory: Path) -> None:
    """Weights (safetensors) and optimizer state: a trial resumed from them goes on exactly."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in learn.model.state_dict().items()},
              str(Path(directory) / "model.safetensors"))
    torch.save(_plain(learn.opt.state_dict()), Path(directory) / "optimizer.pt")


def write_classifier_checkpoint(directory: Path, cfg: TrialConfig, learn, epoch: int) -> None:
    """A 2D checkpoint: the learner's state, the epochs done and the run configuration."""
    save_classifier_state(learn, directory)
    (directory / "progress.json").write_text(json.dumps({"epoch": epoch}))
    write_run_config(cfg, directory)


def classifier_checkpoint_epoch(directory: Path) -> int:
    return json.loads((directory / "progress.json").read_text())["epoch"]


def load_classifier_state(learn, directory: Path) -> None:
    """The inverse of `save_classifier_state` (a checkpoint without optimizer state, from an
    older tlcore, restores the weights and starts Adam's moments afresh)."""
    from safetensors.torch import load_file

    learn.model.load_state_dict(load_file(str(Path(directory) / "model.safetensors")))
    if learn.opt is None:
        learn.create_opt()
    state = Path(directory) / "optimizer.pt"
    if state.exists():
        learn.opt.load_state_dict(torch.load(state, map_location="cpu", weights_only=True))


@torch.no_grad()
def predict_probabilities(model: nn.Module, loader, device: torch.device) -> tuple[list[int], list[float]]:
    """Labels and P(positive) for every image of a loader, in order."""
    model.eval().to(device)
    ys, ps = [], []
    for x, y in loader:
        logits = model(x.to(device)).float()
        ps += torch.softmax(logits, 1)[:, 1].cpu().tolist()
        ys += y.tolist()
    return ys, ps


def image_loaders(cfg: TrialConfig, train_images, val_images, start_epoch: int = 0):
    """Training (shuffled; minority class oversampled for ChestX-ray14) and validation DataLoaders.
    Order and flips come from `SeededSampler` (seed, epoch); the loaders' own generators only
    seed worker processes, so the global torch stream (dropout) is the same for any number of
    workers."""
    from tlcore.data.images2d import RadiographDataset, SeededSampler, oversample

    labels = [i.label for i in train_images]
    train_ds = RadiographDataset([i.path for i in train_images], labels, cfg.image_size, train=True)
    # the minority class is oversampled for ChestX-ray14 (thesis: pneumothorax 18x)
    idx = oversample(labels, cfg.oversample, cfg.seed) if cfg.dataset == "chestxray" else list(range(len(labels)))
    workers = {"num_workers": cfg.data_workers, "pin_memory": torch.cuda.is_available(),
               "persistent_workers": cfg.data_workers > 0}
    train_dl = torch.utils.data.DataLoader(train_ds, batch_size=cfg.batch_size, drop_last=True,
                                           sampler=SeededSampler(idx, cfg.seed, start_epoch),
                                           generator=torch.Generator().manual_seed(cfg.seed), **workers)
    val_ds = RadiographDataset([i.path for i in val_images], [i.label for i in val_images], cfg.image_size)
    return train_dl, torch.utils.data.DataLoader(val_ds, batch_size=cfg.batch_size * 2,
                                                 generator=torch.Generator().manual_seed(cfg.seed), **workers)

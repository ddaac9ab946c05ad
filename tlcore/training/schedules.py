"""Learning-rate schedules: one definition per name, shared by the 3D loop and the 2D (fastai) chain.

A schedule is the factor applied to the peak learning rate `lr` at training progress
`pct` = step / total steps (0 at the first step). `one_cycle` also cycles Adam's beta1 (the
"momentum") against the learning rate, as Smith's one-cycle policy and fastai do.

    constant   1
    cosine     cosine from 1 down to 0.01 (CosineAnnealingLR with eta_min = lr / 100)
    poly       (1 - pct) ** 0.9 (nnU-Net)
    one_cycle  cosine warm-up from 1/25 to 1 over the first 25 %, then cosine down to 1e-5;
               beta1 0.95 -> 0.85 -> 0.95 (fastai's fit_one_cycle defaults)

Weight decay is decoupled everywhere (AdamW: w <- w - lr * weight_decay * w, on every trainable
tensor), in 3D and 2D alike.
"""

from __future__ import annotations

import math

import torch

COSINE_FLOOR = 0.01
POLY_POWER = 0.9
ONE_CYCLE = {"pct_start": 0.25, "div": 25.0, "div_final": 1e5, "beta1": (0.95, 0.85)}


def _cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * pct)) / 2


def lr_factor(schedule: str, pct: float) -> float:
    """Factor of the peak learning rate at progress `pct` in [0, 1]."""
    pct = min(max(pct, 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return _cos(1.0, COSINE_FLOOR, pct)
    if schedule == "poly":
        return (1 - pct) ** POLY_POWER
    if schedule == "one_cycle":
        warm = ONE_CYCLE["pct_start"]
        if pct < warm:
            return _cos(1 / ONE_CYCLE["div"], 1.0, pct / warm)
        return _cos(1.0, 1 / ONE_CYCLE["div_final"], (pct - warm) / (1 - warm))
    raise ValueError(f"lr_schedule={schedule!r}: choose constant, cosine, poly or one_cycle")


def beta1(schedule: str, pct: float) -> float | None:
    """Adam's beta1 at progress `pct`; None = leave it at the optimizer's default (0.9)."""
    if schedule != "one_cycle":
        return None
    hi, lo = ONE_CYCLE["beta1"]
    warm, pct = ONE_CYCLE["pct_start"], min(max(pct, 0.0), 1.0)
    return _cos(hi, lo, pct / warm) if pct < warm else _cos(lo, hi, (pct - warm) / (1 - warm))


class Schedule(torch.optim.lr_scheduler.LRScheduler):
    """A named schedule over `total_steps` optimizer steps for a torch optimizer (3D loop).
    Its state (the step count) is saved with checkpoints like any torch scheduler's."""

    def __init__(self, optimizer: torch.optim.Optimizer, name: str, total_steps: int):
        lr_factor(name, 0.0)  # unknown names fail here, before training
        self.name, self.total_steps = name, max(int(total_steps), 1)
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        pct = self.last_epoch / self.total_steps
        b1 = beta1(self.name, pct)
        if b1 is not None:
            for group in self.optimizer.param_groups:
                group["betas"] = (b1, group["betas"][1])
        return [base * lr_factor(self.name, pct) for base in self.base_lrs]

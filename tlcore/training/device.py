"""Seeding and device choice for a trial, 2D or 3D: no MONAI here, so a classification trial's
worker never loads it (~4.5 CPU-s of imports; tests/test_layout.py checks)."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed every global random source a trial touches: Python, NumPy, torch on the CPU and on
    every GPU. Call it before the model is built: Ray reuses worker processes, so a model built
    unseeded would start from whatever the previous trial left in the random state.

    `deterministic`: GPU kernels without a deterministic implementation are replaced by slower
    deterministic ones (cuDNN autotuning off; cuBLAS needs CUBLAS_WORKSPACE_CONFIG in the
    environment before CUDA starts, which the sweep driver sets for every Ray worker). The last
    few ops PyTorch has no deterministic version of warn instead of failing the trial. CPU
    kernels are deterministic already. Switched off again for a trial that does not ask, since
    the worker process may be reused.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also every CUDA device
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        # Patches and sliding windows have fixed shapes: let cuDNN pick its fastest kernels once
        # (its timing-based choice is not reproducible, so not under --deterministic).
        torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()
        return torch.device("cuda")
    return torch.device("cpu")


def staging_device(subjects, device: torch.device, share: float = 0.4) -> torch.device:
    """Where the training volumes live while patches are drawn: the GPU when image + uint8 label
    of every subject fit in `share` of its free memory (the rest is for the model and the
    activations; fractional trials share the device), else the CPU."""
    if device.type != "cuda":
        return torch.device("cpu")
    need = sum(s.image.numel() * s.image.element_size() + s.label.numel() for s in subjects)
    free, _ = torch.cuda.mem_get_info(device)
    return device if need < share * free else torch.device("cpu")


def stream_seed(seed: int, iteration: int) -> int:
    """Seed of the random streams from `iteration` on (distinct per seed and per start point)."""
    return seed * 1_000_003 + iteration

"""A transferability forecast before any trial: for each freeze depth k, how much do the features
the trainable part of the network receives (the source's group k-1 output; the input itself for
k = 0) say about the target labels? Scored by LogME (You et al. 2021) on sampled voxels, in
seconds; after the sweep, the forecast ranking is set against the measured Dice ranking (Kendall
tau, with a bootstrap interval over subjects: stats.rank_agreement). No Ray here; the registry only
through starts (the source model, cached per machine).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from tlcore.config import TrialConfig
from tlcore.models.networks import layer_groups
from tlcore.models.probes import output_module, probe_patches
from tlcore.training.trial_start import PROBE_SIZE, build_start_model, load_split


def logme(features: np.ndarray, labels: np.ndarray, iterations: int = 11) -> float:
    """LogME: the log marginal evidence per example of a Bayesian linear model from `features`
    (n x d) to one-hot `labels` (n), averaged over classes; higher = more linearly informative.
    Evidence maximisation over the prior (alpha) and noise (beta) precisions by MacKay's
    fixed-point iteration, in the SVD basis of the features."""
    f = np.asarray(features, dtype=np.float64)
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s ** 2
    evidences = []
    for c in np.unique(labels):
        t = (labels == c).astype(np.float64)
        x2 = (u.T @ t) ** 2
        outside = max(float(t @ t - x2.sum()), 0.0)  # the part of t no feature combination reaches
        alpha, beta = 1.0, 1.0
        for _ in range(iterations):
            gamma = float((beta * sigma / (alpha + beta * sigma)).sum())
            m2 = float((beta ** 2 * sigma * x2 / (alpha + beta * sigma) ** 2).sum())
            res2 = float((alpha ** 2 * x2 / (alpha + beta * sigma) ** 2).sum()) + outside
            new_alpha, new_beta = gamma / (m2 + 1e-5), (n - gamma) / (res2 + 1e-5)
            done = abs(new_alpha / new_beta - alpha / beta) / (alpha / beta) < 1e-3
            alpha, beta = new_alpha, new_beta
            if done:
                break
        evidence = (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - 0.5 * float(np.log(alpha + beta * sigma).sum())
                    - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * math.log(2 * math.pi))
        evidences.append(evidence / n)
    return float(np.mean(evidences))


@torch.no_grad()
def depth_features(model: nn.Module, subjects, patch_size: tuple, patches: int = 16, voxels_per_class: int = 64,
                   seed: int = 0, device: torch.device | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Voxel features at every freeze depth k = 0 .. len(groups) - 1: index 0 the input channels,
    index k the output of group k - 1 (channels at the voxel), over sampled voxels of `patches`
    training patches, as many per class as each patch has up to `voxels_per_class`.
    Returns (features per depth, labels)."""
    device = device or torch.device("cpu")
    images, labels = probe_patches(subjects, patch_size, patches, seed, with_labels=True)
    groups = list(layer_groups(model).values())[:-1]  # the head is never frozen
    captured: list[torch.Tensor] = []
    hooks = [output_module(model, g).register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
             for g in groups]
    g = torch.Generator().manual_seed(seed)
    per_depth, ys = [[] for _ in range(len(groups) + 1)], []
    was_training = model.training
    model.eval()
    try:
        for image, label in zip(images, labels):
            flat_label = label.flatten()
            chosen = []
            for c in flat_label.unique():
                where = torch.nonzero(flat_label == c).flatten()
                chosen.append(where[torch.randperm(len(where), generator=g)[:voxels_per_class]])
            idx = torch.cat(chosen)
            captured.clear()
            model(image[None].to(device))
            for depth, out in enumerate([image[None].to(device), *captured]):
                per_depth[depth].append(out.flatten(2)[0][:, idx.to(out.device)].T.double().cpu().numpy())
            ys.append(flat_label[idx].numpy())
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [np.concatenate(f) for f in per_depth], np.concatenate(ys)


def forecast_depths(model: nn.Module, subjects, patch_size: tuple, depths, **kw) -> dict[int, float]:
    """LogME of what the trainable part receives at each freeze depth k in `depths`."""
    features, labels = depth_features(model, subjects, patch_size, **kw)
    return {k: logme(features[k], labels) for k in depths}


def forecast_sweep(config: dict, depths, subjects: int = 8, patches: int = 16) -> dict[int, float]:
    """The forecast of a layer sweep, before its trials: `config` is a transferred start's run
    config (source_model = the registered source); LogME at each freeze depth in `depths`, on
    voxels of `patches` patches from its first `subjects` training subjects (one pass of the
    source over them, CPU seconds)."""
    cfg = TrialConfig.from_dict({**config, "frozen_layers": 0})
    with torch.random.fork_rng(devices=[]):
        model = build_start_model(cfg)[0]
    size = tuple(min(p, PROBE_SIZE) for p in cfg.patch_size)
    return forecast_depths(model, load_split(cfg, "train", limit=subjects, cache=False), size, depths, patches=patches, seed=cfg.seed)

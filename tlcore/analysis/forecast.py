"""A transferability forecast before any trial: for each freeze depth k, how much more do the
features the trainable part of the network receives (the source's group k-1 output; the input
itself for k = 0) say about the target labels than the same layer of untrained networks of the
same architecture? Scored by LogME (You et al. 2021) on exactly class-balanced voxels, in
seconds: the gain over the untrained baseline is the forecast (the raw score grows with depth in
untrained networks too); after the sweep, the forecast ranking is set against the measured Dice ranking (Kendall
tau, with a bootstrap interval over subjects: stats.rank_agreement). No Ray here; the registry only
through starts (the source model, cached per machine).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from tlcore.config import MEANVAR, TrialConfig
from tlcore.models.networks import layer_groups
from tlcore.models.probes import output_module, probe_patches
from tlcore.training.trial_start import build_start_model, load_split

FORECAST_PATCH = 48  # the forecast's patches are at most 48^3 (its voxels, not CKA's probe)


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


def balanced_voxels(labels: torch.Tensor, per_class: int, seed: int = 0) -> list[torch.Tensor]:
    """Flat voxel indices per patch of `labels` (n, 1, *spatial), exactly as many of each class
    present over all patches: the smallest class's count, at most `per_class` per patch on
    average. (Drawing per patch left 1024 background against 677 foreground voxels in one run.)"""
    g = torch.Generator().manual_seed(seed)
    flat = labels.reshape(len(labels), -1)
    classes = flat.unique()
    pools = {int(c): torch.nonzero(flat == c) for c in classes}  # (patch, voxel) pairs
    n = min(min(len(p) for p in pools.values()), per_class * len(flat))
    chosen = torch.cat([p[torch.randperm(len(p), generator=g)[:n]] for p in pools.values()])
    return [chosen[chosen[:, 0] == i, 1] for i in range(len(flat))]


@torch.no_grad()
def features_at(model: nn.Module, images: torch.Tensor, voxels: list[torch.Tensor],
                device: torch.device | None = None) -> list[np.ndarray]:
    """At every freeze depth k = 0 .. len(groups) - 1 (index 0 the input channels, index k the
    output of group k - 1), the channels at the chosen voxels of each patch: (voxels, channels)."""
    device = device or torch.device("cpu")
    groups = list(layer_groups(model).values())[:-1]  # the head is never frozen
    captured: list[torch.Tensor] = []
    hooks = [output_module(model, g).register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
             for g in groups]
    per_depth = [[] for _ in range(len(groups) + 1)]
    was_training = model.training
    model.eval()
    try:
        for image, idx in zip(images, voxels):
            if not len(idx):
                continue
            captured.clear()
            model(image[None].to(device))
            for depth, out in enumerate([image[None].to(device), *captured]):
                per_depth[depth].append(out.flatten(2)[0][:, idx.to(out.device)].T.double().cpu().numpy())
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [np.concatenate(f) for f in per_depth]


def probe_voxels(subjects, patch_size: tuple, patches: int, voxels_per_class: int, seed: int):
    """`patches` training patches, their exactly class-balanced voxels (balanced_voxels) and those
    voxels' labels: (images, voxels per patch, labels)."""
    images, labels = probe_patches(subjects, patch_size, patches, seed, with_labels=True)
    voxels = balanced_voxels(labels, voxels_per_class, seed)
    return images, voxels, np.concatenate([label.flatten()[idx].numpy() for label, idx in zip(labels, voxels)])


def depth_features(model: nn.Module, subjects, patch_size: tuple, patches: int = 16, voxels_per_class: int = 64,
                   seed: int = 0, device: torch.device | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Voxel features at every freeze depth (features_at) at the probe voxels. Returns (features
    per depth, labels)."""
    images, voxels, ys = probe_voxels(subjects, patch_size, patches, voxels_per_class, seed)
    return features_at(model, images, voxels, device), ys


def forecast_depths(models: dict[str, nn.Module], subjects, patch_size: tuple, depths, patches: int = 16,
                    voxels_per_class: int = 64, seed: int = 0) -> dict[str, dict[int, float]]:
    """LogME of what the trainable part receives at each freeze depth k in `depths`, for each
    named model, on the same voxels of the same patches."""
    images, voxels, ys = probe_voxels(subjects, patch_size, patches, voxels_per_class, seed)
    scores = {}
    for name, model in models.items():
        features = features_at(model, images, voxels)
        scores[name] = {k: logme(features[k], ys) for k in depths}
    return scores


BASELINE_SEEDS = 3  # randomly initialised networks of the source's architecture, the forecast's baseline


def forecast_sweep(config: dict, depths, subjects: int = 8, patches: int = 16, meanvar: bool = False,
                   baseline_seeds: int = BASELINE_SEEDS) -> dict[str, dict[int, float]]:
    """The forecast of a layer sweep, before its trials: `config` is a transferred start's run
    config (source_model = the registered source). At each freeze depth in `depths`, on voxels of
    `patches` patches from its first `subjects` training subjects:

    - `logme`: LogME of the source's features there;
    - `baseline`: the mean LogME of `baseline_seeds` randomly initialised networks of the same
      architecture (the same feature counts and receptive fields: deeper features score higher
      in untrained networks too, so the raw score partly measures depth);
    - `gain`: logme - baseline, what the source's training adds: the forecast;
    - with `meanvar`, `meanvar`: the Mean-Var start's (the source's weight scales, no features)."""
    from tlcore.data.layouts import num_classes
    from tlcore.models.networks import build_network

    cfg = TrialConfig.from_dict({**config, "frozen_layers": 0})
    models = {}
    with torch.random.fork_rng(devices=[]):
        models["logme"] = build_start_model(cfg)[0]
        for i in range(baseline_seeds):
            torch.manual_seed(10_007 * (cfg.seed + 1) + i)  # not the trials' own initialisations
            models[f"random{i}"] = build_network(cfg, num_classes(cfg))
        if meanvar:
            models["meanvar"] = build_start_model(TrialConfig.from_dict(
                {**config, "frozen_layers": 0, "source_model": MEANVAR + cfg.source_model}))[0]
    size = tuple(min(p, FORECAST_PATCH) for p in cfg.patch_size)
    scores = forecast_depths(models, load_split(cfg, "train", limit=subjects, cache=False), size, depths,
                             patches=patches, seed=cfg.seed)
    baseline = {k: float(np.mean([scores[f"random{i}"][k] for i in range(baseline_seeds)])) for k in depths}
    out = {"logme": scores["logme"], "baseline": baseline,
           "gain": {k: scores["logme"][k] - baseline[k] for k in depths}}
    if meanvar:
        out["meanvar"] = scores["meanvar"]
    return out

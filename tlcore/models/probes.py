"""Which layers changed, which were reused: per-group representation similarity (linear CKA) and
weight movement, measured on a trial's model while it trains. No Ray, no MLflow here.

CKA (Kornblith et al. 2019) compares two representations of the same examples through their
Gram matrices. The examples here are voxels: a fixed sample of positions in a fixed set of
validation patches, each described by the group's channels at that position. (Whole patches as
examples, millions of features each, rate a randomly initialised HighRes3DNet 0.90-0.999 similar
to the trained source in every group: the patches' own similarity dominates; voxels separate
them, 0.23-0.68. bench/RESULTS.md, "What CKA measures".) We use the unbiased
HSIC estimator (Song et al. 2012), accumulated over minibatches (Nguyen et al. 2021), so that a
probe never holds more than one minibatch of activations. The PyPI CKA packages were not used:
they are stale, or subtract the diagonal's vector from every row (`K - diag(K)`) instead of
zeroing the diagonal.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from tlcore.models.networks import head_group, layer_groups


def hsic1(K: torch.Tensor, L: torch.Tensor) -> float:
    """Unbiased HSIC of two n x n Gram matrices (n >= 4), diagonals zeroed first."""
    n = K.shape[0]
    if n < 4:
        raise ValueError(f"unbiased HSIC needs at least 4 examples per minibatch, got {n}")
    K, L = K.double().clone(), L.double().clone()
    K.fill_diagonal_(0)
    L.fill_diagonal_(0)
    trace = (K * L).sum()  # tr(K L) for symmetric matrices
    ones_k_l = K.sum(0) @ L.sum(1)  # 1' K L 1
    value = trace + K.sum() * L.sum() / ((n - 1) * (n - 2)) - 2.0 * ones_k_l / (n - 2)
    return float(value / (n * (n - 3)))


def gram(x: torch.Tensor) -> torch.Tensor:
    """Linear-kernel Gram matrix of n examples (rows; further axes are flattened), in float64 of
    the centred features: the unbiased HSIC does not change when every example is shifted by the
    same vector, but float32 sums of large offsets (post-ReLU maps) lose the signal."""
    x = x.flatten(1).double()
    x = x - x.mean(0, keepdim=True)
    return x @ x.T


def voxel_samples(output: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) feature maps -> (B * m, C): the features at m positions per map, given as
    fractions of each axis in [0, 1) (B, m, ndim), so that groups of any resolution sample the
    same places."""
    spatial = output.shape[2:]
    size = torch.tensor(spatial, device=positions.device)
    coords = (positions * size).long().clamp_max(size - 1)
    flat = torch.zeros(coords.shape[:2], dtype=torch.long, device=positions.device)
    for axis, n in enumerate(spatial):
        flat = flat * n + coords[..., axis]
    maps = output.flatten(2)  # (B, C, V)
    picked = torch.gather(maps, 2, flat.to(maps.device).unsqueeze(1).expand(-1, maps.shape[1], -1))
    return picked.transpose(1, 2).reshape(-1, maps.shape[1])


class MinibatchCKA:
    """Linear CKA accumulated over minibatches: sum HSIC(K_i, L_i) / sqrt(sum HSIC(K_i, K_i) * sum
    HSIC(L_i, L_i)). Never NaN: when the self-similarity estimates are not positive (possible with
    tiny minibatches of near-constant features) the representations share nothing measurable, 0."""

    def __init__(self):
        self.xy = self.xx = self.yy = 0.0

    def add(self, K: torch.Tensor, L: torch.Tensor) -> None:
        self.xy += hsic1(K, L)
        self.xx += hsic1(K, K)
        self.yy += hsic1(L, L)

    def value(self) -> float:
        denominator = math.sqrt(max(self.xx, 0.0) * max(self.yy, 0.0))
        return self.xy / denominator if denominator > 0 else 0.0


def linear_cka(x: torch.Tensor, y: torch.Tensor, minibatch: int | None = None) -> float:
    """Debiased linear CKA between two representations of the same n examples (rows)."""
    cka, step = MinibatchCKA(), minibatch or x.shape[0]
    for i in range(0, x.shape[0] - step + 1, step):
        cka.add(gram(x[i:i + step]), gram(y[i:i + step]))
    return cka.value()


def analysed_groups(model: nn.Module) -> list[str]:
    """The layer groups whose output representations are compared (every group but the head,
    whose outputs are class scores of possibly different classes)."""
    return [g for g in layer_groups(model) if g != head_group(model)]


def output_module(model: nn.Module, modules: list[nn.Module]) -> nn.Module:
    """The module whose output is a group's output: its last module, or, for a group given as a
    slice of a Sequential (DenseNet's `features[:7]`, a new object the model never calls), the
    slice's last member."""
    last = modules[-1]
    while not any(last is m for m in model.modules()) and isinstance(last, nn.Sequential):
        last = last[-1]
    return last


@contextmanager
def group_grams(model: nn.Module, into: dict[str, list[torch.Tensor]], positions: dict):
    """While active, each forward appends, for every analysed group, the Gram matrix of its output
    at `positions["now"]` (see voxel_samples) to `into[group]`; the activations are dropped."""
    groups = layer_groups(model)
    handles = []
    for name in analysed_groups(model):
        def hook(_module, _inputs, output, name=name):
            into.setdefault(name, []).append(gram(voxel_samples(output.detach(), positions["now"])).cpu())
        handles.append(output_module(model, groups[name]).register_forward_hook(hook))
    try:
        yield into
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def probe_grams(model: nn.Module, patches: torch.Tensor, positions: torch.Tensor, device: torch.device,
                minibatch: int = 8) -> dict[str, list[torch.Tensor]]:
    """Per analysed group, one Gram matrix per minibatch of probe patches, over the voxels at
    `positions` (model in eval mode: BatchNorm with running statistics, no dropout; its
    train/eval mode is restored after)."""
    was_training = model.training
    model.eval()
    out: dict[str, list[torch.Tensor]] = {}
    now: dict = {}
    try:
        with group_grams(model, out, now):
            for i in range(0, len(patches) - minibatch + 1, minibatch):
                now["now"] = positions[i:i + minibatch]
                model(patches[i:i + minibatch].to(device))
    finally:
        model.train(was_training)
    return out


class LayerProbe:
    """Fixed probe patches, fixed voxel positions in them, and the reference model's Gram matrices
    there: `cka(model)` gives each group's CKA between the reference (e.g. the source) and `model`.
    A minibatch of 8 patches x 64 voxels compares 512 examples of at most 80 channels."""

    def __init__(self, reference: nn.Module, patches: torch.Tensor, device: torch.device, minibatch: int = 8,
                 voxels_per_patch: int = 64, seed: int = 0):
        if len(patches) < minibatch or minibatch * voxels_per_patch < 4:
            raise ValueError(f"{len(patches)} probe patches: at least one minibatch of {minibatch} patches "
                             "(and 4 voxels in all) is needed")
        self.patches, self.device, self.minibatch = patches, device, minibatch
        g = torch.Generator().manual_seed(seed)
        self.positions = torch.rand(len(patches), voxels_per_patch, patches.dim() - 2, generator=g)
        self.reference = probe_grams(reference, patches, self.positions, device, minibatch)

    def cka(self, model: nn.Module) -> dict[str, float]:
        grams = probe_grams(model, self.patches, self.positions, self.device, self.minibatch)
        out = {}
        for group, refs in self.reference.items():
            acc = MinibatchCKA()
            for K, L in zip(refs, grams[group]):
                acc.add(K, L)
            out[f"cka.{group}"] = acc.value()
        return out


def group_parameters(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Group name -> its parameters (weights, biases, norm scales), in network order."""
    return {g: [p for m in modules for p in m.parameters()] for g, modules in layer_groups(model).items()}


class WeightMovement:
    """Relative L2 distance of each group's parameters from their values when created:
    ||w - w0|| / ||w0|| over the group's parameters together (0 for a frozen group)."""

    def __init__(self, model: nn.Module):
        self.start = {g: [p.detach().to("cpu", copy=True) for p in ps] for g, ps in group_parameters(model).items()}

    def __call__(self, model: nn.Module) -> dict[str, float]:
        out = {}
        for g, params in group_parameters(model).items():
            moved = sum(float((p.detach().cpu().float() - p0.float()).pow(2).sum()) for p, p0 in zip(params, self.start[g]))
            size = sum(float(p0.float().pow(2).sum()) for p0 in self.start[g])
            out[f"weight_change.{g}"] = math.sqrt(moved / size) if size > 0 else math.sqrt(moved)
        return out


def probe_patches(subjects, size: tuple[int, ...], n: int = 16, seed: int = 0, with_labels: bool = False):
    """n patches of `size` from `subjects` (C, *spatial images), the same for every trial given
    the same subjects and seed: every other patch centred on a labelled (foreground) voxel, the
    rest anywhere in the volume. With `with_labels`, also the label patches: (images, labels)."""
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for i in range(n):
        s = subjects[i % len(subjects)]
        shape = s.image.shape[1:]
        foreground = torch.nonzero(s.label[0] > 0) if i % 2 == 0 else None
        if foreground is not None and len(foreground):
            centre = foreground[int(torch.randint(len(foreground), (1,), generator=g))].tolist()
        else:
            centre = [int(torch.randint(d, (1,), generator=g)) for d in shape]
        lo = [min(max(c - k // 2, 0), max(d - k, 0)) for c, k, d in zip(centre, size, shape)]
        window = (slice(None), *(slice(a, a + k) for a, k in zip(lo, size)))
        crop, label = s.image[window], s.label[window]
        pad = [x for k, d in reversed(list(zip(size, crop.shape[1:]))) for x in (0, k - d)]
        images.append(nn.functional.pad(crop, pad))  # volumes smaller than the probe: zero-padded
        labels.append(nn.functional.pad(label, pad))
    return (torch.stack(images), torch.stack(labels)) if with_labels else torch.stack(images)

"""Which layers changed, which were reused: per-group representation similarity (linear CKA) and
weight movement, measured on a trial's model while it trains. No Ray, no MLflow here.

CKA (Kornblith et al. 2019) compares two representations of the same examples through their
Gram matrices. The examples here are voxels: a fixed sample of positions in a fixed set of
validation patches, each described by the group's channels at that position. (Whole patches as
examples, millions of features each, rate a randomly initialised HighRes3DNet 0.90-0.999 similar
to the trained source in every group: the patches' own similarity dominates; voxels separate
them, 0.23-0.68. bench/RESULTS.md, "What CKA measures".) We use the unbiased
HSIC estimator (Song et al. 2012). A trial's probe (LayerProbe) computes it in feature space:
for a linear kernel every term of the estimator is a sum of per-patch statistics of size
channels x channels, so memory grows with examples x channels, not examples squared, every pair
of the probe's voxels counts (not only pairs within a minibatch), and a bootstrap over the probe
patches costs a few small matrix products (`cka_low.<group>` / `cka_high.<group>`, the 95 %
interval; bench/RESULTS.md, "CKA's interval"). The Gram-matrix form (hsic1, MinibatchCKA,
Nguyen et al. 2021's minibatch accumulation) stays as the reference the tests check it against.
The PyPI CKA packages were not used: they are stale, or subtract the diagonal's vector from
every row (`K - diag(K)`) instead of zeroing the diagonal.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import NamedTuple

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


def flat_indices(spatial: tuple, positions: torch.Tensor) -> torch.Tensor:
    """(B, m) flat voxel indices into maps of shape `spatial` of positions given as fractions of
    each axis in [0, 1) (B, m, ndim)."""
    size = torch.tensor(spatial, device=positions.device)
    coords = (positions * size).long().clamp_max(size - 1)
    flat = torch.zeros(coords.shape[:2], dtype=torch.long, device=positions.device)
    for axis, n in enumerate(spatial):
        flat = flat * n + coords[..., axis]
    return flat


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


def unique_voxels(output: torch.Tensor, positions: torch.Tensor, distinct: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, *spatial) feature maps -> the features at the voxels that `positions` (fractions of
    each axis in [0, 1), (B, m, ndim)) fall on, so that groups of any resolution sample the same
    places: each map's distinct voxels once, in index order, (N, C), and (N,) the index of the
    map each came from. Once, because a coarse map (DenseNet's last block: 7 x 7) has fewer
    voxels than the probe has positions, and a voxel counted twice is two identical examples,
    which the estimator would read as similarity. `distinct=False`: every position, repeats
    included (a probe without an interval, on maps that may be too coarse to give 4 distinct
    voxels: DenseNet's last block at 32 px is 1 x 1)."""
    flat = flat_indices(output.shape[2:], positions)
    maps = output.flatten(2)  # (B, C, V)
    features, owner = [], []
    for b in range(maps.shape[0]):
        keep = (torch.unique(flat[b]) if distinct else flat[b]).to(maps.device)
        features.append(maps[b][:, keep].T)
        owner.append(torch.full((len(keep),), b, dtype=torch.long))
    return torch.cat(features), torch.cat(owner)


@contextmanager
def group_features(model: nn.Module, into: dict[str, list], positions: dict):
    """While active, each forward appends, for every analysed group, its output's features at
    `positions["now"]` (unique_voxels, on the CPU) to `into[group]`; the activations are dropped."""
    groups = layer_groups(model)
    handles = []
    for name in analysed_groups(model):
        def hook(_module, _inputs, output, name=name):
            features, owner = unique_voxels(output.detach(), positions["now"], positions.get("distinct", True))
            into.setdefault(name, []).append((features.cpu(), owner + positions["first"]))
        handles.append(output_module(model, groups[name]).register_forward_hook(hook))
    try:
        yield into
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def probe_features(model: nn.Module, patches: torch.Tensor, positions: torch.Tensor, device: torch.device,
                   minibatch: int = 8, distinct: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per analysed group, (N, C) features at the probe's voxels of every patch, and (N,) the patch
    each voxel is in (model in eval mode: BatchNorm with running statistics, no dropout; its
    train/eval mode is restored after). Forwarded `minibatch` patches at a time."""
    was_training = model.training
    model.eval()
    parts: dict[str, list] = {}
    now: dict = {"distinct": distinct}
    try:
        with group_features(model, parts, now):
            for i in range(0, len(patches), minibatch):
                now["now"], now["first"] = positions[i:i + minibatch], i
                model(patches[i:i + minibatch].to(device))
    finally:
        model.train(was_training)
    return {g: (torch.cat([f for f, _ in ps]), torch.cat([o for _, o in ps])) for g, ps in parts.items()}


class PatchSums(NamedTuple):
    """Per probe patch, the sums the unbiased HSIC of two linear kernels (K = X X', L = Y Y') is
    made of: with them, the estimator over any multiset of patches (a bootstrap resample) is a
    few products of channel-sized matrices. Float64, features centred."""
    count: torch.Tensor   # (P,) voxels
    cross: torch.Tensor   # (P, p, q) sum of x y'
    sum_x: torch.Tensor   # (P, p)
    sum_y: torch.Tensor   # (P, q)
    sq_x: torch.Tensor    # (P,) sum of |x|^2, the diagonal of K
    sq_y: torch.Tensor    # (P,)
    sq_xy: torch.Tensor   # (P,) sum of |x|^2 |y|^2
    sq_x_y: torch.Tensor  # (P, q) sum of |x|^2 y
    sq_y_x: torch.Tensor  # (P, p) sum of |y|^2 x


def patch_sums(x: torch.Tensor, y: torch.Tensor, patch: torch.Tensor, patches: int) -> PatchSums:
    """PatchSums of two representations (N x p, N x q) of the same voxels, `patch` (N,) naming
    each voxel's patch (0..patches-1). Centre x and y first (by any fixed vector: the estimator
    does not change, and float64 sums of post-ReLU offsets keep the signal)."""
    x, y = x.double(), y.double()
    nx, ny = (x * x).sum(1), (y * y).sum(1)

    def per_patch(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(patches, *values.shape[1:], dtype=torch.float64).index_add_(0, patch, values)

    counts = torch.bincount(patch, minlength=patches).tolist()
    order = torch.argsort(patch, stable=True)  # probe_features lists each patch's voxels together already
    cross = torch.stack([a.T @ b for a, b in zip(x[order].split(counts), y[order].split(counts))])
    return PatchSums(per_patch(torch.ones(len(x), dtype=torch.float64)), cross, per_patch(x), per_patch(y),
                     per_patch(nx), per_patch(ny), per_patch(nx * ny), per_patch(nx[:, None] * y),
                     per_patch(ny[:, None] * x))


def weighted_hsic(s: PatchSums, weights: torch.Tensor) -> torch.Tensor:
    """The unbiased HSIC (Song et al. 2012, as hsic1) of the voxels of each row of `weights`
    (R x P: how many times each patch is taken), from PatchSums alone. All ones: exactly hsic1 of
    the probe's Gram matrices. A patch taken twice contributes its voxels twice, and a voxel's
    pairs with its own copies count as diagonal (left out), like a voxel with itself."""
    w = weights.double()
    w2, w3 = w * w, w * w * w
    n = w @ s.count
    R, P = w.shape
    m = (w @ s.cross.reshape(P, -1)).reshape(R, *s.cross.shape[1:])  # sum over resampled voxels of x y'
    tx, ty = w @ s.sum_x, w @ s.sum_y
    trace = (m * m).sum((1, 2)) - w2 @ s.sq_xy                      # tr(K~ L~)
    sum_k = (tx * tx).sum(1) - w2 @ s.sq_x                           # 1' K~ 1
    sum_l = (ty * ty).sum(1) - w2 @ s.sq_y
    ones_k_l = (torch.einsum("rp,rpq,rq->r", tx, m, ty) - ((w2 @ s.sq_x_y) * ty).sum(1)
                - ((w2 @ s.sq_y_x) * tx).sum(1) + w3 @ s.sq_xy)      # 1' K~ L~ 1
    value = (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * ones_k_l / (n - 2)) / (n * (n - 3))
    return torch.where(n >= 4, value, torch.zeros_like(value))  # fewer than 4 examples: nothing measurable


def cka_from_sums(xy: PatchSums, xx: PatchSums | torch.Tensor, yy: PatchSums, weights: torch.Tensor) -> torch.Tensor:
    """Debiased linear CKA for each row of `weights` (see weighted_hsic); 0 where a
    self-similarity estimate is not positive, as MinibatchCKA. `xx` may be given as its
    weighted_hsic already (a probe's reference never changes)."""
    hxx = xx if isinstance(xx, torch.Tensor) else weighted_hsic(xx, weights)
    hxy, hyy = weighted_hsic(xy, weights), weighted_hsic(yy, weights)
    denominator = (hxx.clamp_min(0) * hyy.clamp_min(0)).sqrt()
    return torch.where(denominator > 0, hxy / denominator.clamp_min(1e-300), torch.zeros_like(hxy))


def bootstrap_weights(patches: int, resamples: int, strata: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """(resamples, patches) counts: each row a bootstrap resample of the patches, drawn within
    each stratum (the probe's foreground-centred and anywhere patches keep their proportions).
    Seeded: every report and every trial of a sweep uses the same resamples."""
    g = torch.Generator().manual_seed(seed)
    strata = torch.zeros(patches, dtype=torch.long) if strata is None else strata
    weights = torch.zeros(resamples, patches, dtype=torch.float64)
    for s in strata.unique():
        members = torch.nonzero(strata == s).flatten()
        picks = members[torch.randint(len(members), (resamples, len(members)), generator=g)]
        weights.scatter_add_(1, picks, torch.ones(picks.shape, dtype=torch.float64))
    return weights


class LayerProbe:
    """Fixed probe patches, fixed voxel positions in them, and the reference model's features
    there: `cka(model)` gives each group's debiased linear CKA between the reference (e.g. the
    source) and `model` over every probe voxel (`cka.<group>`), and its 95 % bootstrap interval
    over the patches (`cka_low.<group>`, `cka_high.<group>`). 128 patches x 256 voxels compare
    32,768 examples of at most 80 channels; the reference's features take ~20 MB per group."""

    def __init__(self, reference: nn.Module, patches: torch.Tensor, device: torch.device, minibatch: int = 8,
                 voxels_per_patch: int = 256, seed: int = 0, resamples: int = 1000,
                 strata: torch.Tensor | None = None):
        if not len(patches) or voxels_per_patch < 1:
            raise ValueError("no probe patches (or no voxels in them): nothing to compare")
        self.patches, self.device, self.minibatch = patches, device, minibatch
        g = torch.Generator().manual_seed(seed)
        self.positions = torch.rand(len(patches), voxels_per_patch, patches.dim() - 2, generator=g)
        # The interval resamples patches: none with fewer than 4, or when asked for none (2D:
        # DenseNet's 1,024-channel groups make per-patch channel x channel sums too large).
        self.interval = resamples > 0 and len(patches) >= 4
        self.blocks = len(patches) if self.interval else 1  # without an interval, one block of every voxel
        self.weights = torch.ones(1, self.blocks, dtype=torch.float64)
        if self.interval:
            self.weights = torch.cat([self.weights, bootstrap_weights(len(patches), resamples, strata, seed)])
        self.reference = {g: (centred(x), owner if self.interval else torch.zeros_like(owner))
                          for g, (x, owner) in probe_features(reference, patches, self.positions, device, minibatch,
                                                              self.interval).items()}
        self.reference_hsic = {g: weighted_hsic(patch_sums(x, x, owner, self.blocks), self.weights)
                               for g, (x, owner) in self.reference.items()}

    def cka(self, model: nn.Module) -> dict[str, float]:
        features = probe_features(model, self.patches, self.positions, self.device, self.minibatch, self.interval)
        out = {}
        for group, (x, owner) in self.reference.items():
            y = centred(features[group][0])
            values = cka_from_sums(patch_sums(x, y, owner, self.blocks), self.reference_hsic[group],
                                   patch_sums(y, y, owner, self.blocks), self.weights)
            out[f"cka.{group}"] = float(values[0])
            if self.interval:
                low, high = torch.quantile(values[1:], torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
                out |= {f"cka_low.{group}": low, f"cka_high.{group}": high}
        return out


def centred(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x - x.mean(0, keepdim=True)


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

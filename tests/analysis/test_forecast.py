"""forecast.py: LogME, voxel features per freeze depth, and the forecast-vs-measured agreement."""

import math

import numpy as np
import pytest
import torch

from tlcore.analysis.forecast import balanced_voxels, depth_features, forecast_depths, logme
from tlcore.analysis.stats import rank_agreement
from tlcore.models.networks import build_model


def log_evidence(f, t, alpha, beta):
    """Bayesian linear regression's log evidence, by direct matrix algebra (no SVD)."""
    n, d = f.shape
    A = alpha * np.eye(d) + beta * f.T @ f
    m = beta * np.linalg.solve(A, f.T @ t)
    return (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - n / 2 * math.log(2 * math.pi)
            - beta / 2 * float(np.sum((f @ m - t) ** 2)) - alpha / 2 * float(m @ m) - 0.5 * np.linalg.slogdet(A)[1])


def test_logme_finds_the_maximum_evidence_of_each_class():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(120, 5))
    y = (f[:, 0] + 0.5 * rng.normal(size=120) > 0).astype(int)
    best = np.mean([max(log_evidence(f, (y == c).astype(float), a, b)
                        for a in np.logspace(-3, 3, 61) for b in np.logspace(-2, 3, 61)) / 120 for c in (0, 1)])
    assert logme(f, y) == pytest.approx(best, abs=2e-3)


def test_informative_features_score_higher_than_noise():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    informative = np.stack([y + 0.3 * rng.normal(size=400), rng.normal(size=400)], 1)
    noise = rng.normal(size=(400, 2))
    assert logme(informative, y) > logme(noise, y) + 0.2


def test_forecast_agreement_says_when_the_forecast_ranks_right_or_wrong():
    per_subject = {k: {f"s{i}": 0.2 + 0.1 * k + 0.01 * i for i in range(6)} for k in range(4)}
    right = rank_agreement({0: -1.0, 1: -0.5, 2: 0.0, 3: 0.4}, per_subject, resamples=200)
    assert right["tau"] == 1.0 and right["ci95"] == (1.0, 1.0) and right["forecast_best"] == right["measured_best"] == 3
    wrong = rank_agreement({0: 0.4, 1: 0.0, 2: -0.5, 3: -1.0}, per_subject, resamples=200)
    assert wrong["tau"] == -1.0 and wrong["forecast_best"] == 0 and wrong["measured_best"] == 3
    # subjects where the depths are close: the interval widens around the measured tau
    noisy = {k: {f"s{i}": 0.5 + (0.3 if (i + k) % 2 else -0.3) + 0.01 * k for i in range(8)} for k in range(4)}
    mixed = rank_agreement({0: 0.0, 1: 1.0, 2: 2.0, 3: 3.0}, noisy, resamples=300)
    assert mixed["ci95"][0] < mixed["tau"] <= mixed["ci95"][1] or mixed["ci95"][0] <= mixed["tau"] < mixed["ci95"][1]
    assert math.isnan(rank_agreement({0: 1.0, 1: 2.0}, per_subject)["tau"])  # two depths rank nothing


class Volume:
    def __init__(self, seed):
        g = torch.Generator().manual_seed(seed)
        self.image = torch.randn(2, 20, 20, 20, generator=g)
        self.label = torch.zeros(1, 20, 20, 20, dtype=torch.long)
        self.label[0, 5:12, 6:14, 4:10] = 1
        self.image[0][self.label[0] == 1] += 2.0  # the first channel shows the foreground


def test_depth_features_give_input_and_group_outputs_at_balanced_voxels():
    torch.manual_seed(0)
    model = build_model(num_classes=2)
    features, labels = depth_features(model, [Volume(1), Volume(2)], (12, 12, 12), patches=4, voxels_per_class=16)
    assert [f.shape[1] for f in features] == [2, 16, 16, 32, 64, 80]  # input, conv_0 .. conv_1
    assert all(len(f) == len(labels) for f in features)
    assert labels.mean() == 0.5  # exactly as many foreground as background voxels
    assert model.training
    again, _ = depth_features(model, [Volume(1), Volume(2)], (12, 12, 12), patches=4, voxels_per_class=16)
    assert all(np.array_equal(a, b) for a, b in zip(features, again))
    # the raw input separates these classes: LogME says so
    assert logme(features[0], labels) > logme(np.random.default_rng(0).normal(size=features[0].shape), labels)


def test_balanced_voxels_take_exactly_as_many_of_each_class_over_all_patches():
    labels = torch.zeros(3, 1, 6, 6, 6, dtype=torch.long)
    labels[0, 0, :2, :2, :2] = 1   # 8 foreground voxels in the first patch
    labels[1, 0, :1, :1, :3] = 2   # 3 of a third class in the second, none in the third
    voxels = balanced_voxels(labels, per_class=64, seed=0)
    chosen = torch.cat([labels[i].flatten()[idx] for i, idx in enumerate(voxels)])
    assert torch.bincount(chosen).tolist() == [3, 3, 3]  # the rarest class sets the count
    assert [idx.tolist() for idx in voxels] == [idx.tolist() for idx in balanced_voxels(labels, 64, seed=0)]


@pytest.fixture(scope="module")
def brats_subjects(synthetic_root):
    from tlcore.data.layouts import default_label_map, find_subjects
    from tlcore.data.pipeline import load_subject

    files = find_subjects("brats", synthetic_root / "brats", ("t1", "t2"))
    return [load_subject(s, files[s], ("t1", "t2"), default_label_map("brats"), 2, (16, 16, 16))
            for s in sorted(files)[:8]]


def untrained(seed: int):
    torch.manual_seed(seed)
    return build_model(num_classes=2)


def informative_early_layers():
    """A source whose first group carries the target's signal: each conv_0 feature is a local mean
    of one input channel, positive or negative (so that ReLU keeps one of the two); the residual
    groups pass it on unchanged (zero weights: identity), and conv_1 is untrained."""
    model = untrained(98)
    with torch.no_grad():
        conv = model.blocks[0].conv
        weights = torch.zeros_like(conv.weight)
        for o in range(weights.shape[0]):
            weights[o, (o // 2) % 2] = (1 if o % 2 == 0 else -1) * (1 + o // 4) / 27
        conv.weight.copy_(weights)
        for block in model.blocks[1:10]:
            for m in block.modules():
                if isinstance(m, torch.nn.Conv3d):
                    m.weight.zero_()
    return model


def test_the_gain_over_untrained_networks_measures_transfer_not_depth(brats_subjects):
    """Two constructed sources on synthetic BraTS. A source with nothing learnt (another untrained
    network): its raw LogME still rises with depth, its gain over the untrained baseline stays near
    0 at every depth. A source whose early features carry the signal: the raw score would pick the
    deepest freeze, the gain picks a shallow one."""
    models = {"nothing": untrained(99), "early": informative_early_layers(),
              **{f"baseline{i}": untrained(i) for i in range(3)}}
    scores = forecast_depths(models, brats_subjects, (16, 16, 16), range(6), patches=16, seed=0)
    baseline = {k: np.mean([scores[f"baseline{i}"][k] for i in range(3)]) for k in range(6)}
    gain = {name: {k: scores[name][k] - baseline[k] for k in range(6)} for name in ("nothing", "early")}
    rise = scores["nothing"][5] - scores["nothing"][0]
    assert rise > 0.2 and max(abs(g) for g in gain["nothing"].values()) < rise / 2, (scores["nothing"], gain["nothing"])
    assert max(scores["early"], key=scores["early"].get) == 5                 # raw: freeze deep
    assert max(gain["early"], key=gain["early"].get) in (1, 2)                  # gain: freeze shallow
    assert gain["early"][1] > gain["early"][5] + 0.05 and gain["early"][1] > max(gain["nothing"].values())

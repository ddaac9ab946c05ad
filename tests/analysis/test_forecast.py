"""forecast.py: LogME, voxel features per freeze depth, and the forecast-vs-measured agreement."""

import math

import numpy as np
import pytest
import torch

from tlcore.analysis.forecast import depth_features, logme
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
    assert 0 < labels.mean() < 1  # both classes, balanced where the patch has both
    assert model.training
    again, _ = depth_features(model, [Volume(1), Volume(2)], (12, 12, 12), patches=4, voxels_per_class=16)
    assert all(np.array_equal(a, b) for a, b in zip(features, again))
    # the raw input separates these classes: LogME says so
    assert logme(features[0], labels) > logme(np.random.default_rng(0).normal(size=features[0].shape), labels)

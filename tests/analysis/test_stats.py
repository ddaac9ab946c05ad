"""Statistics of the reports on hand-made data with known answers."""

import numpy as np
import pytest

from tlcore.analysis.stats import bootstrap_ci, holm, paired_correctness, paired_scores


def test_wilcoxon_on_distinct_positive_differences_is_the_exact_sign_probability():
    baseline = {f"s{i}": 0.5 for i in range(10)}
    candidate = {f"s{i}": 0.5 + 0.01 * (i + 1) for i in range(10)}
    c = paired_scores(candidate, baseline)
    # all 10 ranks positive: exact two-sided p = 2 / 2^10
    assert c.n == 10 and c.p_value == pytest.approx(2 / 2**10)
    assert c.mean_difference == pytest.approx(0.055)
    assert c.ci_low <= 0.055 <= c.ci_high and c.ci_low > 0.02


def test_subjects_are_matched_by_id_not_by_order():
    baseline = {"a": 0.1, "b": 0.9, "c": 0.5}
    candidate = {"c": 0.6, "b": 1.0, "a": 0.2, "extra": 0.0}
    c = paired_scores(candidate, baseline)
    assert c.n == 3 and c.mean_difference == pytest.approx(0.1)
    assert c.ci_low == pytest.approx(0.1) and c.ci_high == pytest.approx(0.1)


def test_bootstrap_interval_has_the_normal_width():
    rng = np.random.default_rng(1)
    d = rng.normal(0.02, 0.05, size=400)
    low, high = bootstrap_ci(d)
    half = 1.96 * d.std(ddof=1) / np.sqrt(d.size)
    assert low < d.mean() < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)


def test_no_difference_gives_p_one_and_noise_is_not_significant():
    same = {f"s{i}": 0.7 for i in range(12)}
    assert paired_scores(same, same).p_value == 1.0
    rng = np.random.default_rng(3)
    base = {f"s{i}": float(v) for i, v in enumerate(rng.uniform(0.5, 0.9, 42))}
    noisy = {k: v + float(rng.normal(0, 0.05)) for k, v in base.items()}
    c = paired_scores(noisy, base)
    assert c.p_value > 0.05 and c.ci_low < 0 < c.ci_high


def test_mcnemar_counts_only_discordant_images():
    baseline = {f"i{k}": k < 50 for k in range(100)}            # right on 50
    candidate = {f"i{k}": k < 60 for k in range(100)}           # right on those 50 and 10 more
    c = paired_correctness(candidate, baseline)
    assert c.test == "mcnemar" and c.p_value == pytest.approx(2 * 0.5**10)
    assert c.mean_difference == pytest.approx(0.10)


def test_holm_adjustment():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    out = holm([0.2, float("nan"), 0.01])
    assert out[0] == pytest.approx(0.2) and np.isnan(out[1]) and out[2] == pytest.approx(0.02)

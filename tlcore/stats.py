"""Paired comparisons of a configuration against the scratch baseline on the same subjects.

A Dice difference of 0.02 on 42 test subjects may be noise: every comparison in a report comes
with a bootstrap 95 % confidence interval of the mean paired difference and a p-value
(Wilcoxon signed-rank for per-subject scores, exact McNemar for per-image correctness),
Holm-corrected for the number of comparisons in the report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Comparison:
    n: int                 # paired subjects (or images)
    mean_difference: float
    ci_low: float
    ci_high: float
    p_value: float
    test: str
    p_adjusted: float = float("nan")


def bootstrap_ci(differences, confidence: float = 0.95, resamples: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences."""
    d = np.asarray(differences, float)
    if d.size < 2:
        return float("nan"), float("nan")
    res = stats.bootstrap((d,), np.mean, confidence_level=confidence, n_resamples=resamples,
                          method="percentile", random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_scores(candidate: dict[str, float], baseline: dict[str, float]) -> Comparison:
    """Per-subject scores (e.g. Dice) of two models on the same subjects, matched by subject id."""
    ids = sorted(set(candidate) & set(baseline))
    d = np.array([candidate[i] - baseline[i] for i in ids], float)
    if len(ids) == 0:
        return Comparison(0, float("nan"), float("nan"), float("nan"), float("nan"), "wilcoxon")
    low, high = bootstrap_ci(d)
    p = float("nan")
    if np.any(d != 0):
        p = float(stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)
    elif len(ids):
        p = 1.0
    return Comparison(len(ids), float(d.mean()), low, high, p, "wilcoxon")


def paired_correctness(candidate: dict[str, bool], baseline: dict[str, bool]) -> Comparison:
    """Per-image correct / wrong of two classifiers on the same images: exact McNemar test on the
    discordant pairs; the difference is in accuracy."""
    ids = sorted(set(candidate) & set(baseline))
    a = np.array([candidate[i] for i in ids], bool)
    b = np.array([baseline[i] for i in ids], bool)
    d = a.astype(float) - b.astype(float)
    only_candidate, only_baseline = int(np.sum(a & ~b)), int(np.sum(~a & b))
    discordant = only_candidate + only_baseline
    p = 1.0 if discordant == 0 else float(stats.binomtest(only_candidate, discordant, 0.5).pvalue)
    low, high = bootstrap_ci(d)
    return Comparison(len(ids), float(d.mean()) if len(ids) else float("nan"), low, high, p, "mcnemar")


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaNs stay NaN and do not count as comparisons)."""
    p = np.asarray(p_values, float)
    valid = np.flatnonzero(~np.isnan(p))
    out = np.full(p.shape, np.nan)
    order = valid[np.argsort(p[valid])]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()

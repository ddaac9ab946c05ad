"""Paired comparisons of a configuration against the scratch baseline on the same subjects, and
how well a forecast ranks configurations.

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


def rank_agreement(forecast: dict, per_subject: dict[object, dict[str, float]], resamples: int = 2000,
                   seed: int = 0) -> dict:
    """How well a forecast (key -> score, e.g. freeze depth k -> LogME) ranks what was measured
    (key -> {subject: Dice}): Kendall's tau-b between the scores and the mean Dice over the
    subjects every key was evaluated on, with a percentile bootstrap 95 % interval over subjects."""
    keys = sorted(k for k in forecast if k in per_subject)
    subjects = sorted(set.intersection(*(set(per_subject[k]) for k in keys))) if keys else []
    out = {"keys": keys, "subjects": len(subjects), "tau": float("nan"), "ci95": (float("nan"), float("nan"))}
    if len(keys) < 3 or len(subjects) < 2:
        return out
    dice = np.array([[per_subject[k][s] for s in subjects] for k in keys])  # keys x subjects
    scores = [forecast[k] for k in keys]
    tau = lambda d: stats.kendalltau(scores, d.mean(1)).statistic
    rng = np.random.default_rng(seed)
    boot = np.array([tau(dice[:, rng.integers(0, len(subjects), len(subjects))]) for _ in range(resamples)])
    boot = boot[~np.isnan(boot)]
    measured = dice.mean(1)
    return {**out, "tau": float(tau(dice)),
            "ci95": (float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))) if len(boot) else out["ci95"],
            "forecast_best": keys[int(np.argmax(scores))], "measured_best": keys[int(np.argmax(measured))],
            "measured": dict(zip(keys, measured.tolist()))}

"""Scores of the 2D chain and of training curves, numpy only (no torch, no MONAI: the sweep's
driver computes them): accuracy, AUC, kappa, MURA's study-wise decision, and the steps a
training loss takes to reach a target (data efficiency)."""

from __future__ import annotations

import numpy as np


def classification_metrics(y_true, prob_positive, threshold: float = 0.5) -> dict:
    """Accuracy, ROC AUC, sensitivity, specificity, Cohen's kappa and the confusion matrix
    (rows = true negative / positive, columns = predicted)."""
    from sklearn.metrics import cohen_kappa_score, confusion_matrix, roc_auc_score

    y = np.asarray(y_true).astype(int)
    p = np.asarray(prob_positive, dtype=float)
    pred = (p >= threshold).astype(int)
    cm = confusion_matrix(y, pred, labels=[0, 1])
    tn, fp, fn, tp = cm.ravel()
    return {"accuracy": float((tp + tn) / max(len(y), 1)),
            "auc": float(roc_auc_score(y, p)) if len(set(y)) == 2 else float("nan"),
            "sensitivity": float(tp / max(tp + fn, 1)), "specificity": float(tn / max(tn + fp, 1)),
            "kappa": float(cohen_kappa_score(y, pred)) if len(set(y) | set(pred)) > 1 else 0.0,
            "confusion": cm.tolist()}


def study_wise(studies, y_true, prob_positive, threshold: float = 0.5) -> tuple[list, np.ndarray, np.ndarray]:
    """MURA's study-wise decision: a study is abnormal if any of its images is predicted
    abnormal. Returns (study ids, study labels, study scores = max image probability)."""
    scores: dict = {}
    labels: dict = {}
    for s, y, p in zip(studies, y_true, prob_positive):
        scores[s] = max(scores.get(s, 0.0), float(p))
        if labels.setdefault(s, int(y)) != int(y):
            raise ValueError(f"study {s} has images with different labels")
    ids = sorted(scores)
    return ids, np.array([labels[s] for s in ids]), np.array([scores[s] for s in ids])


def common_target_loss(loss_curves) -> float | None:
    """The training loss every curve reached: the highest of the curves' lowest values (the
    default target of the steps-to-reach comparison)."""
    lows = [min(c) for c in loss_curves if len(c)]
    return max(lows) if lows else None


def steps_to_reach(losses, target: float, smooth: int = 5) -> int | None:
    """First step at which the moving average of the training loss is <= target (None = never)."""
    losses = np.asarray(losses, dtype=float)
    if len(losses) == 0:
        return None
    k = max(1, min(smooth, len(losses)))
    avg = np.convolve(losses, np.ones(k) / k, mode="valid")
    hit = np.flatnonzero(avg <= target)
    return int(hit[0] + k) if len(hit) else None

"""The 2D chain's scores and the steps a training loss takes to a target: study-wise aggregation,
classification metrics, steps-to-target."""

import pytest

from tlcore.evaluation.scores import classification_metrics, steps_to_reach, study_wise


def test_study_wise_aggregation():
    studies = ["s1", "s1", "s1", "s2", "s2", "s3"]
    labels = [1, 1, 1, 0, 0, 1]
    probs = [0.1, 0.2, 0.9, 0.4, 0.3, 0.2]   # s1 abnormal (one image), s2 normal, s3 missed
    ids, y, p = study_wise(studies, labels, probs)
    assert ids == ["s1", "s2", "s3"] and y.tolist() == [1, 0, 1] and p.tolist() == [0.9, 0.4, 0.2]
    m = classification_metrics(y, p)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["confusion"] == [[1, 0], [1, 1]]
    assert m["sensitivity"] == 0.5 and m["specificity"] == 1.0
    with pytest.raises(ValueError, match="different labels"):
        study_wise(["a", "a"], [0, 1], [0.1, 0.2])


def test_steps_to_reach():
    assert steps_to_reach([1.0, 0.8, 0.6, 0.4, 0.2], 0.5, smooth=1) == 4
    assert steps_to_reach([1.0, 0.9], 0.5) is None

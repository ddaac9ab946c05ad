"""The tables a sweep prints from Tune's results (tlcore.sweep.results), on hand-made results."""

import json
from types import SimpleNamespace

import pandas as pd
from ray.tune import Result

from tlcore.sweep.results import trial_rows


def result(folder, config, reports, error=None):
    """A Tune result as ResultGrid makes one: metrics (config included) are the last report's."""
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(config))  # Tune writes it as the trial starts
    df = pd.DataFrame(reports) if reports else None
    metrics = {**reports[-1], "config": config} if reports else {}
    return Result(metrics=metrics, checkpoint=None, error=error, path=str(folder), metrics_dataframe=df)


def test_a_row_per_trial_a_failed_one_included_even_before_its_first_report(tmp_path):
    sweep = SimpleNamespace(max_iterations=12, metric="val_dice", mode="max")
    base = {"dataset": "ixi", "data_dir": str(tmp_path), "seed": 0}
    done = result(tmp_path / "train_segmentation_trial_a_00000", {**base, "lr": 0.001},
                  [{"iteration": 4, "val_dice": 0.2, "trial_id": "a_00000"}, {"iteration": 8, "val_dice": 0.5, "trial_id": "a_00000"},
                   {"iteration": 12, "val_dice": 0.4, "trial_id": "a_00000"}])
    stopped = result(tmp_path / "train_segmentation_trial_a_00001", {**base, "lr": 0.003},
                     [{"iteration": 4, "val_dice": 0.1, "trial_id": "a_00001"}])
    # its worker killed again as it restarted: no report in its last attempt, so no metrics
    failed = result(tmp_path / "train_segmentation_trial_a_00002", {**base, "lr": 0.01}, [],
                    error=RuntimeError("The actor died unexpectedly"))
    rows = {r.trial_id: r.as_dict() for r in trial_rows([done, stopped, failed], sweep)}
    assert rows["a_00000"]["best_val_dice"] == 0.5 and rows["a_00000"]["iterations"] == 12
    assert rows["a_00000"]["stopped_early"] is False and rows["a_00000"]["status"] == "OK"
    assert rows["a_00001"]["stopped_early"] is True and rows["a_00001"]["lr"] == "0.003"
    assert rows["a_00002"]["status"] == "ERROR" and rows["a_00002"]["lr"] == "0.01"  # its config, from params.json
    assert rows["a_00002"]["error"] == "The actor died unexpectedly"
    assert rows["a_00002"]["error_file"].endswith("train_segmentation_trial_a_00002/error.txt")
    assert "error" not in rows["a_00000"]  # the error columns only where a trial failed


def test_the_thesis_tables_are_views_of_the_rows_and_their_scores(tmp_path):
    from tlcore.sweep.results import layer_table, subset_table

    sweep = SimpleNamespace(max_iterations=8, metric="val_dice", mode="max")
    base = {"dataset": "brats", "data_dir": str(tmp_path), "seed": 0, "lr": 0.001}
    results = [result(tmp_path / f"train_segmentation_trial_b_0000{i}", {**base, "train_subset": subset, "start": start},
                      [{"iteration": 8, "val_dice": 0.3 + i / 10, "trial_id": f"b_0000{i}"}])
               for i, (subset, start) in enumerate([("S1", {"source_model": "scratch", "frozen_layers": 0}),
                                                     ("S1", {"source_model": "models:/ixi/1", "frozen_layers": 1})])]
    rows = trial_rows(results, sweep)
    assert [r.source_model for r in rows] == ["scratch", "models:/ixi/1"]  # scratch first
    scores = {"b_00000": {"train_dice": 0.61234, "test_dice": 0.5, "best_iteration": 8}}
    layers = layer_table(rows, scores)
    assert layers[0]["train_dice"] == 0.6123 and layers[0]["best_val_dice"] == 0.3 and layers[1]["test_dice"] == ""
    subsets = subset_table(rows, scores, {"train": ["a", "b", "c"], "subsets": {"S1": ["a"]}})
    assert [r["model"] for r in subsets] == ["scratch", "k=1"] and subsets[0]["train_subset"] == "S1 (1)"
    assert subsets[1]["val_dice"] == 0.4 and subsets[1]["status"] == "OK"

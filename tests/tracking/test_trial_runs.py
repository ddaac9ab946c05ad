"""trial_runs.py: how a trial's MLflow run is named and what it logs."""

from tlcore.tracking.trial_runs import trial_run_name


def test_run_names_lead_with_what_varies():
    """MLflow's runs table cuts long names: the subset and the frozen groups come before the rest."""
    transferred = {"start": {"source_model": "models:/ixi_hippocampus/1", "frozen_layers": 2}, "lr": 0.001,
                   "lr_schedule": "constant"}
    assert trial_run_name(transferred) == "k=2 · ixi_hippocampus/1 · lr=0.001 constant"
    assert trial_run_name({**transferred, "train_subset": "S2"}).startswith("S2 · k=2 · ")
    assert trial_run_name({"start": {"source_model": "scratch", "frozen_layers": 0}, "train_subset": "all",
                           "lr": 0.001, "lr_schedule": "constant"}) == "scratch · lr=0.001 constant"
    # a control has no frozen groups to name
    assert trial_run_name({"source_model": "meanvar:models:/ixi_hippocampus/1", "lr": 0.001,
                           "lr_schedule": "cosine"}) == "meanvar:ixi_hippocampus/1 · lr=0.001 cosine"

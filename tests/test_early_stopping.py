"""Early stopping per stratum, through a real local Ray Tune run (trials report made-up curves).

Every trial reports `val_dice = quality` at each of 9 reports. Trials on S1 (few subjects) are
all worse than every trial on S4, as small-subset trials are in a real brats_subsets sweep.
"""

import tempfile
from pathlib import Path

import pytest
from ray import tune

from tlcore.trainables import StratifiedASHA

REPORTS = 9
QUALITY = {"S1": [0.10, 0.20, 0.30], "S4": [0.60, 0.70, 0.80]}


def curve_trial(config):
    """Reports with a checkpoint each time, as tlcore's trainables do: a paused trial goes on."""
    done = 0
    if tune.get_checkpoint():
        with tune.get_checkpoint().as_directory() as d:
            done = int((Path(d) / "done").read_text())
    for i in range(done, REPORTS):
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "done").write_text(str(i + 1))
            tune.report({"val_dice": QUALITY[config["train_subset"]][config["rank"]]},
                        checkpoint=tune.Checkpoint.from_directory(d))


def run(scheduler, tmp_path) -> dict:
    """(subset, quality) -> reports each trial made before it ended."""
    space = {"train_subset": tune.grid_search(["S1", "S4"]), "rank": tune.grid_search([0, 1, 2])}
    tuner = tune.Tuner(tune.with_resources(curve_trial, {"cpu": 1}), param_space=space,
                       tune_config=tune.TuneConfig(metric="val_dice", mode="max", scheduler=scheduler),
                       run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0))
    results = tuner.fit()
    assert not results.errors
    return {(r.config["train_subset"], QUALITY[r.config["train_subset"]][r.config["rank"]]):
            int(r.metrics["training_iteration"]) for r in results}


def survivors(reports: dict) -> set:
    return {key for key, n in reports.items() if n == REPORTS}


def test_one_stratum_stops_small_subset_trials_for_being_behind_large_ones(local_ray, tmp_path):
    reports = run(StratifiedASHA((), max_t=REPORTS, grace_period=1, reduction_factor=3, synchronous=True), tmp_path)
    assert survivors(reports) <= {("S4", q) for q in QUALITY["S4"]}  # no S1 trial ran to the end


@pytest.mark.parametrize("synchronous", [False, True])
def test_a_small_subset_trial_is_judged_only_against_its_own_subset(local_ray, tmp_path, synchronous):
    reports = run(StratifiedASHA(("train_subset",), max_t=REPORTS, grace_period=1, reduction_factor=3,
                                 synchronous=synchronous), tmp_path)
    # the best trial of each subset always survives its stratum's rungs
    assert ("S1", 0.30) in survivors(reports) and ("S4", 0.80) in survivors(reports)
    if synchronous:  # decisions depend on the results only: rungs 1 and 3 keep ceil(3/3) = 1 of 3
        assert survivors(reports) == {("S1", 0.30), ("S4", 0.80)}
        assert all(reports[(s, q)] == 1 for s in QUALITY for q in QUALITY[s][:2])


def test_synchronous_rungs_are_asha_rungs():
    s = StratifiedASHA(max_t=40, grace_period=2, reduction_factor=3, synchronous=True)
    assert s.rungs == [2, 6, 18]  # grace_period * 3^k below max_t, as Ray's ASHA


class ResumeCount(tune.Callback):
    def __init__(self):
        self.count = 0

    def on_trial_start(self, iteration, trials, trial, **info):
        self.count += bool(trial.checkpoint)


class StaleStorageCopy(tune.Callback):
    """What Ray's periodic sync leaves behind: before a paused trial resumes, the storage path
    holds an older copy of its result file (here: one report behind)."""

    def on_trial_start(self, iteration, trials, trial, **info):
        local = Path(trial.local_path, "result.json")
        if trial.checkpoint and local.exists():
            remote = Path(trial.storage.trial_fs_path, "result.json")
            remote.parent.mkdir(parents=True, exist_ok=True)
            remote.write_text("".join(local.read_text().splitlines(keepends=True)[:-1]))


def test_a_paused_trial_keeps_every_report_in_its_results(local_ray, tmp_path):
    """asha-sync pauses trials at every rung; their results (metrics_dataframe: best values,
    best checkpoints, tables) must not depend on when Ray last synced to storage."""
    from tlcore.trainables import result_loggers

    # the best trial starts first, so it waits PAUSED at the rung (report 3) for the others
    space = {"train_subset": "S4", "rank": tune.grid_search([2, 1, 0])}
    resumed = ResumeCount()
    tuner = tune.Tuner(
        tune.with_resources(curve_trial, {"cpu": 1}), param_space=space,
        tune_config=tune.TuneConfig(metric="val_dice", mode="max", scheduler=StratifiedASHA(
            (), max_t=REPORTS, grace_period=3, reduction_factor=3, synchronous=True)),
        run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0,
                                  callbacks=[resumed, StaleStorageCopy(), *result_loggers()]))
    results = tuner.fit()
    assert not results.errors
    survivor = [r for r in results if r.metrics["training_iteration"] == REPORTS]
    assert [r.config["rank"] for r in survivor] == [2] and resumed.count >= 1
    assert list(survivor[0].metrics_dataframe["training_iteration"]) == list(range(1, REPORTS + 1))


def test_successive_halving_decides_once_a_stratum_has_all_reported_whatever_the_order():
    from itertools import permutations

    from tlcore.halving import SuccessiveHalving

    scores = {"t1": 0.5, "t2": 0.9, "t3": 0.5, "t4": 0.1, "s1": 0.0, "s2": 0.2}
    stratum_of = {t: ("S1",) if t.startswith("s") else ("S4",) for t in scores}
    outcomes = set()
    for order in permutations(["t1", "t2", "t3", "t4"]):
        book = SuccessiveHalving(rungs=[2, 6], reduction_factor=3)
        for t in scores:
            book.add(t, stratum_of[t])
        decisions = [book.report(t, ("S4",), 2, scores[t]) for t in order]
        assert decisions[:3] == [None, None, None]  # the first three wait for the fourth
        outcomes.add((decisions[3].keep, decisions[3].stop))
    # ceil(4 / 3) = 2 go on: the best, then the tie at 0.5 broken by trial id; S1 plays no part
    assert outcomes == {(frozenset({"t2", "t1"}), frozenset({"t3", "t4"}))}

    # a trial that ends while others wait at a rung releases them
    book = SuccessiveHalving(rungs=[2, 6], reduction_factor=3)
    for t in ("s1", "s2"):
        book.add(t, ("S1",))
    assert book.report("s1", ("S1",), 2, 0.0) is None
    (decision,) = book.leave("s2", ("S1",))
    assert decision.keep == {"s1"} and decision.rung == 2 and book.leave("s2", ("S1",)) == []

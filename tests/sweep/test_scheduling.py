"""Early stopping per stratum, through a real local Ray Tune run (trials report made-up curves).

Every trial reports `val_dice = quality` at each of 9 reports. Trials on S1 (few subjects) are
all worse than every trial on S4, as small-subset trials are in a real brats_subsets sweep.
"""

import tempfile
from pathlib import Path

import pytest
from ray import tune

from tlcore.sweep.scheduling import StratifiedASHA

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


def test_a_paused_trial_keeps_every_report_in_its_results(local_ray, tmp_path, monkeypatch):
    """asha-sync pauses trials at every rung; their results (metrics_dataframe: best values,
    best checkpoints, tables) must not depend on when Ray last synced to storage."""
    from tlcore.sweep.callbacks import result_loggers

    # Tune saves its experiment state at every step (in a real sweep, a trial waits long enough)
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "0")

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
    # a loser stopped while it waited PAUSED is TERMINATED in Tune's saved state too (what
    # tlcore.tracking.sync and --resume read), not PAUSED as saved while it waited
    from tlcore.tracking.sync import read_trials

    assert {t.trial_id: t.status for t in read_trials(Path(results.experiment_path))} == {
        r.metrics["trial_id"]: "TERMINATED" for r in results}


def test_successive_halving_decides_once_a_stratum_has_all_reported_whatever_the_order():
    from itertools import permutations

    from tlcore.sweep.halving import SuccessiveHalving

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


# ------------------------------------------------------------------ faults: retries, resumes, searches
# A trial's curve is flat at its quality; `quality` picks it. Markers in a shared folder let a trial
# wait for the others (the worker of a trial that fails once, after the rung was decided without it).

def marked_trial(config):
    """curve_trial with faults: the trial of `failing_quality` fails once (before its first
    report) after `fail_when_marked` other trials have reported."""
    import time

    markers = Path(config["markers"])
    done = 0
    if tune.get_checkpoint():
        with tune.get_checkpoint().as_directory() as d:
            done = int((Path(d) / "done").read_text())
    for i in range(done, REPORTS):
        if (i == 0 and config.get("fail_when_marked") and config["quality"] == config["failing_quality"]
                and not (markers / "failed").exists()):
            deadline = time.time() + 60
            while len(list(markers.glob("first_*"))) < config["fail_when_marked"] and time.time() < deadline:
                time.sleep(0.1)
            (markers / "failed").write_text(f"{time.time()}")
            raise RuntimeError("worker lost (test)")
        (markers / f"first_{config['quality']}").write_text(f"{time.time()}")  # before: a paused trial's report() never returns
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "done").write_text(str(i + 1))
            tune.report({"val_dice": config["quality"]}, checkpoint=tune.Checkpoint.from_directory(d))


class DriverDies(tune.Callback):
    """Ends the Tune loop (as a killed driver does) once `after` results came in, once (the
    restored sweep unpickles this callback as it was); Tune saved its state at every step
    before (TUNE_GLOBAL_CHECKPOINT_S=0)."""

    def __init__(self, after: int, marker: Path):
        self.after, self.seen, self.marker = after, 0, marker

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.seen += 1

    def on_step_end(self, iteration, trials, **info):
        if self.after and self.seen >= self.after and not self.marker.exists():
            self.marker.touch()
            raise RuntimeError("driver killed (test)")


def finishers(results) -> set:
    return {r.config["quality"] for r in results if r.metrics.get("training_iteration") == REPORTS}


def run_marked(tmp_path, name, qualities, synchronous, *, fail_when_marked=0, dies_after=0, sequential=False,
               searcher=None, num_samples=1, budget_s=120, callbacks=()):
    import time

    markers = tmp_path / f"{name}-markers"
    markers.mkdir()
    space = {"markers": str(markers)}
    if searcher is None:
        space["quality"] = tune.grid_search(qualities)
        space.update(fail_when_marked=fail_when_marked, failing_quality=min(qualities))
    scheduler = StratifiedASHA((), max_t=REPORTS, grace_period=1, reduction_factor=3, synchronous=synchronous)
    trainable = tune.with_resources(marked_trial, {"cpu": 1})
    tuner = tune.Tuner(trainable, param_space=space,
                       tune_config=tune.TuneConfig(metric="val_dice", mode="max", scheduler=scheduler,
                                                   search_alg=searcher, num_samples=num_samples,
                                                   max_concurrent_trials=1 if sequential else None,
                                                   time_budget_s=budget_s),
                       run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0,
                                                 failure_config=tune.FailureConfig(max_failures=1),
                                                 callbacks=[DriverDies(dies_after, markers / "driver_died"),
                                                            *callbacks]))
    t0 = time.time()
    try:
        results = tuner.fit()
    except Exception:  # noqa: BLE001 -- the driver "died"; --resume
        assert dies_after, "only the dying driver may raise"
        results = tune.Tuner.restore(str(tmp_path / name), trainable, resume_errored=True).fit()
    elapsed = time.time() - t0
    print(f"{name}: {elapsed:.1f} s")
    assert elapsed < budget_s - 5, f"the sweep ran into its time budget ({elapsed:.0f} s): it stalled"
    assert not results.errors, results.errors
    return results


@pytest.mark.parametrize("synchronous", [True, False], ids=["asha-sync", "asha"])
def test_a_trial_failing_after_its_rung_was_decided_is_retried_and_the_sweep_ends(local_ray, tmp_path, synchronous):
    """The worst of five trials fails once, after the other four have reported at rung 1: the
    rung decides without it (keeping ceil(4/3) = 2, as ceil(5/3) would), Tune retries it, it
    arrives late and is judged against the recorded scores. The survivors of a quiet sweep; the
    progress view says the trial was retried."""
    import io

    from tlcore.sweep.callbacks import Progress

    qualities = [0.1, 0.3, 0.5, 0.7, 0.9]
    progress = Progress(REPORTS, "val_dice", "max")
    progress.stream = io.StringIO()
    faulty = run_marked(tmp_path, "faulty", qualities, synchronous, fail_when_marked=4, callbacks=[progress])
    assert (tmp_path / "faulty-markers" / "failed").exists()
    assert "failed at 0/9, retried from its last checkpoint (traceback: " in progress.stream.getvalue()
    assert all(r.metrics.get("training_iteration", 0) >= 1 for r in faulty)  # the retried trial reported
    if synchronous:  # the same survivors as a sweep without the failure
        assert finishers(faulty) == finishers(run_marked(tmp_path, "quiet", qualities, synchronous)) == {0.9}
    else:  # (asynchronous: which trials a rung keeps depends on arrival order; the best goes on)
        assert 0.9 in finishers(faulty)


@pytest.mark.parametrize("synchronous,dies_after", [(True, 2), (False, REPORTS)], ids=["asha-sync", "asha"])
def test_a_resumed_sweep_rebuilds_its_rungs_and_decides_as_an_uninterrupted_one(local_ray, tmp_path, monkeypatch,
                                                                                synchronous, dies_after):
    """One trial at a time, best first. asha-sync: the driver dies while 0.9 and 0.5 wait at rung 1
    for 0.1. asha: it dies once 0.9 has finished, before the others reach rung 1. Resumed, the
    rungs are rebuilt from the result files: the same survivors as without the death (a fresh
    scheduler would let 0.5 through, or wait at rung 1 for trials that have finished)."""
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "0")
    qualities = [0.9, 0.5, 0.1]
    quiet = run_marked(tmp_path, "quiet", qualities, synchronous, sequential=True)
    resumed = run_marked(tmp_path, "resumed", qualities, synchronous, sequential=True, dies_after=dies_after)
    assert finishers(resumed) == finishers(quiet) == {0.9}
    assert len(resumed) == 3 and all(r.metrics.get("training_iteration", 0) >= 1 for r in resumed)


def quality_space(trial):
    trial.suggest_float("quality", 0.0, 1.0)


@pytest.mark.parametrize("synchronous", [True, False], ids=["asha-sync", "asha"])
def test_optuna_adding_trials_over_time_ends_and_learns_of_early_stops_as_pruned(local_ray, tmp_path, synchronous):
    from optuna.trial import TrialState

    from tlcore.sweep.scheduling import OptunaPruned, optuna_search

    searcher = optuna_search(quality_space, metric="val_dice", mode="max", seed=0, max_concurrent=2)
    searcher.searcher.max_t = REPORTS
    results = run_marked(tmp_path, "optuna", None, synchronous, searcher=searcher, num_samples=6)
    assert len(results) == 6 and finishers(results)
    assert isinstance(searcher.searcher, OptunaPruned)
    states = {t.number: t.state for t in searcher.searcher._ot_study.trials}
    stopped = [r for r in results if r.metrics["training_iteration"] < REPORTS]
    assert stopped and sum(s == TrialState.PRUNED for s in states.values()) == len(stopped)
    assert sum(s == TrialState.COMPLETE for s in states.values()) == len(finishers(results))


class PhantomASHA(StratifiedASHA):
    """A book that waits for a trial Tune never had: what the stall guard is for."""

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)
        self._halving.add("phantom", self._stratum_of[trial.trial_id])


def test_trials_waiting_for_nothing_fail_the_sweep_naming_them(local_ray, tmp_path):
    import time

    from tlcore.sweep.halving import SweepStalled

    space = {"markers": str(tmp_path), "quality": tune.grid_search([0.2, 0.8])}
    tuner = tune.Tuner(tune.with_resources(marked_trial, {"cpu": 1}), param_space=space,
                       tune_config=tune.TuneConfig(metric="val_dice", mode="max", time_budget_s=120,
                                                   scheduler=PhantomASHA((), max_t=REPORTS, grace_period=1,
                                                                         synchronous=True, stall_s=3)),
                       run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0))
    t0 = time.time()
    with pytest.raises(Exception) as raised:
        tuner.fit()
    assert time.time() - t0 < 60
    chain, e = [], raised.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    (stalled,) = [e for e in chain if isinstance(e, SweepStalled)]
    assert "2 trial(s) wait at a rung" in str(stalled) and "(rung 1)" in str(stalled)


def test_a_stalled_sweep_exits_2_with_the_message_and_leaves_nothing_running(tmp_path, capsys):
    from tlcore.sweep import driver
    from tlcore.sweep.halving import SweepStalled
    from tlcore.tracking import store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store.prepare_store(uri)
    parent = store.start_run(uri, "s", "s", {}, {"role": "parent"})
    child = store.start_run(uri, "s", "t", {}, {"trial_id": "a"}, parent_run_id=parent)

    def main():
        try:
            raise SweepStalled("1 trial(s) wait at a rung: a (rung 2)")
        except SweepStalled as e:
            raise RuntimeError("Tune failed") from e   # as Tuner.fit wraps it

    driver._running.update(uri=uri, exp_dir=str(tmp_path), name="s", parent_run_id=parent)
    try:
        with pytest.raises(SystemExit) as exited:
            driver.run(main)
    finally:
        driver._running.clear()
    assert exited.value.code == 2
    assert "error: 1 trial(s) wait at a rung: a (rung 2)" in capsys.readouterr().err
    assert store.get_run(uri, child).status == "FAILED" and store.get_run(uri, parent).status == "FAILED"

"""The sweep's MLflow callback on its own (no Tune run): a real SQLite store made unreachable by
an exclusive lock, as a second process holding the database would."""

import pickle
import sqlite3

from helpers import mlflow_child_runs

from tlcore.tracking import store


def test_the_mlflow_callback_buffers_through_an_outage_and_a_restored_one_writes_it_once(tmp_path, capsys):
    from ray.tune.experiment import Trial

    from tlcore.sweep.callbacks import MLflowTrialLogger

    db = tmp_path / "m.db"
    uri = f"sqlite:///{db}"
    store.prepare_store(uri)
    parent = store.start_run(uri, "exp", "parent", tags={"role": "parent"})
    logger = MLflowTrialLogger(uri, "exp", parent, max_iterations=12, retry_s=0.0, final_wait_s=0)
    trial = Trial("fn", config={"dataset": "ixi", "data_dir": str(tmp_path), "lr": 0.003}, trial_id="t1", stub=True)
    result = lambda it, dice: {"iteration": it, "val_dice": dice, "train_loss": 1.0 / it}

    logger.on_trial_start(0, [trial], trial)
    logger.on_trial_result(0, [trial], trial, result(4, 0.3))
    assert logger._pending == []  # written at once while the store answers

    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # the store is gone for writers (SQLite: "database is locked")
    try:
        logger.on_trial_result(0, [trial], trial, result(8, 0.5))
        assert "unreachable" in capsys.readouterr().out
        assert len(logger._pending) == 1  # kept, in order, not dropped
        saved = pickle.dumps(logger), logger.get_state()  # what Tune saves with the experiment state
    finally:
        lock.execute("ROLLBACK")
        lock.close()

    # the store is back while the sweep runs: its next write sends the backlog first, and says so
    logger.on_trial_result(0, [trial], trial, result(12, 0.6))
    assert "reachable again" in capsys.readouterr().out and logger._pending == []
    (run,) = mlflow_child_runs(uri, "exp", parent)
    assert store.metric_history(uri, run.info.run_id, "val_dice") == [(4, 0.3), (8, 0.5), (12, 0.6)]

    # or the driver died during the outage; a new one restores the callback as Tune does (its
    # backlog, step 8, is in MLflow by now: written once) and the trial ends
    restored = pickle.loads(saved[0])
    restored.set_state(saved[1])
    assert restored.flush(force=True)  # the backlog, from Tune's saved state
    (run,) = mlflow_child_runs(uri, "exp", parent)
    assert store.metric_history(uri, run.info.run_id, "val_dice") == [(4, 0.3), (8, 0.5), (12, 0.6)]
    restored.on_trial_result(0, [trial], trial, result(12, 0.6))  # a restored trial reports again: once only
    trial.update_last_result(result(12, 0.6))
    restored.on_trial_complete(0, [trial], trial)
    assert restored._pending == [] and restored.dropped == 0

    (run,) = mlflow_child_runs(uri, "exp", parent)
    assert run.data.tags["trial_id"] == "t1" and run.data.params["lr"] == "0.003"
    assert store.metric_history(uri, run.info.run_id, "val_dice") == [(4, 0.3), (8, 0.5), (12, 0.6)]
    assert run.info.status == "FINISHED" and run.data.tags["stopped_early"] == "False"

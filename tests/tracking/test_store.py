import pytest

from tlcore.tracking import credentials, registry, store
from tlcore.tracking.model_cache import cached_model


def test_child_runs_are_found_again_by_trial_id(mlflow_uri):
    parent = store.start_run(mlflow_uri, "exp", "parent", {"a": 1}, {"sweep": "exp"})
    child = store.start_run(mlflow_uri, "exp", "child", {"lr": 0.001, "patch_size": [16, 16, 16]},
                               {"trial_id": "t1"}, parent_run_id=parent)
    assert store.find_child_run(mlflow_uri, "exp", parent, "t1") == child
    assert store.find_child_run(mlflow_uri, "exp", parent, "t2") is None
    store.log_metrics(mlflow_uri, child, {"val_dice": 0.5, "note": "x"}, step=10)
    store.log_metrics(mlflow_uri, child, {"val_dice": 0.7}, step=20)
    assert store.metric_history(mlflow_uri, child, "val_dice") == [(10, 0.5), (20, 0.7)]
    store.log_params(mlflow_uri, child, {"lr": 0.001, "extra": "y"})  # re-logging is harmless
    run = store.get_run(mlflow_uri, child)  # plain values: no MLflow object leaves store.py
    assert run.params["patch_size"] == "[16, 16, 16]" and run.params["extra"] == "y"
    assert run.tags["mlflow.parentRunId"] == parent and run.tags["trial_id"] == "t1"
    assert (run.name, run.experiment, run.status, run.metrics["val_dice"]) == ("child", "exp", "RUNNING", 0.7)
    store.end_run(mlflow_uri, child)
    assert store.get_run(mlflow_uri, child).status == "FINISHED"
    assert [r.run_id for r in store.child_runs(mlflow_uri, "exp", parent)] == [child]
    assert store.child_runs(mlflow_uri, "exp", parent, "tags.trial_id = 't2'") == []
    assert store.find_run(mlflow_uri, "exp", "tags.trial_id = 't1'") == child


def test_artifacts_go_next_to_the_sqlite_store(mlflow_uri, tmp_path):
    run = store.start_run(mlflow_uri, "exp2", "r")
    store.log_dict(mlflow_uri, run, {"x": 1}, "d.json")
    assert (tmp_path / "mlflow" / "artifacts" / "exp2").is_dir()


def test_register_and_resolve_models(mlflow_uri, tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "model.safetensors").write_bytes(b"weights")
    runs = []
    for _ in range(2):
        run = store.start_run(mlflow_uri, "src", "r")
        store.log_artifacts(mlflow_uri, run, tmp_path / "w", "model")
        runs.append(run)
        ref = registry.register_model(mlflow_uri, "ixi_hippocampus", run, tags={"source_run_id": run})
    assert ref.uri == "models:/ixi_hippocampus/2"
    latest = registry.resolve_model(mlflow_uri, "models:/ixi_hippocampus/latest")
    assert (latest.version, latest.run_id) == ("2", runs[1])
    assert registry.resolve_model(mlflow_uri, "models:/ixi_hippocampus/1").run_id == runs[0]
    store.client(mlflow_uri).set_registered_model_alias("ixi_hippocampus", "champion", "1")
    assert registry.resolve_model(mlflow_uri, "models:/ixi_hippocampus@champion").version == "1"
    folder = registry.download_model(mlflow_uri, latest, tmp_path / "dl")
    assert (folder / "model.safetensors").read_bytes() == b"weights"


@pytest.mark.parametrize("uri", ["models:/nope/latest", "models:/nope/1", "runs:/abc/model"])
def test_missing_models_raise_model_not_found(mlflow_uri, uri):
    with pytest.raises(registry.ModelNotFoundError):
        registry.resolve_model(mlflow_uri, uri)


def test_lineage_follows_a_two_step_chain(mlflow_uri, tmp_path):
    """imagenet -> source run -> registered v1 -> fine-tuned run -> registered v1 of the target."""
    from tlcore.tracking.lineage import chain, chain_line, main

    src = store.start_run(mlflow_uri, "mura_source", "densenet imagenet", {"source_model": "imagenet"})
    store.log_metrics(mlflow_uri, src, {"test_accuracy": 0.81}, step=1)
    store.log_text(mlflow_uri, src, "weights", "model/model.safetensors")
    mura = registry.register_model(mlflow_uri, "mura_densenet121", src)
    tuned = store.start_run(mlflow_uri, "chestxray_transfer", "mura k=1",
                               {"source_model": mura.uri}, {"source_run_id": mura.run_id})
    store.log_text(mlflow_uri, tuned, "weights", "model/model.safetensors")
    target = registry.register_model(mlflow_uri, "chestxray_pneumothorax", tuned)

    links = chain(mlflow_uri, "models:/chestxray_pneumothorax/latest")
    assert [link.start for link in links] == [target.uri, mura.uri, "imagenet"]
    assert [link.run_id for link in links] == [tuned, src, ""]
    assert links[1].experiment == "mura_source" and "test_accuracy 0.810" in links[1].metric
    assert chain_line(chain(mlflow_uri, f"runs:/{tuned}")) == f"imagenet -> {mura.uri} -> runs:/{tuned}"
    assert main([target.uri, "--mlflow-uri", mlflow_uri]) == 0
    assert main(["models:/nothing/1", "--mlflow-uri", mlflow_uri]) == 2


def test_a_password_in_a_tracking_uri_is_refused_and_a_user_moves_to_the_environment(monkeypatch):
    for var in credentials.CREDENTIAL_VARS:
        monkeypatch.delenv(var, raising=False)
    for uri in ("http://alice:s%40cret@10.0.0.5:5000/", "postgresql://mlflow:s%40cret@db:5432/mlflow"):
        with pytest.raises(credentials.PasswordInURI) as e:
            credentials.take_credentials(uri)
        assert "s%40cret" not in str(e.value) and "MLFLOW_TRACKING_PASSWORD" in str(e.value)
    assert "pgpass" in str(e.value)
    assert not credentials.without_credentials()  # nothing was put in the environment
    assert credentials.take_credentials("http://alice@10.0.0.5:5000/") == "http://10.0.0.5:5000/"
    assert credentials.without_credentials() == {"MLFLOW_TRACKING_USERNAME": "alice"}
    assert credentials.take_credentials("https://[::1]:5000") == "https://[::1]:5000"
    assert credentials.take_credentials("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"


def test_redact_hides_passwords_anywhere_in_a_line():
    line = "store postgresql://u:pw1@h/db, server http://admin:pw2@10.0.0.5:5000 (no secret: http://h:5000)"
    assert credentials.redact(line) == "store postgresql://u:***@h/db, server http://admin:***@10.0.0.5:5000 (no secret: http://h:5000)"


def test_a_trial_run_found_again_without_params_gets_them(tmp_path):
    """The store failed between create_run and log_params: the next time the trial's run is
    found (a restored trial, `python -m tlcore.tracking.sync`), its params are completed."""
    from tlcore.config import TrialConfig
    from tlcore.tracking.trial_runs import open_trial_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = store.start_run(uri, "ixi_source", "parent", {"seed": 0}, {"role": "parent"})
    orphan = store.start_run(uri, "ixi_source", "trial", None, {"sweep": "ixi_source", "trial_id": "t1"},
                                parent_run_id=parent)  # tags only: the params never arrived
    config = {"dataset": "ixi", "lr": 0.003, "lr_schedule": "cosine"}
    assert open_trial_run(uri, "ixi_source", parent, "t1", config, reopen=False) == orphan
    params = store.client(uri).get_run(orphan).data.params
    expected = TrialConfig.from_dict(config).logged_params()
    assert set(expected) <= set(params) and params["lr"] == "0.003" and params["lr_schedule"] == "cosine"


def test_cached_models_latest_by_version_no_temp_left_and_concurrent_trials_agree(mlflow_uri, tmp_path, monkeypatch):
    """`latest` is cached under the version it resolves to (no download left in a temp folder),
    and trials fetching one model at once on a node all get the complete folder."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where a stray download would land
    (tmp_path / "tmp").mkdir()
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "model.safetensors").write_bytes(b"weights-1")
    run = store.start_run(mlflow_uri, "src", "r")
    store.log_artifacts(mlflow_uri, run, tmp_path / "w", "model")
    registry.register_model(mlflow_uri, "ixi_hippocampus", run)

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: cached_model(mlflow_uri, "models:/ixi_hippocampus/latest"), range(4)))
    folders = {folder for _, folder in got}
    assert len(folders) == 1 and {ref.version for ref, _ in got} == {"1"}
    folder = folders.pop()
    assert (folder / "model.safetensors").read_bytes() == b"weights-1"
    assert cached_model(mlflow_uri, "models:/ixi_hippocampus/1")[1] == folder  # the same cache entry
    assert not list((tmp_path / "tmp").iterdir())           # nothing left in the temp folder
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # nor next to the cache


def test_an_outage_is_recognised_inside_a_ray_task_error_and_other_errors_are_not():
    """driver.run turns an unreachable store into a message and exit 75; it must see one wrapped
    in a Ray task's error (evaluation runs in Ray tasks) and leave every other error alone."""
    import requests
    from ray.exceptions import RayTaskError

    down = requests.exceptions.ConnectionError("Max retries exceeded: Connection refused")
    wrapped = RayTaskError("_evaluate_task", "Traceback ...", down)
    assert store.unreachable_cause(wrapped) is down
    try:
        try:
            raise down
        except Exception as e:
            raise RuntimeError("evaluation failed") from e
    except RuntimeError as chained:
        assert store.unreachable_cause(chained) is down
    assert store.unreachable_cause(RayTaskError("f", "tb", ValueError("bad label 7"))) is None
    assert store.unreachable_cause(KeyError("val_dice")) is None


def test_require_store_raises_store_unreachable_quickly(tmp_path):
    import time

    from helpers import free_port

    t0 = time.time()
    with pytest.raises(store.StoreUnreachable, match="does not answer"):
        store.require_store(f"http://127.0.0.1:{free_port()}", attempts=2, wait_s=0.1)
    assert time.time() - t0 < 60
    store.require_store(f"sqlite:///{tmp_path / 'ok.db'}")  # a store that answers: no error


def test_experiments_open_on_mlflows_model_training_view(mlflow_uri):
    """MLflow 3 shows an untagged experiment as GenAI; tlcore's are tagged model training, and an
    experiment made before the tag existed gets it when next used."""
    store.start_run(mlflow_uri, "fresh", "r")
    c = store.client(mlflow_uri)
    assert c.get_experiment_by_name("fresh").tags["mlflow.experimentKind"] == "custom_model_development"
    old = c.create_experiment("older")  # as an earlier tlcore made it
    assert "mlflow.experimentKind" not in c.get_experiment(old).tags
    store.start_run(mlflow_uri, "older", "r")
    assert c.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def test_unknown_run_and_parent_ids_end_the_tools_in_one_line(mlflow_uri, capsys):
    """`lineage runs:<unknown>` and `report --parent-run <unknown>` (or a run of another sweep): exit 2,
    one line naming the id, no MLflow traceback."""
    from tlcore.report import page
    from tlcore.tracking import lineage

    other = store.start_run(mlflow_uri, "ixi_source", "a parent", tags={"role": "parent"})
    for tool, argv, says in (
            (lineage.main, ["runs:/0123456789abcdef0123456789abcdef"], "no run '0123456789abcdef0123456789abcdef' in"),
            (lineage.main, ["runs:0123456789abcdef0123456789abcdef"], "is neither models:/<name>/<version> nor runs:/"),
            (page.main, ["brats_layers", "--parent-run", "feedface"], "no run 'feedface' in"),
            (page.main, ["brats_layers", "--parent-run", other], "belongs to experiment 'ixi_source'")):
        assert tool([*argv, "--mlflow-uri", mlflow_uri]) == 2
        err = capsys.readouterr().err
        assert err.startswith("[tlcore] error: ") and says in err and len(err.strip().splitlines()) == 1, err
    assert lineage.main([f"runs:/{other}", "--mlflow-uri", mlflow_uri]) == 0  # a run it holds: its chain
    assert other[:8] in capsys.readouterr().out

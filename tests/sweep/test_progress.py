"""The sweep's progress view (tlcore.sweep.progress) on its own: a status line redrawn in place on a
terminal, plain lines elsewhere, and a closing table of the swept axes."""

import io

from tlcore.sweep.progress import CLEAR_LINE, SweepProgress, swept_axes


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def configs():
    base = {"dataset": "brats", "data_dir": "/data/brats", "tracking_uri": "sqlite:///m.db", "lr": 0.003}
    return {"t1": {**base, "start": {"source_model": "scratch", "frozen_layers": 0}},
            "t2": {**base, "start": {"source_model": "models:/ixi/1", "frozen_layers": 2}},
            "t3": {**base, "start": {"source_model": "models:/ixi/1", "frozen_layers": 4}}}


def run_sweep_events(progress: SweepProgress) -> None:
    for trial_id, config in configs().items():
        progress.started(trial_id, config, trial_id)
    progress.reported("t1", {"iteration": 4, "val_dice": 0.2})
    progress.reported("t2", {"iteration": 4, "val_dice": 0.5})
    progress.reported("t3", {"iteration": 4, "val_dice": 0.1})
    progress.finished("t3", 4)  # stopped early at the first rung
    progress.reported("t2", {"iteration": 8, "val_dice": 0.4})  # worse than its best: best stays
    progress.tick(running=2, trials=3)


def test_the_swept_axes_are_the_keys_that_differ():
    assert swept_axes(list(configs().values())) == ["source_model", "frozen_layers"]


def test_on_a_terminal_one_status_line_is_redrawn_with_a_table_above_it(monkeypatch):
    monkeypatch.delenv("TLCORE_PROGRESS", raising=False)
    out = Terminal()
    progress = SweepProgress(max_iterations=12, stream=out, every_s=0)
    run_sweep_events(progress)

    # t1 at 4, t2 at 8, t3 ended (its 12 count: its budget is spent) of 3 x 12
    assert progress.iterations() == (24, 36)
    assert progress.status_line().startswith("[tlcore] [################........] 24/36 iterations, 2 running")
    assert "best val_dice 0.500" in progress.status_line()
    text = out.getvalue()
    assert text.count(CLEAR_LINE) >= 5 and "iteration 4/12" not in text  # no line per report
    assert text.rstrip(" 0123456789s").endswith(progress.status_line().rstrip(" 0123456789s"))

    progress.finished("t1", 12)
    progress.finished("t2", 12)
    progress.tick(running=0, trials=3)  # every_s=0: the summary and the table, above the status line
    table = out.getvalue().split(CLEAR_LINE)[-1]
    assert "3/3 trials ended (1 stopped early, 0 failed)" in table
    header, rule, *rows = table.splitlines()[1:-1]
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "trial", "source_model", "frozen_layers", "iteration", "best val_dice", "status"]
    assert [c.strip() for c in rows[1].strip("|").split("|")] == ["t2", "ixi/1", "2", "12/12", "0.500", "finished"]
    assert [c.strip() for c in rows[2].strip("|").split("|")][-2:] == ["0.100", "stopped early"]
    assert "/data/brats" not in table and "sqlite" not in table


def test_elsewhere_plain_lines_per_report_and_summaries(monkeypatch):
    monkeypatch.delenv("TLCORE_PROGRESS", raising=False)
    out = io.StringIO()
    progress = SweepProgress(max_iterations=12, stream=out, every_s=0)
    run_sweep_events(progress)
    text = out.getvalue()
    assert CLEAR_LINE not in text
    assert "[tlcore] t2 t2: iteration 8/12  val_dice 0.400 (best 0.500)" in text.splitlines()
    assert "1/3 trials ended (1 stopped early, 0 failed), 2 running" in text

    monkeypatch.setenv("TLCORE_PROGRESS", "bar")  # forced, e.g. under a terminal multiplexer
    assert progress.on_terminal


def test_a_progress_view_pickled_by_an_older_tlcore_still_runs():
    import pickle

    progress = SweepProgress(max_iterations=4, stream=io.StringIO())
    state = pickle.loads(pickle.dumps(progress)).__dict__
    for newer in ("configs", "done", "running", "trials"):
        del state[newer]
    restored = SweepProgress.__new__(SweepProgress)
    restored.__setstate__(state)
    restored.stream = io.StringIO()
    restored.started("t1", {"lr": 0.1}, "t1")
    restored.reported("t1", {"iteration": 4, "val_dice": 0.3})
    restored.end()
    assert "best val_dice 0.300" in restored.stream.getvalue()


def test_ray_workers_start_with_tunes_info_lines_off():
    """Tune's "Restored on <ip> from checkpoint" is logged in the worker before any trial code
    runs: the setup hook that connect() gives every worker keeps such info lines out."""
    import logging

    import ray

    from tlcore.sweep.cluster import connect
    from tlcore.sweep.flags import sweep_parser

    connect(sweep_parser("test", dataset="ixi").parse_args([]))
    try:
        @ray.remote
        def levels():
            import logging
            return [logging.getLogger(name).getEffectiveLevel() for name in ("ray.tune", "ray.train")]

        @ray.remote
        def unraisable_output() -> tuple[str, str]:
            """What the worker prints for an exception Python cannot raise (in a finaliser):
            nothing for the SystemExit of Ray's SIGTERM handler, the usual report otherwise."""
            import contextlib
            import io

            class RaisesWhenDropped:
                def __init__(self, exc):
                    self.exc = exc

                def __del__(self):
                    raise self.exc

            def printed(exc) -> str:
                out = io.StringIO()
                with contextlib.redirect_stderr(out):
                    RaisesWhenDropped(exc)  # dropped at once: Python reports what __del__ raised
                return out.getvalue()

            return printed(SystemExit(1)), printed(ValueError("a real problem"))

        assert ray.get(levels.remote()) == [logging.WARNING, logging.WARNING]
        stopped, real = ray.get(unraisable_output.remote())
        assert stopped == "" and "a real problem" in real
    finally:
        ray.shutdown()


WORKER_PROBE = r"""
import ray
from tlcore.sweep.cluster import worker_runtime_env

ray.init(address="local", num_cpus=1, include_dashboard=False, runtime_env=worker_runtime_env(False, volumes=True))

@ray.remote
def probe(module):
    import importlib, sys
    try:
        importlib.import_module(module)
        return "imported"
    except ImportError:
        return "refused" if module not in [m.split(".")[0] for m in sys.modules if sys.modules[m]] else "partly"

print("WORKER", *ray.get([probe.remote(m) for m in ("mlflow", "torchvision", "sklearn", "matplotlib")]))
"""


def test_a_sweeps_ray_workers_refuse_to_import_mlflow():
    """The driver is the only MLflow client: a sweep's workers (trials, evaluation tasks) cannot
    load MLflow at all (progress.prepare_ray_worker). A 3D sweep's workers load none of what
    MONAI would import for features they never use either (prepare_3d_ray_worker: torchvision,
    scikit-learn, matplotlib, ~2.2 CPU-s each; the 2D sweeps' DenseNet121 trials in
    tests/sweeps/test_classification_sweeps.py show theirs can import torchvision). (MONAI's
    optional imports take the refusals quietly: every 3D sweep test's workers import MONAI.)"""
    import subprocess
    import sys

    from helpers import REPO, sweep_env

    done = subprocess.run([sys.executable, "-c", WORKER_PROBE], cwd=REPO, env=sweep_env(), capture_output=True,
                          text=True, timeout=300)
    assert "WORKER refused refused refused refused" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]

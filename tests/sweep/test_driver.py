"""How a sweep's process ends (tlcore/sweep/driver.py)."""

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def test_a_finished_sweep_runs_its_exit_handlers_and_exits_0_without_the_teardown(tmp_path):
    # Ray's shutdown and MLflow's flush are exit handlers: end_process must run them, and then end
    # the process before the interpreter's teardown (where a finished sweep once died of SIGSEGV)
    marker = tmp_path / "handlers.txt"
    script = textwrap.dedent(f"""
        import atexit
        from tlcore.sweep import driver

        class Torn:  # finalised in the teardown only
            def __del__(self):
                open({str(marker)!r}, "a").write("teardown\\n")

        kept = Torn()
        atexit.register(lambda: open({str(marker)!r}, "a").write("first\\n"))
        atexit.register(lambda: open({str(marker)!r}, "a").write("second\\n"))
        driver.run(lambda: print("sweep done"))
        print("not reached")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "sweep done\n"
    assert marker.read_text() == "second\nfirst\n"  # every handler once, last registered first, no teardown


SWEEP_IN_MLFLOW = """
import sys, time
from tlcore.sweep import driver
from tlcore.tracking import store

uri = {uri!r}
store.prepare_store(uri)
parent = store.start_run(uri, "brats_layers", "sweep", {{}}, {{"role": "parent"}})
child = store.start_run(uri, "brats_layers", "trial", {{}}, {{"trial_id": "a"}}, parent_run_id=parent)
done = store.start_run(uri, "brats_layers", "done", {{}}, {{"trial_id": "b"}}, parent_run_id=parent)
store.end_run(uri, done, "FINISHED")
driver._running.update(uri=uri, exp_dir={exp_dir!r}, name="brats_layers", parent_run_id=parent)

def main():
    print(parent, child, done, flush=True)
    {body}

driver.run(main)
"""


# driver.start_ray on a private local Ray (whose ray.init puts in its own SIGTERM handler), then a wait
WITH_RAY = ("from types import SimpleNamespace as N\n"
            "    driver.start_ray(N(base_config={{'dataset': 'mura'}}, gpus_per_trial=0, args=N(\n"
            "        address=None, deterministic=False, gpus_per_trial=0, cpus_per_trial=1, autoscale=False,\n"
            "        shared_storage=False, storage_path={storage!r})))\n"
            "    print('ray', flush=True)\n"
            "    time.sleep(120)")


def start_sweep(tmp_path, body: str) -> tuple[subprocess.Popen, list[str], str]:
    from helpers import sweep_env

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = SWEEP_IN_MLFLOW.format(uri=uri, exp_dir=str(tmp_path), body=body.format(storage=str(tmp_path)))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=sweep_env())
    return proc, proc.stdout.readline().split(), uri


@pytest.mark.parametrize("signal_name, code, body", [("SIGINT", 130, "time.sleep(120)"), ("SIGTERM", 143, WITH_RAY)])
def test_an_interrupted_sweep_leaves_nothing_running_and_says_how_to_resume(tmp_path, signal_name, code, body):
    """Ctrl-C, or Slurm's scancel / a job's time limit (SIGTERM, here once Ray runs): the open runs
    end KILLED, the local Ray stops."""
    from tlcore.tracking import store

    proc, (parent, child, done), uri = start_sweep(tmp_path, body)
    if body == WITH_RAY:
        assert proc.stdout.readline().strip() == "ray", proc.stderr.read()[-2000:]
    proc.send_signal(getattr(signal, signal_name))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("[tlcore] interrupted")
    assert f"--resume to continue from {tmp_path}" in err
    status = {r: store.get_run(uri, r) for r in (parent, child, done)}
    assert [status[r].status for r in (parent, child, done)] == ["KILLED", "KILLED", "FINISHED"]
    assert status[child].tags["interrupted"] == signal_name


def test_an_unforeseen_error_fails_the_open_runs_in_one_line_with_the_traceback_in_a_file(tmp_path):
    from tlcore.tracking import store

    proc, (parent, child, done), uri = start_sweep(tmp_path, "raise ZeroDivisionError('no subjects left to average')")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("[tlcore] error: ZeroDivisionError: no subjects left to average (the traceback: ")
    saved = Path(line.split("(the traceback: ")[1].split(")")[0])
    assert saved.parent == tmp_path and "in main" in saved.read_text()
    assert [store.get_run(uri, r).status for r in (parent, child, done)] == ["FAILED", "FAILED", "FINISHED"]
    assert store.get_run(uri, parent).tags["error"] == "ZeroDivisionError: no subjects left to average"

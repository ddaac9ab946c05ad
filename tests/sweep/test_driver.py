"""How a sweep's process ends (tlcore/sweep/driver.py)."""

import subprocess
import sys
import textwrap


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

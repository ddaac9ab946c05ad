"""The suite runs in two pytest-xdist workers (`--dist loadgroup`). Some tests share one MLflow
store in order, or start Ray clusters that another test's `--address auto` would find; their
`xdist_group` mark keeps each group on one worker. pytest 9.2 broke that silently
(pytest-dev/pytest-xdist#1386), hence the pin in pyproject.toml and this check with the
installed pytest and pytest-xdist."""

import subprocess
import sys


def test_xdist_groups_keep_their_tests_on_one_worker(tmp_path):
    # a group of four tests (marked per module, as tests/sweeps/test_classification_sweeps.py does) next to ungrouped
    # ones: without grouping, two idle workers would share the group's tests
    (tmp_path / "test_grouped.py").write_text(
        "import os, time, pytest\n"
        "pytestmark = pytest.mark.xdist_group('g')\n"
        + "".join(f"def test_g{i}():\n    time.sleep(0.3)\n"
                  f"    open('{tmp_path}/ran', 'a').write(os.environ['PYTEST_XDIST_WORKER'] + '\\n')\n"
                  for i in range(4)))
    (tmp_path / "test_free.py").write_text(
        "import time\n" + "".join(f"def test_f{i}():\n    time.sleep(0.3)\n" for i in range(4)))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup",
                           "-p", "no:cacheprovider", str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    workers = (tmp_path / "ran").read_text().split()
    assert len(workers) == 4 and len(set(workers)) == 1, (
        f"the group's tests ran on {sorted(set(workers))}: pytest-xdist ignored xdist_group; these pytest "
        "/ pytest-xdist versions do not work together (see pyproject.toml)")

"""The README's quickstart is true today: every command it shows starts (its flags parse, --help
at the end), every page and picture it names exists."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_quickstart_command_starts_and_every_named_file_exists():
    text = README.read_text()
    lines = [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()]
    commands = [shlex.split(line.split("#")[0]) for line in lines if line.startswith(".venv/bin/python sweeps/")]
    assert len(commands) >= 5, commands
    # and the tools (python -m tlcore.<tool>): run as modules, to --help too
    commands += [shlex.split(line.split("#")[0]) for line in lines if line.startswith(".venv/bin/python -m tlcore.")]
    assert [".venv/bin/python", "-m", "tlcore.predict"] in [c[:3] for c in commands], commands
    # one process runs them all: each script reads its flags and stops at --help with exit status
    # 0, before it loads Ray, MLflow, SciPy or torch (sweep.deferred: --help in ~0.1 s, not 3-9 s)
    probe = ("import runpy, sys\n"
             "for argv in %r:\n"
             "    sys.argv = argv + ['--help']\n"
             "    try:\n"
             "        if argv[0] == '-m':\n"
             "            sys.argv = argv[1:] + ['--help']\n"
             "            runpy.run_module(argv[1], run_name='__main__', alter_sys=True)\n"
             "        else:\n"
             "            runpy.run_path(argv[0], run_name='__main__')\n"
             "    except SystemExit as e:\n"
             "        assert e.code in (0, None), (argv, e.code)\n"
             "    else:\n"
             "        raise AssertionError(f'{argv} did not stop at --help')\n"
             "heavy = [m for m in ('ray', 'ray.tune', 'mlflow', 'scipy', 'torch', 'monai') if m in sys.modules]\n"
             "assert not heavy, f'--help loaded {heavy}'\n"
             "print('ok', len(%r))\n") % ([c[1:] for c in commands], commands)
    run = subprocess.run([sys.executable, "-c", probe], cwd=README.parent, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith(f"ok {len(commands)}"), run.stderr[-3000:]
    named = re.findall(r"\]\(([^)#\s]+)\)", text) + re.findall(r"`((?:docs|mlflow|cluster|bench|sweeps)/[\w./-]+)`", text)
    missing = [n for n in named if not n.startswith("http") and not (README.parent / n).exists()]
    assert named and not missing, missing

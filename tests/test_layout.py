"""The package's architecture, checked on the source: each stage folder imports only the stages its
docstring names, only `tracking/` imports mlflow and only `sweep/` imports ray.tune, and the
command-line tools start without Ray."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "tlcore"
STAGES = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
MAX_LINES = 420


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def importers(prefix: str) -> set[str]:
    return {str(p.relative_to(PACKAGE).parent) for p in PACKAGE.rglob("*.py")
            if any(m == prefix or m.startswith(prefix + ".") for m in imported_modules(p))}


def may_import(stage: str) -> set[str]:
    """The stages a folder's docstring allows ("May import: tlcore.config, tlcore.data.")."""
    doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text())) or ""
    found = re.search(r"^May import: (.+)\.$", doc, re.M)
    assert found, f"tlcore/{stage}/__init__.py: say what the folder may import ('May import: ...')"
    return set(found.group(1).split(", ")) | {f"tlcore.{stage}"}


def test_the_folders_are_the_stages_and_no_module_sits_loose():
    assert STAGES == ["analysis", "data", "evaluation", "models", "predict", "report", "sweep", "tracking", "training"]
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert loose == ["__init__.py", "config.py", "text.py"], loose


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_imports_only_the_stages_its_docstring_names(stage):
    allowed = may_import(stage)
    wrong = sorted(f"{p.relative_to(PACKAGE)}: {m}" for p in (PACKAGE / stage).rglob("*.py")
                   for m in imported_modules(p) if m.startswith("tlcore.") and ".".join(m.split(".")[:2]) not in allowed)
    assert not wrong, wrong


def test_the_stages_form_one_order_with_no_import_running_back_up():
    order = []
    remaining = {s: {a.split(".")[1] for a in may_import(s)} - {s, "config", "text"} for s in STAGES}
    while remaining:
        ready = sorted(s for s, needs in remaining.items() if needs <= set(order))
        assert ready, f"a cycle among {remaining}"
        order += ready
        remaining = {s: n for s, n in remaining.items() if s not in ready}
    assert order.index("tracking") < order.index("training") < order.index("sweep")


def test_the_tests_mirror_the_package():
    """tests/<stage>/test_<module>.py for each stage; tests/sweeps and tests/cluster run the
    repository's sweeps/ scripts and cluster/ files end to end."""
    folders = {p.name for p in (REPO / "tests").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(STAGES) | {"sweeps", "cluster"}, folders
    loose = sorted(p.name for p in (REPO / "tests").glob("test_*.py"))
    # what belongs to no stage: the config, the layout itself, the README's quickstart, the test runner
    assert loose == ["test_config.py", "test_layout.py", "test_readme.py", "test_xdist_groups.py"], loose
    names = [p.name for p in (REPO / "tests").rglob("test_*.py")]
    assert len(names) == len(set(names)), "test file names must be unique (pytest imports them by name)"


def test_only_tracking_imports_mlflow_and_only_sweep_imports_ray_tune():
    assert importers("mlflow") == {"tracking"}
    assert importers("ray.tune") == {"sweep"}


def test_no_module_is_longer_than_a_screenful_of_screens():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these (over {MAX_LINES} lines): {long}"


def test_the_command_line_tools_start_without_ray_or_torch_training_code():
    """The tools answer in a second, on any machine, and a sweep's flags are checked before Ray loads."""
    code = ("import sys\nimport tlcore.tracking.sync, tlcore.tracking.lineage, tlcore.report.page, tlcore.data.validate, "
            "tlcore.sweep.prune, tlcore.tracking.accounts, tlcore.sweep.flags\n"
            "print(sorted(m for m in ('ray', 'ray.tune', 'tlcore.sweep.trainables', 'tlcore.training.segmentation') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_sweeps_driver_loads_no_monai_the_workers_do():
    """Importing MONAI loads all of it (~7 CPU-s, in every process that does): the driver only hands
    Tune its functions and sends evaluation tasks, so the sweep scripts import without it."""
    code = ("import sys, runpy\nsys.argv = ['x']\n"
            "from tlcore.sweep import deferred\n"
            "for script in %r: runpy.run_path(script, run_name='imported')\n"
            "for module in vars(deferred).values():\n"  # what the scripts load once their flags are read
            "    if isinstance(module, deferred.Deferred): module.__file__\n"
            "print(sorted(m for m in ('monai', 'tlcore.training.segmentation', 'tlcore.data.pipeline') if m in sys.modules))"
            % sorted(str(p) for p in (REPO / "sweeps").glob("*.py")))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_what_a_worker_runs_imports_without_mlflow():
    """A sweep's workers cannot load MLflow (sweep.progress.prepare_ray_worker): the trainables, the
    trial start-up and the evaluation tasks must not need it."""
    code = ("import sys\nsys.modules['mlflow'] = None\n"
            "import tlcore.sweep.trainables, tlcore.sweep.worker_tasks, tlcore.training.trial_start, "
            "tlcore.training.classification, tlcore.models.probes, tlcore.analysis.forecast\nprint('imported')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "imported", out.stderr[-3000:]


def test_what_a_classification_trial_runs_loads_no_monai():
    """A 2D trial's worker (the classifier trainable, its start, its data, its evaluation task)
    never loads MONAI, the 3D pipeline's library (~4.5 CPU-s per worker): what 2D and 3D trials
    share is in training/device.py, and trial_start imports the 3D pipeline where a 3D trial needs it."""
    code = ("import sys\n"
            "import tlcore.sweep.trainables, tlcore.sweep.worker_tasks, tlcore.training.trial_start, "
            "tlcore.training.classification, tlcore.data.images2d, tlcore.data.mura, tlcore.data.chestxray\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'monai')[:3])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_the_mlflow_folder_is_not_a_package():
    assert not (REPO / "mlflow" / "__init__.py").exists()  # it would shadow the mlflow package

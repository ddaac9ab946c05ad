"""The package's dependency rules, checked on the source: who may import mlflow and ray.tune,
and which command-line tools start without Ray."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "tlcore"


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
    return {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
            if any(m == prefix or m.startswith(prefix + ".") for m in imported_modules(p))}


def test_only_tracking_imports_mlflow_and_only_trainables_imports_ray_tune():
    assert importers("mlflow") == {"tracking.py"}
    assert importers("ray.tune") == {"trainables.py"}


def test_the_command_line_tools_start_without_ray_or_torch_training_code():
    """`python -m tlcore.sync|lineage|report|validate|prune|accounts` answer in a second, on any machine."""
    code = ("import sys\nimport tlcore.sync, tlcore.lineage, tlcore.report, tlcore.validate, tlcore.prune, tlcore.accounts\n"
            "print(sorted(m for m in ('ray', 'ray.tune', 'tlcore.trainables', 'tlcore.train') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_mlflow_folder_is_not_a_package():
    assert not (REPO / "mlflow" / "__init__.py").exists()  # it would shadow the mlflow package

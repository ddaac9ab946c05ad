"""The suite runs in two pytest-xdist workers (`--dist loadgroup`). Some tests share one MLflow
store in order, or start Ray clusters that another test's `--address auto` would find; their
`xdist_group` mark keeps each group on one worker. pytest-xdist applies a group by tagging the
node ids `@<group>`; pytest 9.2 broke that silently (pytest-dev/pytest-xdist#1386), hence the
pin in pyproject.toml and this check."""

import pytest


@pytest.mark.xdist_group("workspace_store")
def test_xdist_groups_are_applied(request):
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not run with --dist loadgroup")
    assert request.node.nodeid.endswith("@workspace_store"), (
        "pytest-xdist ignored the xdist_group marks: these pytest / pytest-xdist versions do not work "
        "together (see pyproject.toml)")

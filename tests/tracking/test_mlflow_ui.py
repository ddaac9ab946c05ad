"""The link a sweep prints opens, in a real (headless) browser, the experiment's runs table in
MLflow's model-training view, not the GenAI view MLflow 3 opens experiments on by default."""

import re
import shutil
import subprocess

import pytest
from helpers import free_port, start_tracking_server, stop_tracking_server

from tlcore.tracking import store

pytestmark = pytest.mark.slow
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def rendered(url: str, profile) -> str:
    """The page's text once its scripts have run, in a fresh browser profile (no stored view choice)."""
    out = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", out.stdout, flags=re.S)))


@pytest.mark.skipif(BROWSER is None, reason="no Chromium (as root: apt-get install chromium; tests/cluster_deps.sh does)")
def test_the_printed_link_opens_the_runs_table_in_the_training_view(tmp_path):
    port = free_port()
    server = start_tracking_server(tmp_path, port)
    try:
        uri = f"http://127.0.0.1:{port}"
        parent = store.start_run(uri, "brats_layers", "brats_layers sweep", tags={"role": "parent"})
        store.start_run(uri, "brats_layers", "ixi_hippocampus/1 k=2", {"frozen_layers": 2}, {"trial_id": "t2"},
                        parent_run_id=parent)
        link = store.runs_page(uri, uri, "brats_layers")
        page = rendered(link, tmp_path / "profile")
        # the model-training sidebar (Runs, Models, Model registry) over the runs table
        assert "Run Name" in page and "brats_layers sweep" in page and "Model registry" in page, page[:1500]
        assert not {"Observability", "Judges", "Playground"} & set(page.split()), page[:1500]
        # what a fresh browser shows on the experiment without the parameter: the GenAI overview
        plain = rendered(link.split("/runs")[0], tmp_path / "profile2")
        assert "Token Usage" in plain and "Observability" in plain, plain[:1500]
    finally:
        stop_tracking_server(server)

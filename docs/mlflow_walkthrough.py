"""Screenshots of a sweep in the MLflow UI, for the README's walkthrough, taken in headless Chromium.

    python docs/mlflow_walkthrough.py                       # the embedded store, experiment brats_layers
    python docs/mlflow_walkthrough.py --mlflow-uri sqlite:////tmp/demo/mlflow.db --out docs/mlflow

Starts `mlflow server` on 127.0.0.1 (a free port) over the store, opens the experiment and clicks
what a researcher clicks: the parent run expanded into its trials, the swept params and the Dice
columns chosen, the mean-over-seeds runs filtered, the chart view comparing curves. Needs the
`docs` extra (`pip install -e '.[docs]'`: Playwright's Python driver) and a Chromium binary
(Debian: `apt-get install chromium`; or set CHROMIUM=/path/to/chrome); Playwright's own browser
download is not needed. The selectors are MLflow 3.17's; another MLflow may need them changed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# no sync, updates or background look-ups: on a closed network each one is a refused connection
FLAGS = ["--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-quic"]
PARAMS = ("source_model", "frozen_layers", "seed")
METRICS = ("best_val_dice", "test_dice")  # val_dice is the last report's; best_val_dice the checkpoint's


def chromium() -> str:
    for name in (os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    sys.exit("error: no Chromium found: install it (Debian: apt-get install chromium) or set CHROMIUM=/path")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(uri: str, port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return server
        except OSError:
            time.sleep(1)
    server.kill()
    sys.exit(f"error: mlflow server on port {port} did not answer within 90 s")


class Walkthrough:
    def __init__(self, page, runs_page: str, out: Path):
        self.page, self.runs_page, self.out = page, runs_page, out

    def shot(self, name: str) -> None:
        from PIL import Image

        self.page.wait_for_timeout(2000)
        path = self.out / f"{name}.png"
        self.page.screenshot(path=str(path))
        Image.open(path).convert("RGB").quantize(colors=256).save(path, optimize=True)  # a third of the bytes
        print(path)

    def open_runs(self) -> None:
        self.page.goto(self.runs_page)  # the link a sweep prints: the model-training view
        self.page.wait_for_selector("text=matching runs", timeout=60_000)
        self.page.wait_for_timeout(3000)
        self.shot("0-first-visit")  # what the link shows before any click
        close = self.page.locator('button[data-component-id="mlflow.assistant.chat_panel.close"]')
        if close.count():
            close.first.click()

    def expand_parents(self) -> None:
        expanders = self.page.locator('button[data-component-id$="runnamecellrenderer.tsx_46"]')
        for i in range(expanders.count()):
            expanders.nth(i).click()
        self.page.wait_for_timeout(1000)

    def widen_run_names(self, by: int = 180) -> None:
        """Drag the right edge of the Run Name header: trial names say source, k and lr."""
        header = self.page.locator('.ag-header-cell[col-id="attributes.`Run Name`"]').first
        box = header.bounding_box()
        if box:
            x, y = box["x"] + box["width"] - 2, box["y"] + box["height"] / 2
            self.page.mouse.move(x - 20, y)
            self.page.mouse.move(x, y, steps=4)
            self.page.mouse.down()
            self.page.mouse.move(x + by, y, steps=12)
            self.page.mouse.up()
            self.page.mouse.move(5, 890)  # no tooltip left on the picture

    def choose_columns(self, show: tuple[str, ...], hide: tuple[str, ...] = ("Dataset", "Source", "Models")) -> None:
        self.page.get_by_role("button", name="Columns", exact=True).click()
        search = self.page.get_by_placeholder("Search columns")
        for name, want in [*((n, False) for n in hide), *((n, True) for n in show)]:
            search.fill(name)
            self.page.wait_for_timeout(400)
            # the column picker is a tree: one node per column, its checkbox a styled span
            title = self.page.locator(".du-bois-light-tree-title", has_text=re.compile(f"^{re.escape(name)}$"))
            node = self.page.locator(".du-bois-light-tree-treenode").filter(has=title).first
            checked = "checkbox-checked" in (node.locator(".du-bois-light-tree-checkbox").get_attribute("class") or "")
            if checked != want:
                node.locator(".du-bois-light-tree-checkbox").click()
        search.fill("")
        self.page.keyboard.press("Escape")

    def search(self, text: str) -> None:
        box = self.page.get_by_test_id("search-box")
        box.fill(text)
        box.press("Enter")
        self.page.wait_for_timeout(1500)

    def chart_view(self) -> None:
        self.page.locator("label.du-bois-light-radio-button-wrapper").filter(
            has=self.page.locator('input[name="runs-view-mode"][value="CHART"]')).click()
        self.page.wait_for_timeout(3000)


    def filter_charts(self, text: str) -> None:
        self.page.get_by_placeholder("Search metric charts").fill(text)
        self.page.wait_for_timeout(1000)

    def parallel_coordinates(self, params: tuple[str, ...], metrics: tuple[str, ...]) -> None:
        """Open "Add chart" > "Parallel coordinates" and pick the axes (the preview is the picture)."""
        self.page.get_by_text("Add chart", exact=True).first.click()
        self.page.get_by_text("Parallel coordinates", exact=True).first.click()
        dialog = self.page.get_by_role("dialog")
        boxes = dialog.get_by_role("combobox")  # chart type, params, metrics
        for box, names in ((boxes.nth(boxes.count() - 2), params), (boxes.nth(boxes.count() - 1), metrics)):
            for name in names:
                box.click()
                self.page.keyboard.type(name)
                self.page.wait_for_timeout(500)
                self.page.keyboard.press("Enter")
            dialog.get_by_text("Add new chart").click()  # closes the open list, not the dialog


def main() -> None:
    from tlcore.tracking import store

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mlflow-uri", default=store.default_tracking_uri())
    p.add_argument("--experiment", default="brats_layers")
    p.add_argument("--out", default=str(REPO / "docs" / "mlflow"))
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    exp = store.client(args.mlflow_uri).get_experiment_by_name(args.experiment)
    if exp is None:
        sys.exit(f"error: no experiment {args.experiment!r} in {args.mlflow_uri}; run its sweep first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_server(args.mlflow_uri, port)
    try:
        with sync_playwright() as pw:
            root = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium refuses to run sandboxed as root
            browser = pw.chromium.launch(executable_path=chromium(), args=[*FLAGS, *root])
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            w = Walkthrough(page, store.runs_page(f"http://127.0.0.1:{port}", args.mlflow_uri, args.experiment), out)
            w.open_runs()
            w.expand_parents()
            w.choose_columns(PARAMS + METRICS)
            w.widen_run_names()
            w.shot("1-runs-expanded")
            if store.find_run(args.mlflow_uri, args.experiment, 'tags.role = "seed_aggregate"'):
                w.search('tags.role = "seed_aggregate"')
                w.choose_columns(("test_dice_sd", "best_val_dice_sd"), hide=("source_model",))
                w.shot("2-mean-over-seeds")
                w.search("")
                w.choose_columns(("source_model",), hide=("test_dice_sd", "best_val_dice_sd"))
            else:
                print("no mean-over-seeds runs (the sweep ran one seed): 2-mean-over-seeds.png kept")
            w.chart_view()
            w.filter_charts("val_dice")
            w.shot("3-charts")
            w.filter_charts("")
            w.parallel_coordinates(("frozen_layers",), ("best_val_dice", "test_dice"))
            w.shot("4-parallel-coordinates")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()

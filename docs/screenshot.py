"""A full-page PNG of a sweep report, for the README, rendered by headless Chromium.

    python docs/screenshot.py results/brats_layers/report/report.html docs/report-page-brats_layers-demo.png

Needs a Chromium binary (Debian: `apt-get install chromium`; or set CHROMIUM=/path/to/chrome).
Chromium cannot measure the page for us on the command line, so it renders into a very tall
window and the empty bottom is cropped away.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, TALL = 1280, 16000
# no sync, updates or background look-ups: on a closed network each one is a refused connection
FLAGS = ["--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic", "--default-background-color=ffffffff"]


def chromium() -> str:
    for name in (os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    sys.exit("error: no Chromium found: install it (Debian: apt-get install chromium) or set CHROMIUM=/path")


def screenshot(page: Path, out: Path, width: int = WIDTH) -> Path:
    with tempfile.TemporaryDirectory() as profile:
        raw = Path(profile) / "raw.png"
        root = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium refuses to run sandboxed as root
        subprocess.run([chromium(), *FLAGS, *root, f"--user-data-dir={profile}", f"--window-size={width},{TALL}",
                        f"--screenshot={raw}", page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
        image = Image.open(raw).convert("RGB")
    pixels = np.asarray(image)
    used = np.flatnonzero((pixels < 250).any(axis=(1, 2)))
    bottom = min(len(pixels), int(used[-1]) + 40) if len(used) else len(pixels)
    if bottom >= TALL - 40:
        print(f"warning: the page is taller than {TALL} px; the screenshot is cut", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.crop((0, 0, image.width, bottom)).save(out, optimize=True)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(screenshot(Path(sys.argv[1]), Path(sys.argv[2])))

"""Figures logged with runs (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def confusion_png(cm, labels, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.6, 3.2), dpi=120)
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(np.asarray(cm)):
        ax.text(j, i, str(v), ha="center", va="center")
    ax.set_xticks([0, 1], labels)
    ax.set_yticks([0, 1], labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

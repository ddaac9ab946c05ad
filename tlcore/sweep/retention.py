"""Which checkpoints a trial may delete, on paths and scores only (no Ray here;
callbacks.KeepBestAndLatest reads Tune's checkpoint records and applies this rule).

Why not Tune's CheckpointConfig(num_to_keep): Tune deletes a superseded checkpoint the moment the
next one registers, but the experiment state that `--resume` reads after a killed driver reaches
storage later (saved at the end of the controller's step, then copied to storage in a background
thread). Killed in between, the stored state names as latest a checkpoint that is gone, and the
trial cannot resume. So a checkpoint goes only when it is older than the latest one the stored
state names, and is the best neither now nor in that state: no state Tune has written or will
write can still need it.
"""

from __future__ import annotations

import math
from pathlib import Path


def checkpoint_index(path: str) -> int:
    """Tune's checkpoint_000012 -> 12 (indices grow with every checkpoint of a trial); -1 if none."""
    tail = Path(path).name.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def best_paths(scored: list[tuple[str, float | None]], mode: str = "max") -> set[str]:
    """The paths whose score is the best by `mode` (ties all kept); missing and NaN scores never win."""
    valid = [s for _, s in scored if isinstance(s, (int, float)) and not math.isnan(s)]
    if not valid:
        return set()
    best = max(valid) if mode == "max" else min(valid)
    return {path for path, s in scored if s == best}


def deletable(paths: list[str], *, latest: str, stored_latest: str, keep: set[str] = frozenset()) -> list[str]:
    """Of a trial's checkpoints `paths`, those to delete: neither the latest now nor the latest
    stored, not in `keep` (the best now and in the stored state), and older than the stored latest."""
    kept = {latest, stored_latest, *keep}
    return [p for p in paths if p not in kept and checkpoint_index(p) < checkpoint_index(stored_latest)]

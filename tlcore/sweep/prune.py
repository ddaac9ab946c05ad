"""Free the disk that earlier sweeps hold: a dry run first, deletion only when asked.

    python -m tlcore.sweep.prune results                   # what would go, and how much space it frees
    python -m tlcore.sweep.prune results --keep 1 --delete # keep the newest earlier run of each sweep

A sweep started again without --resume moves its earlier results aside to
`<storage>/<name>.<YYYYmmdd-HHMMSS>` (never overwritten); those folders, with every checkpoint of
every trial, are what this removes. The current `<storage>/<name>` folders are never touched, and
neither is MLflow: runs, metrics and registered models stay.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

MOVED_ASIDE = re.compile(r"^(?P<name>.+)\.(?P<stamp>\d{8}-\d{6})$")


def size_of(folder: Path) -> int:
    """Bytes of the files in `folder`; links are not followed (a link's target is not freed)."""
    return sum(f.lstat().st_size for f in folder.rglob("*") if not f.is_symlink() and f.is_file())


def earlier_sweeps(storage: Path, keep: int = 0) -> list[Path]:
    """Moved-aside sweep folders under `storage`, oldest first, except the newest `keep` of each
    sweep. A symlink named like one is never a sweep's own folder (whoever can write the storage
    path could point it anywhere): skipped, not followed."""
    by_name: dict[str, list[Path]] = {}
    for d in storage.iterdir() if storage.is_dir() else ():
        m = MOVED_ASIDE.match(d.name)
        if m and d.is_symlink():
            print(f"[tlcore] skipping {d}: a symbolic link, not a sweep folder", file=sys.stderr)
        elif d.is_dir() and m:
            by_name.setdefault(m["name"], []).append(d)
    doomed = []
    for folders in by_name.values():
        folders.sort(key=lambda d: MOVED_ASIDE.match(d.name)["stamp"])
        doomed += folders[:max(len(folders) - keep, 0)]
    return sorted(doomed, key=lambda d: MOVED_ASIDE.match(d.name)["stamp"])


def human(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("storage", help="the sweeps' --storage-path (default of the sweeps: results)")
    p.add_argument("--keep", type=int, default=0, help="keep the newest N earlier runs of each sweep")
    p.add_argument("--delete", action="store_true", help="delete them (without it: only list)")
    a = p.parse_args(argv)
    storage = Path(a.storage)
    if not storage.is_dir():
        print(f"[tlcore] {storage} is not a folder: give the sweeps' --storage-path", file=sys.stderr)
        return 2
    doomed = earlier_sweeps(storage, a.keep)
    total = 0
    for d in doomed:
        n = size_of(d)
        total += n
        print(f"{'deleting' if a.delete else 'would delete'}  {d}  ({human(n)})")
        if a.delete:
            shutil.rmtree(d)
    if not doomed:
        print(f"[tlcore] no earlier sweep under {storage} (current sweeps are never pruned)")
    elif a.delete:
        print(f"[tlcore] freed {human(total)}; MLflow runs and registered models are untouched")
    else:
        print(f"[tlcore] {len(doomed)} earlier sweep folder(s), {human(total)}: rerun with --delete to remove them")
    return 0


if __name__ == "__main__":
    sys.exit(main())

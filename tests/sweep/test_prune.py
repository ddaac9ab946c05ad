"""`python -m tlcore.sweep.prune`: earlier sweeps' folders listed first, deleted only when asked."""

import subprocess
import sys

from helpers import REPO


def sweep_folder(path, megabytes=0.01):
    (path / "train_x" / "checkpoint_000001").mkdir(parents=True)
    (path / "train_x" / "checkpoint_000001" / "model.safetensors").write_bytes(b"w" * int(megabytes * 2**20))
    return path


def prune(*args):
    return subprocess.run([sys.executable, "-m", "tlcore.sweep.prune", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True)


def test_prune_lists_first_keeps_the_newest_and_never_touches_current_sweeps(tmp_path):
    current = sweep_folder(tmp_path / "brats_layers")
    old = [sweep_folder(tmp_path / f"brats_layers.2026110{d}-120000") for d in (1, 2, 3)]
    other = sweep_folder(tmp_path / "ixi_source.20261101-090000")
    unrelated = sweep_folder(tmp_path / "notes.v2")  # not a moved-aside sweep

    dry = prune(tmp_path, "--keep", "1")
    assert dry.returncode == 0, dry.stderr
    assert all(d.exists() for d in (*old, other, current, unrelated))  # a dry run deletes nothing
    listed = [line.split()[2] for line in dry.stdout.splitlines() if line.startswith("would delete")]
    assert listed == [str(old[0]), str(old[1])]  # oldest first; each sweep's newest earlier run kept
    assert "rerun with --delete" in dry.stdout

    done = prune(tmp_path, "--keep", "1", "--delete")
    assert done.returncode == 0 and "freed" in done.stdout
    assert [d.exists() for d in old] == [False, False, True] and other.exists()
    every = prune(tmp_path, "--delete")  # --keep 0: every earlier run
    assert every.returncode == 0 and not old[2].exists() and not other.exists()
    assert current.exists() and unrelated.exists()  # current sweeps and other folders: never
    assert prune(tmp_path / "missing").returncode == 2


def test_prune_skips_a_symlink_named_like_an_earlier_sweep(tmp_path):
    storage, elsewhere = tmp_path / "results", sweep_folder(tmp_path / "precious", megabytes=1)
    old = sweep_folder(storage / "brats_layers.20261101-120000")
    (storage / "brats_layers.20261102-120000").symlink_to(elsewhere, target_is_directory=True)
    (old / "train_x" / "link").symlink_to(elsewhere, target_is_directory=True)  # not counted, not followed

    dry = prune(storage)
    assert dry.returncode == 0 and "a symbolic link" in dry.stderr, dry.stderr
    assert [line.split()[2] for line in dry.stdout.splitlines() if line.startswith("would delete")] == [str(old)]
    assert "(10.2 KB)" in dry.stdout  # the 1 MB behind the links is not counted
    done = prune(storage, "--delete")
    assert done.returncode == 0, done.stderr
    assert not old.exists() and (storage / "brats_layers.20261102-120000").is_symlink()
    assert (elsewhere / "train_x" / "checkpoint_000001" / "model.safetensors").exists()

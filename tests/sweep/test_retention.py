"""retention.py: which checkpoints a trial may delete, on paths alone (no Ray)."""

import math

from tlcore.sweep.retention import best_paths, checkpoint_index, deletable


def ckpt(i: int) -> str:
    return f"/results/sweep/trial_a/checkpoint_{i:06d}"


def test_checkpoint_index_reads_tunes_folder_names():
    assert checkpoint_index(ckpt(12)) == 12
    assert checkpoint_index("/x/checkpoint_tmp") == -1


def test_best_paths_keeps_ties_and_never_picks_nan_or_missing():
    scored = [(ckpt(0), 0.4), (ckpt(1), math.nan), (ckpt(2), 0.7), (ckpt(3), None), (ckpt(4), 0.7)]
    assert best_paths(scored, "max") == {ckpt(2), ckpt(4)}
    assert best_paths(scored, "min") == {ckpt(0)}
    assert best_paths([(ckpt(0), math.nan)]) == set()


def test_only_checkpoints_older_than_the_stored_latest_and_not_kept_go():
    paths = [ckpt(i) for i in range(8)]
    # the driver has moved on to checkpoint 7; the state in storage still names 4 as latest, 2 as best
    gone = deletable(paths, latest=ckpt(7), stored_latest=ckpt(4), keep={ckpt(2), ckpt(6)})
    assert gone == [ckpt(0), ckpt(1), ckpt(3)]
    # 5 and 6 are newer than what the stored state names: a killed driver's state may not know them yet,
    # but it names 4, which must survive; nothing at or after it goes
    assert not set(gone) & {ckpt(4), ckpt(5), ckpt(6), ckpt(7)}


def test_nothing_goes_before_the_stored_state_names_a_later_checkpoint():
    paths = [ckpt(i) for i in range(3)]
    assert deletable(paths, latest=ckpt(2), stored_latest=ckpt(0)) == []

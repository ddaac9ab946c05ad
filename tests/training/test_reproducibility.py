"""Same seed, same numbers: a trial's curves repeat bit for bit in fresh processes on CPU,
whatever an earlier trial left in a reused worker's random state; another seed differs."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO

from tlcore.config import TrialConfig
from tlcore.data.images2d import RadiographDataset, SeededSampler
from tlcore.data.layouts import find_brats
from tlcore.data.mura import find_mura
from tlcore.data.splits import split_patients, split_subjects, write_splits
from tlcore.data.synthetic import write_mura

# 3D trials through the trainable's own start-up (start_segmentation) and loop, 8 iterations each,
# one after another in one process (as in a reused Ray worker).
TRIALS_3D = r"""
import json, sys, torch
from tlcore.config import TrialConfig
from tlcore.training.segmentation import train_segmentation
from tlcore.data.layouts import num_classes
from tlcore.training.trial_start import start_segmentation
torch.rand(int(sys.argv[2]))  # a reused Ray worker: an earlier trial used the random state
curves = []
for cfg in map(TrialConfig.from_dict, json.loads(sys.argv[1])):
    model, _, sampler, val, device = start_segmentation(cfg)
    curves.append([])
    train_segmentation(cfg, model, sampler, val, num_classes(cfg),
                       lambda m, s: curves[-1].append([m["train_loss"], m["val_loss"], m["val_dice"]]), device=device)
print("CURVE", json.dumps(curves))
"""

# One 2D trial (DenseNet121 + fastai head, dropout and flips) through start_classifier, one epoch.
TRIAL_2D = r"""
import json, sys, torch
from tlcore.config import TrialConfig
from tlcore.training.classification import build_learner, fit_classifier
from tlcore.training.trial_start import start_classifier
cfg = TrialConfig.from_dict(json.loads(sys.argv[1]))
torch.rand(int(sys.argv[2]))
model, _, train_dl, val_dl = start_classifier(cfg)
learn = build_learner(cfg, model, train_dl, val_dl, torch.device("cpu"))
fit_classifier(learn, cfg)
print("CURVE", json.dumps([float(v) for v in learn.recorder.values[-1][:2]] + [float(l) for l in learn.recorder.losses]))
"""


def run_trial(script: str, cfg: dict, burn: int) -> list:
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(cfg), str(burn)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("CURVE", 1)[1])


@pytest.fixture(scope="module")
def brats_config(synthetic_root, tmp_path_factory):
    splits = split_subjects(sorted(find_brats(synthetic_root / "brats")), (0.5, 0.3, 0.2), seed=0)
    splits["val"] = splits["val"][:2]
    path = write_splits(tmp_path_factory.mktemp("splits") / "splits.json", splits)
    return {"dataset": "brats", "data_dir": str(synthetic_root / "brats"), "splits_file": str(path),
            "patch_size": [12, 12, 12], "batch_size": 2, "inference_roi": [32, 32, 32],
            "max_iterations": 8, "report_every": 4, "num_threads": 1}


@pytest.mark.slow  # whole trials in fresh processes (make test; not test-fast)
def test_3d_trial_repeats_in_fresh_processes_and_another_seed_differs(brats_config):
    seed = lambda s: {**brats_config, "seed": s}
    (first,) = run_trial(TRIALS_3D, [seed(0)], burn=0)
    other, again = run_trial(TRIALS_3D, [seed(1), seed(0)], burn=1000)  # seed 0 after another trial
    assert len(first) == 2 and first == again  # bit-identical losses and Dice at every report
    assert other != first


@pytest.mark.slow  # whole trials in fresh processes (make test; not test-fast)
def test_2d_trial_repeats_in_fresh_processes(tmp_path):
    cfg = _mura_config(tmp_path)
    first, again = run_trial(TRIAL_2D, cfg, burn=0), run_trial(TRIAL_2D, cfg, burn=1000)
    assert len(first) > 3 and first == again


def test_resumed_trial_continues_exactly_as_an_uninterrupted_one(brats_config):
    """Tune pauses and restores trials (a lost node, synchronous early stopping): from a
    checkpoint the trial must go on with the same patches, not a fresh stream."""
    from tlcore.training.segmentation import train_segmentation
    from tlcore.training.trial_start import start_segmentation

    cfg = TrialConfig.from_dict({**brats_config, "seed": 3})
    whole, states = [], []
    model, _, sampler, val, device = start_segmentation(cfg)
    train_segmentation(cfg, model, sampler, val, 2, lambda m, s: (whole.append(m["val_dice"]),
                                                                  states.append(_copy(s))), device=device)
    model, _, sampler, val, device = start_segmentation(cfg)
    sampler.reseed(12345)  # whatever stream it had: the resumed stretch must not depend on it
    resumed = []
    train_segmentation(cfg, model, sampler, val, 2, lambda m, s: resumed.append(m["val_dice"]),
                       resume=states[0], device=device)
    assert resumed == whole[1:]


def test_resumed_2d_trial_continues_exactly_as_an_uninterrupted_one(tmp_path):
    """The 2D trainable's checkpoint (weights and Adam's moments) and per-epoch seeds: resumed
    at epoch 2, a trial trains on as if it had never stopped."""
    from fastai.callback.core import Callback

    from tlcore.training.classification import (
        build_learner,
        fit_classifier,
        load_classifier_state,
        save_classifier_state,
    )
    from tlcore.training.trial_start import start_classifier

    cfg = TrialConfig.from_dict({**_mura_config(tmp_path), "max_iterations": 2, "seed": 5})
    saved = tmp_path / "after_epoch_1"
    saved.mkdir()

    class SaveFirstEpoch(Callback):
        def after_epoch(self):
            if self.epoch == 0:
                save_classifier_state(self.learn, saved)

    class BatchLosses(Callback):  # the raw loss of every step (fastai's recorder smooths them)
        def __init__(self):
            self.losses = []

        def after_loss(self):
            if self.training:
                self.losses.append(float(self.loss.detach()))

    whole_losses, resumed_losses = BatchLosses(), BatchLosses()
    model, _, train_dl, val_dl = start_classifier(cfg)
    whole = build_learner(cfg, model, train_dl, val_dl, torch.device("cpu"), cbs=[SaveFirstEpoch(), whole_losses])
    fit_classifier(whole, cfg)
    model, _, train_dl, val_dl = start_classifier(cfg, start_epoch=1)
    torch.rand(1000)  # whatever the random state: the epoch's own seed decides
    resumed = build_learner(cfg, model, train_dl, val_dl, torch.device("cpu"), cbs=[resumed_losses])
    load_classifier_state(resumed, saved)
    fit_classifier(resumed, cfg, start_epoch=1)
    second_epoch = len(resumed_losses.losses)
    assert second_epoch > 1 and len(whole_losses.losses) == 2 * second_epoch
    assert resumed_losses.losses == whole_losses.losses[second_epoch:]
    # validation loss and accuracy (fastai's train_loss is smoothed across epochs: not reported)
    assert [float(v) for v in resumed.recorder.values[-1][1:]] == [float(v) for v in whole.recorder.values[-1][1:]]


def _mura_config(tmp_path) -> dict:
    images = find_mura(write_mura(tmp_path / "mura", n_patients=8, size=32))[0]
    patients = sorted({i.patient for i in images})
    official_test = sorted({i.patient for i in images if i.split == "valid"})
    path = write_splits(tmp_path / "splits.json", split_patients(patients, official_test, 0.25, seed=0))
    return {"dataset": "mura", "data_dir": str(tmp_path / "mura"), "splits_file": str(path), "image_size": 32,
            "batch_size": 4, "max_iterations": 1, "lr_schedule": "one_cycle", "num_threads": 1, "seed": 0}


def _copy(state: dict) -> dict:
    import copy
    return copy.deepcopy({k: v for k, v in state.items() if k != "val_per_subject"})


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes:UserWarning")  # 3 on purpose
def test_flips_do_not_depend_on_the_number_of_workers(tmp_path):
    from tlcore.training.classification import image_loaders

    images = find_mura(write_mura(tmp_path / "mura", n_patients=6, size=32))[0]
    cfg = TrialConfig(dataset="mura", image_size=32, batch_size=4, seed=5)
    batches = {}
    for workers in (0, 2, 3):
        train_dl, _ = image_loaders(TrialConfig.from_dict({**cfg.to_params(), "data_workers": workers}), images, images[:4])
        batches[workers] = torch.cat([x for x, _ in train_dl])
    assert torch.equal(batches[0], batches[2]) and torch.equal(batches[0], batches[3])
    # each drawn seed flips its image or keeps it, and both happen
    train, plain = train_dl.dataset, RadiographDataset(train_dl.dataset.paths, train_dl.dataset.labels, 32)
    seen = set()
    for i, seed in SeededSampler(list(range(len(train))), seed=5):
        x, original = train[(i, seed)][0], plain[i][0]
        seen.add("flipped" if torch.equal(x, original.flip(-1)) else "kept" if torch.equal(x, original) else "other")
    assert seen == {"flipped", "kept"}


@pytest.mark.slow
@pytest.mark.xdist_group("workspace_store")  # the first run is conftest.source_sweep, made once per worker
def test_two_runs_of_a_sweep_log_identical_curves(workspace, source_sweep, tmp_path):
    """The bar: two runs of one sweep with one seed, each in its own processes, log the same
    numbers (the synchronous scheduler also makes the same early-stopping decisions, so the
    tables match too). The first run is the suite's source sweep; this test runs it again."""
    from helpers import SOURCE_SWEEP_FLAGS, run_script

    from tlcore.tracking import store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    again = run_script("ixi_source.py", "--data-dir", str(workspace["data"] / "ixi"), "--mlflow-uri", uri,
                       "--storage-path", str(tmp_path / "results"), *SOURCE_SWEEP_FLAGS)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]

    def curves(uri: str) -> dict:
        runs = store.client(uri).search_runs(
            [store.client(uri).get_experiment_by_name("ixi_source").experiment_id], "tags.trial_id != ''")
        return {(r.data.params["lr"], r.data.tags["stopped_early"]):
                {m: store.metric_history(uri, r.info.run_id, m)
                 for m in ("train_loss", "val_loss", "val_dice", "weight_change.res_2")}
                for r in runs}

    def table(output: str) -> list:
        """The printed results table without the trial ids."""
        rows = [line.split("|")[2:] for line in output.split("ixi_source results", 1)[1].splitlines() if line.startswith("| ")]
        return [[c for c in row if "_0000" not in c] for row in rows]

    a, b = curves(workspace["uri"]), curves(uri)
    assert len(a) == 2 and {stopped for _, stopped in a} == {"True", "False"}  # one stopped at the rung
    assert a == b  # every value of every curve, bit for bit, and the same trial stopped
    assert table(source_sweep.stdout) == table(again.stdout)


def test_the_table_says_how_many_seeds_stand_behind_each_row():
    from tlcore.report.summary import DEMO_SEED_SD, seeds_note

    one = [{"source_model": "scratch", "seed": 0}, {"source_model": "models:/ixi/1", "seed": 0}]
    assert "every row is one seed" in seeds_note(one, synthetic=True) and f"~{DEMO_SEED_SD}" in seeds_note(one, True)
    assert "cannot separate" in seeds_note(one, synthetic=False)
    three = [{"source_model": m, "seed": s} for m in ("scratch", "models:/ixi/1") for s in range(3)]
    assert "3+ seeds" in seeds_note(three, synthetic=True)

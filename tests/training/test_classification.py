"""The 2D chain: DenseNet121 + fastai head, freezing, discriminative learning rates, metrics."""

import numpy as np
import pytest
import torch

from tlcore.config import TrialConfig
from tlcore.data.images2d import RadiographDataset, oversample
from tlcore.data.mura import find_mura
from tlcore.data.synthetic import write_mura
from tlcore.models.networks import build_densenet121, layer_groups
from tlcore.models.transfer import freeze_first
from tlcore.training.classification import build_learner, fit_classifier, load_imagenet


def test_fastai_head_and_three_groups():
    model = build_densenet121(num_classes=2)
    head = [type(m).__name__ for m in model[1]]
    assert head == ["AdaptiveConcatPool2d", "Flatten", "BatchNorm1d", "Dropout", "Linear", "ReLU",
                    "BatchNorm1d", "Dropout", "Linear"]
    assert model[1][4].in_features == 2048 and model[1][8].out_features == 2
    groups = layer_groups(model)
    assert list(groups) == ["body_1", "body_2", "head"]
    counts = [sum(p.numel() for m in mods for p in m.parameters()) for mods in groups.values()]
    assert sum(counts) == sum(p.numel() for p in model.parameters()) and min(counts) > 0


@pytest.fixture(scope="module")
def mura_images(tmp_path_factory):
    root = write_mura(tmp_path_factory.mktemp("mura"), n_patients=10, size=32)
    return find_mura(root)[0]


def test_freezing_and_discriminative_learning_rates(mura_images):
    torch.manual_seed(0)
    cfg = TrialConfig(dataset="mura", image_size=32, batch_size=4, max_iterations=1, lr=1e-3, lr_ratio=100,
                    lr_schedule="constant", source_model="imagenet", frozen_layers=1)
    model = build_densenet121(2)
    report = freeze_first(model, 1)
    assert report.frozen_groups == ["body_1"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds = RadiographDataset([i.path for i in mura_images], [i.label for i in mura_images], 32, train=True)
    dl = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, drop_last=True)
    learn = build_learner(cfg, model, dl, torch.utils.data.DataLoader(ds, batch_size=8), torch.device("cpu"))
    fit_classifier(learn, cfg)
    lrs = [h["lr"] for h in learn.opt.hypers]
    assert np.allclose(lrs, [1e-5, 1e-4, 1e-3])  # per-group learning rates in the optimizer
    after = model.state_dict()
    body_1 = {f"0.0.{k}" for k in model[0][0][:7].state_dict()}
    assert all(torch.equal(after[k], before[k]) for k in body_1)              # weights and BN stats frozen
    assert not torch.equal(after["0.0.denseblock3.denselayer1.conv1.weight"], before["0.0.denseblock3.denselayer1.conv1.weight"])
    assert not torch.equal(after["1.8.weight"], before["1.8.weight"])


def test_imagenet_weights_from_a_local_file_including_legacy_names(tmp_path):
    from torchvision.models import densenet121

    ref = densenet121().state_dict()
    legacy = {}
    for k, v in ref.items():  # torchvision's published file uses "norm.1" for "norm1"
        legacy[k.replace("norm1", "norm.1").replace("conv2", "conv.2") if "denselayer" in k else k] = v
    torch.save(legacy, tmp_path / "densenet121-a639ec97.pth")
    model = build_densenet121(2)
    report = load_imagenet(model, str(tmp_path / "densenet121-a639ec97.pth"))
    assert torch.equal(model.state_dict()["0.0.denseblock2.denselayer3.norm1.weight"],
                       ref["features.denseblock2.denselayer3.norm1.weight"])
    assert len(report.loaded) == sum(k.startswith("features.") for k in ref)
    assert report.reinitialised and all(k.startswith("1.") for k in report.reinitialised)


def test_offline_imagenet_error_says_how_to_prefetch(tmp_path, monkeypatch):
    import tlcore.training.classification as t2

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(t2, "DENSENET121_URL", "http://127.0.0.1:9/densenet121-a639ec97.pth")
    with pytest.raises(RuntimeError, match="weights='IMAGENET1K_V1'") as e:
        t2.imagenet_state()
    assert "--source /path/to/densenet121-a639ec97.pth" in str(e.value)




def test_oversampling_ratio():
    labels = [0] * 90 + [1] * 10
    balanced = oversample(labels)
    assert sum(labels[i] for i in balanced) == 90 and len(balanced) == 180
    thesis = oversample(labels, factor=18)
    assert sum(labels[i] for i in thesis) == 180
    assert oversample(labels, factor=18, seed=1) != thesis and sorted(oversample(labels, 18, 1)) == sorted(thesis)




def test_resumed_training_runs_only_the_remaining_epochs(mura_images):
    """A trial resumed from its epoch-k checkpoint trains epochs k+1.. with the schedule where it was."""
    cfg = TrialConfig(dataset="mura", image_size=32, batch_size=4, max_iterations=3, lr=1e-3, lr_schedule="one_cycle")
    ds = RadiographDataset([i.path for i in mura_images], [i.label for i in mura_images], 32, train=True)
    dl = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, drop_last=True)
    epochs = []

    from fastai.callback.core import Callback

    class Seen(Callback):  # epochs in which training batches actually ran
        def after_batch(self):
            if self.training and self.epoch not in epochs:
                epochs.append(self.epoch)

    learn = build_learner(cfg, build_densenet121(2), dl, torch.utils.data.DataLoader(ds, batch_size=8),
                          torch.device("cpu"), cbs=[Seen()])
    fit_classifier(learn, cfg, start_epoch=2)
    assert epochs == [2]
    assert learn.opt.hypers[-1]["lr"] < 1e-3 / 10  # one-cycle annealed: the schedule resumed at its end

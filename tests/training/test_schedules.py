"""One meaning per schedule name and one weight-decay rule, in the 3D loop and the 2D chain."""

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback

from tlcore.config import LR_SCHEDULES, TrialConfig
from tlcore.data.images2d import RadiographDataset
from tlcore.data.mura import find_mura
from tlcore.data.synthetic import write_mura
from tlcore.models.networks import build_densenet121
from tlcore.training.classification import build_learner, fit_classifier
from tlcore.training.schedules import beta1, lr_factor
from tlcore.training.segmentation import build_optimizer, build_scheduler


@pytest.fixture(scope="module")
def loader(tmp_path_factory):
    images = find_mura(write_mura(tmp_path_factory.mktemp("mura"), n_patients=4, size=32))[0][:12]
    ds = RadiographDataset([i.path for i in images], [i.label for i in images], 32)
    return torch.utils.data.DataLoader(ds, batch_size=4, drop_last=True)


def schedule_3d(cfg: TrialConfig, steps: int) -> tuple[list, list]:
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg)
    lrs, betas = [], []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        betas.append(opt.param_groups[0]["betas"][0])
        opt.step()
        sched.step()
    return lrs, betas


def schedule_2d(cfg: TrialConfig, loader) -> tuple[list, list]:
    class Record(Callback):
        order = 70  # after fastai's ParamScheduler set this batch's values

        def before_batch(self):
            if self.training:
                self.seen.append((self.opt.hypers[-1]["lr"], self.opt.hypers[0]["lr"], self.opt.hypers[-1]["mom"]))

    rec = Record()
    rec.seen = []
    learn = build_learner(cfg, build_densenet121(2), loader, loader, torch.device("cpu"), cbs=[rec])
    fit_classifier(learn, cfg)
    head, first, mom = zip(*rec.seen)
    assert np.allclose(np.array(first) * cfg.lr_ratio, head)  # discriminative rates follow the same curve
    return list(head), list(mom)


@pytest.mark.parametrize("schedule", LR_SCHEDULES)
def test_2d_and_3d_follow_the_same_schedule(schedule, loader):
    cfg = TrialConfig(dataset="mura", lr=1e-3, lr_schedule=schedule, max_iterations=3, image_size=32, batch_size=4)
    lr_2d, mom_2d = schedule_2d(cfg, loader)
    steps = len(lr_2d)  # 3 epochs x 3 batches
    lr_3d, beta_3d = schedule_3d(TrialConfig(lr=1e-3, lr_schedule=schedule, max_iterations=steps), steps)
    assert steps == 9 and np.allclose(lr_2d, lr_3d, rtol=1e-9, atol=0)
    assert np.allclose(mom_2d, beta_3d, rtol=1e-9, atol=0)
    expected = [1e-3 * lr_factor(schedule, i / steps) for i in range(steps)]
    assert np.allclose(lr_3d, expected, rtol=1e-9, atol=0)
    if schedule == "one_cycle":
        assert beta1(schedule, 0.0) == 0.95 and min(beta_3d) < 0.9 and max(lr_3d) > 5 * lr_3d[0]
    else:
        assert set(beta_3d) == {0.9}


def test_weight_decay_is_decoupled_in_2d_and_3d(loader):
    """With a zero gradient, Adam moves nothing; decoupled weight decay shrinks every trainable
    tensor by lr * weight_decay (coupled L2 would instead push it by about lr)."""
    lr, wd = 0.1, 0.01
    linear = torch.nn.Linear(3, 3)
    before = linear.weight.detach().clone()
    opt = build_optimizer(linear, TrialConfig(lr=lr, weight_decay=wd))
    linear.weight.grad, linear.bias.grad = torch.zeros_like(linear.weight), torch.zeros_like(linear.bias)
    opt.step()
    assert torch.allclose(linear.weight.detach(), before * (1 - lr * wd))

    cfg = TrialConfig(dataset="mura", lr=lr, lr_ratio=1, weight_decay=wd, image_size=32, batch_size=4)
    model = build_densenet121(2)
    learn = build_learner(cfg, model, loader, loader, torch.device("cpu"))
    learn.create_opt()
    learn.opt.set_hyper("lr", lr)
    bn = model[1][2]  # BatchNorm1d of the head: fastai would skip it without wd_bn_bias
    tensors = {"linear": model[1][4].weight, "bn": bn.weight, "bias": bn.bias}
    before = {k: v.detach().clone() for k, v in tensors.items()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    learn.opt.step()
    for k, v in tensors.items():
        assert torch.allclose(v.detach(), before[k] * (1 - lr * wd)), k

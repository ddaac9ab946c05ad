"""analysis/reuse.py: the re-initialisation test (Zhang, Bengio & Singer 2022)."""

import pytest
import torch

from tlcore.models.networks import build_model, layer_groups
from tlcore.models.transfer import freeze_first


def test_a_reset_costs_what_the_group_learnt_and_frozen_groups_are_not_scored():
    from tlcore.analysis.reuse import reinit_drops

    torch.manual_seed(0)
    start = build_model(num_classes=2)
    model = build_model(num_classes=2)
    model.load_state_dict(start.state_dict())
    freeze_first(model, 2)  # conv_0 and res_1 keep their start
    with torch.no_grad():  # "training" changed res_2 a lot, res_3 a little
        for name, scale in (("res_2", 1.0), ("res_3", 0.05)):
            for m in layer_groups(model)[name]:
                for p in m.parameters():
                    p.add_(scale * p.std() * torch.randn_like(p) if p.numel() > 1 else 0)
    x = torch.randn(1, 2, 12, 12, 12)
    model.eval()  # BatchNorm's running statistics stay as they are
    with torch.no_grad():
        target = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scored = []

    def score(m) -> float:  # 1 = the trained network's output exactly
        scored.append(1)
        with torch.no_grad():
            return 1.0 - float((m(x) - target).pow(2).mean() / target.pow(2).mean())

    drops = reinit_drops(model, start, score)
    assert set(drops) == {f"reinit_drop.{g}" for g in layer_groups(model)}
    assert drops["reinit_drop.conv_0"] == drops["reinit_drop.res_1"] == 0.0  # frozen: nothing to reset
    assert drops["reinit_drop.res_2"] > 10 * drops["reinit_drop.res_3"] > 0, drops
    assert drops["reinit_drop.conv_1"] == 0.0 and drops["reinit_drop.conv_2"] == 0.0  # untouched
    assert len(scored) == 1 + 2  # the trained model, then only the groups that changed
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # put back as it was
    assert reinit_drops(model, start, score, trained=0.5)["reinit_drop.res_2"] == pytest.approx(
        drops["reinit_drop.res_2"] - 0.5)  # a known trained score is used as given

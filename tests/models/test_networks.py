import pytest
import torch
from torch import nn

from tlcore.config import HEADS
from tlcore.models.networks import HIGHRES3DNET_GROUPS, build_model, group_of, group_parameter_counts, layer_groups


def conv(cin, cout, k):
    return cin * cout * k ** 3  # MONAI's HighResNet convolutions have no bias


def bn(c):
    return 2 * c


def residual_stage(cin, c, blocks=3):
    total = 0
    for _ in range(blocks):  # BN -> ReLU -> conv -> BN -> ReLU -> conv
        total += bn(cin) + conv(cin, c, 3) + bn(c) + conv(c, c, 3)
        cin = c
    return total


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("in_channels,num_classes", [(2, 2), (2, 3), (4, 5)])
def test_group_parameter_counts_match_architecture(in_channels, num_classes, head):
    expected = {
        "conv_0": conv(in_channels, 16, 3) + bn(16),
        "res_1": residual_stage(16, 16),
        "res_2": residual_stage(16, 32),
        "res_3": residual_stage(32, 64),
        "conv_1": conv(64, 80, 1) + bn(80),
        # bn_relu and bn: a BN after the conv (a ReLU has no parameters); conv: a bias instead
        "conv_2": conv(80, num_classes, 1) + (num_classes if head == "conv" else bn(num_classes)),
    }
    model = build_model(in_channels=in_channels, num_classes=num_classes, head=head)
    counts = group_parameter_counts(model)
    assert counts == expected
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())  # groups cover the net
    if (in_channels, num_classes) == (2, 2):  # thesis (NiftyNet): 812,312, see the Table 6.1 test
        assert sum(counts.values()) == (809_378 if head == "conv" else 809_380)


# Thesis Table 6.1: NiftyNet's HighRes3DNet, T1 + T2 in, 2 classes out.
THESIS_TABLE_6_1 = {"conv_0": 964, "res_1": 42_060, "res_2": 153_132, "res_3": 610_380,
                    "conv_1": 5_602, "conv_2": 174}
THESIS_TOTAL = 812_312
# Thesis minus tlcore, per group. Neither network has conv biases, both have a BN in every group
# (NiftyNet's head is `conv_2_bn`: conv -> BN), and leaky ReLU / ReLU have no parameters, so the
# whole difference is what the thesis counted besides learnable parameters: it counted every
# variable of the TensorFlow checkpoint except Adam's moment slots (the thesis's variable list:
# github.com/skaliy/niftynet_brain, config/brats/original/net_vars.txt). Per BN of C channels:
#   moving_mean, moving_variance                 2C  (torch: buffers, not parameters)
#   moving_{mean,variance}/biased                2C  (TF's zero-debiased moving averages)
#   moving_{mean,variance}/local_step            2   (their step counters)
# and, listed first and so counted in conv_0, Adam's beta1_power and beta2_power: 2.
THESIS_MINUS_TLCORE = {"conv_0": 4 * 16 + 2 + 2,                    # 1 BN of 16
                       "res_1": 6 * (4 * 16 + 2),                   # 6 BNs of 16
                       "res_2": 4 * (16 + 32 + 4 * 32) + 6 * 2,     # BNs of 16, 32, then 4 of 32
                       "res_3": 4 * (32 + 64 + 4 * 64) + 6 * 2,     # BNs of 32, 64, then 4 of 64
                       "conv_1": 4 * 80 + 2,
                       "conv_2": 4 * 2 + 2}                         # the head's BN: 2 classes


@pytest.mark.parametrize("head", ("bn_relu", "bn"))  # the thesis's head is bn; conv differs in conv_2 only
def test_parameter_counts_match_thesis_table_6_1(head):
    model = build_model(in_channels=2, num_classes=2, head=head)
    ours = group_parameter_counts(model)
    assert {g: ours[g] + THESIS_MINUS_TLCORE[g] for g in ours} == THESIS_TABLE_6_1
    assert sum(THESIS_TABLE_6_1.values()) == THESIS_TOTAL
    assert THESIS_TOTAL - sum(ours.values()) == sum(THESIS_MINUS_TLCORE.values()) == 2_932
    # the same accounting read off the model: the differences are all BatchNorm bookkeeping
    extra = {g: sum(4 * m.num_features + 2 for top in mods for m in top.modules() if isinstance(m, nn.BatchNorm3d))
             for g, mods in layer_groups(model).items()}
    extra["conv_0"] += 2
    assert extra == THESIS_MINUS_TLCORE
    assert not any(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv3d))


def test_heads_differ_only_in_what_follows_the_last_conv():
    x = torch.randn(1, 2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    out = {}
    for head in HEADS:
        torch.manual_seed(0)
        model = build_model(in_channels=2, num_classes=2, head=head).train()
        with torch.no_grad():
            out[head] = model(x)
        assert out[head].shape == (1, 2, 16, 16, 16) and torch.isfinite(out[head]).all()
    assert (out["bn_relu"] >= 0).all()
    assert (out["bn"] < 0).any() and (out["conv"] < 0).any()  # logits without a ReLU can be negative
    assert torch.allclose(torch.relu(out["bn"]), out["bn_relu"])
    conv = build_model(head="conv").blocks[11]
    assert conv.conv.bias is not None and not any(isinstance(m, nn.BatchNorm3d) for m in conv.modules())


def test_weights_move_between_the_bn_heads_and_transfer_reinitialises_a_changed_head():
    from tlcore.models.transfer import load_source

    bn_relu, bn = (build_model(num_classes=3, head=h) for h in ("bn_relu", "bn"))
    assert bn_relu.state_dict().keys() == bn.state_dict().keys()
    bn.load_state_dict(bn_relu.state_dict(), strict=True)
    report = load_source(build_model(num_classes=2, head="conv"), bn_relu.state_dict(), source="bn_relu source")
    assert {k.split(".", 2)[1] for k in report.reinitialised} == {"11"} and "blocks.11.adn.N.weight" in report.skipped
    assert len(report.loaded) == len(bn_relu.state_dict()) - 6  # every tensor but the source's head


def test_unknown_head_is_rejected():
    with pytest.raises(ValueError, match="head"):
        build_model(head="relu")


def test_group_order_and_lookup():
    assert list(HIGHRES3DNET_GROUPS) == ["conv_0", "res_1", "res_2", "res_3", "conv_1", "conv_2"]
    assert group_of("blocks.5.layers.1.conv.weight") == "res_2"
    with pytest.raises(KeyError):
        group_of("head.weight")


def test_the_model_spec_table_builds_each_network_with_its_groups_and_head():
    from tlcore.config import TrialConfig
    from tlcore.models.networks import build_network, head_group, spec_of_model

    volumes = build_network(TrialConfig(dataset="brats", modalities=("t1", "t2", "flair"), head="bn"), num_classes=4)
    assert spec_of_model(volumes).name == "highres3dnet" and head_group(volumes) == "conv_2"
    assert volumes.blocks[0].conv.in_channels == 3 and volumes.blocks[-1].conv.out_channels == 4
    assert list(layer_groups(volumes)) == ["conv_0", "res_1", "res_2", "res_3", "conv_1", "conv_2"]

    radiographs = build_network(TrialConfig(dataset="mura", frozen_layers=0), num_classes=2)
    assert spec_of_model(radiographs).name == "densenet121" and head_group(radiographs) == "head"
    assert list(layer_groups(radiographs)) == ["body_1", "body_2", "head"]
    # every parameter belongs to exactly one group
    grouped = [p for mods in layer_groups(radiographs).values() for m in mods for p in m.parameters()]
    assert len(grouped) == len(list(radiographs.parameters())) == len({id(p) for p in grouped})

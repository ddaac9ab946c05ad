import pytest

from tlcore.models import HIGHRES3DNET_GROUPS, build_model, group_of, group_parameter_counts


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


@pytest.mark.parametrize("in_channels,num_classes", [(2, 2), (2, 3), (4, 5)])
def test_group_parameter_counts_match_architecture(in_channels, num_classes):
    expected = {
        "conv_0": conv(in_channels, 16, 3) + bn(16),
        "res_1": residual_stage(16, 16),
        "res_2": residual_stage(16, 32),
        "res_3": residual_stage(32, 64),
        "conv_1": conv(64, 80, 1) + bn(80),
        "conv_2": conv(80, num_classes, 1) + bn(num_classes),
    }
    model = build_model(in_channels=in_channels, num_classes=num_classes)
    counts = group_parameter_counts(model)
    assert counts == expected
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())  # groups cover the net
    if (in_channels, num_classes) == (2, 2):
        assert sum(counts.values()) == 809_380  # thesis (NiftyNet): 812,312


def test_group_order_and_lookup():
    assert list(HIGHRES3DNET_GROUPS) == ["conv_0", "res_1", "res_2", "res_3", "conv_1", "conv_2"]
    assert group_of("blocks.5.layers.1.conv.weight") == "res_2"
    with pytest.raises(KeyError):
        group_of("head.weight")

"""Networks and their named layer groups (the unit of transfer and freezing)."""

from __future__ import annotations

from torch import nn
from monai.networks.nets import HighResNet

# HighRes3DNet layer groups (thesis Table 6.1) -> indices into MONAI HighResNet.blocks.
HIGHRES3DNET_GROUPS: dict[str, tuple[int, ...]] = {
    "conv_0": (0,),          # 3x3x3, 16 features
    "res_1": (1, 2, 3),      # 3 residual blocks, 16 features, dilation 1
    "res_2": (4, 5, 6),      # 32 features, dilation 2
    "res_3": (7, 8, 9),      # 64 features, dilation 4
    "conv_1": (10,),         # 1x1x1, 80 features
    "conv_2": (11,),         # 1x1x1, one output per class: the head
}
HEAD_GROUP = "conv_2"


def build_model(name: str = "highres3dnet", in_channels: int = 2, num_classes: int = 2) -> nn.Module:
    """HighRes3DNet (Li et al. 2017) as MONAI implements it (~0.81 M parameters)."""
    if name != "highres3dnet":
        raise ValueError(f"unknown model {name!r}; tlcore's 3D model is 'highres3dnet'")
    return HighResNet(spatial_dims=3, in_channels=in_channels, out_channels=num_classes)


def layer_groups(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Group name -> modules, in network order."""
    return {g: [model.blocks[i] for i in idx] for g, idx in HIGHRES3DNET_GROUPS.items()}


def group_prefixes(group: str) -> tuple[str, ...]:
    """State-dict key prefixes of a group, e.g. res_1 -> ('blocks.1.', 'blocks.2.', 'blocks.3.')."""
    return tuple(f"blocks.{i}." for i in HIGHRES3DNET_GROUPS[group])


def group_of(key: str) -> str:
    """Group owning a state-dict key."""
    for g in HIGHRES3DNET_GROUPS:
        if key.startswith(group_prefixes(g)):
            return g
    raise KeyError(f"{key} belongs to no HighRes3DNet layer group")


def group_parameter_counts(model: nn.Module) -> dict[str, int]:
    return {g: sum(p.numel() for m in mods for p in m.parameters()) for g, mods in layer_groups(model).items()}

"""Networks and their named layer groups (the unit of transfer and freezing).

`MODEL_SPECS` holds, per network, what the rest of tlcore needs: how to build it from a run
configuration, its layer groups in network order and which group is the head (re-initialised
on transfer). Building, loading, freezing, evaluation and the model card all go through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # torch is imported where a network is built: a sweep's driver only reads the specs
    from torch import nn

from tlcore.config import DATASETS_2D, HEADS, TrialConfig

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

# The output block (blocks[11], group conv_2): a 1x1x1 conv to one channel per class, then
#   bn_relu: BN + ReLU, MONAI's HighResNet (no logit can be negative);
#   bn:      BN, NiftyNet's HighRes3DNet, the thesis's network (its variable `conv_2_bn`; NiftyNet's
#            ConvolutionalLayer has a BN and no bias, and Table 6.1 counts that BN in conv_2);
#   conv:    nothing: the conv, with a bias, gives the logits.
# A BN on the logits normalises the class scores with statistics of 2-patch batches: their
# running average shifts every voxel's tumour/background offset from step to step, and
# validation Dice jumps with it (bench/RESULTS.md, "Validation-curve noise"); hence the default.
# bn_relu and bn have the same tensors (weights move between them); conv has a bias and no BN.


def build_model(name: str = "highres3dnet", in_channels: int = 2, num_classes: int = 2,
                head: str = "conv") -> nn.Module:
    """HighRes3DNet (Li et al. 2017) on MONAI's HighResNet (~0.81 M parameters), with the output
    block `head` (see HEADS)."""
    if name != "highres3dnet":
        raise ValueError(f"unknown model {name!r}; tlcore's 3D model is 'highres3dnet'")
    if head not in HEADS:
        raise ValueError(f"head={head!r}: choose from {HEADS}")
    # imported here: importing MONAI loads all of it (~7 CPU-s), and the specs are also read by
    # processes that build no network (a sweep's driver, the model card)
    from monai.networks.nets import HighResNet
    from torch import nn

    net = HighResNet(spatial_dims=3, in_channels=in_channels, out_channels=num_classes)
    block = net.blocks[HIGHRES3DNET_GROUPS[HEAD_GROUP][0]]
    if head == "bn":
        block.adn.A = nn.Identity()  # keeps the module names: state-dict keys are those of bn_relu
    elif head == "conv":
        block.conv = nn.Conv3d(block.conv.in_channels, num_classes, kernel_size=1, bias=True)
        block.adn = nn.Identity()
    net.tlcore_arch = "highres3dnet"
    return net


def build_densenet121(num_classes: int = 2) -> nn.Module:
    """torchvision DenseNet121 body + fastai head (AdaptiveConcatPool2d, Flatten, BN, Dropout,
    Linear, ReLU, BN, Dropout, Linear), randomly initialised; see transfer.py for weights."""
    from fastai.vision.learner import create_vision_model
    from torchvision.models import densenet121

    model = create_vision_model(densenet121, n_out=num_classes, pretrained=False)
    model.tlcore_arch = "densenet121"
    return model


def _highres3dnet_groups(model: nn.Module) -> dict[str, list[nn.Module]]:
    return {g: [model.blocks[i] for i in idx] for g, idx in HIGHRES3DNET_GROUPS.items()}


def _densenet121_groups(model: nn.Module) -> dict[str, list[nn.Module]]:
    features = model[0][0]
    return {"body_1": [features[:7]], "body_2": [features[7:]], "head": [model[1]]}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[TrialConfig, int], nn.Module]          # (run config, number of classes) -> network
    groups: Callable[[nn.Module], dict[str, list[nn.Module]]]
    head_group: str


MODEL_SPECS = {
    "highres3dnet": ModelSpec("highres3dnet", lambda cfg, classes: build_model(
        in_channels=len(cfg.modalities), num_classes=classes, head=cfg.head), _highres3dnet_groups, HEAD_GROUP),
    "densenet121": ModelSpec("densenet121", lambda cfg, classes: build_densenet121(classes),
                             _densenet121_groups, "head"),
}


def spec_for_config(cfg: TrialConfig) -> ModelSpec:
    """The network a run trains: DenseNet121 for the radiographs, HighRes3DNet for volumes."""
    return MODEL_SPECS["densenet121" if cfg.dataset in DATASETS_2D else "highres3dnet"]


def build_network(cfg: TrialConfig, num_classes: int) -> nn.Module:
    return spec_for_config(cfg).build(cfg, num_classes)


def spec_of_model(model: nn.Module) -> ModelSpec:
    return MODEL_SPECS[getattr(model, "tlcore_arch", "highres3dnet")]


def layer_groups(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Group name -> modules, in network order."""
    return spec_of_model(model).groups(model)


def head_group(model: nn.Module) -> str:
    return spec_of_model(model).head_group


def group_keys(model: nn.Module) -> dict[str, set[str]]:
    """Group name -> the state-dict keys of its parameters and buffers."""
    owner = {}
    for group, modules in layer_groups(model).items():
        for top in modules:
            for m in top.modules():
                owner[id(m)] = group
    keys: dict[str, set[str]] = {g: set() for g in layer_groups(model)}
    for name, m in model.named_modules():
        g = owner.get(id(m))
        if g is not None:
            keys[g].update(f"{name}.{k}" for k in list(m._parameters) + list(m._buffers)
                           if getattr(m, k, None) is not None)
    return keys


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

"""Move weights from a source model into a target model, and freeze what should not train.

Each helper returns a report of what it did; trainables log it to MLflow so every run says
exactly which tensors came from the source, which were re-initialised and which were frozen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tlcore.models.networks import build_network, group_keys, head_group, layer_groups


@dataclass
class TransferReport:
    source: str = "scratch"
    loaded: list[str] = field(default_factory=list)          # copied from the source
    sampled: list[str] = field(default_factory=list)         # drawn from N(mean, var) of the source tensor (Mean-Var)
    reinitialised: list[str] = field(default_factory=list)   # head tensors whose shape changed (new classes)
    skipped: list[str] = field(default_factory=list)         # in the source but not in this model
    frozen_groups: list[str] = field(default_factory=list)
    frozen_params: int = 0
    total_params: int = 0

    def counts(self) -> dict[str, int]:
        return {"loaded_tensors": len(self.loaded), "sampled_tensors": len(self.sampled),
                "reinitialised_tensors": len(self.reinitialised),
                "skipped_tensors": len(self.skipped), "frozen_groups": len(self.frozen_groups),
                "frozen_params": self.frozen_params, "total_params": self.total_params}

    def __str__(self) -> str:
        c = self.counts()
        return (f"transfer from {self.source}: {c['loaded_tensors']} tensors loaded, "
                f"{c['sampled_tensors']} sampled (Mean-Var), "
                f"{c['reinitialised_tensors']} re-initialised, {c['skipped_tensors']} skipped; "
                f"frozen {self.frozen_groups or 'nothing'} ({self.frozen_params:,} of {self.total_params:,} parameters)")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file, without unpickling code."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"source weights {path} do not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj.get("model", obj) if isinstance(obj, dict) else obj


def load_checkpoint(cfg, directory: str | Path, classes: int) -> nn.Module:
    """The network a checkpoint or registered-model folder holds (model.safetensors), built as `cfg`
    (its run_config.json) describes it."""
    model = build_network(cfg, classes)
    model.load_state_dict(read_weights(Path(directory) / "model.safetensors"))
    return model


def load_source(model: nn.Module, state: dict[str, torch.Tensor], source: str = "",
                head_groups=None) -> TransferReport:
    """Copy tensors whose name and shape match; re-initialise head groups that changed shape.

    A missing or mis-shaped tensor outside the head means the source is a different
    architecture: that raises, naming the key, instead of training a half-loaded network.
    """
    report = TransferReport(source=source or "state dict")
    target = model.state_dict()
    keys = group_keys(model)
    head_groups = head_groups or (head_group(model),)
    head = set().union(*(keys[g] for g in head_groups))
    group_of = {k: g for g, ks in keys.items() for k in ks}
    head_changed = any(k in head and (k not in state or state[k].shape != v.shape) for k, v in target.items())
    new_state = {}
    for key, value in target.items():
        if key in head and head_changed:
            report.reinitialised.append(key)  # keep the fresh initialisation of build_model
            continue
        if key not in state and key.endswith("num_batches_tracked"):
            continue  # older checkpoints (torchvision's ImageNet files) predate this counter
        if key not in state:
            raise KeyError(f"source {source!r} has no tensor {key!r} (group {group_of.get(key, '?')}); "
                           "is it the same architecture with the same layer layout?")
        if state[key].shape != value.shape:
            raise ValueError(f"source {source!r} tensor {key!r} has shape {tuple(state[key].shape)}, "
                             f"the model expects {tuple(value.shape)}: in_channels or widths differ "
                             f"(only the head {list(head_groups)} may change shape)")
        new_state[key] = state[key].to(value.dtype)
        report.loaded.append(key)
    report.skipped = sorted(set(state) - set(target))
    model.load_state_dict(new_state, strict=False)
    return report


def mean_var_init(model: nn.Module, state: dict[str, torch.Tensor], seed: int, source: str = "") -> TransferReport:
    """The Mean-Var control (Raghu et al. 2019, Transfusion): every conv and linear weight and bias
    drawn i.i.d. from N(mean, variance) of the matching source tensor, so the network starts with
    the source's weight scales but none of its features. Normalisation layers keep their default
    initialisation (sampling running variances could make them negative); head tensors whose shape
    changed keep their fresh initialisation, as in `load_source`. Draws come from `seed` alone."""
    report = TransferReport(source=source or "state dict")
    g = torch.Generator().manual_seed(seed)
    head = group_keys(model)[head_group(model)]
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                continue
            for p_name, param in module.named_parameters(recurse=False):
                key = f"{name}.{p_name}"
                if key in head and (key not in state or state[key].shape != param.shape):
                    report.reinitialised.append(key)
                    continue
                if key not in state:
                    raise KeyError(f"source {source!r} has no tensor {key!r}; is it the same architecture?")
                ref = state[key].double()
                if ref.shape != param.shape:
                    raise ValueError(f"source {source!r} tensor {key!r} has shape {tuple(ref.shape)}, "
                                     f"the model expects {tuple(param.shape)}")
                mean, std = float(ref.mean()), float(ref.std(unbiased=False))
                drawn = torch.randn(param.shape, generator=g, dtype=torch.float64) * std + mean
                param.copy_(drawn.to(param.dtype))
                report.sampled.append(key)
    return report


def _keep_eval(module: nn.Module, _inputs) -> None:
    # model.train() flips every module to training mode; frozen BatchNorm must keep using
    # (and not update) the source's running statistics, so reset it before each forward.
    module.training = False


def freeze_first(model: nn.Module, k: int, report: TransferReport | None = None) -> TransferReport:
    """Freeze the first k layer groups: no gradients, and BatchNorm statistics fixed."""
    report = report or TransferReport()
    groups = layer_groups(model)
    names = list(groups)
    if not 0 <= k <= len(names):
        raise ValueError(f"frozen_layers={k}: the model has {len(names)} groups {names}")
    for name in names[:k]:
        for module in groups[name]:
            for p in module.parameters():
                p.requires_grad_(False)
            for m in module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.register_forward_pre_hook(_keep_eval)
                    m.eval()
    report.frozen_groups = names[:k]
    report.total_params = sum(p.numel() for p in model.parameters())
    report.frozen_params = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return report

"""Which layer groups a trained network depends on: the re-initialisation test of Zhang, Bengio &
Singer ("Are all layers created equal?", JMLR 2022). Put one group back to the weights the trial
started from (parameters and BatchNorm statistics), leave the rest trained, and score again:
a large drop means the network relies on what that group learnt during fine-tuning; none means
the group's start (for a transferred group, the source's features) serves as well. It needs no
training, and it answers where CKA is ambiguous (a group can move far in CKA and still not matter,
or keep its CKA and matter). No Ray, no MLflow here.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from tlcore.models.networks import layer_groups


def same_weights(modules: list[nn.Module], start: list[nn.Module]) -> bool:
    return all(torch.equal(a.detach().cpu(), b.detach().cpu())
               for m, s in zip(modules, start) for a, b in zip(m.state_dict().values(), s.state_dict().values()))


@torch.no_grad()
def reinit_drops(model: nn.Module, start: nn.Module, score: Callable[[nn.Module], float],
                 trained: float | None = None) -> dict[str, float]:
    """`reinit_drop.<group>` for every layer group: `trained` (score(model), computed if not given)
    minus the score with that group alone reset to `start`'s weights (a network of the same
    architecture: the trial's starting point). A group that never changed (frozen) scores 0
    without being scored again. `model` is left as it was."""
    trained = score(model) if trained is None else trained
    starts = layer_groups(start)
    out = {}
    for group, modules in layer_groups(model).items():
        if same_weights(modules, starts[group]):
            out[f"reinit_drop.{group}"] = 0.0
            continue
        kept = [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]
        try:
            for m, s in zip(modules, starts[group]):
                m.load_state_dict(s.state_dict())
            out[f"reinit_drop.{group}"] = trained - score(model)
        finally:
            for m, state in zip(modules, kept):
                m.load_state_dict(state)
    return out

"""What CKA measures on HighRes3DNet: whole patches or voxels as the examples?

    .venv/bin/python bench/cka_examples.py            # after `make demo` (needs models:/ixi_hippocampus)

The source model (the IXI hippocampus model in the default MLflow store) against itself, its
Mean-Var control and a random initialisation, on probe patches of the synthetic BraTS
validation subjects, at 16^3 and 32^3. Patches as examples (every voxel and channel a feature,
as with images in 2D CKA studies) against voxels as examples (the group's channels at 64 fixed
voxels per patch, what tlcore logs). A measure that rates a random network as similar to the
trained one as the trained one itself cannot say which layers were reused. One JSON line per
(examples, size, model) to stdout.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tlcore import tracking
from tlcore.config import TrialConfig
from tlcore.data.layouts import default_label_map, find_brats
from tlcore.data.pipeline import load_subject
from tlcore.models.networks import build_model
from tlcore.models.probes import LayerProbe, MinibatchCKA, gram, probe_patches
from tlcore.models.transfer import load_source, mean_var_init
from tlcore.training.trial_start import registered_weights

REPO = Path(__file__).resolve().parents[1]


def patch_examples_cka(reference, model, patches) -> dict:
    """CKA with whole patches as the examples (features: every voxel x channel)."""
    out = {}
    grams = {}
    for name, m in (("ref", reference), ("model", model)):
        m.eval()
        acts: dict = {}
        hooks = [m.blocks[i].register_forward_hook(lambda _m, _i, o, g=g, acts=acts: acts.setdefault(g, []).append(gram(o)))
                 for g, i in (("conv_0", 0), ("res_1", 3), ("res_2", 6), ("res_3", 9), ("conv_1", 10))]
        with torch.no_grad():
            for i in range(0, len(patches), 8):
                m(patches[i:i + 8])
        for h in hooks:
            h.remove()
        grams[name] = acts
    for g in grams["ref"]:
        acc = MinibatchCKA()
        for K, L in zip(grams["ref"][g], grams["model"][g]):
            acc.add(K, L)
        out[g] = round(acc.value(), 3)
    return out


def main() -> None:
    uri = tracking.default_tracking_uri()
    cfg = TrialConfig(dataset="brats", tracking_uri=uri, source_model="models:/ixi_hippocampus/latest")
    _, state = registered_weights(cfg)
    files = find_brats(REPO / "data" / "synthetic" / "brats")
    subjects = [load_subject(sid, f, ("t1", "t2"), default_label_map("brats"), 2, (32, 32, 32))
                for sid, f in sorted(files.items())[-6:]]

    def start(kind: str, seed: int = 0):
        torch.manual_seed(seed)
        model = build_model(in_channels=2, num_classes=2, head=cfg.head)
        if kind == "source":
            load_source(model, state)
        elif kind == "meanvar":
            mean_var_init(model, state, seed)
        return model.eval()

    source = start("source")
    for size in (16, 32):
        patches = probe_patches(subjects, (size,) * 3, 16)
        probe = LayerProbe(source, patches, torch.device("cpu"))
        for kind, seed in (("source", 0), ("meanvar", 0), ("random", 1)):
            model = start(kind, seed)
            for examples, values in (("patches", patch_examples_cka(source, model, patches)),
                                     ("voxels", {k[4:]: round(v, 3) for k, v in probe.cka(model).items()})):
                print(json.dumps({"bench": "cka_examples", "examples": examples, "probe": f"{size}^3",
                                  "model": kind, **values}), flush=True)


if __name__ == "__main__":
    main()

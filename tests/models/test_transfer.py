import pickle

import pytest
import torch
from safetensors.torch import save_file

from tlcore.config import TrialConfig
from tlcore.data.layouts import default_label_map, find_brats
from tlcore.data.pipeline import PatchSampler, load_subject
from tlcore.models.networks import build_model, group_prefixes
from tlcore.models.transfer import freeze_first, load_source, read_weights
from tlcore.training.segmentation import train_segmentation


def source_state(num_classes=3):
    torch.manual_seed(1)
    src = build_model(num_classes=num_classes)
    for m in src.modules():  # distinctive BN statistics, so "unchanged" means something
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return {k: v.clone() for k, v in src.state_dict().items()}


def test_head_reinitialised_when_classes_differ():
    state = source_state(num_classes=3)
    model = build_model(num_classes=2)
    report = load_source(model, state, source="models:/ixi_hippocampus/1")
    head = [k for k in model.state_dict() if k.startswith(group_prefixes("conv_2"))]
    assert sorted(report.reinitialised) == sorted(head) and len(head) == 2  # the conv head: weight, bias
    assert len(report.loaded) == len(model.state_dict()) - len(head)
    for k in report.loaded:
        assert torch.equal(model.state_dict()[k], state[k])
    assert not torch.equal(model.state_dict()["blocks.11.conv.weight"][:2], state["blocks.11.conv.weight"][:2])
    assert "2 re-initialised" in str(report)


def test_same_classes_load_everything():
    state = source_state(num_classes=2)
    model = build_model(num_classes=2)
    report = load_source(model, state)
    assert report.reinitialised == [] and len(report.loaded) == len(state)


def test_mismatch_outside_head_names_the_key():
    state = source_state()
    state["blocks.4.layers.1.conv.weight"] = torch.zeros(32, 16, 5, 5, 5)
    with pytest.raises(ValueError, match="blocks.4.layers.1.conv.weight"):
        load_source(build_model(num_classes=2), state, source="x")
    del state["blocks.4.layers.1.conv.weight"]
    with pytest.raises(KeyError, match="blocks.4.layers.1.conv.weight"):
        load_source(build_model(num_classes=2), state, source="x")


def test_read_weights_safetensors_and_torch_without_pickled_code(tmp_path):
    state = source_state()
    save_file(state, str(tmp_path / "m.safetensors"))
    torch.save({"model": state}, tmp_path / "m.pt")
    for name in ("m.safetensors", "m.pt"):
        loaded = read_weights(tmp_path / name)
        assert all(torch.equal(loaded[k], state[k]) for k in state)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(pickle.UnpicklingError):
        read_weights(tmp_path / "evil.pt")


@pytest.mark.parametrize("k", [0, 2, 5])
def test_freeze_first_counts(k):
    model = build_model(num_classes=2)
    report = freeze_first(model, k)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen_prefixes = tuple(p for g in ["conv_0", "res_1", "res_2", "res_3", "conv_1"][:k] for p in group_prefixes(g))
    assert all(not n.startswith(frozen_prefixes) for n in trainable) if k else len(trainable) > 0
    assert report.frozen_params == sum(p.numel() for n, p in model.named_parameters() if n.startswith(frozen_prefixes))
    assert len(report.frozen_groups) == k


def test_training_keeps_frozen_groups_bit_identical(synthetic_root):
    state = source_state(num_classes=3)
    model = build_model(num_classes=2)
    load_source(model, state)
    freeze_first(model, 2)
    files = list(find_brats(synthetic_root / "brats").items())[:3]
    subjects = [load_subject(s, f, ("t1", "t2"), default_label_map("brats"), 2, (16, 16, 16)) for s, f in files]
    cfg = TrialConfig(patch_size=(16, 16, 16), batch_size=2, max_iterations=3, report_every=3,
                    inference_roi=(32, 32, 32), lr=1e-2)
    torch.set_num_threads(1)
    train_segmentation(cfg, model, PatchSampler(subjects, (16, 16, 16), 2), subjects[:1], 2,
                       report=lambda m, s: None, device=torch.device("cpu"))
    after = model.state_dict()
    frozen = group_prefixes("conv_0") + group_prefixes("res_1")
    for key, value in after.items():
        if key.startswith(frozen):  # weights and BN running statistics
            assert torch.equal(value, state[key]), key
    moved = [k for k in after if k.startswith(group_prefixes("res_2")) and k.endswith("conv.weight")]
    assert moved and all(not torch.equal(after[k], state[k]) for k in moved)
    assert not torch.equal(after["blocks.4.layers.0.N.running_mean"], state["blocks.4.layers.0.N.running_mean"])

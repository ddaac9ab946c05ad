import numpy as np
import pytest
import torch

from tlcore.config import TrialConfig
from tlcore.data.layouts import default_label_map, find_brats
from tlcore.data.pipeline import PatchSampler, load_subject
from tlcore.data.splits import split_subjects
from tlcore.evaluation.metrics import evaluate_subjects
from tlcore.models.networks import build_model
from tlcore.training.segmentation import build_optimizer, build_scheduler, train_segmentation


@pytest.mark.parametrize("schedule", ["constant", "cosine", "poly", "one_cycle"])
def test_lr_schedules(schedule):
    cfg = TrialConfig(lr=1e-3, lr_schedule=schedule, max_iterations=100)
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    if schedule == "constant":
        assert set(lrs) == {1e-3}
    elif schedule == "one_cycle":
        peak = int(np.argmax(lrs))
        assert 0 < peak < 99 and lrs[0] < 1e-3 / 5 and lrs[-1] < lrs[peak] / 100
    else:
        assert lrs[0] == pytest.approx(1e-3) and all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 1e-4


PATCH = (12, 12, 12)  # 16^3 learns no better here and costs 2.3x the CPU


def brats_subjects(root):
    files = find_brats(root)
    s = split_subjects(files, (0.5, 0.3, 0.2), seed=0)
    load = lambda ids: [load_subject(i, files[i], ("t1", "t2"), default_label_map("brats"), 2, PATCH) for i in ids]
    return load(s["train"]), load(s["val"])


def test_learning_happens_and_resume_continues(synthetic_root):
    """Forty CPU steps on 12^3 patches reach validation Dice far above chance (0.6-0.8 over seeds 0-2)."""
    torch.set_num_threads(2)
    train, val = brats_subjects(synthetic_root / "brats")
    torch.manual_seed(0)
    model = build_model(num_classes=2)
    before = evaluate_subjects(model, val, 2, (32, 32, 32), torch.device("cpu"))["dice"]
    cfg = TrialConfig(patch_size=PATCH, batch_size=2, inference_roi=(32, 32, 32),
                    max_iterations=40, report_every=20, seed=0)
    reports, states = [], []
    train_segmentation(cfg, model, PatchSampler(train, PATCH, 2, seed=0), val, 2,
                       report=lambda m, s: (reports.append(m), states.append(s)), device=torch.device("cpu"))
    assert [r["iteration"] for r in reports] == [20, 40]
    best = max(r["val_dice"] for r in reports)
    assert before < 0.1 and best > 0.4, (before, reports)
    assert set(states[0]["val_per_subject"]) == {s.id for s in val}

    # resume from the first report's state: continues at iteration 20, not 0
    more = []
    cfg2 = TrialConfig(patch_size=PATCH, batch_size=2, inference_roi=(32, 32, 32),
                     max_iterations=25, report_every=5, seed=0, max_val_subjects=1)
    train_segmentation(cfg2, build_model(num_classes=2), PatchSampler(train, PATCH, 2), val, 2,
                       report=lambda m, s: more.append(m), resume=states[0], device=torch.device("cpu"))
    assert [m["iteration"] for m in more] == [25]


def train_tiny(root, compiled: bool, **config) -> tuple:
    """A few CPU steps from seed 0, compiled or eager: (the model, its starting state, the last report and state)."""
    torch.set_num_threads(2)
    train, val = brats_subjects(root / "brats")
    cfg = TrialConfig(patch_size=PATCH, batch_size=2, inference_roi=(32, 32, 32), seed=0, max_val_subjects=1,
                      **config)
    torch.manual_seed(0)
    model = build_model(num_classes=2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    train_segmentation(cfg, model, PatchSampler(train, PATCH, 2, seed=0), val, 2,
                       report=lambda m, s: seen.append((m, s)), device=torch.device("cpu"), compiled=compiled)
    return model, start, *seen[-1]


def test_compiled_training_steps_match_eager_and_checkpoint_plain_weights(synthetic_root):
    """torch.compile (the GPU default) runs the training step only: it must train the same weights as
    eager (same seed, same patches), and the state a checkpoint gets keeps the eager module's names."""
    from tlcore.training.segmentation import choose_torch_compile

    runs = {c: train_tiny(synthetic_root, c, max_iterations=4, report_every=4, precise_bn_batches=1)
            for c in (False, True)}
    for model, start, _, _ in runs.values():
        moved = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, start[k])]
        assert len(moved) > len(start) // 2, moved  # the (compiled) steps trained the module itself
    (_, start, eager, eager_state), (_, _, comp, comp_state) = runs[False], runs[True]
    assert list(comp_state["model"]) == list(eager_state["model"])  # no "_orig_mod." prefix
    assert comp["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-3)
    # fused kernels round differently and Adam magnifies it where gradients are near zero: the
    # two runs' weights must be far closer to each other than either is to where it started
    flat = lambda state: torch.cat([v.float().flatten() for k, v in state.items() if v.is_floating_point()])
    apart = (flat(comp_state["model"]) - flat(eager_state["model"])).norm()
    moved = (flat(eager_state["model"]) - flat(start)).norm()
    assert apart < 0.05 * moved, (float(apart), float(moved))
    assert comp["precise_bn_s"] > 0 and comp["val_s"] > 0  # a report says where its time went

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert choose_torch_compile(TrialConfig(), cpu) == (False, "auto: eager on cpu")
    assert choose_torch_compile(TrialConfig(), gpu)[0] is True
    assert choose_torch_compile(TrialConfig(deterministic=True), gpu)[0] is False
    assert choose_torch_compile(TrialConfig(torch_compile="on"), cpu)[0] is True


def test_a_node_that_cannot_compile_trains_eagerly(synthetic_root, monkeypatch, capsys):
    """Inductor needs a C compiler: without one the trial warns and trains as eager would, it does not fail."""
    import torch._dynamo
    import torch._functorch.config
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/g++",))
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)  # a cached kernel needs no compiler
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    torch._dynamo.reset()
    compiled, *_ = train_tiny(synthetic_root, True, max_iterations=2, report_every=2, precise_bn_batches=0)
    assert "torch.compile failed on this node, training eagerly instead" in capsys.readouterr().err
    eager, *_ = train_tiny(synthetic_root, False, max_iterations=2, report_every=2, precise_bn_batches=0)
    for k, v in eager.state_dict().items():
        assert torch.equal(compiled.state_dict()[k], v), k
    torch._dynamo.reset()


def test_layout_timing_leaves_the_model_untouched():
    from tlcore.training.segmentation import time_layouts

    torch.manual_seed(0)
    model = build_model(num_classes=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}  # BN running stats included
    images, labels = torch.randn(1, 2, 12, 12, 12), torch.randint(0, 2, (1, 1, 12, 12, 12))
    seconds = time_layouts(model, images, labels, torch.device("cpu"), None, steps=2)
    assert set(seconds) == {"ncdhw", "channels_last_3d"} and all(t > 0 for t in seconds.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert next(model.parameters()).is_contiguous()  # the copies were converted, not the model


def test_channels_last_auto_is_measured_once_per_machine_and_shape(tmp_path, monkeypatch):
    import json

    from tlcore.training import segmentation

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu, model = torch.device("cpu"), build_model(num_classes=2)
    cfg = TrialConfig(patch_size=(12, 12, 12), batch_size=1)
    assert segmentation.choose_channels_last(TrialConfig(channels_last="on"), cpu, model, 2) == (True, "channels_last=on")
    assert segmentation.choose_channels_last(TrialConfig(channels_last="off"), cpu, model, 2)[0] is False
    assert segmentation.choose_channels_last(cfg, cpu, model, 2) == (False, "auto: NCDHW on cpu")
    assert not (tmp_path / "tlcore" / "layouts.json").exists()  # CPUs are not measured

    # measured where the device is one of LAYOUT_MEASURED_ON (GPUs); here the CPU stands in
    monkeypatch.setattr(segmentation, "LAYOUT_MEASURED_ON", ("cpu",))
    use, why = segmentation.choose_channels_last(cfg, cpu, model, 2)
    cache = json.loads((tmp_path / "tlcore" / "layouts.json").read_text())
    (key, seen), = cache.items()
    assert "batch (1, 2, 12, 12, 12)" in key and "HighResNet" in key and "measured" in why
    t = seen["s_per_step"]
    assert use == (t["ncdhw"] / t["channels_last_3d"] >= segmentation.LAYOUT_MIN_SPEEDUP)
    # the cached timings decide from then on, for every trial of this machine
    for ncdhw, expected in ((2.0, True), (1.02, False), (0.5, False)):
        seen["s_per_step"] = {"ncdhw": ncdhw, "channels_last_3d": 1.0}
        (tmp_path / "tlcore" / "layouts.json").write_text(json.dumps({key: seen}))
        use, why = segmentation.choose_channels_last(cfg, cpu, model, 2)
        assert use is expected and "cached" in why and f"{ncdhw:.2f}x" in why
    # another patch shape is another measurement, made once while the other trials wait for it
    from concurrent.futures import ThreadPoolExecutor

    other = TrialConfig(patch_size=(16, 16, 16), batch_size=1)
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: segmentation.choose_channels_last(other, cpu, model, 2), range(2)))
    assert sorted(why.split(", ")[1].split()[0] for _, why in answers) == ["cached", "measured"]
    assert answers[0][0] == answers[1][0]
    assert len(json.loads((tmp_path / "tlcore" / "layouts.json").read_text())) == 2


def test_ckas_interval_at_the_default_probe_is_at_most_006_wide(synthetic_root):
    """Every group's 95 % interval at TrialConfig's probe (128 patches; of 16^3 here, the demo's
    patch size), in the widest case: two unrelated (randomly initialised) networks. (The
    thesis's 24^3 probe on larger volumes, and the probe before: bench/, analysis.cka_interval_width_*.)"""
    from tlcore.training.trial_start import make_probe, probe_inputs

    cfg = TrialConfig(patch_size=(16, 16, 16))
    _, val = brats_subjects(synthetic_root / "brats")
    torch.manual_seed(0)
    reference, unrelated = build_model(in_channels=2, num_classes=2), build_model(in_channels=2, num_classes=2)
    inputs = probe_inputs(cfg, val)
    assert len(inputs) == cfg.probe_patches == 128
    values = make_probe(cfg, reference, inputs, torch.device("cpu")).cka(unrelated)
    groups = [k[4:] for k in values if k.startswith("cka.")]
    widths = {g: values[f"cka_high.{g}"] - values[f"cka_low.{g}"] for g in groups}
    assert all(values[f"cka_low.{g}"] <= values[f"cka.{g}"] <= values[f"cka_high.{g}"] for g in groups)
    assert 0.3 < min(values[f"cka.{g}"] for g in groups) and max(values[f"cka.{g}"] for g in groups) < 0.9
    assert 0 < max(widths.values()) <= 0.06, widths

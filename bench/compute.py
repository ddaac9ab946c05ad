"""The GPU side (what bench/gpu.sh runs on a lent GPU): 3D training pipeline against the model's own
speed, precision, deterministic kernels, fractional-GPU packing, whole-volume inference, the 2D
chain."""

from __future__ import annotations

import copy
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from common import FixedBatch, Profile, random_batch, steady_patches_per_s, sync, synthetic_subjects  # noqa: E402

from tlcore.config import TrialConfig  # noqa: E402
from tlcore.data.layouts import default_label_map  # noqa: E402
from tlcore.data.pipeline import PatchSampler, load_subject  # noqa: E402
from tlcore.evaluation.metrics import dice_per_class, predict_logits, write_prediction  # noqa: E402
from tlcore.models.networks import build_model  # noqa: E402
from tlcore.training.device import pick_device, seed_everything, staging_device  # noqa: E402
from tlcore.training.segmentation import amp_dtype, choose_channels_last, train_segmentation  # noqa: E402


def bench_train3d(p: Profile, device, tmp: Path, emit) -> dict:
    subjects, val, files, load_s = synthetic_subjects(tmp, p)
    half = p.steps
    cfg = TrialConfig(patch_size=p.patch, batch_size=p.batch, inference_roi=p.roi, torch_compile="off", max_iterations=2 * half,
                    report_every=half, max_val_subjects=1, num_threads=torch.get_num_threads())
    dtype = amp_dtype(cfg, device)
    cl, layout = choose_channels_last(cfg, device, build_model(in_channels=2, num_classes=2), 2)  # as a trial does
    x, y = (t.to(device) for t in random_batch(p))
    stage = staging_device(subjects, device)
    sampler = PatchSampler(subjects, p.patch, p.batch, "weighted", True, seed=0, device=stage)
    from monai_sampler import MonaiPatchSampler
    reference = MonaiPatchSampler(subjects, p.patch, p.batch, seed=0)
    # interleaved and best of two, so a slow spell of the machine does not fall on one variant
    best = defaultdict(float)
    for round_ in range(2):
        for name, s in (("compute", FixedBatch(x, y)), ("pipeline", sampler), ("reference", reference)):
            if name == "reference" and round_ and p.name == "full":
                continue  # MONAI's CPU sampler on BraTS-size volumes: once is minutes of device time
            best[name] = max(best[name], steady_patches_per_s(cfg, s, [val], device)[0])
    compute_pps, pipeline_pps, reference_pps = best["compute"], best["pipeline"], best["reference"]
    step_s = p.batch / compute_pps

    def per_patch(s, n=20) -> float:
        s.next_batch()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            s.next_batch()
        sync(device)
        return (time.perf_counter() - t0) / (n * p.batch)

    sample_s, reference_sample_s = per_patch(sampler), per_patch(reference, 5)
    out = {"train3d.compute_patches_per_s": compute_pps, "train3d.patches_per_s": pipeline_pps,
           "train3d.pipeline_over_compute": pipeline_pps / compute_pps,
           "train3d.monai_reference_patches_per_s": reference_pps,
           "train3d.monai_reference_over_compute": reference_pps / compute_pps,
           "train3d.load_s_per_subject": load_s, "train3d.step_s": step_s,
           "sampling.s_per_patch": sample_s, "sampling.per_patch_over_step": sample_s / step_s,
           "sampling.monai_reference_per_patch_over_step": reference_sample_s / step_s,
           "train3d.volumes_on": stage.type, "train3d.precision": str(dtype or "fp32"),
           "train3d.channels_last_3d": cl, "train3d.layout": layout}
    emit("train3d", out)
    return {"subjects": subjects, "val": val, "files": files, "step_s": step_s}


PRECISIONS = (("fp32", "off"), ("fp32", "on"), ("bf16", "off"), ("bf16", "on"))  # (precision, channels_last)


def bench_precision(p: Profile, device, tmp: Path, emit, staged: dict) -> None:
    """bf16 autocast and channels-last-3d, alone and together, against fp32: speed of the full
    pipeline, and Dice parity (some PyTorch/cuDNN versions are slow or wrong on dilated 3D
    convs, so the GPU defaults are kept only where this says they help).

    Each variant trains the same initial model on the same patch stream for `2 * p.steps` steps
    (patches/s over the second half), then predicts the validation volume. Parity: the Dice of
    each variant's prediction against the fp32-trained model's, and, with the fp32 weights,
    the agreement of a bf16 + channels-last prediction with the fp32 one (same weights)."""
    subjects, val = staged["subjects"], staged["val"]
    stage = staging_device(subjects, device)
    out, preds, fp32_model = {}, {}, None
    for precision, cl in PRECISIONS:
        name = f"{precision}{'_cl' if cl == 'on' else ''}"
        cfg = TrialConfig(patch_size=p.patch, batch_size=p.batch, inference_roi=p.roi, torch_compile="off", max_iterations=2 * p.steps,
                        report_every=p.steps, max_val_subjects=1, precision=precision, channels_last=cl,
                        num_threads=torch.get_num_threads())
        sampler = PatchSampler(subjects, p.patch, p.batch, "weighted", True, seed=0, device=stage)
        torch.manual_seed(0)
        model = build_model(in_channels=2, num_classes=2)
        reports = []
        train_segmentation(cfg, model, sampler, [val], 2, report=lambda m, s, reports=reports: reports.append(m), device=device)
        model.eval()
        preds[name] = predict_logits(model, val.image, p.roi, device, 2, 0.5, amp_dtype(cfg, device),
                                     cl == "on").argmax(1).cpu()
        fp32_model = fp32_model or model
        out[f"precision.{name}.patches_per_s"] = reports[-1]["patches_per_s"]
        out[f"precision.{name}.val_dice"] = reports[-1]["val_dice"]
        out[f"precision.{name}.train_loss"] = reports[-1]["train_loss"]
    for name in preds:
        out[f"precision.{name}.speedup_over_fp32"] = out[f"precision.{name}.patches_per_s"] / out["precision.fp32.patches_per_s"]
        out[f"precision.{name}.prediction_dice_vs_fp32"] = float(dice_per_class(preds[name], preds["fp32"], 2).mean())
    same_weights = predict_logits(fp32_model, val.image, p.roi, device, 2, 0.5, torch.bfloat16, True).argmax(1).cpu()
    out["precision.same_weights_bf16_cl_agreement"] = float(dice_per_class(same_weights, preds["fp32"], 2).mean())
    # what matters for the sweeps: does bf16 + channels-last inference change the Dice a model scores?
    truth = val.label.cpu()
    out["precision.same_weights_abs_dice_delta"] = abs(float(dice_per_class(same_weights, truth, 2).mean())
                                                       - float(dice_per_class(preds["fp32"], truth, 2).mean()))
    out["precision.bf16_cl.val_dice_minus_fp32"] = out["precision.bf16_cl.val_dice"] - out["precision.fp32.val_dice"]
    out["precision.fastest"] = max(preds, key=lambda n: out[f"precision.{n}.patches_per_s"])
    out["precision.dilated_convs"] = "HighRes3DNet: dilation 1, 2, 4"
    emit("precision", out)


def bench_deterministic(p: Profile, device, tmp: Path, emit, staged: dict) -> None:
    """What --deterministic costs: patches/s of the full pipeline with deterministic kernels over
    the default kernels (interleaved, best of two), and whether two deterministic runs from the
    same seed give the same losses. (cuBLAS also needs CUBLAS_WORKSPACE_CONFIG before CUDA
    starts; bench/gpu.sh sets it, as the sweep driver does for its workers.)"""
    cfg = TrialConfig(patch_size=p.patch, batch_size=p.batch, inference_roi=p.roi, torch_compile="off", max_iterations=2 * p.steps,
                    report_every=p.steps, max_val_subjects=1, num_threads=torch.get_num_threads())
    stage = staging_device(staged["subjects"], device)
    best, losses = defaultdict(float), defaultdict(list)
    for _ in range(2):
        for deterministic in (False, True):
            seed_everything(0, deterministic)
            pick_device()  # cuDNN autotuning follows the deterministic setting
            sampler = PatchSampler(staged["subjects"], p.patch, p.batch, "weighted", True, seed=0, device=stage)
            reports = []
            model = build_model(in_channels=2, num_classes=2)
            train_segmentation(cfg, model, sampler, [staged["val"]], 2, report=lambda m, s, reports=reports: reports.append(m),
                               device=device)
            best[deterministic] = max(best[deterministic], reports[-1]["patches_per_s"])
            losses[deterministic].append([r["train_loss"] for r in reports])
    seed_everything(0, False)
    pick_device()
    emit("deterministic", {"deterministic.patches_per_s": best[True], "default.patches_per_s": best[False],
                           "deterministic.slowdown": best[False] / best[True],
                           "deterministic.repeats_bit_identical": losses[True][0] == losses[True][1],
                           "default.repeats_bit_identical": losses[False][0] == losses[False][1]})


def _packed_worker(args) -> float:
    """One of k processes sharing the device, as k fractional-GPU trials would."""
    p, threads = args
    torch.set_num_threads(threads)
    device = pick_device()
    cfg = TrialConfig(patch_size=p.patch, batch_size=p.batch, inference_roi=p.roi, torch_compile="off", max_iterations=2 * p.steps,
                    report_every=p.steps, max_val_subjects=1, num_threads=threads)
    x, y = (t.to(device) for t in random_batch(p))
    from tlcore.data.pipeline import Subject
    val = Subject("v", torch.randn(2, *p.roi), torch.zeros(1, *p.roi, dtype=torch.long), np.eye(4))
    return steady_patches_per_s(cfg, FixedBatch(x, y), [val], device)[0]


def bench_packing(p: Profile, device, tmp: Path, emit) -> None:
    """Fractional-GPU trial packing: total patches/s of k trials sharing one device (k processes
    started together) over one trial alone. Above 1, `--gpus-per-trial 1/k` pays."""
    import multiprocessing as mp

    cores = os.cpu_count() or 1
    ks = (1, 2, 4) if device.type == "cuda" else (1, 2)
    total = {}
    ctx = mp.get_context("spawn")
    for k in ks:
        with ctx.Pool(k) as pool:
            total[k] = sum(pool.map(_packed_worker, [(p, max(1, cores // k))] * k))
    emit("packing", {**{f"packing.k{k}_patches_per_s": v for k, v in total.items()},
                     **{f"packing.k{k}_over_k1": total[k] / total[1] for k in ks if k > 1},
                     "packing.patch": list(p.patch), "packing.batch": p.batch})


def bench_inference(p: Profile, device, tmp: Path, emit, staged: dict) -> None:
    cfg = TrialConfig(patch_size=p.patch, batch_size=p.batch, inference_roi=p.roi)
    model = build_model(in_channels=2, num_classes=2)
    dtype, cl = amp_dtype(cfg, device), choose_channels_last(cfg, device, model, 2)[0]
    model = model.to(device).eval()
    if cl:
        model.to(memory_format=torch.channels_last_3d)
    val, files = staged["val"], staged["files"][staged["val"].id]
    volume = torch.randn(2, *p.volume).to(device)

    def model_only() -> float:
        sync(device)
        t0 = time.perf_counter()
        predict_logits(model, volume, p.roi, device, 2, 0.5, dtype, cl).argmax(1)
        sync(device)
        return time.perf_counter() - t0

    def end_to_end() -> float:  # NIfTI in, NIfTI + Dice out
        t0 = time.perf_counter()
        s = load_subject(val.id, files, ("t1", "t2"), default_label_map("brats"), 2, with_centres=False)
        pred = predict_logits(model, s.image, p.roi, device, 2, 0.5, dtype, cl).argmax(1)
        dice = float(dice_per_class(pred, s.label, 2).mean())
        write_prediction(pred, files["t1"], tmp / "pred" / f"{val.id}_pred.nii.gz")
        assert 0 <= dice <= 1
        return time.perf_counter() - t0

    model_only(), end_to_end()  # warm-up (cuDNN autotuning, first file reads)
    emit("inference", {"inference.model_only_s": min(model_only() for _ in range(3)),
                       "inference.end_to_end_s": min(end_to_end() for _ in range(3)),
                       "inference.volume": list(p.volume), "inference.roi": list(p.roi)})


def bench_train2d(p: Profile, device, tmp: Path, emit) -> None:
    """DenseNet121 + fastai head. Compute: steps on one pre-staged batch, with fastai's Adam (what
    fit_classifier uses) and with torch's fused AdamW, at the sweeps' batch (16, the thesis's)
    and at 64 (the issue's ceiling). Pipeline: the PNG DataLoader feeding the same steps."""
    from functools import partial

    from fastai.optimizer import OptimWrapper

    from tlcore.data.mura import find_mura
    from tlcore.data.synthetic import write_mura
    from tlcore.models.networks import build_densenet121
    from tlcore.training.classification import build_learner, image_loaders

    root = write_mura(tmp / "mura", n_patients=max(12, 2 * p.batch_2d), size=p.image_size)
    images = [i for i in find_mura(root)[0] if i.split == "train"]
    # one epoch covers every timed step: a real MURA epoch is 36,808 images, so the loader's
    # start-of-epoch refill must not be timed 10 times over as it would with a few dozen images
    images = images * -(-(p.steps_2d + 2) * 4 * p.batch_2d // len(images))
    workers = 0 if device.type == "cpu" else min(8, (os.cpu_count() or 2) - 1)

    def learner(batch: int, torch_adamw: bool):
        cfg = TrialConfig(dataset="mura", image_size=p.image_size, batch_size=batch, data_workers=workers)
        train_dl, _ = image_loaders(cfg, images, images[:batch])
        torch.manual_seed(0)
        learn = build_learner(cfg, build_densenet121(), train_dl, train_dl, device)
        if torch_adamw:
            learn.opt_func = partial(OptimWrapper, opt=partial(torch.optim.AdamW, fused=device.type == "cuda"))
        # These steps drive the model by hand, under their own bf16 autocast: fastai's
        # MixedPrecision callback only works inside fit() (its before_fit makes the autocast
        # context), so drop it.
        learn.remove_cbs([cb for cb in learn.cbs if type(cb).__name__ == "MixedPrecision"])
        learn.create_opt()
        learn.model.train()
        return learn, train_dl

    def steps(learn, batches) -> float:
        n = 0
        sync(device)
        t0 = time.perf_counter()
        for xb, yb in batches:
            learn.xb, learn.yb = (xb,), (yb,)
            learn("before_batch")
            learn.opt.zero_grad()
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss = learn.loss_func(learn.model(*learn.xb), *learn.yb)
            loss.backward()
            learn.opt.step()
            n += xb.shape[0]
        sync(device)
        return n / (time.perf_counter() - t0)

    def compute(batch: int, torch_adamw: bool) -> float:
        learn, train_dl = learner(batch, torch_adamw)
        fixed = next(iter(train_dl))
        steps(learn, [fixed] * 3)  # warm-up
        return steps(learn, [fixed] * p.steps_2d)

    figures = {"train2d.compute_images_per_s": compute(p.batch_2d, False),
               "train2d.torch_adamw_compute_images_per_s": compute(p.batch_2d, True)}
    figures["train2d.b64_compute_images_per_s"] = compute(64 if device.type == "cuda" else 2 * p.batch_2d, True)

    learn, train_dl = learner(p.batch_2d, False)
    batches = iter(train_dl)
    steps(learn, [next(batches) for _ in range(3)])  # warm-up: workers started, cuDNN tuned
    pipeline = steps(learn, (next(batches) for _ in range(p.steps_2d)))
    emit("train2d", {**figures, "train2d.images_per_s": pipeline,
                     "train2d.pipeline_over_compute": pipeline / figures["train2d.compute_images_per_s"],
                     "train2d.torch_adamw_over_fastai_adam": figures["train2d.torch_adamw_compute_images_per_s"]
                     / figures["train2d.compute_images_per_s"],
                     "train2d.image_size": p.image_size, "train2d.batch": p.batch_2d,
                     "train2d.data_workers": workers})


def bench_analysis(p: Profile, device, tmp: Path, emit, staged: dict) -> None:
    """What the per-group analysis costs a trial: one report's CKA with the source on the probe
    patches plus weight movement, against the training steps between two reports (validation not
    counted, so the share is an upper bound); the probe's set-up once per trial; the forecast once
    per sweep (LogME at every freeze depth of the source and of BASELINE_SEEDS untrained networks,
    on the driver's CPU), and the depth bias the baseline removes: an untrained "source"'s raw
    LogME per depth and its gain over the baseline (a forecast of nothing should be flat at 0)."""
    from tlcore.analysis.forecast import BASELINE_SEEDS, FORECAST_PATCH, forecast_depths
    from tlcore.models.probes import WeightMovement
    from tlcore.training.trial_start import make_probe, probe_inputs

    cfg = TrialConfig(patch_size=p.patch, batch_size=p.batch)
    torch.manual_seed(0)
    source, model = build_model(in_channels=2, num_classes=2).to(device), build_model(in_channels=2, num_classes=2)
    model.to(device)
    sync(device)
    t0 = time.perf_counter()
    movement = WeightMovement(model)
    inputs = probe_inputs(cfg, [staged["val"]])
    probe = make_probe(cfg, source, inputs, device)
    sync(device)
    setup_s = time.perf_counter() - t0

    def measure() -> float:
        sync(device)
        t = time.perf_counter()
        movement(model)
        probe.cka(model)
        sync(device)
        return time.perf_counter() - t

    measure()
    report_s = min(measure() for _ in range(3))
    interval_s = TrialConfig().report_every * staged["step_s"]
    widths = cka_interval_widths(cfg, source, [*staged["subjects"], staged["val"]], device)
    size = tuple(min(x, FORECAST_PATCH) for x in p.patch)
    untrained = {}
    for i in range(BASELINE_SEEDS + 1):  # the last one stands in for a source that learnt nothing
        torch.manual_seed(1_000 + i)
        untrained[f"random{i}"] = build_model(in_channels=2, num_classes=2)
    t0 = time.perf_counter()
    scores = forecast_depths({"source": source.cpu(), **{f"random{i}": untrained[f"random{i}"] for i in range(BASELINE_SEEDS)}},
                             staged["subjects"], size, range(6))
    forecast_s = time.perf_counter() - t0
    nothing = forecast_depths({"nothing": untrained[f"random{BASELINE_SEEDS}"]}, staged["subjects"], size, range(6))["nothing"]
    baseline = {k: sum(scores[f"random{i}"][k] for i in range(BASELINE_SEEDS)) / BASELINE_SEEDS for k in range(6)}
    emit("analysis", {"forecast.untrained_raw_by_depth": [round(nothing[k], 3) for k in range(6)],
                      "forecast.untrained_gain_by_depth": [round(nothing[k] - baseline[k], 3) for k in range(6)],"analysis.report_s": report_s, "analysis.setup_s": setup_s,
                      "analysis.overhead_pct_of_report_interval": 100 * report_s / interval_s,
                      "analysis.setup_pct_of_trial": 100 * setup_s / (TrialConfig().max_iterations * staged["step_s"]),
                      "analysis.probe_patches": len(inputs), "analysis.probe_size": list(inputs.shape[2:]),
                      "forecast.cpu_s": forecast_s, **widths})


def cka_interval_widths(cfg: TrialConfig, source, subjects, device) -> dict:
    """The width of CKA's 95 % interval per group at the default probe (make_probe on
    probe_inputs) and at the probe before it (16 patches of up to 48^3, 64 voxels each), against
    an unrelated network (another random initialisation: CKA ~0.6, the widest case) and a related
    one (the source with noise of half each tensor's sd added), with each probe's forward cost."""
    from tlcore.models.probes import LayerProbe, probe_patches
    from tlcore.training.trial_start import make_probe, probe_inputs

    torch.manual_seed(7)
    unrelated, related = build_model(in_channels=2, num_classes=2).to(device), copy.deepcopy(source)
    with torch.no_grad():
        for q in related.parameters():
            q.add_(0.5 * q.std() * torch.randn_like(q) if q.numel() > 1 else 0)
    old_inputs = probe_patches(subjects, tuple(min(x, 48) for x in cfg.patch_size), 16)
    probes = {"default": make_probe(cfg, source, probe_inputs(cfg, subjects), device),
              "before": LayerProbe(source, old_inputs, device, voxels_per_patch=64, strata=torch.arange(16) % 2)}
    out = {"analysis.cka_probe": f"{cfg.probe_patches} patches of {list(probe_inputs(cfg, subjects[:1]).shape[2:])}, "
                                 f"{probes['default'].positions.shape[1]} voxels each"}
    for name, probe in probes.items():
        for kind, other in (("unrelated", unrelated), ("related", related)):
            sync(device)
            t = time.perf_counter()
            r = probe.cka(other)
            sync(device)
            out[f"analysis.cka_{name}_{kind}_s"] = time.perf_counter() - t
            groups = [k[4:] for k in r if k.startswith("cka.")]
            out[f"analysis.cka_{name}_{kind}_by_group"] = [round(r[f"cka.{g}"], 3) for g in groups]
            out[f"analysis.cka_interval_width_{name}_{kind}_by_group"] = [
                round(r[f"cka_high.{g}"] - r[f"cka_low.{g}"], 3) for g in groups]
    out["analysis.cka_interval_width_default_max"] = max(max(out[f"analysis.cka_interval_width_default_{k}_by_group"])
                                                         for k in ("unrelated", "related"))
    return out

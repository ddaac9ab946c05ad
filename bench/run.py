"""tlcore benchmarks: how close the full pipeline comes to the model's own speed.

    make bench                                   # CPU, small shapes, a few minutes
    .venv/bin/python bench/run.py --full         # GPU: BraTS-size volumes, 96^3 patches, 299^2 images
    .venv/bin/python bench/run.py --only train3d,inference

Every figure that matters is a ratio of two timings taken in the same run (the machines are
noisy); absolute times are meaningful only from a GPU run. Results: one JSON line per
measurement on stdout and in bench/results-<device>.jsonl; the summary table of this device
replaces its section in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from tlcore.config import RunConfig  # noqa: E402
from tlcore.data.layouts import default_label_map, find_brats  # noqa: E402
from tlcore.data.pipeline import PatchSampler, load_subject  # noqa: E402
from tlcore.data.synthetic import write_brats  # noqa: E402
from tlcore.evaluate import dice_per_class, predict_logits, write_prediction  # noqa: E402
from tlcore.models import build_model  # noqa: E402
from tlcore.train import (amp_dtype, choose_channels_last, pick_device, seed_everything, staging_device,  # noqa: E402
                          train_segmentation)

# The GPU targets (bench/README.md), for one H100/H200 (ratios apply on every device).
TARGETS = {
    "train3d.pipeline_over_compute": (">=", 0.9),
    "train3d.patches_per_s": (">=", 30.0),
    "inference.model_only_s": ("<=", 0.6),
    "inference.end_to_end_s": ("<=", 1.5),
    "tune.overhead_ratio": ("<=", 1.10),
    "mlflow.overhead_pct_of_step": ("<=", 2.0),
    "asha.iterations_over_grid": ("<=", 0.35),
    "asha.same_best": ("==", True),
    "precision.same_weights_abs_dice_delta": ("<=", 0.01),
    "deterministic.repeats_bit_identical": ("==", True),
    "train2d.b64_compute_images_per_s": (">=", 800.0),
    "train2d.pipeline_over_compute": (">=", 0.9),
}
# Reports per trial of a real sweep (10,000 iterations, a report every 250): ASHA's rungs sit on
# reports, so the recorded grid reports as often, whatever its length.
SWEEP_REPORTS = RunConfig().max_iterations // RunConfig().report_every
BENCHES = ("train3d", "inference", "precision", "deterministic", "packing", "train2d", "mlflow", "tune", "asha")
GPU_ONLY = {"train3d.patches_per_s", "inference.model_only_s", "inference.end_to_end_s",
            "train2d.b64_compute_images_per_s"}


@dataclass(frozen=True)
class Profile:
    name: str
    volume: tuple          # BraTS-like subject size
    subjects: int
    patch: tuple
    batch: int
    steps: int             # timed steps per measurement (after warm-up)
    roi: tuple             # sliding-window size
    image_size: int        # 2D
    batch_2d: int
    steps_2d: int
    tune_trials: int
    sweep_iterations: int  # ASHA: iterations per trial of the recorded grid (SWEEP_REPORTS reports)


SMALL = Profile("small", (64, 64, 48), 4, (24, 24, 24), 2, 12, (32, 32, 32), 64, 8, 6, 4, 80)
FULL = Profile("full", (240, 240, 155), 8, (96, 96, 96), 2, 40, (96, 96, 96), 299, 16, 40, 4, 2000)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class FixedBatch:
    """A sampler that hands out one pre-staged batch: the model's own speed, no data pipeline."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def reseed(self, seed: int) -> None:
        pass

    def next_batch(self):
        return self.images, self.labels


def random_batch(p: Profile, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed training batch (2 modalities, ~10 % foreground) for pure-compute timings."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(p.batch, 2, *p.patch, generator=g), (torch.rand(p.batch, 1, *p.patch, generator=g) > 0.9).long()


def synthetic_subjects(root: Path, p: Profile):
    data = write_brats(root / "brats", n_hgg=p.subjects + 1, n_lgg=0, shape=p.volume, seed=0)
    files = find_brats(data)
    t0 = time.perf_counter()
    subjects = [load_subject(sid, f, ("t1", "t2"), default_label_map("brats"), 2, p.patch)
                for sid, f in sorted(files.items())]
    load_s = (time.perf_counter() - t0) / len(subjects)
    return subjects[:-1], subjects[-1], files, load_s


def steady_patches_per_s(cfg: RunConfig, sampler, val, device) -> tuple[float, float]:
    """train_segmentation's own patches/s over `cfg.max_iterations / 2` steps after as many
    warm-up steps, and the seconds per step."""
    reports = []
    torch.manual_seed(0)
    model = build_model(in_channels=2, num_classes=2)
    train_segmentation(cfg, model, sampler, val, 2, report=lambda m, s: reports.append(m), device=device)
    pps = reports[-1]["patches_per_s"]
    return pps, cfg.batch_size / pps


def bench_train3d(p: Profile, device, tmp: Path, emit) -> dict:
    subjects, val, files, load_s = synthetic_subjects(tmp, p)
    half = p.steps
    cfg = RunConfig(patch_size=p.patch, batch_size=p.batch, inference_roi=p.roi, max_iterations=2 * half,
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
        cfg = RunConfig(patch_size=p.patch, batch_size=p.batch, inference_roi=p.roi, max_iterations=2 * p.steps,
                        report_every=p.steps, max_val_subjects=1, precision=precision, channels_last=cl,
                        num_threads=torch.get_num_threads())
        sampler = PatchSampler(subjects, p.patch, p.batch, "weighted", True, seed=0, device=stage)
        torch.manual_seed(0)
        model = build_model(in_channels=2, num_classes=2)
        reports = []
        train_segmentation(cfg, model, sampler, [val], 2, report=lambda m, s: reports.append(m), device=device)
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
    cfg = RunConfig(patch_size=p.patch, batch_size=p.batch, inference_roi=p.roi, max_iterations=2 * p.steps,
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
            train_segmentation(cfg, model, sampler, [staged["val"]], 2, report=lambda m, s: reports.append(m),
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
    cfg = RunConfig(patch_size=p.patch, batch_size=p.batch, inference_roi=p.roi, max_iterations=2 * p.steps,
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
    cfg = RunConfig(patch_size=p.patch, batch_size=p.batch, inference_roi=p.roi)
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
    from tlcore.models import build_densenet121
    from tlcore.train2d import build_learner, image_loaders

    root = write_mura(tmp / "mura", n_patients=max(12, 2 * p.batch_2d), size=p.image_size)
    images = [i for i in find_mura(root)[0] if i.split == "train"]
    # one epoch covers every timed step: a real MURA epoch is 36,808 images, so the loader's
    # start-of-epoch refill must not be timed 10 times over as it would with a few dozen images
    images = images * -(-(p.steps_2d + 2) * 4 * p.batch_2d // len(images))
    workers = 0 if device.type == "cpu" else min(8, (os.cpu_count() or 2) - 1)

    def learner(batch: int, torch_adamw: bool):
        cfg = RunConfig(dataset="mura", image_size=p.image_size, batch_size=batch, data_workers=workers)
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


def bench_tracking(p: Profile, device, tmp: Path, emit, step_s: float) -> None:
    from tlcore import tracking

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    tracking.prepare_store(uri)
    run = tracking.start_run(uri, "bench", "bench")
    metrics = {"train_loss": 0.5, "val_loss": 0.6, "val_dice": 0.7, "lr": 1e-3, "patches_per_s": 10.0}
    tracking.log_metrics(uri, run, metrics, step=0)
    n = 30
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        tracking.log_metrics(uri, run, metrics, step=i)
    per_log = (time.perf_counter() - t0) / n
    report_every = RunConfig().report_every
    # The trial never waits for MLflow: Tune's driver logs each report. Per training step
    # that is per_log / report_every, and even logging every step would cost per_log.
    emit("mlflow", {"mlflow.s_per_log_call": per_log, "mlflow.every_step_pct_of_step": 100 * per_log / step_s,
                    "mlflow.overhead_pct_of_step": 100 * per_log / report_every / step_s,
                    "mlflow.report_every": report_every})


def bench_tune(p: Profile, device, tmp: Path, emit) -> None:
    """The same fixed trials in a plain loop and under Tune (one at a time, checkpoints on)."""
    import ray
    from ray import tune

    cfg = dict(patch_size=p.patch, batch_size=p.batch, max_iterations=p.steps, report_every=p.steps // 2,
               inference_roi=p.roi, max_val_subjects=1)
    val_shape = p.volume

    def trial(config, report):
        torch.set_num_threads(config.get("threads", 1))
        c = RunConfig(**{**cfg, "seed": config["seed"]})
        x, y = random_batch(p, config["seed"])
        from tlcore.data.pipeline import Subject
        val = Subject("v", torch.randn(2, *val_shape), (torch.rand(1, *val_shape) > 0.9).long(), np.eye(4))
        dev = pick_device()
        train_segmentation(c, build_model(in_channels=2, num_classes=2), FixedBatch(x.to(dev), y.to(dev)),
                           [val], 2, report, device=dev)

    def save(metrics, state, d):
        state.pop("val_per_subject")
        torch.save(state, Path(d) / "state.pt")

    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    for seed in range(p.tune_trials):
        with tempfile.TemporaryDirectory() as d:
            trial({"seed": seed, "threads": threads}, lambda m, s: save(m, s, d))
    plain = time.perf_counter() - t0

    def tune_trial(config):
        def report(m, s):
            with tempfile.TemporaryDirectory() as d:
                save(m, s, d)
                tune.report(m, checkpoint=tune.Checkpoint.from_directory(d))
        trial(config, report)

    t_init = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count(), include_dashboard=False,
             log_to_driver=False)
    init_s = time.perf_counter() - t_init
    try:
        t0 = time.perf_counter()
        tuner = tune.Tuner(
            tune.with_resources(tune_trial, {"cpu": os.cpu_count(), "gpu": 1 if device.type == "cuda" else 0}),
            param_space={"seed": tune.grid_search(list(range(p.tune_trials))), "threads": threads},
            tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=True),
            run_config=tune.RunConfig(storage_path=str(tmp / "ray"), name="overhead", verbose=0))
        tuner.fit()
        tuned = time.perf_counter() - t0
    finally:
        ray.shutdown()
    emit("tune", {"tune.plain_s": plain, "tune.tune_s": tuned, "tune.overhead_ratio": tuned / plain,
                  "tune.ray_init_s": init_s, "tune.with_init_ratio": (tuned + init_s) / plain,
                  "tune.trials": p.tune_trials})


def bench_asha(p: Profile, device, tmp: Path, emit) -> None:
    """Run the brats_layers grid to the end once (no early stopping), then replay ASHA with the
    sweeps' own settings on the recorded validation curves."""
    import ray
    from ray import tune

    from tlcore.trainables import asha

    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    uri = f"sqlite:///{tmp / 'sweep.db'}"
    common = ["--mlflow-uri", uri, "--storage-path", str(tmp / "results")]
    # The source model only has to exist; the grid's curves are validated on every validation
    # subject, as in a real sweep (the smoke profile's 2 subjects make rung decisions coin flips).
    for script, extra in (("ixi_source.py", ["--smoke-test"] if p.name == "small" else []),
                          ("brats_layers.py", ["--scheduler", "none", "--max-iterations", str(p.sweep_iterations),
                                               "--report-every", str(p.sweep_iterations // SWEEP_REPORTS)])):
        out = subprocess.run([sys.executable, str(REPO / "sweeps" / script), *common, *extra], cwd=REPO, env=env,
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{script} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    curves = {}
    for d in (tmp / "results" / "brats_layers").glob("train_*"):
        rows = [json.loads(line) for line in (d / "result.json").read_text().splitlines() if line.strip()]
        params = json.loads((d / "params.json").read_text())
        name = f"{params['start']['source_model']} k={params['start']['frozen_layers']}"
        curves[name] = [r["val_dice"] for r in rows]
    reports = max(len(c) for c in curves.values())
    grid_best = max(curves, key=lambda k: max(curves[k]))

    def replay(config):
        for v in curves[config["name"]]:
            time.sleep(0.05)  # trials advance together, as equal-speed trials on a cluster do
            tune.report({"val_dice": v})

    def asha_replay(concurrency: int, grace_period: int = 2, reduction_factor: int = 3) -> tuple[float, str]:
        """ASHA's share of the grid's iterations and its best configuration, with `concurrency`
        trials running at once (async ASHA cannot stop a trial before others reach its rung)."""
        ray.init(num_cpus=concurrency, include_dashboard=False, log_to_driver=False)
        try:
            results = tune.Tuner(
                tune.with_resources(replay, {"cpu": 1}),
                param_space={"name": tune.grid_search(sorted(curves))},
                tune_config=tune.TuneConfig(metric="val_dice", mode="max",
                                            scheduler=asha(reports, grace_period, reduction_factor)),
                run_config=tune.RunConfig(storage_path=str(tmp / f"replay{concurrency}"), name="asha",
                                          verbose=0)).fit()
        finally:
            ray.shutdown()
        used = {r.config["name"]: int(r.metrics["training_iteration"]) for r in results}
        survivors = [k for k, n in used.items() if n == len(curves[k])]
        best = max(survivors, key=lambda k: max(curves[k]))
        return sum(used.values()) / sum(len(c) for c in curves.values()), best

    here = max(1, (os.cpu_count() or 2) if device.type == "cpu" else torch.cuda.device_count())
    share, best = asha_replay(here)
    share_all, best_all = asha_replay(len(curves))
    # other settings on the same curves, at this machine's concurrency: [share of the grid, same best]
    settings = {}
    for grace_period in (1, 2, 4):
        for reduction_factor in (2, 3, 4):
            if (grace_period, reduction_factor) != (2, 3):
                got, b = asha_replay(here, grace_period, reduction_factor)
                settings[f"grace{grace_period}_rf{reduction_factor}"] = [round(got, 3), b == grid_best]
    settings["grace2_rf3"] = [round(share, 3), best == grid_best]
    emit("asha", {"asha.iterations_over_grid": share, "asha.same_best": best == grid_best,
                  "asha.concurrent_trials": here,
                  "asha.iterations_over_grid_all_parallel": share_all,
                  "asha.same_best_all_parallel": best_all == grid_best,
                  "asha.grid_best": grid_best, "asha.asha_best": best, "asha.reports_per_trial": reports,
                  "asha.best_val_dice": {k: round(max(v), 4) for k, v in sorted(curves.items())},
                  "asha.curves": {k: [round(x, 4) for x in v] for k, v in sorted(curves.items())},  # to replay offline
                  "asha.other_settings": "; ".join(f"{k} {v[0]}{'' if v[1] else ' (other best)'}"
                                                   for k, v in sorted(settings.items()))})


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    v = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("monai", "ray", "mlflow", "fastai"):
        try:
            v[package] = version(package)
        except PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
        v["cudnn"] = str(torch.backends.cudnn.version())
    return v


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def verdict(key: str, value, on_gpu: bool) -> str:
    if key not in TARGETS:
        return ""
    op, target = TARGETS[key]
    if key in GPU_ONLY and not on_gpu:
        return "GPU target"
    ok = {">=": lambda: value >= target, "<=": lambda: value <= target, "==": lambda: value == target}[op]()
    return "met" if ok else "NOT met"


def write_summary(log: Path, device: torch.device, profile: Profile) -> None:
    """This device's section of RESULTS.md from the newest record of each measurement in `log`
    (so `--only` reruns replace just their own rows)."""
    on_gpu = device.type == "cuda"
    newest = {}
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("device") == device_name(device) and rec.get("profile") == profile.name:
            newest[rec["bench"]] = rec
    order = list(BENCHES)
    records = [newest[b] for b in order if b in newest]
    title = f"## {device_name(device)}: `bench/run.py{' --full' if profile.name == 'full' else ''}`"
    lines = [title, "", f"{time.strftime('%Y-%m-%d')}; " + ", ".join(f"{k} {v}" for k, v in versions().items()), "",
             "| measurement | value | target | |", "|---|---|---|---|"]
    for rec in records:
        for k, v in rec.items():
            if k in ("bench", "device", "profile") or isinstance(v, (dict, list)):
                continue
            shown = f"{v:.4g}" if isinstance(v, float) else str(v)
            target = " ".join(map(str, TARGETS[k])) if k in TARGETS else ""
            lines.append(f"| {k} | {shown} | {target} | {verdict(k, v, on_gpu)} |")
    section = "\n".join(lines) + "\n"
    path = BENCH / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n\nWritten by `bench/run.py`; see bench/README.md.\n"
    parts = text.split("\n## ")
    kept = [parts[0]] + ["## " + s for s in parts[1:] if not ("## " + s).startswith(title)]
    path.write_text("\n".join(x.rstrip("\n") + "\n" for x in kept) + "\n" + section)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the real shapes (for a GPU)")
    ap.add_argument("--only", default="", help="comma-separated: " + ",".join(BENCHES))
    ap.add_argument("--no-summary", action="store_true", help="do not touch bench/RESULTS.md")
    args = ap.parse_args(argv)
    profile = FULL if args.full else SMALL
    device = pick_device()
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    only = set(filter(None, args.only.split(","))) or set(BENCHES)
    if only - set(BENCHES):
        ap.error(f"--only {args.only}: choose from {', '.join(BENCHES)}")
    from importlib.util import find_spec
    for bench, module in (("tune", "ray"), ("asha", "ray"), ("mlflow", "mlflow"), ("train2d", "fastai")):
        if bench in only and find_spec(module) is None:  # e.g. a GPU box that cannot install Ray
            print(f"[bench] skipping {bench}: {module} is not installed", file=sys.stderr)
            only.discard(bench)
    log = BENCH / f"results-{device.type}.jsonl"

    def emit(name: str, values: dict) -> None:
        rec = {"bench": name, "device": device_name(device), "profile": profile.name, **values}
        line = json.dumps(rec, default=str)
        print(line, flush=True)
        with log.open("a") as f:
            f.write(line + "\n")

    with tempfile.TemporaryDirectory(prefix="tlcore-bench-") as d:
        tmp = Path(d)
        staged = (bench_train3d(profile, device, tmp, emit)
                  if only & {"train3d", "inference", "mlflow", "precision", "deterministic"} else None)
        if "inference" in only:
            bench_inference(profile, device, tmp, emit, staged)
        if "precision" in only:
            bench_precision(profile, device, tmp, emit, staged)
        if "deterministic" in only:
            bench_deterministic(profile, device, tmp, emit, staged)
        if "packing" in only:
            bench_packing(profile, device, tmp, emit)
        if "train2d" in only:
            bench_train2d(profile, device, tmp, emit)
        if "mlflow" in only:
            bench_tracking(profile, device, tmp, emit, staged["step_s"])
        if "tune" in only:
            bench_tune(profile, device, tmp, emit)
        if "asha" in only:
            bench_asha(profile, device, tmp, emit)
    if not args.no_summary:
        write_summary(log, device, profile)
        print(f"[bench] summary written to {BENCH / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

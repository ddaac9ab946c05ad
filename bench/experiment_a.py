"""Thesis experiment A on one GPU, in measured parts (`bench/run.py --only experiment_a`), and
MONAI's GPU-side patch pipeline against tlcore's sampler (`--only monai_gpu`).

Experiment A (SPEC 1.1): 7 starts (scratch; the IXI source with its first k = 0..5 layer groups
frozen) x 3 seeds x 10,000 iterations, a report every 250 (40 reports), BraTS HGG split
105 / 63 / 42. A scaled-down run trains the same 7 starts on the same shapes (240x240x155
volumes, 2 x 96^3 patches, bf16 + channels-last as a trial picks them) for a few reports,
through `train_segmentation` itself, validating every report on every validation volume; the
full experiment is extrapolated from what it and the parts below measured:

    trial_s(k) = ITERATIONS * step_s(k) + REPORTS * (rung_subjects * val_s + precise_bn_s)
    eval_s     = EVAL_SUBJECTS * eval_s_per_volume             (every trial on train + val + test)
    gpu_hours  = (SEEDS * sum_k trial_s(k) + TRIALS * eval_s) / packing_gain / 3600

- step_s(k): seconds per training step of start k in the scaled run (frozen groups need no
  weight gradients; the deeper the freeze, the shorter the backward pass);
- val_s: seconds per validation volume in the scaled run (sliding window, Dice, the real code);
  the window settings are the fastest of `variants` whose Dice on the same weights stays within
  0.01 of the reference (overlap 0.5, sw_batch_size 2: what the sweeps used);
- rung_subjects: the fixed validation subset ASHA decides on, if its ranking of the trials
  agrees with the full set's in the scaled run (else all 63);
- packing_gain: total throughput of N processes sharing the GPU over one alone, each running
  training steps and validation in the real experiment's proportion, best N;
- torch.compile: measured, counted only if it pays after its compile time (same weights, bf16).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from common import Profile, steady_patches_per_s  # noqa: E402
from experiment_a_parts import (  # noqa: E402
    DICE_TOLERANCE,
    measure_compile,
    packing_with_validation,
    rank_agreement,
    validation_variants,
)

from tlcore.config import TrialConfig  # noqa: E402
from tlcore.models.networks import build_model  # noqa: E402
from tlcore.models.transfer import freeze_first  # noqa: E402
from tlcore.training.device import staging_device  # noqa: E402
from tlcore.training.segmentation import amp_dtype, choose_channels_last, train_segmentation  # noqa: E402

# The thesis's experiment A (SPEC 1.1) and the decision rule for MONAI's sampler (the issue's).
STARTS = ("scratch", 0, 1, 2, 3, 4, 5)
SEEDS, ITERATIONS, REPORT_EVERY = 3, 10_000, 250
REPORTS = ITERATIONS // REPORT_EVERY
VAL_SUBJECTS, EVAL_SUBJECTS = 63, 105 + 63 + 42
RUNG_SUBJECTS = 16                 # the fixed subset tried for rung decisions (about a quarter)
MONAI_SWITCH_AT = 0.95             # MONAI's GPU pipeline replaces tlcore's sampler at >= this share


# ---------------------------------------------------------------------------------------------
# MONAI's GPU-side pipeline


def bench_monai_gpu(p: Profile, device, tmp: Path, emit, staged: dict) -> None:
    """MONAI's fast-training path (volumes cached on the device; RandCropByLabelClassesd with
    class indices computed once, then RandAffined on the device) against tlcore's PatchSampler
    in the same training loop: patches/s of `train_segmentation`, interleaved, best of two.
    Variants: eager transforms; `lazy` (MONAI's lazy resampling fuses the crop and the affine
    into one resample, as tlcore's sampler does); `thread` (eager, drawn in a background thread
    with MONAI's ThreadBuffer, as its ThreadDataLoader does)."""
    from monai_sampler import MonaiGpuPatchSampler

    from tlcore.data.pipeline import PatchSampler

    subjects, val = staged["subjects"], staged["val"]
    stage = staging_device(subjects, device)
    cfg = TrialConfig(patch_size=p.patch, batch_size=p.batch, inference_roi=p.roi, torch_compile="off", max_iterations=2 * p.steps,
                    report_every=p.steps, max_val_subjects=1, precise_bn_batches=0,
                    num_threads=torch.get_num_threads())
    samplers = {"tlcore": lambda: PatchSampler(subjects, p.patch, p.batch, "weighted", True, seed=0, device=stage)}
    for mode in ("eager", "lazy", "thread"):
        samplers[f"monai_{mode}"] = lambda mode=mode: MonaiGpuPatchSampler(subjects, p.patch, p.batch, seed=0,
                                                                           device=stage, mode=mode)
    out, best = {}, {}
    for _ in range(2):
        for name, make in samplers.items():
            try:
                sampler = make()
                best[name] = max(best.get(name, 0.0), steady_patches_per_s(cfg, sampler, [val], device)[0])
                close = getattr(sampler, "close", None)
                if close:
                    close()
            except Exception as e:  # noqa: BLE001 (a variant MONAI cannot run here is a finding, not a crash)
                out[f"monai_gpu.{name}.error"] = f"{type(e).__name__}: {e}"[:300]
    for name, pps in best.items():
        out[f"monai_gpu.{name}.patches_per_s"] = pps
    monai = {n: v for n, v in best.items() if n.startswith("monai_")}
    if monai and "tlcore" in best:
        fastest = max(monai, key=monai.get)
        ratio = monai[fastest] / best["tlcore"]
        out.update({"monai_gpu.fastest": fastest, "monai_gpu.over_tlcore": ratio,
                    "monai_gpu.volumes_on": stage.type,
                    # tlcore keeps its own sampler unless MONAI's reaches MONAI_SWITCH_AT of it
                    "monai_gpu.default_follows_measurement": ratio < MONAI_SWITCH_AT})
    emit("monai_gpu", out)


# ---------------------------------------------------------------------------------------------
# The scaled-down experiment


def _validation_subjects(tmp: Path, p: Profile, n: int):
    """n more BraTS-size synthetic subjects, written and loaded as a sweep loads them (in
    parallel: one full-size subject takes seconds to draw)."""
    from concurrent.futures import ProcessPoolExecutor

    from tlcore.data.layouts import default_label_map, find_brats
    from tlcore.data.pipeline import load_subject
    roots = [tmp / f"val{i}" for i in range(n)]
    with ProcessPoolExecutor(min(n, os.cpu_count() or 1), mp_context=mp.get_context("spawn")) as pool:
        list(pool.map(_write_one, [(r, p.volume, 100 + i) for i, r in enumerate(roots)]))
    subjects = []
    for i, r in enumerate(roots):
        (sid, files), = find_brats(r).items()
        s = load_subject(sid, files, ("t1", "t2"), default_label_map("brats"), 2, p.patch, with_centres=False)
        subjects.append(replace(s, id=f"val{i}"))  # one subject per folder: every folder names it alike
    return subjects


def _write_one(args) -> None:
    from tlcore.data.synthetic import write_brats
    root, shape, seed = args
    write_brats(root, n_hgg=1, n_lgg=0, shape=shape, seed=seed)


def scaled_run(p: Profile, device, staged: dict, val_subjects, window: dict, iterations: int, reports: int) -> dict:
    """The 7 starts, one seed, `iterations` each with `reports` reports, through
    train_segmentation: each report's patches/s (training only) and per-subject Dice, and the
    seconds of precise BN + validation per report."""
    from tlcore.data.pipeline import PatchSampler

    subjects = staged["subjects"]
    stage = staging_device(subjects, device)
    common = dict(patch_size=p.patch, batch_size=p.batch, inference_roi=tuple(window["roi"]), torch_compile="off",
                  report_every=iterations // reports, max_val_subjects=0, sw_overlap=window["overlap"],
                  sw_batch_size=window["sw_batch_size"], num_threads=torch.get_num_threads())
    # the source: a model trained on the same task from another seed (no IXI here); the starts
    # load it as a sweep loads the registered IXI model
    torch.manual_seed(1)
    source = build_model(in_channels=2, num_classes=2)
    train_segmentation(TrialConfig(**{**common, "max_iterations": iterations, "report_every": iterations,
                                      "max_val_subjects": 1}),
                       source, PatchSampler(subjects, p.patch, p.batch, "weighted", True, seed=1, device=stage),
                       val_subjects[:1], 2, report=lambda m, s: None, device=device)
    source_state = {k: v.detach().cpu().clone() for k, v in source.state_dict().items()}
    per_start, curves = {}, []
    for start in STARTS:
        torch.manual_seed(0)
        model = build_model(in_channels=2, num_classes=2)
        if start != "scratch":
            model.load_state_dict(source_state)
            freeze_first(model, start)
        sampler = PatchSampler(subjects, p.patch, p.batch, "weighted", True, seed=0, device=stage)
        marks, reports_seen = [time.perf_counter()], []

        def report(metrics, state, marks=marks, reports_seen=reports_seen):
            marks.append(time.perf_counter())
            reports_seen.append((metrics, state["val_per_subject"]))

        cfg = TrialConfig(**common, max_iterations=iterations)
        train_segmentation(cfg, model, sampler, val_subjects, 2, report=report, device=device)
        pps = [m["patches_per_s"] for m, _ in reports_seen[1:]] or [reports_seen[0][0]["patches_per_s"]]
        step_s = p.batch / float(np.median(pps))
        report_wall = np.diff(marks)[1:] if len(marks) > 2 else np.diff(marks)
        # what a report costs beyond its training steps: precise BN + validation (+ the loop's share)
        overhead = float(np.median(report_wall)) - cfg.report_every * step_s
        later = [m for m, _ in reports_seen[1:]] or [reports_seen[0][0]]  # the first warms cuDNN up
        per_start[str(start)] = {"step_s": step_s, "report_overhead_s": overhead,
                                 "bn_s": float(np.median([m["precise_bn_s"] for m in later])),
                                 "val_s": float(np.median([m["val_s"] for m in later])),
                                 "final_dice": reports_seen[-1][0]["val_dice"]}
        for i, (_, per_subject) in enumerate(reports_seen):
            while len(curves) <= i:
                curves.append({})
            curves[i][str(start)] = [per_subject[s.id] for s in val_subjects]
    return {"per_start": per_start, "curves": curves}


def bench_experiment_a(p: Profile, device, tmp: Path, emit, staged: dict) -> None:
    out = {}
    dtype = amp_dtype(TrialConfig(), device)
    n_val = 12 if p.name == "full" else 4
    t0 = time.perf_counter()
    val_subjects = _validation_subjects(tmp, p, n_val)
    out["experiment_a.setup_s"] = time.perf_counter() - t0

    # 1. window settings, on a model trained a little (a predictor that is neither empty nor random)
    cfg = TrialConfig(patch_size=p.patch, batch_size=p.batch, inference_roi=p.roi, torch_compile="off", max_iterations=2 * p.steps,
                    report_every=2 * p.steps, max_val_subjects=1, num_threads=torch.get_num_threads())
    from tlcore.data.pipeline import PatchSampler
    torch.manual_seed(0)
    model = build_model(in_channels=2, num_classes=2)
    cl = choose_channels_last(cfg, device, model, 2)[0]
    stage = staging_device(staged["subjects"], device)
    train_segmentation(cfg, model, PatchSampler(staged["subjects"], p.patch, p.batch, "weighted", True, seed=0,
                                                device=stage), val_subjects[:1], 2,
                       report=lambda m, s: None, device=device)
    variants, window = validation_variants(p, model, [s.image for s in val_subjects],
                                           [s.label for s in val_subjects], device, dtype, cl)
    out.update(variants)
    emit("experiment_a", out)  # partial records survive a later failure; the summary merges them

    # 2. the scaled-down experiment: 7 starts, the chosen window, every validation subject per report
    iterations, reports = (3 * p.steps, 3) if p.name == "full" else (2 * p.steps, 2)
    run = scaled_run(p, device, staged, val_subjects, window, iterations, reports)
    subset = max(1, round(n_val * RUNG_SUBJECTS / VAL_SUBJECTS))
    agreement = rank_agreement(run["curves"], subset)
    rung_ok = agreement["same_top_third_share"] == 1.0 and agreement["regret_max"] <= DICE_TOLERANCE
    step_s = {k: v["step_s"] for k, v in run["per_start"].items()}
    # the report's two parts as train_segmentation timed them: precise BN once, then each volume
    bn_s = float(np.median([v["bn_s"] for v in run["per_start"].values()]))
    val_s = float(np.median([v["val_s"] for v in run["per_start"].values()])) / n_val
    overhead = float(np.median([v["report_overhead_s"] for v in run["per_start"].values()]))
    out.update({f"experiment_a.step_s.{k}": v for k, v in step_s.items()})
    out.update({f"experiment_a.rank.{k}": v for k, v in agreement.items()})
    out.update({"experiment_a.val_s_per_volume": val_s, "experiment_a.bn_s_per_report": bn_s,
                "experiment_a.report_overhead_s": overhead,
                "experiment_a.rung_subset_agrees": rung_ok, "experiment_a.rank.subset": f"{subset} of {n_val}",
                "experiment_a.final_dice": {k: v["final_dice"] for k, v in run["per_start"].items()},
                "experiment_a.curves": run["curves"]})
    emit("experiment_a", out)

    # 3. packing with validation in the real proportion (a report: 250 steps, then the rung's volumes)
    rung_subjects = RUNG_SUBJECTS if rung_ok else VAL_SUBJECTS
    steps_per_volume = max(1, round(REPORT_EVERY / rung_subjects))
    packing = packing_with_validation(p, device, steps_per_volume,
                                      (window["overlap"], window["sw_batch_size"], tuple(window["roi"])))
    out.update({f"experiment_a.{k}": v for k, v in packing.items()})
    out["experiment_a.rung_subjects"] = rung_subjects
    extrapolate(out)
    emit("experiment_a", out)

    # 4. torch.compile, where it pays after its compile time (last: it may take minutes)
    apply_compile(out, measure_compile(p, device, timeout_s=120 if device.type == "cuda" else 600))
    emit("experiment_a", out)


def recorded_parts(p: Profile, device) -> dict:
    """Experiment A's parts this device recorded last (the short device calls measure one part and
    extrapolate again from the rest)."""
    from common import device_name, newest_records

    newest = newest_records(BENCH / f"results-{device.type}.jsonl", device_name(device), p.name)
    return {k: v for k, v in newest.get("experiment_a", {}).items() if k.startswith(("experiment_a.", "validation."))}


def changed(out: dict, parts: dict) -> dict:
    """What a short call adds to the recorded parts: a record of its own, not a copy of theirs."""
    return {k: v for k, v in out.items() if k not in parts or parts[k] != v}


def bench_compile(p: Profile, device, tmp: Path, emit, staged: dict) -> None:
    """`--only compile`: torch.compile alone, and experiment A's figure again with it, from the
    parts this device recorded last (a short device call after a long one)."""
    parts = recorded_parts(p, device)
    out = dict(parts)
    apply_compile(out, measure_compile(p, device, timeout_s=240 if device.type == "cuda" else 600))
    emit("experiment_a", changed(out, parts))


def bench_report_parts(p: Profile, device, tmp: Path, emit, staged: dict) -> None:
    """`--only report_parts`: a report's two parts as `train_segmentation` times them (precise BN
    once, then validation per volume), with the sweeps' window defaults, on one start and the
    validation volumes of `experiment_a`; then experiment A's figure again from the parts this
    device recorded last (a short device call that corrects the validation term)."""
    from tlcore.data.pipeline import PatchSampler

    n_val = 12 if p.name == "full" else 4
    val_subjects = _validation_subjects(tmp, p, n_val)
    subjects = staged["subjects"]
    reports, every = 3, p.steps
    cfg = TrialConfig(patch_size=p.patch, batch_size=p.batch, inference_roi=p.roi, torch_compile="off",
                      max_iterations=reports * every, report_every=every, max_val_subjects=0, num_threads=torch.get_num_threads())
    seen = []
    torch.manual_seed(0)
    train_segmentation(cfg, build_model(in_channels=2, num_classes=2),
                       PatchSampler(subjects, p.patch, p.batch, "weighted", True, seed=0,
                                    device=staging_device(subjects, device)),
                       val_subjects, 2, report=lambda m, s: seen.append(m), device=device)
    later = seen[1:]  # the first report warms cuDNN up
    parts = recorded_parts(p, device)
    out = dict(parts)
    out.update({"experiment_a.bn_s_per_report": float(np.median([m["precise_bn_s"] for m in later])),
                "experiment_a.val_s_per_volume": float(np.median([m["val_s"] for m in later])) / n_val,
                "experiment_a.report_parts.window": f"overlap {cfg.sw_overlap}, sw_batch_size {cfg.sw_batch_size}",
                "experiment_a.report_parts.precise_bn_batches": cfg.precise_bn_batches})
    if "experiment_a.packing_val.gain" in out:
        extrapolate(out)
    emit("experiment_a", changed(out, parts))


def apply_compile(out: dict, compiled: dict) -> None:
    """Record torch.compile's figures; where it pays after its compile time, and keeps the same
    predictions, extrapolate again with the compiled step (needs the parts already in `out`)."""
    out.update({f"experiment_a.{k}": v for k, v in compiled.items()})
    out["experiment_a.compile.error"] = compiled.get("compile.error")  # None clears an earlier run's in the summary
    if "compile.error" in compiled or "experiment_a.step_s.scratch" not in out:
        return
    saved = ITERATIONS * out["experiment_a.step_s.scratch"] * (1 - 1 / compiled["compile.speedup"])
    # the same predictions: compiled bf16 as close to fp32 as eager bf16 is (the AMP noise already accepted)
    same = compiled.get("compile.compiled_vs_fp32_agreement", compiled["compile.argmax_agreement"]) >= \
        compiled.get("compile.eager_amp_vs_fp32_agreement", 1.0) - DICE_TOLERANCE
    pays = saved > compiled["compile.compile_s"] and same
    out["experiment_a.compile.pays"] = pays
    if "experiment_a.packing_val.gain" in out:
        extrapolate(out)


def extrapolate(out: dict) -> None:
    """The full experiment's GPU-hours from the measured parts in `out` (the module's formula):
    torch.compile's step counts where it paid; precise BN per report where it was timed apart
    (records before 2026-12-05 counted it inside val_s)."""
    step_s = {k.rsplit(".", 1)[1]: v for k, v in out.items() if k.startswith("experiment_a.step_s.")}
    rung_subjects, best_k = out["experiment_a.rung_subjects"], out["experiment_a.packing_val.best_k"]
    compile_factor = 1 / out["experiment_a.compile.speedup"] if out.get("experiment_a.compile.pays") else 1.0
    val_s, bn_s = out["experiment_a.val_s_per_volume"], out.get("experiment_a.bn_s_per_report", 0.0)
    training = {k: ITERATIONS * s * compile_factor for k, s in step_s.items()}
    trial_s = {k: training[k] + REPORTS * (bn_s + rung_subjects * val_s) for k in step_s}
    eval_s = EVAL_SUBJECTS * val_s
    gain = out["experiment_a.packing_val.gain"]
    grid_s = SEEDS * sum(trial_s.values())
    work_s = grid_s + SEEDS * len(STARTS) * eval_s
    asha = asha_share()
    out.update({"experiment_a.training_share": SEEDS * sum(training.values()) / work_s,
                "experiment_a.rung_subjects": rung_subjects,
                "experiment_a.asha_share": asha,
                "experiment_a.gpu_hours_grid": work_s / gain / 3600,
                # as README's 7.7 was counted: ASHA's share of the grid's iterations, every trial evaluated
                "experiment_a.gpu_hours": (asha * grid_s + SEEDS * len(STARTS) * eval_s) / gain / 3600,
                "experiment_a.formula": (
                    f"({asha:.2f} (ASHA's share of the grid, CPU run) x {SEEDS} seeds x sum over {len(STARTS)} starts of ({ITERATIONS} x step_s(k)"
                    f"{f' x {compile_factor:.3f} (compiled)' if compile_factor != 1 else ''} + {REPORTS} reports x ("
                    f"{bn_s:.2f} s precise BN + {rung_subjects} volumes x {val_s:.3f} s)) + {SEEDS * len(STARTS)} trials x {EVAL_SUBJECTS} "
                    f"volumes x {val_s:.3f} s) / packing gain {gain:.2f} ({best_k} trials per GPU) / 3600")})


def asha_share() -> float:
    """ASHA's iterations over the grid's, the newest CPU measurement (`asha.iterations_over_grid`,
    the sweeps' own settings replayed on a recorded brats_layers grid); 1 when none was recorded."""
    from common import newest_records

    return float(newest_records(BENCH / "results-cpu.jsonl").get("asha", {}).get("asha.iterations_over_grid", 1.0))

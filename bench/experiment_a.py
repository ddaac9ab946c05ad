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

import json
import math
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

from common import Profile, random_batch, steady_patches_per_s, sync  # noqa: E402

from tlcore.config import TrialConfig  # noqa: E402
from tlcore.evaluation.metrics import dice_per_class, predict_logits  # noqa: E402
from tlcore.models.networks import build_model  # noqa: E402
from tlcore.models.transfer import freeze_first  # noqa: E402
from tlcore.training.segmentation import (  # noqa: E402
    amp_dtype,
    build_loss,
    choose_channels_last,
    pick_device,
    staging_device,
    train_segmentation,
)

# The thesis's experiment A (SPEC 1.1) and the decision rule for MONAI's sampler (the issue's).
STARTS = ("scratch", 0, 1, 2, 3, 4, 5)
SEEDS, ITERATIONS, REPORT_EVERY = 3, 10_000, 250
REPORTS = ITERATIONS // REPORT_EVERY
VAL_SUBJECTS, EVAL_SUBJECTS = 63, 105 + 63 + 42
RUNG_SUBJECTS = 16                 # the fixed subset tried for rung decisions (about a quarter)
MONAI_SWITCH_AT = 0.95             # MONAI's GPU pipeline replaces tlcore's sampler at >= this share
DICE_TOLERANCE = 0.01              # a cheaper validation must score the same weights within this


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
    cfg = TrialConfig(patch_size=p.patch, batch_size=p.batch, inference_roi=p.roi, max_iterations=2 * p.steps,
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
# Validation: window settings on the same weights


def _predict_batch(model, images: torch.Tensor, roi, device, sw_batch: int, overlap: float, dtype, cl) -> torch.Tensor:
    """Class indices of N same-shape volumes (N, C, H, W, D) in one sliding-window call: MONAI
    fills each sw_batch with windows of every volume."""
    from monai.inferers import sliding_window_inference

    from tlcore.evaluation.metrics import autocast

    roi = tuple(min(int(r), int(n)) for r, n in zip(roi, images.shape[-3:]))
    x = images.to(device)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad(), autocast(device, dtype):
        logits = sliding_window_inference(x, roi_size=roi, sw_batch_size=sw_batch, predictor=model,
                                          overlap=overlap, mode="gaussian")
    return torch.as_tensor(logits).argmax(1)


def validation_variants(p: Profile, model, volumes, labels, device, dtype, cl) -> tuple[dict, dict]:
    """Seconds per volume (model only: volumes on the device, Dice not counted) and Dice on the
    same weights for window settings (overlap, sw_batch_size, roi, volumes per call); the
    reference is the sweeps' (0.5, 2, the patch, 1)."""
    big = tuple(int(1.5 * r) for r in p.roi)   # 144^3 on the full profile: 8 windows cover a BraTS volume
    variants = {"ref": (0.5, 2, p.roi, 1), "o50_sw8": (0.5, 8, p.roi, 1), "o25_sw2": (0.25, 2, p.roi, 1),
                "o25_sw8": (0.25, 8, p.roi, 1), "o25_sw8_n4": (0.25, 8, p.roi, 4),
                "o25_roi1.5_sw2": (0.25, 2, big, 1), "o50_roi1.5_sw2": (0.5, 2, big, 1)}
    model.eval()
    n = len(volumes)
    stacked = torch.stack(volumes).to(device)
    out, table, preds = {}, {}, {}
    for name, (overlap, sw, roi, per_call) in variants.items():
        try:
            def run(roi=roi, sw=sw, overlap=overlap, per_call=per_call):
                sync(device)
                t0 = time.perf_counter()
                result = [_predict_batch(model, stacked[i:i + per_call], roi, device, sw, overlap, dtype, cl)
                          for i in range(0, n, per_call)]
                sync(device)
                return (time.perf_counter() - t0) / n, torch.cat(result)
            _predict_batch(model, stacked[:per_call], roi, device, sw, overlap, dtype, cl)  # warm-up: cuDNN's kernels
            seconds, pred = min((run() for _ in range(2)), key=lambda r: r[0])
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            out[f"validation.{name}.error"] = "out of memory"
            continue
        preds[name] = pred.cpu()
        dice = float(np.mean([dice_per_class(pred[i], labels[i], 2).mean() for i in range(n)]))
        table[name] = {"overlap": overlap, "sw_batch_size": sw, "roi": list(roi), "volumes_per_call": per_call,
                       "s_per_volume": seconds, "dice": dice}
    ref = table["ref"]
    for name, row in table.items():
        row["speedup"] = ref["s_per_volume"] / row["s_per_volume"]
        row["abs_dice_delta"] = abs(row["dice"] - ref["dice"])
        row["agreement_with_ref"] = float(np.mean([dice_per_class(preds[name][i], preds["ref"][i], 2).mean()
                                                   for i in range(n)]))
        for key in ("s_per_volume", "speedup", "abs_dice_delta", "agreement_with_ref"):
            out[f"validation.{name}.{key}"] = row[key]
    ok = [n_ for n_, r in table.items() if r["abs_dice_delta"] <= DICE_TOLERANCE and r["volumes_per_call"] == 1]
    chosen = min(ok, key=lambda n_: table[n_]["s_per_volume"])
    out["validation.chosen"] = chosen
    out["validation.ref_dice"] = ref["dice"]
    return out, table[chosen]


# ---------------------------------------------------------------------------------------------
# Fixed validation subset for rung decisions


def rank_agreement(per_report: list[dict[str, list[float]]], subset: int) -> dict:
    """Do the first `subset` validation subjects rank the trials as all of them do? For each
    report: Kendall's tau between the two rankings, whether both keep the same top third (what
    ASHA's reduction factor 3 promotes), and the full-set Dice given up by promoting the subset's
    top third instead of the full set's (regret)."""
    from scipy.stats import kendalltau

    taus, same_top, regret = [], [], []
    for dice in per_report:
        trials = sorted(dice)
        full = np.array([np.mean(dice[t]) for t in trials])
        part = np.array([np.mean(dice[t][:subset]) for t in trials])
        tau = kendalltau(full, part).statistic
        taus.append(1.0 if math.isnan(tau) else float(tau))
        keep = max(1, len(trials) // 3)
        top_full, top_part = set(np.argsort(-full)[:keep]), set(np.argsort(-part)[:keep])
        same_top.append(top_full == top_part)
        regret.append(float(full[list(top_full)].mean() - full[list(top_part)].mean()))
    return {"tau_mean": float(np.mean(taus)), "tau_min": float(np.min(taus)),
            "same_top_third_share": float(np.mean(same_top)), "regret_max": float(np.max(regret))}


# ---------------------------------------------------------------------------------------------
# Packing with validation included


def _packed_trial(args) -> float:
    """One of N processes sharing the device: cycles of training steps and one validation volume
    in the real experiment's proportion; returns cycles per second (one cycle = one validation
    volume's share of a report)."""
    p, threads, steps_per_volume, window, barrier = args
    torch.set_num_threads(threads)
    device = pick_device()
    cfg = TrialConfig(patch_size=p.patch, batch_size=p.batch)
    dtype = amp_dtype(cfg, device)
    torch.manual_seed(0)
    model = build_model(in_channels=2, num_classes=2).to(device)
    cl = device.type == "cuda"
    if cl:
        model.to(memory_format=torch.channels_last_3d)
    optimizer, loss_fn = torch.optim.AdamW(model.parameters(), lr=1e-3), build_loss()
    x, y = (t.to(device) for t in random_batch(p))
    if cl:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    volume = torch.randn(2, *p.volume, device=device)
    overlap, sw, roi = window

    def cycle():
        model.train()
        for _ in range(steps_per_volume):
            with torch.autocast(device.type, torch.bfloat16, enabled=dtype is not None):
                loss = loss_fn(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        predict_logits(model, volume, roi, device, sw, overlap, dtype, cl).argmax(1)

    cycle()
    sync(device)
    barrier.wait()  # every process is warm: time them together
    n, t0 = 3, time.perf_counter()
    for _ in range(n):
        cycle()
    sync(device)
    return n / (time.perf_counter() - t0)


def packing_with_validation(p: Profile, device, steps_per_volume: int, window: tuple) -> dict:
    cores = os.cpu_count() or 1
    ks = (1, 2, 4) if device.type == "cuda" else (1, 2)  # 6 read as 4 on the H200 (0.89x)
    ctx = mp.get_context("spawn")
    total = {}
    for k in ks:
        with ctx.Manager() as manager, ctx.Pool(k) as pool:
            barrier = manager.Barrier(k)
            try:
                total[k] = sum(pool.map(_packed_trial, [(p, max(1, cores // k), steps_per_volume, window, barrier)] * k))
            except Exception as e:  # noqa: BLE001 (out of memory at large k: the previous k is the ceiling)
                print(f"[bench] packing {k} per device failed: {e}", file=sys.stderr)
                break
    best = max(total, key=lambda k: total[k])
    return {**{f"packing_val.k{k}_over_k1": total[k] / total[1] for k in total},
            "packing_val.best_k": best, "packing_val.gain": total[best] / total[1],
            "packing_val.steps_per_volume": steps_per_volume}


# ---------------------------------------------------------------------------------------------
# torch.compile


def _compiled_step(args) -> dict:
    """Eager against torch.compile'd training steps (default mode) on one pre-staged batch, the
    compile time, and the same weights' eval outputs (bf16) compiled against eager."""
    p, steps = args
    device = pick_device()
    cfg = TrialConfig(patch_size=p.patch, batch_size=p.batch)
    dtype = amp_dtype(cfg, device)
    cl = device.type == "cuda"
    x, y = (t.to(device) for t in random_batch(p))
    if cl:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    loss_fn = build_loss()

    def steps_per_s(model, n):
        optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-3)

        def step():
            with torch.autocast(device.type, torch.bfloat16, enabled=dtype is not None):
                loss = loss_fn(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        sync(device)
        t0 = time.perf_counter()
        step()  # the compiled model compiles here
        sync(device)
        first = time.perf_counter() - t0
        for _ in range(3):
            step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        sync(device)
        return n / (time.perf_counter() - t0), first

    torch.manual_seed(0)
    eager = build_model(in_channels=2, num_classes=2).to(device)
    if cl:
        eager.to(memory_format=torch.channels_last_3d)
    eager_rate, _ = steps_per_s(eager, steps)
    compiled = torch.compile(eager)  # the same module: the same weights
    compiled_rate, compile_s = steps_per_s(compiled, steps)
    eager.eval()
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=dtype is not None):
        a, b = eager(x).float(), compiled(x).float()
    agreement = float(np.mean([dice_per_class(a[i].argmax(0), b[i].argmax(0), 2).mean() for i in range(len(a))]))
    return {"compile.eager_steps_per_s": eager_rate, "compile.compiled_steps_per_s": compiled_rate,
            "compile.speedup": compiled_rate / eager_rate, "compile.compile_s": compile_s,
            "compile.max_abs_logit_diff": float((a - b).abs().max()), "compile.argmax_agreement": agreement}


def measure_compile(p: Profile, device, timeout_s: float) -> dict:
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        job = pool.apply_async(_compiled_step, ((p, p.steps),))
        try:
            return job.get(timeout=timeout_s)
        except mp.TimeoutError:
            return {"compile.error": f"not compiled within {timeout_s:.0f} s"}
        except Exception as e:  # noqa: BLE001 (no Triton or C compiler on the device image: a finding)
            return {"compile.error": f"{type(e).__name__}: {e}"[:300]}


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
    common = dict(patch_size=p.patch, batch_size=p.batch, inference_roi=tuple(window["roi"]),
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
        per_start[str(start)] = {"step_s": step_s, "report_overhead_s": overhead,
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
    cfg = TrialConfig(patch_size=p.patch, batch_size=p.batch, inference_roi=p.roi, max_iterations=2 * p.steps,
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
    overhead_per_volume = float(np.median([v["report_overhead_s"] for v in run["per_start"].values()])) / n_val
    out.update({f"experiment_a.step_s.{k}": v for k, v in step_s.items()})
    out.update({f"experiment_a.rank.{k}": v for k, v in agreement.items()})
    out.update({"experiment_a.val_s_per_volume": overhead_per_volume,
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
    emit("experiment_a", out)

    extrapolate(out, step_s, rung_subjects, packing["packing_val.best_k"], 1.0)
    emit("experiment_a", out)

    # 4. torch.compile, where it pays after its compile time (last: it may take minutes)
    apply_compile(out, measure_compile(p, device, timeout_s=120 if device.type == "cuda" else 600))
    emit("experiment_a", out)


def bench_compile(p: Profile, device, tmp: Path, emit, staged: dict) -> None:
    """`--only compile`: torch.compile alone, and experiment A's figure again with it, from the
    parts this device recorded last (a short device call after a long one)."""
    from common import device_name

    parts = {}
    log = BENCH / f"results-{device.type}.jsonl"
    for line in log.read_text().splitlines() if log.exists() else []:
        rec = json.loads(line)
        if rec.get("bench") == "experiment_a" and rec.get("device") == device_name(device) \
                and rec.get("profile") == p.name:
            parts.update(rec)
    out = {k: v for k, v in parts.items() if k.startswith(("experiment_a.", "validation."))}
    apply_compile(out, measure_compile(p, device, timeout_s=240 if device.type == "cuda" else 600))
    emit("experiment_a", {k: v for k, v in out.items() if k not in parts or parts[k] != v})


def apply_compile(out: dict, compiled: dict) -> None:
    """Record torch.compile's figures; where it pays after its compile time, and keeps the same
    predictions, extrapolate again with the compiled step (needs the parts already in `out`)."""
    out.update({f"experiment_a.{k}": v for k, v in compiled.items()})
    out["experiment_a.compile.error"] = compiled.get("compile.error")  # None clears an earlier run's in the summary
    step_s = {k.rsplit(".", 1)[1]: v for k, v in out.items() if k.startswith("experiment_a.step_s.")}
    if "compile.error" in compiled or not step_s:
        return
    saved = ITERATIONS * step_s["scratch"] * (1 - 1 / compiled["compile.speedup"])
    pays = saved > compiled["compile.compile_s"] and compiled["compile.argmax_agreement"] >= 1 - DICE_TOLERANCE
    out["experiment_a.compile.pays"] = pays
    if pays and "experiment_a.packing_val.gain" in out:
        extrapolate(out, step_s, out["experiment_a.rung_subjects"], out["experiment_a.packing_val.best_k"],
                    1 / compiled["compile.speedup"])


def extrapolate(out: dict, step_s: dict, rung_subjects: int, best_k: int, compile_factor: float) -> None:
    """The full experiment's GPU-hours from the measured parts (the module's formula)."""
    val_s = out["experiment_a.val_s_per_volume"]
    training = {k: ITERATIONS * s * compile_factor for k, s in step_s.items()}
    trial_s = {k: training[k] + REPORTS * rung_subjects * val_s for k in step_s}
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
                    f"{f' x {compile_factor:.3f} (compiled)' if compile_factor != 1 else ''} + {REPORTS} reports x "
                    f"{rung_subjects} volumes x {val_s:.3f} s) + {SEEDS * len(STARTS)} trials x {EVAL_SUBJECTS} "
                    f"volumes x {val_s:.3f} s) / packing gain {gain:.2f} ({best_k} trials per GPU) / 3600")})


def asha_share() -> float:
    """ASHA's iterations over the grid's, the newest CPU measurement (`asha.iterations_over_grid`,
    the sweeps' own settings replayed on a recorded brats_layers grid); 1 when none was recorded."""
    share = 1.0
    log = BENCH / "results-cpu.jsonl"
    for line in log.read_text().splitlines() if log.exists() else []:
        share = json.loads(line).get("asha.iterations_over_grid", share)
    return float(share)

"""The measured parts of thesis experiment A (bench/experiment_a.py puts them together): window
settings for validation on the same weights, whether a validation subset ranks trials as the
whole set does, trials sharing one device with validation included, and torch.compile."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from common import Profile, random_batch, sync  # noqa: E402

from tlcore.config import TrialConfig  # noqa: E402
from tlcore.evaluation.metrics import dice_per_class, predict_logits  # noqa: E402
from tlcore.models.networks import build_model  # noqa: E402
from tlcore.training.segmentation import amp_dtype, build_loss, pick_device  # noqa: E402

DICE_TOLERANCE = 0.01              # a cheaper validation must score the same weights within this

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
    with torch.no_grad():
        reference = eager(x).float()  # fp32 eager: what bf16 already departs from, and compile may add to
        with torch.autocast(device.type, torch.bfloat16, enabled=dtype is not None):
            a, b = eager(x).float(), compiled(x).float()

    def agreement(u, v):
        return float(np.mean([dice_per_class(u[i].argmax(0), v[i].argmax(0), 2).mean() for i in range(len(u))]))
    return {"compile.eager_steps_per_s": eager_rate, "compile.compiled_steps_per_s": compiled_rate,
            "compile.speedup": compiled_rate / eager_rate, "compile.compile_s": compile_s,
            "compile.max_abs_logit_diff": float((a - b).abs().max()), "compile.argmax_agreement": agreement(a, b),
            # a few steps on one random batch leave near-ties, so bf16 eager itself moves argmaxes:
            # compile is judged against that, not against a perfect 1.0
            "compile.eager_amp_vs_fp32_agreement": agreement(a, reference),
            "compile.compiled_vs_fp32_agreement": agreement(b, reference)}


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

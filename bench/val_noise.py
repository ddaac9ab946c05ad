"""Why does a single run's validation Dice jump between consecutive reports (0.74 -> 0.12 -> 0.69)?

Demo profile (synthetic BraTS 32^3, 16^3 patches, batch 2, Adam lr 1e-3 constant, 120 iterations)
with a report every 10 iterations. Each *training variant* is trained once per seed; at every
report the same weights are scored under several *evaluation modes*, so variants that only
change BatchNorm's statistics share one training trajectory:

  eval      eval-mode BN with the running statistics training left (momentum 0.1): what tlcore does
  trainbn   train-mode BN: each validation volume normalised by its own statistics (diagnostic)
  precise   "precise BN": running statistics recomputed (cumulative average, momentum=None) over
            PRECISE_BATCHES fixed training batches just before validating
  mom0.01   running statistics as BN momentum 0.01 would have left them (shadow estimates: BN's
  cumul     momentum does not change training, only the buffers), and as momentum=None would
  ema0.9    weights averaged over training (EMA, decay 0.9), then precise BN (implemented, not run)

Training variants: bn (MONAI HighResNet, MONAI head conv->BN->ReLU), head_none (NiftyNet head:
conv->BN, no ReLU), head_plain (no normalisation on the logits: 1x1x1 conv with a bias, nothing
after; BN everywhere else), and, defined but not run for lack of CPU time, lr3e-4, cosine (lr 1e-3
cosine-annealed), inst_head_none (InstanceNorm everywhere, NiftyNet head).

Noise = mean |delta val Dice| between consecutive reports over the second half of training
(iterations 60..120: 7 reports, 6 deltas); best / final over the same reports.

    .venv/bin/python bench/val_noise.py --variants bn --seeds 0      # every mode (~5-9 min, 1 thread)
    .venv/bin/python bench/val_noise.py --variants head_plain --seeds 1,2 --modes eval@60
    .venv/bin/python bench/val_noise.py --table                       # table from the JSON lines

The training loop is a copy of tlcore.training.segmentation.train_segmentation at commit 4206c0b (Adam with
coupled L2, per-iteration LambdaLR / CosineAnnealingLR, DiceCE), CPU fp32, so edits to tlcore
under way do not move the measurement. Runs already in the results file are skipped.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import HighResNet
from torch import nn

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from tlcore.config import TrialConfig  # noqa: E402
from tlcore.data.layouts import default_label_map, find_brats  # noqa: E402
from tlcore.data.pipeline import PatchSampler, load_subject  # noqa: E402
from tlcore.data.splits import split_subjects  # noqa: E402
from tlcore.data.synthetic import ensure_synthetic  # noqa: E402
from tlcore.evaluation.metrics import dice_per_class, predict_logits  # noqa: E402

RESULTS = BENCH / "results-val-noise.jsonl"
DATA = Path("/tmp/tlcore-valnoise")
PATCH, ROI, BATCH, ITERS, EVERY = (16, 16, 16), (32, 32, 32), 2, 120, 10
SECOND_HALF = 60          # noise / best / final over reports at iterations >= this
PRECISE_BATCHES = 16      # training batches (of 2) for precise BN
PRECISE_SEED = 987_654    # the same batches before every validation
NUM_CLASSES = 2

VARIANTS = {  # name -> (TrialConfig overrides, norm, head, eval modes [mode, from iteration])
    "bn": ({}, "batch", "bn_relu",
           [("eval", 0), ("trainbn", 0), ("precise", SECOND_HALF), ("mom0.01", SECOND_HALF), ("cumul", SECOND_HALF)]),
    "head_none": ({}, "batch", "none", [("eval", 0), ("trainbn", SECOND_HALF), ("precise", SECOND_HALF)]),
    "lr3e-4": ({"lr": 3e-4}, "batch", "bn_relu", [("eval", SECOND_HALF), ("precise", SECOND_HALF)]),
    "cosine": ({"lr_schedule": "cosine"}, "batch", "bn_relu", [("eval", SECOND_HALF), ("precise", SECOND_HALF)]),
    "head_plain": ({}, "batch", "plain", [("eval", SECOND_HALF), ("precise", SECOND_HALF)]),
    "inst_head_none": ({}, "instance", "none", [("eval", SECOND_HALF)]),
}
# Runs made (2 cores shared with other jobs, ~5-9 min per run under load): bn seed 0 with every
# mode above; the other runs with --modes eval@60,precise@60[,ema0.9@60] (see RESULTS.md).


# ----------------------------------------------------------------------------- data and model

def load_data():
    root = ensure_synthetic(DATA / "brats", "brats", seed=0, shape=(32, 32, 32), n_hgg=20, n_lgg=4)
    files = find_brats(root)
    label_map = default_label_map("brats")
    split = split_subjects(sorted(files), (0.5, 0.3, 0.2), seed=0)
    load = lambda sid: load_subject(sid, files[sid], ("t1", "t2"), label_map, NUM_CLASSES, PATCH)
    return [load(s) for s in split["train"]], [load(s) for s in split["val"]]


def build(norm: str, head: str) -> nn.Module:
    norm_type = ("batch", {"affine": True}) if norm == "batch" else ("instance", {"affine": True})
    net = HighResNet(spatial_dims=3, in_channels=2, out_channels=NUM_CLASSES, norm_type=norm_type)
    if head == "none":  # NiftyNet's head: conv -> norm, no activation (as tlcore.models.networks on the working tree)
        net.blocks[11].adn.A = nn.Identity()
    elif head == "plain":  # no normalisation on the logits: 1x1x1 conv with a bias, nothing after
        net.blocks[11].conv = nn.Conv3d(80, NUM_CLASSES, 1, bias=True)
        net.blocks[11].adn = nn.Identity()
    return net


def bns(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class ShadowStats:
    """Running BN statistics as other momenta would have left them, from the same batches.
    A forward pre-hook on each BN of the trained model (not of its deep copies: the hook is a
    plain closure over the original module, which deepcopy shares rather than copies)."""

    def __init__(self, model, momenta):
        self.bn = bns(model)
        self.stats = {m: [[b.running_mean.clone(), b.running_var.clone()] for b in self.bn] for m in momenta}
        self.count = [0] * len(self.bn)
        for i, b in enumerate(self.bn):
            b.register_forward_pre_hook(self._hook(i, b))

    def _hook(self, i, orig):
        def hook(module, args):
            if module is not orig or not module.training:
                return
            x = args[0].detach().float()
            dims = [0, *range(2, x.dim())]
            mean, var = x.mean(dims), x.var(dims, unbiased=True)
            self.count[i] += 1
            for mom, st in self.stats.items():
                a = 1.0 / self.count[i] if mom is None else mom
                st[i][0].mul_(1 - a).add_(a * mean)
                st[i][1].mul_(1 - a).add_(a * var)
        return hook

    def copy_with(self, model, mom):
        m = copy.deepcopy(model)
        for b, (mean, var) in zip(bns(m), self.stats[mom]):
            b.running_mean.copy_(mean)
            b.running_var.copy_(var)
        return m

    def check(self, model, mom=0.1) -> float:
        """Largest difference between the shadow of BN's own momentum and BN's buffers (~0)."""
        return max(float((b.running_mean - s[0]).abs().max()) for b, s in zip(bns(model), self.stats[mom]))


def precise_copy(model, sampler: PatchSampler):
    m = copy.deepcopy(model)
    for b in bns(m):
        b.reset_running_stats()
        b.momentum = None  # cumulative average over the batches below
    m.train()
    sampler.reseed(PRECISE_SEED)
    with torch.no_grad():
        for _ in range(PRECISE_BATCHES):
            m(sampler.next_batch()[0])
    return m.eval()


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def logits_of(model, val, mode: str) -> torch.Tensor:
    """(n, K, 32, 32, 32) logits. roi == volume: the sliding window is one window, so the eval-mode
    path runs the volumes as one batch (checked against tlcore.evaluation.metrics.predict_logits). trainbn:
    each volume alone, as the sliding window would feed it (batch statistics of that volume)."""
    if mode == "trainbn":
        m = copy.deepcopy(model).train()
        return torch.cat([m(s.image[None]) for s in val])
    return model.eval()(torch.stack([s.image for s in val]))


def score(logits, val) -> dict:
    pred = logits.argmax(1)
    dice = [float(dice_per_class(pred[i:i + 1], s.label, NUM_CLASSES).mean()) for i, s in enumerate(val)]
    fg_true = [int((s.label > 0).sum()) for s in val]
    fg_pred = [int((pred[i] > 0).sum()) for i in range(len(val))]
    return {"dice": float(np.mean(dice)), "per_subject": dict(zip([s.id for s in val], dice)),
            "fg_pred_over_true": float(sum(fg_pred) / max(sum(fg_true), 1)),
            # ReLU head: voxels whose logits are all 0 fall to class 0 by argmax's tie rule
            "all_logits_zero_frac": float((logits.amax(1) <= 0).float().mean()),
            "fg_logit_zero_frac": float((logits[:, 1] <= 0).float().mean())}


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Foreground Dice between two predictions (per volume, mean) and voxel agreement."""
    pa, pb = a.argmax(1) > 0, b.argmax(1) > 0
    d = [float(2 * (x & y).sum() / max(int(x.sum() + y.sum()), 1)) if (x.any() or y.any()) else 1.0
         for x, y in zip(pa, pb)]
    return {"fg_dice": float(np.mean(d)), "voxel_agree": float((pa == pb).float().mean())}


def bn_drift(model, ref) -> float:
    """Mean over BN layers and channels of |running mean - precise mean| / sqrt(precise var)."""
    out = [((b.running_mean - r.running_mean).abs() / (r.running_var + b.eps).sqrt()).mean()
           for b, r in zip(bns(model), bns(ref))]
    return float(torch.stack(out).mean()) if out else float("nan")


# ----------------------------------------------------------------------------- one run

def run(variant: str, seed: int, train, val, modes=None) -> list[dict]:
    overrides, norm, head, default_modes = VARIANTS[variant]
    modes = modes or default_modes
    cfg = TrialConfig(patch_size=PATCH, batch_size=BATCH, inference_roi=ROI, max_iterations=ITERS,
                    report_every=EVERY, seed=seed, precision="fp32", channels_last="off", **overrides)
    sampler = PatchSampler(train, PATCH, BATCH, "weighted", True, seed)
    precise_sampler = PatchSampler(train, PATCH, BATCH, "weighted", True, PRECISE_SEED)
    torch.manual_seed(seed)
    model = build(norm, head)
    shadow = ShadowStats(model, (0.1, 0.01, None)) if norm == "batch" else None

    # --- copy of train_segmentation (commit 4206c0b) on the CPU, fp32
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=ITERS, eta_min=cfg.lr * 1e-2)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    sampler.reseed(cfg.seed * 1_000_003)
    torch.manual_seed(cfg.seed * 1_000_003)

    ema_decays = [float(m[3:]) for m, _ in modes if m.startswith("ema")]
    ema = {d: [p.detach().clone() for p in model.parameters()] for d in ema_decays}
    curves = {m: [] for m, _ in modes}
    diag, losses, t_start, iteration = [], [], time.perf_counter(), 0
    while iteration < ITERS:
        model.train()
        images, labels = sampler.next_batch()
        loss = loss_fn(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        iteration += 1
        losses.append(float(loss.detach()))
        with torch.no_grad():
            for d, avg in ema.items():
                for a, p in zip(avg, model.parameters()):
                    a.mul_(d).add_(p.detach(), alpha=1 - d)
        if iteration % EVERY:
            continue
        # --- the report: every evaluation mode on the same weights
        logits, row = {}, {"iteration": iteration, "train_loss": float(np.mean(losses)),
                           "lr": scheduler.get_last_lr()[0]}
        losses = []
        for mode, start in modes:
            if iteration < start:
                continue
            if mode in ("eval", "trainbn"):
                net = model
            elif mode == "precise":
                net = precise_copy(model, precise_sampler)
                row["bn_drift_running_vs_precise"] = bn_drift(model, net)
            elif mode.startswith("ema"):
                averaged = copy.deepcopy(model)
                with torch.no_grad():
                    for p, a in zip(averaged.parameters(), ema[float(mode[3:])]):
                        p.copy_(a)
                net = precise_copy(averaged, precise_sampler)
            else:
                net = shadow.copy_with(model, {"mom0.01": 0.01, "cumul": None}[mode])
            logits[mode] = logits_of(net, val, mode)
            curves[mode].append({"iteration": iteration, **score(logits[mode], val)})
        if "eval" in logits and "trainbn" in logits:
            row["eval_vs_trainbn"] = agreement(logits["eval"], logits["trainbn"])
        if "eval" in logits and "precise" in logits:
            row["eval_vs_precise"] = agreement(logits["eval"], logits["precise"])
        if shadow is not None:
            row["shadow_check"] = shadow.check(model)
        if iteration == EVERY and "eval" in logits:  # the batched eval path == tlcore's sliding window
            ref = predict_logits(model.eval(), val[0].image, ROI, torch.device("cpu"))
            row["max_abs_diff_vs_predict_logits"] = float((ref - logits["eval"][:1]).abs().max())
        diag.append(row)
        print(f"  {variant} seed {seed} it {iteration}: " + "  ".join(
            f"{m} {curves[m][-1]['dice']:.3f}" for m in curves if curves[m] and curves[m][-1]["iteration"] == iteration)
            + (f"  eval~trainbn {row['eval_vs_trainbn']['fg_dice']:.3f}" if "eval_vs_trainbn" in row else ""),
            flush=True)
    wall = time.perf_counter() - t_start
    out = []
    for mode, curve in curves.items():
        out.append({"kind": "curve", "variant": variant, "eval_mode": mode, "seed": seed,
                    "config": {**overrides, "norm": norm, "head": head, "lr": cfg.lr,
                               "lr_schedule": cfg.lr_schedule},
                    **summarise(curve), "curve": curve})
    out.append({"kind": "diagnostics", "variant": variant, "seed": seed, "wall_s": round(wall, 1),
                "reports": diag})
    return out


def summarise(curve) -> dict:
    tail = [c["dice"] for c in curve if c["iteration"] >= SECOND_HALF]
    deltas = np.abs(np.diff(tail))
    return {"noise": float(deltas.mean()), "max_jump": float(deltas.max()),
            "best": float(max(tail)), "final": float(tail[-1]), "n_reports": len(tail)}


# ----------------------------------------------------------------------------- tables

def read_results() -> list[dict]:
    if not RESULTS.exists():
        return []
    return [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]


def ms(xs) -> str:
    return f"{np.mean(xs):.3f} ± {np.std(xs, ddof=1):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def table(rows) -> str:
    curves = [r for r in rows if r["kind"] == "curve"]
    order = [(v, m) for v, (_, _, _, modes) in VARIANTS.items() for m, _ in modes + [("ema0.9", 0)]]
    lines = ["| variant (training / evaluation) | seeds | noise: mean abs Δ Dice | largest jump | best Dice | final Dice |",
             "|---|---|---|---|---|---|"]
    for v, m in order:
        rs = [r for r in curves if r["variant"] == v and r["eval_mode"] == m]
        if rs:
            lines.append(f"| {v} / {m} | {len(rs)} | {ms([r['noise'] for r in rs])} | "
                         f"{ms([r['max_jump'] for r in rs])} | {ms([r['best'] for r in rs])} | {ms([r['final'] for r in rs])} |")
    return "\n".join(lines)


def subject_analysis(rows) -> str:
    """(c): is the jump a property of the model state (all subjects move together) or of the few
    validation subjects (each moves on its own, the mean of 6 averages it out)?"""
    out = []
    for v in ("bn", "head_none"):
        for r in [r for r in rows if r["kind"] == "curve" and r["variant"] == v and r["eval_mode"] == "eval"]:
            tail = [c for c in r["curve"] if c["iteration"] >= SECOND_HALF]
            per = np.array([[c["per_subject"][k] for k in sorted(c["per_subject"])] for c in tail])  # reports x subjects
            d = np.diff(per, axis=0)
            mean_d = np.diff(per.mean(1))
            same_sign = float(np.mean([(np.sign(d[:, j]) == np.sign(mean_d)).mean() for j in range(per.shape[1])]))
            out.append({"variant": v, "seed": r["seed"], "noise_mean_of_6": float(np.abs(mean_d).mean()),
                        "noise_single_subject": float(np.abs(d).mean()),
                        "sd_across_subjects": float(per.std(1, ddof=1).mean()),
                        "se_of_mean_of_6": float(per.std(1, ddof=1).mean() / np.sqrt(per.shape[1])),
                        "share_of_subject_deltas_with_sign_of_mean": same_sign})
    return out


def diag_summary(rows) -> list[dict]:
    out = []
    for r in [r for r in rows if r["kind"] == "diagnostics" and r["variant"] in ("bn", "head_none")]:
        d = {"variant": r["variant"], "seed": r["seed"], "wall_s": r["wall_s"]}
        agr = [x["eval_vs_trainbn"]["fg_dice"] for x in r["reports"] if "eval_vs_trainbn" in x]
        if agr:
            d["eval_vs_trainbn_fg_dice_per_report"] = [round(a, 3) for a in agr]
        drift = [x["bn_drift_running_vs_precise"] for x in r["reports"] if "bn_drift_running_vs_precise" in x]
        if drift:
            d["bn_drift_mean"] = float(np.mean(drift))
        out.append(d)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--modes", default="", help="override the variant's evaluation modes, e.g. eval@60,precise@60")
    ap.add_argument("--table", action="store_true", help="only print the tables from the results file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not args.table:
        train, val = load_data()
        print(f"train {len(train)} val {len(val)} subjects", flush=True)
        done = {(r["variant"], r["seed"]) for r in read_results() if r["kind"] == "diagnostics"}
        meta = {"python": platform.python_version(), "torch": torch.__version__,
                "monai": __import__("monai").__version__, "machine": f"{platform.machine()} cpu x{torch.get_num_threads()} thread"}
        for v in args.variants.split(","):
            for s in (int(x) for x in args.seeds.split(",")):
                if (v, s) in done:
                    print(f"skip {v} seed {s} (in {RESULTS.name})")
                    continue
                modes = [(m.split("@")[0], int(m.split("@")[1]) if "@" in m else 0)
                         for m in args.modes.split(",") if m]
                lines = run(v, s, train, val, modes)
                with RESULTS.open("a") as f:
                    for line in lines:
                        f.write(json.dumps({**line, **meta}) + "\n")
    rows = read_results()
    print(table(rows))
    for x in subject_analysis(rows):
        print(json.dumps(x))
    for x in diag_summary(rows):
        print(json.dumps(x))


if __name__ == "__main__":
    main()

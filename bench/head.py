"""Which output block should HighRes3DNet default to? MONAI's head (conv -> BN -> ReLU), NiftyNet's
(conv -> BN, the thesis's network) and a plain conv with a bias, from scratch and transferred from
IXI, paired by seed; with the report-to-report noise of each validation curve.

    .venv/bin/python bench/head.py                          # 4 seeds x 4 cells, ~33 CPU-minutes
    .venv/bin/python bench/head.py --seeds 1 --iterations 20 --source-iterations 20   # smoke test
    .venv/bin/python bench/head.py --summary                # re-print the table from the JSONL

Synthetic BraTS (tumour core, 24 subjects of 32^3, split 50/30/20 %) and IXI (hippocampus,
3 classes, 24 subjects, 80/10/10 %), the demo profile (16^3 patches, batch 2, 120 iterations,
validation every 20 over 32^3 windows), tlcore's own training loop without Ray. Every run
seeds its model, its patch stream and its augmentation from its seed, so run (seed, start) of
one head is paired with the same run of the other. One IXI source per head (seed 1000,
`--source-iterations`), loaded with all groups trainable; its head is re-initialised (3 -> 2
classes). A run fails when its best validation Dice stays below 0.1 or its loss turns non-finite.
One JSON line per run in bench/results-head.jsonl; finished runs are kept on a rerun.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from tlcore.config import HEADS, TrialConfig  # noqa: E402
from tlcore.data.layouts import default_label_map, find_subjects  # noqa: E402
from tlcore.data.pipeline import PatchSampler, load_subject  # noqa: E402
from tlcore.data.splits import DEFAULT_FRACTIONS, split_subjects  # noqa: E402
from tlcore.data.synthetic import ensure_synthetic  # noqa: E402
from tlcore.models.networks import build_model  # noqa: E402
from tlcore.models.transfer import load_source  # noqa: E402
from tlcore.training.device import seed_everything  # noqa: E402
from tlcore.training.segmentation import train_segmentation  # noqa: E402

STARTS = ("scratch", "transferred")
FAIL_BELOW = 0.1           # best validation Dice under this = the run did not learn
SOURCE_SEED = 1000
DEMO = dict(patch_size=(16, 16, 16), batch_size=2, inference_roi=(32, 32, 32), report_every=20)


def load_dataset(root: Path, dataset: str) -> tuple[list, list, int]:
    """(train subjects, val subjects, classes) of a synthetic dataset, split as the sweeps do."""
    if dataset == "brats":
        ensure_synthetic(root / "brats", "brats", seed=0, shape=(32, 32, 32), n_hgg=20, n_lgg=4)
    else:
        ensure_synthetic(root / "ixi", "ixi", seed=0, shape=(32, 32, 32), n=24)
    label_map = default_label_map(dataset)
    classes = max(label_map.values()) + 1
    files = find_subjects(dataset, root / dataset, ("t1", "t2"), grades=("HGG", "LGG"))
    splits = split_subjects(files, DEFAULT_FRACTIONS[dataset], seed=0)
    load = lambda ids: [load_subject(s, files[s], ("t1", "t2"), label_map, classes, DEMO["patch_size"])
                        for s in ids]
    return load(splits["train"]), load(splits["val"]), classes


def train_one(cfg: TrialConfig, head: str, data: tuple, source_state: dict | None = None) -> dict:
    """Train one run; returns its record (curve, best and final validation Dice) and final weights."""
    train, val, classes = data
    seed_everything(cfg.seed)  # before the build: the initial weights come from the seed
    model = build_model(in_channels=2, num_classes=classes, head=head)
    if source_state is not None:
        load_source(model, source_state, source=f"ixi source ({head})")
    sampler = PatchSampler(train, cfg.patch_size, cfg.batch_size, cfg.sampler, cfg.augment, cfg.seed)
    curve, t0, error = [], time.perf_counter(), None

    def report(metrics: dict, state: dict) -> None:
        curve.append({k: metrics[k] for k in ("iteration", "train_loss", "val_loss", "val_dice")})

    try:
        train_segmentation(cfg, model, sampler, val, classes, report, device=torch.device("cpu"),
                           channels_last=False)
    except FloatingPointError as e:  # the loop's own check: the training loss became non-finite
        error = str(e)
    dice = [c["val_dice"] for c in curve]
    finite = error is None and all(math.isfinite(c["val_loss"]) and math.isfinite(c["val_dice"]) for c in curve)
    best = max(dice) if dice else float("nan")
    rec = {"head": head, "seed": cfg.seed, "iterations": cfg.max_iterations, "precise_bn": cfg.precise_bn_batches,
           "best_val_dice": best, "final_val_dice": dice[-1] if dice else float("nan"),
           "finite": finite, "failed": (not finite) or not best >= FAIL_BELOW, "error": error,
           "seconds": round(time.perf_counter() - t0, 1), "curve": curve}
    return rec, model.state_dict()


def run(args) -> None:
    torch.set_num_threads(1)
    out = Path(args.out)
    done = {}
    if out.exists():  # keep finished runs of the same protocol: a rerun continues
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done[(r["kind"], r["head"], r.get("start"), r["seed"], r["iterations"])] = r
    root = Path(args.data)
    brats, ixi = load_dataset(root, "brats"), load_dataset(root, "ixi")
    print(f"BraTS: {len(brats[0])} train / {len(brats[1])} val; IXI: {len(ixi[0])} train / {len(ixi[1])} val",
          flush=True)

    def write(rec: dict) -> None:
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    starts = args.starts.split(",")
    sources = {}
    for head in args.heads.split(",") if "transferred" in starts else ():
        if all(("target", head, "transferred", seed, args.iterations) in done for seed in range(args.seeds)):
            continue  # every transferred run of this head is in the JSONL already
        cfg = TrialConfig(dataset="ixi", max_iterations=args.source_iterations, seed=SOURCE_SEED,
                        precise_bn_batches=args.precise_bn,
                        **{**DEMO, "report_every": max(1, args.source_iterations // 4)})
        rec, state = train_one(cfg, head, ixi)
        sources[head] = state  # retrained on a rerun (seconds-cheap next to the targets; not cached on disk)
        key = ("source", head, None, SOURCE_SEED, args.source_iterations)
        if key not in done:
            write({"kind": "source", "start": None, **rec})
        print(f"source {head:8s} IXI best val Dice {rec['best_val_dice']:.3f} ({rec['seconds']} s)", flush=True)

    for seed in range(args.seeds):
        for start in starts:
            for head in args.heads.split(","):  # the heads of a (seed, start) pair back to back
                if ("target", head, start, seed, args.iterations) in done:
                    continue
                cfg = TrialConfig(dataset="brats", max_iterations=args.iterations, seed=seed,
                                precise_bn_batches=args.precise_bn, **DEMO)
                rec, _ = train_one(cfg, head, brats, sources.get(head) if start == "transferred" else None)
                write({"kind": "target", "start": start, **rec})
                print(f"seed {seed} {start:11s} {head:8s} best {rec['best_val_dice']:.3f} "
                      f"final {rec['final_val_dice']:.3f}{' FAILED' if rec['failed'] else ''} ({rec['seconds']} s)",
                      flush=True)
    summarise(out, args.iterations)


def summarise(path: Path, iterations: int) -> str:
    """The Markdown table of bench/RESULTS.md from the JSONL: per cell, then paired per start.
    A run with precise BatchNorm statistics is labelled `<head>+pbn`."""
    recs = [json.loads(x) for x in Path(path).read_text().splitlines()]
    for r in recs:
        r["head"] += "+pbn" if r.get("precise_bn") else ""
    targets = [r for r in recs if r["kind"] == "target" and r["iterations"] == iterations]
    variants = [h for h in (*HEADS, *(f"{h}+pbn" for h in HEADS)) if any(r["head"] == h for r in targets)]
    # noise over the second half of the runs; longer runs also show it over 60-120, as the 120 runs
    late = max(60, iterations // 2)
    early = " | noise, reports 60-120" if late > 60 else ""
    lines = ["| start | head | runs | best val Dice mean ± sd | median | final val Dice mean ± sd | "
             f"noise (mean abs Δ Dice, reports {late}-{iterations}){early} | failures |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if early else "")]
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else float("nan")
    for start in STARTS:
        for head in variants:
            rs = [r for r in targets if r["start"] == start and r["head"] == head]
            if not rs:
                continue
            b, f = [r["best_val_dice"] for r in rs], [r["final_val_dice"] for r in rs]
            n = [noise(r, late) for r in rs]
            n_early = [noise(r, 60, 120) for r in rs]
            lines.append(f"| {start} | {head} | {len(rs)} | {statistics.mean(b):.3f} ± {sd(b):.3f} | "
                         f"{statistics.median(b):.3f} | {statistics.mean(f):.3f} ± {sd(f):.3f} | "
                         f"{statistics.mean(n):.3f} ± {sd(n):.3f} | "
                         + (f"{statistics.mean(n_early):.3f} ± {sd(n_early):.3f} | " if early else "")
                         + f"{sum(r['failed'] for r in rs)} |")
    lines += ["", "Paired by seed against MONAI's head (other − bn_relu); Wilcoxon signed-rank, two-sided:", "",
              "| other head | start | pairs | metric | mean diff | median diff | other better | p |",
              "|---|---|---|---|---|---|---|---|"]
    for b in variants[1:]:
        lines += paired_rows(targets, "bn_relu", b)
    sources = [r for r in recs if r["kind"] == "source"]
    if sources:
        lines += ["", "IXI sources: " + "; ".join(
            f"{r['head']} best val Dice {r['best_val_dice']:.3f} after {r['iterations']} it" for r in sources)]
    text = "\n".join(lines)
    print(text)
    return text


def noise(rec: dict, from_iteration: int = 60, to_iteration: float = math.inf) -> float:
    """Mean |change of validation Dice| between consecutive reports from `from_iteration` on
    (earlier changes are mostly learning)."""
    dice = [c["val_dice"] for c in rec["curve"] if from_iteration <= c["iteration"] <= to_iteration]
    return statistics.mean(abs(b - a) for a, b in zip(dice, dice[1:])) if len(dice) > 1 else float("nan")


def paired_rows(targets: list, a: str, b: str) -> list[str]:
    from scipy.stats import wilcoxon

    lines = []
    for start in (*STARTS, "both"):
        by = {(r["head"], r["start"], r["seed"]): r for r in targets}
        keys = sorted({(r["start"], r["seed"]) for r in targets if start in ("both", r["start"])})
        pairs = [(by[(a, s, seed)], by[(b, s, seed)]) for s, seed in keys if (a, s, seed) in by and (b, s, seed) in by]
        for metric in ("best_val_dice", "final_val_dice"):
            d = [y[metric] - x[metric] for x, y in pairs]
            if len(d) < 2:
                continue
            p = wilcoxon(d).pvalue if any(d) else 1.0
            lines.append(f"| {b} | {start} | {len(d)} | {metric.replace('_val_dice', '')} | {statistics.mean(d):+.3f} | "
                         f"{statistics.median(d):+.3f} | {sum(x > 0 for x in d)}/{len(d)} | {p:.3f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # One run costs ~108 CPU-s (120 steps at 0.56 s + 6 validations of 7 volumes at 6.9 s), a source
    # ~120 s: 4 seeds fit the ~35 min budget of a bench on one core; 8 would take ~62 min.
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--iterations", type=int, default=120, help="target (BraTS) iterations per run")
    p.add_argument("--source-iterations", type=int, default=200, help="IXI source iterations")
    p.add_argument("--data", default="/tmp/tlcore-bench-head", help="where the synthetic datasets are written")
    p.add_argument("--out", default=str(BENCH / "results-head.jsonl"))
    p.add_argument("--heads", default=",".join(HEADS), help="comma-separated heads to run (e.g. one per core)")
    p.add_argument("--starts", default=",".join(STARTS), help="comma-separated: scratch, transferred")
    p.add_argument("--precise-bn", type=int, default=TrialConfig().precise_bn_batches,
                   help="TrialConfig.precise_bn_batches of every run (0 = momentum running statistics)")
    p.add_argument("--summary", action="store_true", help="only print the table of --out")
    args = p.parse_args()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, python {platform.python_version()}")
    if args.summary:
        summarise(Path(args.out), args.iterations)
    else:
        run(args)


if __name__ == "__main__":
    main()

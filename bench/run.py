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
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from common import FULL, SMALL, Profile, device_name, newest_records, stage, versions  # noqa: E402
from compute import (  # noqa: E402
    bench_analysis,
    bench_deterministic,
    bench_inference,
    bench_packing,
    bench_precision,
    bench_train2d,
    bench_train3d,
)
from experiment_a import bench_compile, bench_experiment_a, bench_monai_gpu, bench_report_parts  # noqa: E402
from orchestration import bench_asha, bench_tracking, bench_tune  # noqa: E402
from scale import bench_scale  # noqa: E402

from tlcore.training.device import pick_device  # noqa: E402

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
    "analysis.overhead_pct_of_report_interval": ("<=", 3.0),
    "analysis.cka_interval_width_default_max": ("<=", 0.06),
    "scale.sqlite.growth_ratio": ("<=", 1.2),
    "scale.server.growth_ratio": ("<=", 1.2),
    "scale.sqlite.report_s_at_1000": ("<=", 60.0),
    "scale.server.report_s_at_1000": ("<=", 60.0),
    "monai_gpu.default_follows_measurement": ("==", True),
    "experiment_a.gpu_hours": ("<=", 1.5),
}

BENCHES = ("train3d", "inference", "precision", "deterministic", "packing", "train2d", "analysis", "monai_gpu",
           "experiment_a", "compile", "report_parts", "mlflow", "tune", "asha", "scale")
GPU_ONLY = {"train3d.patches_per_s", "inference.model_only_s", "inference.end_to_end_s",
            "train2d.b64_compute_images_per_s", "experiment_a.gpu_hours", "monai_gpu.default_follows_measurement"}


def verdict(key: str, value, on_gpu: bool) -> str:
    if key not in TARGETS:
        return ""
    op, target = TARGETS[key]
    if key in GPU_ONLY and not on_gpu:
        return "GPU target"
    ok = {">=": lambda: value >= target, "<=": lambda: value <= target, "==": lambda: value == target}[op]()
    return "met" if ok else "NOT met"


def write_summary(log: Path, device: torch.device | str, profile: Profile) -> None:
    """This device's section of RESULTS.md from the newest value of each measurement in `log`
    (so `--only` reruns, and partial ones such as TLCORE_SCALE_STORES=server, replace just their
    own rows). `device`: this process's device, or the name a GPU run recorded (`--summary-of`:
    a lent machine's run cut short before it wrote its summary)."""
    name = device if isinstance(device, str) else device_name(device)
    on_gpu = not name.startswith("CPU")
    newest = newest_records(log, name, profile.name)
    order = list(BENCHES)
    records = [newest[b] for b in order if b in newest]
    title = f"## {name}: `bench/run.py{' --full' if profile.name == 'full' else ''}`"
    stamp = f"{time.strftime('%Y-%m-%d')}; " + ", ".join(f"{k} {v}" for k, v in versions().items())
    if isinstance(device, str):  # written elsewhere: these versions are not the run's
        stamp = f"{time.strftime('%Y-%m-%d')}; from {log.name} (the run's versions: bench.log of that run)"
    lines = [title, "", stamp, "",
             "| measurement | value | target | |", "|---|---|---|---|"]
    for rec in records:
        for k, v in rec.items():
            if k in ("bench", "device", "profile") or v is None or isinstance(v, (dict, list)):
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
    ap.add_argument("--summary-of", metavar="DEVICE", help="only rewrite DEVICE's section of RESULTS.md from "
                    "results-cuda.jsonl (e.g. 'NVIDIA H200', after a lent machine's run was cut short)")
    args = ap.parse_args(argv)
    profile = FULL if args.full else SMALL
    if args.summary_of:
        write_summary(BENCH / "results-cuda.jsonl", args.summary_of, profile)
        return 0
    device = pick_device()
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    only = set(filter(None, args.only.split(","))) or set(BENCHES)
    if only - set(BENCHES):
        ap.error(f"--only {args.only}: choose from {', '.join(BENCHES)}")
    from importlib.util import find_spec
    for bench, module in (("tune", "ray"), ("asha", "ray"), ("scale", "ray"), ("mlflow", "mlflow"), ("train2d", "fastai")):
        if bench in only and find_spec(module) is None:  # e.g. a GPU box that cannot install Ray
            print(f"[bench] skipping {bench}: {module} is not installed", file=sys.stderr)
            only.discard(bench)
    log = BENCH / f"results-{device.type}.jsonl"

    stack = versions()

    def emit(name: str, values: dict) -> None:
        rec = {"bench": name, "device": device_name(device), "profile": profile.name, **values, "versions": stack}
        line = json.dumps(rec, default=str)
        print(line, flush=True)
        with log.open("a") as f:
            f.write(line + "\n")

    with tempfile.TemporaryDirectory(prefix="tlcore-bench-") as d:
        tmp = Path(d)
        needs_subjects = {"inference", "mlflow", "precision", "deterministic", "analysis", "monai_gpu", "experiment_a",
                          "report_parts"}
        staged = (bench_train3d(profile, device, tmp, emit) if "train3d" in only
                  else stage(profile, device, tmp) if only & needs_subjects else None)
        for name, bench in (("monai_gpu", bench_monai_gpu), ("experiment_a", bench_experiment_a),
                            ("compile", bench_compile), ("report_parts", bench_report_parts)):
            if name in only:
                bench(profile, device, tmp, emit, staged)
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
        if "analysis" in only:
            bench_analysis(profile, device, tmp, emit, staged)
        if "mlflow" in only:
            bench_tracking(profile, device, tmp, emit, staged["step_s"])
        if "tune" in only:
            bench_tune(profile, device, tmp, emit)
        if "asha" in only:
            bench_asha(profile, device, tmp, emit)
        if "scale" in only:
            bench_scale(profile, device, tmp, emit)
    if not args.no_summary:
        write_summary(log, device, profile)
        print(f"[bench] summary written to {BENCH / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

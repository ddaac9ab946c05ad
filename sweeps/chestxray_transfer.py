"""Target task of the 2D chain: pneumothorax vs No Finding on ChestX-ray14, starting from
scratch, ImageNet, or ImageNet -> MURA (thesis ch. 5): does the medical source learn faster?

    python sweeps/chestxray_transfer.py                                 # synthetic, local Ray
    python sweeps/chestxray_transfer.py --data-dir /data/ChestX-ray14 --address auto

Needs the MURA model: run sweeps/mura_source.py first (or pass --source models:/<name>/<v>).
"""

from tlcore.sweep import flags
from tlcore.sweep.deferred import driver, evaluation, results, trainables, tune, tuner

NAME = "chestxray_transfer"


def search_space(imagenet: str | None, mura: str, smoke: bool, controls: list[dict]) -> dict:
    starts = list(controls)  # scratch; with --controls scratch,meanvar also the MURA model's Mean-Var control
    for source in ([imagenet] if imagenet else []) + [mura]:
        starts += [{"source_model": source, "frozen_layers": k} for k in (0, 1, 2)]
    return {
        "start": tune.grid_search(starts),
        "lr": 1e-4 if smoke else tune.grid_search([1e-4, 1e-3]),   # the head's rate (thesis 1e-4)
        "lr_schedule": "one_cycle",
    }


def parse_flags():
    parser = flags.sweep_parser(__doc__, source="models:/mura_densenet121/latest", dataset="chestxray")
    parser.add_argument("--imagenet", default="imagenet",
                        help="ImageNet starting point: 'imagenet' (torch cache / download), a local weights file, or 'none'")
    parser.add_argument("--oversample", type=float, default=0, help="minority-class factor (0 = balance; thesis 18)")
    parser.add_argument("--target-loss", type=float, default=None,
                        help="training loss for the steps-to-reach table (default: the highest final loss)")
    parser.set_defaults(controls="scratch")
    return parser.parse_args()


def main(args) -> None:
    sweep = driver.prepare(NAME, "chestxray", args, objective=("val_loss", "min"))
    imagenet = None if args.imagenet == "none" else args.imagenet
    if imagenet:
        driver.check_imagenet(imagenet)
    mura = driver.resolve_source(sweep, args.source, "python sweeps/mura_source.py").uri
    driver.start_ray(sweep)
    driver.begin(sweep)
    space = {**sweep.base_config, **search_space(imagenet, mura, args.smoke_test, flags.control_starts(args.controls, mura)),
             "oversample": args.oversample}
    trials = tuner.run_sweep(NAME, space, trainable=trainables.train_classifier_trial, **sweep.tune_kwargs(), grace_period=1)
    rows = evaluation.evaluate_classifier_trials(trials, results.trial_rows(trials, sweep), sweep, target_loss=args.target_loss)
    per_start = {}
    for r in rows:  # the thesis's argument: a medical source reaches a given loss in fewer steps
        steps = r.scores["steps_to_target"] if isinstance(r.scores["steps_to_target"], int) else float("inf")
        per_start[r.source_model] = min(per_start.get(r.source_model, float("inf")), steps)
    driver.log_table(sweep, [{"source_model": k, "target_loss": rows[0].scores["target_loss"],
                           "fewest_steps_to_target": v if v != float("inf") else "not reached"}
                          for k, v in per_start.items()], "steps_to_target.md", "Steps to reach the training loss")
    driver.finish(sweep, rows)


if __name__ == "__main__":
    args = parse_flags()  # --help, and a flag it refuses, answer before Ray, MLflow and torch load
    driver.run(main, args)

"""Does transfer help more when the target has fewer training subjects?
(thesis ch. 6, experiment B: nested training subsets S1 < S2 < S3 < S4 of BraTS HGG)

    python sweeps/brats_subsets.py                        # synthetic BraTS, local Ray
    python sweeps/brats_subsets.py --address auto --data-dir /data/MICCAI_BraTS_2018_Data_Training \
        --subset-sizes 26,52,78,105

Needs the source model: run sweeps/ixi_source.py first (or pass --source models:/<name>/<v>).
Early stopping compares a trial only with trials on the same training subset; every trial is
evaluated at its best checkpoint on its training subset and the test split; the table has the
shape of thesis Tables 6.3-6.6.
"""

from tlcore.sweep import flags
from tlcore.sweep.deferred import driver, evaluation, results, tune, tuner

NAME = "brats_subsets"


def search_space(source: str, controls: list[dict]) -> dict:
    return {
        # the controls (--controls: scratch; add meanvar for the Mean-Var control) and the IXI model
        # with its first 1, 2 or 3 layer groups frozen (thesis models 1-3)
        "start": tune.grid_search([*controls, *({"source_model": source, "frozen_layers": k} for k in (1, 2, 3))]),
        "train_subset": tune.grid_search(["S1", "S2", "S3", "S4"]),
        "lr_schedule": tune.grid_search(["constant", "cosine"]),
        "lr": 1e-3,
    }


def parse_flags():
    parser = flags.sweep_parser(__doc__, source="models:/ixi_hippocampus/latest", dataset="brats")
    parser.add_argument("--subset-sizes", default=None,
                        help="comma-separated S1..S4 sizes (default: 26 .. all training subjects)")
    parser.set_defaults(controls="scratch")  # Mean-Var would add a quarter to the sweep: ask for it
    return parser.parse_args()


def main(args) -> None:
    sizes = [int(x) for x in args.subset_sizes.split(",")] if args.subset_sizes else None
    # early stopping compares trials on the same training subset
    sweep = driver.prepare(NAME, "brats", args, subset_sizes=sizes, default_strata=("train_subset",))
    source = driver.resolve_source(sweep, args.source, "python sweeps/ixi_source.py").uri
    driver.start_ray(sweep)
    driver.begin(sweep)
    space = {**sweep.base_config, **search_space(source, flags.control_starts(args.controls, source))}
    if args.smoke_test:  # scratch vs k=1 on the smallest and the full subset: the table's shape, cheaply
        space["lr_schedule"] = "constant"
        space["start"] = tune.grid_search([s for s in space["start"]["grid_search"]
                                           if s["source_model"] == "scratch" or s["frozen_layers"] == 1])
        space["train_subset"] = tune.grid_search(["S1", "S4"])
    trials = tuner.run_sweep(NAME, space, **sweep.tune_kwargs())
    scores = evaluation.evaluate_trials(trials, sweep)
    rows = results.trial_rows(trials, sweep)
    driver.finish(sweep, rows, results.subset_table(rows, scores, sweep.splits))


if __name__ == "__main__":
    args = parse_flags()  # --help, and a flag it refuses, answer before Ray, MLflow and torch load
    driver.run(main, args)

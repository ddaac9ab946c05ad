"""Which HighRes3DNet layer groups transfer from IXI hippocampus to BraTS tumour core?
(thesis ch. 6, experiment A: scratch vs the IXI model with its first k groups frozen)

    python sweeps/brats_layers.py                         # synthetic BraTS, local Ray
    python sweeps/brats_layers.py --address auto --data-dir /data/MICCAI_BraTS_2018_Data_Training
    python sweeps/brats_layers.py --search optuna --num-samples 20
    python sweeps/brats_layers.py --frozen-layers 0,1,2 --controls scratch   # part of the grid

Needs the source model: run sweeps/ixi_source.py first (or pass --source models:/<name>/<v>).
"""

from functools import partial

from tlcore.sweep import flags
from tlcore.sweep.deferred import driver, evaluation, results, scheduling, tune, tuner

NAME = "brats_layers"


def search_space(source: str, frozen_layers=range(6), controls: list[dict] = ()) -> dict:
    return {
        # the controls (scratch, Mean-Var), then the IXI model with its first k layer groups frozen
        "start": tune.grid_search([*controls, *({"source_model": source, "frozen_layers": k} for k in frozen_layers)]),
        "lr": 1e-3,
        "lr_schedule": "constant",
    }


def optuna_space(trial, source: str) -> None:
    # define-by-run: frozen layers only mean something for a transferred model
    if trial.suggest_categorical("source_model", ["scratch", source]) != "scratch":
        trial.suggest_int("frozen_layers", 0, 5)
    trial.suggest_float("lr", 1e-4, 1e-2, log=True)
    trial.suggest_categorical("lr_schedule", ["constant", "cosine", "poly", "one_cycle"])


def parse_flags():
    parser = flags.sweep_parser(__doc__, source="models:/ixi_hippocampus/latest", dataset="brats")
    parser.add_argument("--search", choices=["grid", "optuna"], default="grid")
    parser.add_argument("--frozen-layers", type=flags.frozen_layers, default="0,1,2,3,4,5",
                        help="comma-separated k (0..5): the transferred starts, with their first k layer groups frozen")
    return parser.parse_args()


def main(args) -> None:
    sweep = driver.prepare(NAME, "brats", args)
    source = driver.resolve_source(sweep, args.source, "python sweeps/ixi_source.py").uri
    driver.start_ray(sweep)
    driver.begin(sweep)
    ks = args.frozen_layers if args.search == "grid" else range(6)
    driver.log_forecast(sweep, source, ks, meanvar="meanvar" in args.controls)  # which k should win? (vs the result in the report)
    space, searcher = dict(sweep.base_config), None
    if args.search == "grid":  # --num-samples: the grid once per seed
        space.update(search_space(source, ks, flags.control_starts(args.controls, source)))
    else:  # --num-samples: trials of the search
        searcher = scheduling.optuna_search(partial(optuna_space, source=source), metric=sweep.metric, mode=sweep.mode, seed=args.seed)
    trials = tuner.run_sweep(NAME, space, search_alg=searcher, **sweep.tune_kwargs())
    rows = results.trial_rows(trials, sweep)
    # thesis Table 6.2: whole-volume train, validation and test Dice of every trial's best
    # checkpoint, early-stopped or not; validation predictions (NIfTI) feed the report's overlays
    scores = evaluation.evaluate_trials(trials, sweep, splits=("train", "val", "test"))
    evaluation.cka_with_scratch(trials, sweep)  # the report's heatmap
    evaluation.reinit_drops(trials, sweep, scores)  # which groups each transferred model depends on
    driver.finish(sweep, rows, results.layer_table(rows, scores))


if __name__ == "__main__":
    args = parse_flags()  # --help, and a flag it refuses, answer before Ray, MLflow and torch load
    driver.run(main, args)

"""Source task: HighRes3DNet segmenting left/right hippocampus in IXI T1+T2 (thesis ch. 6).

    python sweeps/ixi_source.py                                   # synthetic IXI, local Ray
    python sweeps/ixi_source.py --data-dir /data/IXI --address auto

The best trial's best checkpoint is evaluated on the test split and registered in the MLflow
model registry as `ixi_hippocampus`, the source of sweeps/brats_layers.py.
"""

from tlcore.sweep import flags
from tlcore.sweep.deferred import driver, evaluation, publish, results, tune, tuner

NAME = "ixi_source"
REGISTERED_NAME = "ixi_hippocampus"
LABEL_MAP = {17: 1, 53: 2}  # FreeSurfer left / right hippocampus; every other label is background


def search_space() -> dict:
    return {
        "lr": tune.grid_search([1e-3, 3e-3]),
        "lr_schedule": "constant",
    }


def parse_flags():
    return flags.sweep_parser(__doc__, dataset="ixi").parse_args()


def main(args) -> None:
    sweep = driver.prepare(NAME, "ixi", args, label_map=LABEL_MAP)
    driver.start_ray(sweep)
    driver.begin(sweep)
    space = {**sweep.base_config, **search_space()}
    trials = tuner.run_sweep(NAME, space, **sweep.tune_kwargs())
    rows = results.trial_rows(trials, sweep)
    if all(r.failed for r in rows):
        driver.finish(sweep, rows, errors=len(rows))  # exits non-zero: nothing to register
    best, checkpoint, iteration = results.best_trial_checkpoint(trials, sweep)
    test = evaluation.evaluate_remote(best.config, checkpoint, "test", sweep)
    publish.publish_model(sweep.runs, best, checkpoint, iteration, test, REGISTERED_NAME, task="IXI hippocampus (left/right)")
    driver.finish(sweep, rows)


if __name__ == "__main__":
    args = parse_flags()  # --help, and a flag it refuses, answer before Ray, MLflow and torch load
    driver.run(main, args)

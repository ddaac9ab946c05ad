"""Source task: HighRes3DNet segmenting left/right hippocampus in IXI T1+T2 (thesis ch. 6).

    python sweeps/ixi_source.py                                   # synthetic IXI, local Ray
    python sweeps/ixi_source.py --data-dir /data/IXI --address auto

The best trial's best checkpoint is evaluated on the test split and registered in the MLflow
model registry as `ixi_hippocampus`, the source of sweeps/brats_layers.py.
"""

from ray import tune

from tlcore.sweep import driver, flags
from tlcore.sweep.evaluation import evaluate_remote
from tlcore.sweep.publish import publish_model
from tlcore.sweep.results import best_trial_checkpoint, trial_rows
from tlcore.sweep.tuner import run_sweep

NAME = "ixi_source"
REGISTERED_NAME = "ixi_hippocampus"
LABEL_MAP = {17: 1, 53: 2}  # FreeSurfer left / right hippocampus; every other label is background

SEARCH_SPACE = {
    "lr": tune.grid_search([1e-3, 3e-3]),
    "lr_schedule": "constant",
}


def main() -> None:
    args = flags.sweep_parser(__doc__, dataset="ixi").parse_args()
    sweep = driver.prepare(NAME, "ixi", args, label_map=LABEL_MAP)
    driver.start_ray(sweep)
    driver.begin(sweep)
    space = {**sweep.base_config, **SEARCH_SPACE}
    results = run_sweep(NAME, space, **sweep.tune_kwargs())
    rows = trial_rows(results, sweep)
    if all(r.failed for r in rows):
        driver.finish(sweep, rows, errors=len(rows))  # exits non-zero: nothing to register
    best, checkpoint, iteration = best_trial_checkpoint(results, sweep)
    test = evaluate_remote(best.config, checkpoint, "test", sweep)
    publish_model(sweep.runs, best, checkpoint, iteration, test, REGISTERED_NAME, task="IXI hippocampus (left/right)")
    driver.finish(sweep, rows)


if __name__ == "__main__":
    driver.run(main)

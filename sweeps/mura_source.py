"""Source task of the 2D chain: DenseNet121 (fastai head) ImageNet -> MURA bone radiographs
(thesis ch. 5): normal vs abnormal, judged study-wise.

    python sweeps/mura_source.py                          # synthetic MURA, local Ray
    python sweeps/mura_source.py --data-dir /data --address auto     # the folder holding MURA-v1.1/

The best trial is evaluated on the official valid split (study-wise accuracy, per body part,
Cohen's kappa, confusion matrix) and registered as `mura_densenet121`.
"""

from ray import tune

from tlcore.sweep import driver, flags
from tlcore.sweep.evaluation import evaluate_classifier_remote, log_mura_study_accuracy
from tlcore.sweep.publish import publish_model
from tlcore.sweep.results import best_trial_checkpoint, trial_rows
from tlcore.sweep.trainables import train_classifier_trial
from tlcore.sweep.tuner import run_sweep

NAME = "mura_source"
REGISTERED_NAME = "mura_densenet121"

SEARCH_SPACE = {
    "lr": tune.grid_search([1e-4, 1e-3]),   # the head's rate; earlier groups get lr / lr_ratio
    "lr_schedule": "one_cycle",
    "frozen_layers": 0,
}


def main() -> None:
    parser = flags.sweep_parser(__doc__, dataset="mura")
    parser.add_argument("--source", default="imagenet",
                        help="imagenet (torchvision weights, cached or downloaded), a local weights file, or scratch")
    args = parser.parse_args()
    sweep = driver.prepare(NAME, "mura", args, objective=("val_accuracy", "max"))
    driver.check_imagenet(args.source)
    driver.start_ray(sweep)
    driver.begin(sweep)
    space = {**sweep.base_config, **SEARCH_SPACE, "source_model": args.source}
    results = run_sweep(NAME, space, trainable=train_classifier_trial, **sweep.tune_kwargs(), grace_period=1)
    rows = trial_rows(results, sweep)
    if all(r.failed for r in rows):
        driver.finish(sweep, rows, errors=len(rows))
    best, checkpoint, epoch = best_trial_checkpoint(results, sweep)
    predictions = evaluate_classifier_remote(best.config, checkpoint, "test", sweep)
    metrics = log_mura_study_accuracy(sweep, best, predictions)
    publish_model(sweep.runs, best, checkpoint, epoch, metrics, REGISTERED_NAME, task="MURA v1.1 normal / abnormal")
    driver.finish(sweep, rows)


if __name__ == "__main__":
    driver.run(main)

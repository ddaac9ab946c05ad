"""Source task of the 2D chain: DenseNet121 (fastai head) ImageNet -> MURA bone radiographs
(thesis ch. 5): normal vs abnormal, judged study-wise.

    python sweeps/mura_source.py                          # synthetic MURA, local Ray
    python sweeps/mura_source.py --data-dir /data --address auto     # the folder holding MURA-v1.1/

The best trial is evaluated on the official valid split (study-wise accuracy, per body part,
Cohen's kappa, confusion matrix) and registered as `mura_densenet121`.
"""

from tlcore.sweep import flags
from tlcore.sweep.deferred import driver, evaluation, publish, results, trainables, tune, tuner

NAME = "mura_source"
REGISTERED_NAME = "mura_densenet121"


def search_space() -> dict:
    return {
        "lr": tune.grid_search([1e-4, 1e-3]),   # the head's rate; earlier groups get lr / lr_ratio
        "lr_schedule": "one_cycle",
        "frozen_layers": 0,
    }


def parse_flags():
    parser = flags.sweep_parser(__doc__, dataset="mura")
    parser.add_argument("--source", default="imagenet",
                        help="imagenet (torchvision weights, cached or downloaded), a local weights file, or scratch")
    return parser.parse_args()


def main(args) -> None:
    sweep = driver.prepare(NAME, "mura", args, objective=("val_accuracy", "max"))
    driver.check_imagenet(args.source)
    driver.start_ray(sweep)
    driver.begin(sweep)
    space = {**sweep.base_config, **search_space(), "source_model": args.source}
    trials = tuner.run_sweep(NAME, space, trainable=trainables.train_classifier_trial, **sweep.tune_kwargs(), grace_period=1)
    rows = results.trial_rows(trials, sweep)
    if all(r.failed for r in rows):
        driver.finish(sweep, rows, errors=len(rows))
    best, checkpoint, epoch = results.best_trial_checkpoint(trials, sweep)
    predictions = evaluation.evaluate_classifier_remote(best.config, checkpoint, "test", sweep)
    metrics = evaluation.log_mura_study_accuracy(sweep, best, predictions)
    publish.publish_model(sweep.runs, best, checkpoint, epoch, metrics, REGISTERED_NAME, task="MURA v1.1 normal / abnormal")
    driver.finish(sweep, rows)


if __name__ == "__main__":
    args = parse_flags()  # --help, and a flag it refuses, answer before Ray, MLflow and torch load
    driver.run(main, args)

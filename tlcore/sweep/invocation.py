"""One sweep invocation: what the driver knows about it (`Sweep`) and how it stops on a mistake
(`fail`: one line with the fix, exit status 2)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import NoReturn

from tlcore.tracking.credentials import redact
from tlcore.tracking.trial_runs import SweepRuns


@dataclass
class Sweep:
    """One sweep invocation: its name, objective (metric, mode), resources, store, data and budget.
    Result tables and evaluation take it rather than each of these again."""
    name: str
    args: argparse.Namespace
    tracking_uri: str
    storage_path: str
    data_dir: str
    splits_file: str
    base_config: dict
    splits: dict                      # train / val / test (and 3D: nested training subsets S1..S4)
    previous: dict | None = None      # tlcore_sweep.json of the sweep --resume continues
    default_strata: tuple = ()        # config keys early stopping compares within (the sweep's choice)
    parent_run_id: str = ""           # set by begin()
    gpus_per_trial: float = 0         # set by start_ray()
    source_weights: dict = field(default_factory=dict)  # set by resolve_source(): for the trials
    metric: str = "val_dice"          # the objective early stopping and "best checkpoint" use
    mode: str = "max"

    @property
    def cpus_per_trial(self) -> float:
        return self.args.cpus_per_trial

    @property
    def runs(self) -> SweepRuns:
        return SweepRuns(self.tracking_uri, self.name, self.parent_run_id)

    @property
    def max_iterations(self) -> int:
        return self.base_config["max_iterations"]

    @property
    def report_every(self) -> int:
        return self.base_config["report_every"]

    def remote(self, fn):
        """`fn` as a Ray task with a trial's resources (a GPU where trials get one): the forecast
        before the trials, the evaluations after them (sweep/worker_tasks)."""
        import ray  # here: the checks before Ray starts import this module

        return ray.remote(num_cpus=self.cpus_per_trial, num_gpus=self.gpus_per_trial)(fn)

    def tune_kwargs(self) -> dict:
        """The `run_sweep` arguments every sweep passes the same way."""
        a = self.args
        return {"tracking_uri": self.tracking_uri, "parent_run_id": self.parent_run_id,
                "storage_path": self.storage_path, "max_iterations": self.max_iterations,
                "report_every": self.report_every, "cpus_per_trial": a.cpus_per_trial,
                "metric": self.metric, "mode": self.mode,
                "gpus_per_trial": self.gpus_per_trial, "max_failures": a.max_failures, "resume": a.resume,
                "scheduler": a.scheduler, "strata": self.strata, "seed": a.seed, "num_samples": a.num_samples,
                "source_weights": self.source_weights}

    @property
    def strata(self) -> tuple:
        """Config keys that early stopping compares within: --strata, else the sweep's own."""
        if self.args.strata is not None:
            return tuple(k.strip() for k in self.args.strata.split(",") if k.strip())
        return tuple(self.default_strata)


def fail(msg: str) -> NoReturn:
    print(f"\n[tlcore] error: {redact(msg)}", file=sys.stderr)
    raise SystemExit(2)

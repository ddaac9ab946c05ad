"""Ray Tune and the sweep modules that load Ray, MLflow, SciPy and torch, imported on their first
use. A sweep script reads its flags before it touches any of them, so `--help` and a refused flag
answer in a fraction of a second; importing them first took 3-9 s (15-24 s on a busy machine).

    from tlcore.sweep.deferred import driver, tune   # nothing loaded yet
    tune.grid_search([0, 1])                          # ray.tune is imported here, once
"""

from __future__ import annotations

from importlib import import_module


class Deferred:
    """Stands for the module `name` and imports it when one of its attributes is first read."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(import_module(self._name), attr)  # after the first call: a dict lookup

    def __repr__(self) -> str:
        return f"<deferred module {self._name!r}>"


tune = Deferred("ray.tune")
driver = Deferred("tlcore.sweep.driver")
evaluation = Deferred("tlcore.sweep.evaluation")
publish = Deferred("tlcore.sweep.publish")
results = Deferred("tlcore.sweep.results")
scheduling = Deferred("tlcore.sweep.scheduling")
trainables = Deferred("tlcore.sweep.trainables")
tuner = Deferred("tlcore.sweep.tuner")

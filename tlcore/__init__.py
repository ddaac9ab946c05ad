"""tlcore: transfer-learning experiments in medical imaging as Ray Tune sweeps logged to MLflow.

The folders are the stages, each importing only the ones before it (each package's docstring
names them; tests/test_layout.py holds them to it):

    data -> models -> evaluation -> tracking -> training -> analysis -> report -> sweep

`config` (the frozen trial configuration) and `text` (tables) sit under all of them. Only
`tracking` imports mlflow and only `sweep` imports ray.tune.
"""

__version__ = "0.2.0"

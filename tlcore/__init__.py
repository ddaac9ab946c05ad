"""tlcore: transfer-learning experiments in medical imaging as Ray Tune sweeps logged to MLflow."""

__version__ = "0.1.0"

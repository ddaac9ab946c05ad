"""Stage 3, evaluation: the metrics, computed the same way everywhere. metrics: sliding-window
inference and Dice for segmentation (MONAI); scores: AUC, kappa and per-study scores for
classification, steps-to-target (numpy only, for processes that load no network).

May import: tlcore.config, tlcore.data.
"""

"""Stage 3, evaluation: the metrics, computed the same way everywhere. Sliding-window inference and
Dice for segmentation, AUC and per-study scores for classification, steps-to-target.

May import: tlcore.config, tlcore.data.
"""

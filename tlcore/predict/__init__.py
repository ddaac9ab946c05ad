"""Stage 9, predict: a trained model on new scans. `python -m tlcore.predict MODEL INPUT OUTPUT`
loads a registered model (`models:/<name>/<version>`) or a checkpoint folder, finds the scans or
radiographs under INPUT, and writes segmentations on each input's own grid (the evaluation's own
inference code) or class scores to a CSV. No Ray: it runs on a workstation beside a viewer.

May import: tlcore.config, tlcore.text, tlcore.data, tlcore.models, tlcore.evaluation, tlcore.tracking, tlcore.training.
"""

"""Stage 5, training: one trial, start to finish, on one device, without Ray. A trial's start (its
source weights, frozen groups and data), the segmentation loop (HighRes3DNet), the classification
loop (fastai's Learner), learning-rate schedules, device and precision choices.

May import: tlcore.config, tlcore.data, tlcore.models, tlcore.evaluation, tlcore.tracking.
"""

"""Stage 5, training: one trial, start to finish, on one device, without Ray. A trial's start (its
source weights, frozen groups and data), the segmentation loop (HighRes3DNet), the classification
loop (fastai's Learner), learning-rate schedules, device and precision choices (seeding and the
device, shared by 2D and 3D, in device.py: a 2D trial never loads MONAI).

May import: tlcore.config, tlcore.data, tlcore.models, tlcore.evaluation, tlcore.tracking.
"""

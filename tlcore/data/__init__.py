"""Stage 1, data: where the datasets are and what they hold. The real layouts (IXI, BraTS 2018, MURA,
ChestX-ray14) and their checks (`validate`, run before any trial), the fixed splits and nested
subsets, the synthetic stand-ins, NIfTI loading and MONAI-based patch sampling, and the 2D image
datasets. Nothing here knows about networks, training, MLflow or Ray.

May import: tlcore.config.
"""

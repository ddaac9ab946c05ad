"""Stage 2, models: the networks and what transfer does to them. The network registry (HighRes3DNet,
DenseNet121 with fastai's head) and its layer groups, loading a source's weights, freezing the
first k groups, Mean-Var re-initialisation, and the probes that measure a network layer by layer
(CKA, weight movement).

May import: tlcore.config.
"""

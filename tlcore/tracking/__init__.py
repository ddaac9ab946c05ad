"""Stage 4, tracking: the only door to MLflow. The store (runs, metrics, artifacts, the model
registry, accounts), credentials kept out of URIs and command lines, the local cache of
registered source models, one MLflow run per trial, a model's lineage, and replaying a
sweep's local results into a store that was down. Nothing here imports Ray.

May import: tlcore.config, tlcore.text, tlcore.data.
"""

"""Stage 7, report: what a reviewer reads, built from the MLflow store alone (no Ray). Trials summarised
per configuration, the plots, and the HTML page (`python -m tlcore.report`).

May import: tlcore.config, tlcore.text, tlcore.data, tlcore.evaluation, tlcore.tracking, tlcore.analysis.
"""

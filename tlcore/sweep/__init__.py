"""Stage 8, sweep: the only door to Ray Tune. A sweep script's flags, the driver's lifecycle (checks
before Ray starts, the parent run, the end), connecting to a cluster, the trainables, early
stopping, callbacks, checkpoint retention, progress lines, result tables and evaluation tasks.
`flags` and `prune` import no Ray, so mistakes are refused and old results pruned in a second.

May import: tlcore.config, tlcore.text, tlcore.data, tlcore.models, tlcore.evaluation, tlcore.tracking, tlcore.training, tlcore.analysis, tlcore.report.
"""

"""Stage 6, analysis: questions asked of many trials or of a network before it trains. The forecast
of which freeze depth will transfer best, the re-initialisation test of which groups a trained
network depends on (reuse), and the statistics (paired tests, bootstrap intervals,
Holm's correction, rank agreement) the report uses.

May import: tlcore.config, tlcore.data, tlcore.models, tlcore.evaluation, tlcore.training.
"""

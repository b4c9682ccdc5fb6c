"""Orchestration of data preparation at scale: sources, partitions, shards, resume, rejects, stats,
and the demo-corpus builder. The models it runs live in ``s2train.judges``."""

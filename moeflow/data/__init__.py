"""Corpora to token shards and the per-rank batch streams the trainer reads.

`moeflow data prepare` tokenizes text, JSONL, Parquet or a `datasets` folder into a prepared folder
(Megatron indexed shards and a manifest, `moeflow.data.manifest`); `[data]` of a run reads prepared
folders, Megatron corpora and mixtures of them. This package knows nothing of models or
parallelism: a stream is given its rank and world size.
"""

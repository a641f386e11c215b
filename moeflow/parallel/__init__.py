"""Parallelism: degrees and groups, expert sharding, gradient synchronisation."""

from moeflow.parallel.dims import ParallelContext, ParallelDims
from moeflow.parallel.grad_sync import GradSync, expert_parameter_names
from moeflow.parallel.parallelize import moe_layers, parallelize

__all__ = [
    "GradSync",
    "ParallelContext",
    "ParallelDims",
    "expert_parameter_names",
    "moe_layers",
    "parallelize",
]

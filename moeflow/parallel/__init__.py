"""Parallelism: degrees and groups, the expert layout over them, parallel modes, a model made
ready over them (`prepare_model`: parallelize, materialise, compile, shard), gradient
synchronisation, routing statistics and live re-placement."""

from moeflow.moe.dispatch_config import MODES, DispatchConfig
from moeflow.moe.layout import ExpertLayout
from moeflow.moe.walk import moe_layers, split_parameters
from moeflow.parallel.dims import ParallelContext, ParallelDims
from moeflow.parallel.grad_sync import GradSync, expert_parameter_names
from moeflow.parallel.parallelize import expert_layouts, parallelize, set_parallel_mode
from moeflow.parallel.prepare import prepare_model
from moeflow.parallel.routing_stats import RoutingStats

__all__ = [
    "MODES",
    "DispatchConfig",
    "ExpertLayout",
    "GradSync",
    "ParallelContext",
    "ParallelDims",
    "RoutingStats",
    "expert_layouts",
    "expert_parameter_names",
    "moe_layers",
    "parallelize",
    "prepare_model",
    "set_parallel_mode",
    "split_parameters",
]

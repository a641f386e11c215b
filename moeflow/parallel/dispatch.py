"""The dispatch settings a run asks `moeflow.parallel` for (the trainer builds no `comm` object):
how an MoE layer's tokens travel, and the parallel modes it can run in."""

from moeflow.comm.dispatcher import MODES, DispatchConfig

__all__ = ["MODES", "DispatchConfig"]

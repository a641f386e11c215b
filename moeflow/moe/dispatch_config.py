"""The parallel modes of an MoE layer and how its tokens travel: the one owner of both.

`ep`: tokens travel to their expert; `sharded`: tokens travel to every slice of their expert;
`dp`: the experts travel to the tokens (`moeflow.moe.expert_dispatch` implements them). A run
sets them through `[parallel]` (`moeflow.train.parallel_config`, which adds `auto`: the tuner
chooses per call), a layer call may name another (`MoELayer(..., mode=)`), and `check_mode` is
the one check of a mode's name.

Example:
    >>> DispatchConfig(mode="dp", overlap_degree=2).overlap_degree
    2
    >>> check_mode("tp", "dispatch.mode")
    Traceback (most recent call last):
    ...
    ValueError: dispatch.mode ('tp') must be one of ['ep', 'sharded', 'dp']
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("ep", "sharded", "dp")


def check_mode(mode: str, field: str = "parallel mode") -> str:
    """`mode` if it is one of `MODES`, else a `ValueError` naming `field` and the choices."""
    if mode not in MODES:
        raise ValueError(f"{field} ({mode!r}) must be one of {list(MODES)}")
    return mode


@dataclass(kw_only=True, frozen=True)
class DispatchConfig:
    """How an MoE layer's tokens travel. `mode`: the parallel mode a layer call uses unless it
    names one (`MODES`). `overlap_degree` C: chunks pipelined so communication hides behind
    compute (1 = no overlap). `two_level`: all-to-all within a node first, then across nodes
    (`moeflow.comm.hierarchical`), with nodes of `ranks_per_node` ranks (default:
    `LOCAL_WORLD_SIZE`, as torchrun sets it)."""

    mode: str = "ep"
    overlap_degree: int = 1
    two_level: bool = False
    ranks_per_node: int | None = None

    def __post_init__(self) -> None:
        check_mode(self.mode, "dispatch.mode")
        if self.ranks_per_node is not None and (
            not isinstance(self.ranks_per_node, int) or self.ranks_per_node < 1
        ):
            raise ValueError(
                f"dispatch.ranks_per_node ({self.ranks_per_node!r}) must be an integer >= 1"
            )
        if not isinstance(self.overlap_degree, int) or self.overlap_degree < 1:
            raise ValueError(
                f"dispatch.overlap_degree ({self.overlap_degree!r}) must be an integer >= 1"
            )

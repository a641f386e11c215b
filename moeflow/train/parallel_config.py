"""`[parallel]`: how the ranks of a run split the work (expert and data parallelism, sharding,
the MoE layers' modes) and how long they wait for each other.

Example:
    >>> p, gpu, cpu = ParallelConfig(ep=8), torch.device("cuda"), torch.device("cpu")
    >>> p.dp_for(64), p.dp_shard_for(8, gpu), p.dp_shard_for(8, cpu)  # dp_shard "auto"
    (8, 8, 1)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeflow.moe.dispatch_config import MODES
from moeflow.utils.validate import check_choice, check_int


@dataclass(kw_only=True, frozen=True)
class ParallelConfig:
    """`ep`: expert-parallel degree (the expert group: every rank holds 1/ep of the expert
    parameters, an F-slice of one expert when ep > num_experts); the data-parallel degree is
    `world_size / ep` (set `dp` to insist on one). `mode`: how MoE layers run on that layout
    (`ep`: tokens to their experts; `sharded`: tokens to every slice of their expert; `dp`: the
    experts gathered to the tokens; see `moeflow.moe.expert_dispatch`). `overlap_degree`: chunks
    of the pipelined all-to-all; `two_level` with `ranks_per_node` (default: torchrun's
    LOCAL_WORLD_SIZE): the all-to-all within nodes first, then across them, for multi-node runs.
    `mode`, `overlap_degree` and/or `two_level` = "auto": the runtime tuner (`[tuner]`,
    `moeflow.parallel.tuner`) measures the candidates while training and chooses per MoE layer
    (two-level only where the nodes split the expert group). `overlap_grad_sync`: gradient
    buckets are all-reduced from backward hooks as soon as they are ready, overlapping the rest
    of the backward (`GradSync(overlap=True)`); false: after the backward. `timeout_s`: how long
    a collective of a training step or validation waits for the other ranks before the run stops
    with an error naming the ranks that did not answer (`moeflow.train.watchdog`); `dp_shard`:
    how many of the `dp` data-parallel ranks shard the parameters, gradients and AdamW state
    between them (FSDP2, `moeflow.parallel.fsdp`; dense weights over `dp_shard x ep` ranks,
    experts over the `dp_shard` ranks holding them, replicated over `dp / dp_shard`: HSDP); 1
    replicates them on every rank; `auto` shards over every data-parallel rank on GPUs (what
    torchtitan and Megatron's distributed optimizer do: the memory a rank needs falls as ranks are
    added) and replicates on CPUs (one machine's ranks share its memory, and the gathers cost
    more than they save there);
    `startup_timeout_s`: the same for start-up (process groups, building, loading a checkpoint)
    and checkpoint saves, which may legitimately take longer."""

    ep: int = 1
    dp: int | None = None
    timeout_s: float = 180.0
    startup_timeout_s: float = 600.0
    mode: str = "ep"
    overlap_degree: int | str = 1
    overlap_grad_sync: bool = True
    two_level: bool | str = False
    ranks_per_node: int | None = None
    dp_shard: int | str = "auto"

    def __post_init__(self) -> None:
        check_int("parallel.ep", self.ep)
        if self.dp_shard != "auto":
            check_int("parallel.dp_shard", self.dp_shard)
        if self.overlap_degree != "auto":
            check_int("parallel.overlap_degree", self.overlap_degree)
        check_choice("parallel.mode", self.mode, (*MODES, "auto"))
        if not isinstance(self.two_level, bool) and self.two_level != "auto":
            raise ValueError(
                f'parallel.two_level ({self.two_level!r}) must be true, false or "auto"'
            )
        if self.dp is not None:
            check_int("parallel.dp", self.dp)
        if self.ranks_per_node is not None:
            check_int("parallel.ranks_per_node", self.ranks_per_node)
        for name in ("timeout_s", "startup_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"parallel.{name} ({getattr(self, name)!r}) must be > 0 (seconds)")

    def dp_for(self, world_size: int) -> int:
        if world_size % self.ep:
            raise ValueError(
                f"the world size ({world_size}) is not divisible by parallel.ep ({self.ep}); "
                f"launch a multiple of {self.ep} processes or change parallel.ep"
            )
        dp = world_size // self.ep
        if self.dp is not None and self.dp != dp:
            raise ValueError(
                f"parallel.dp ({self.dp}) x parallel.ep ({self.ep}) must equal the world size "
                f"({world_size}); remove parallel.dp or set it to {dp}"
            )
        return dp

    def dp_shard_for(self, dp: int, device: torch.device) -> int:
        """`dp_shard` with `auto` resolved (see the class doc); one that does not divide `dp` is
        refused, naming the divisors."""
        if self.dp_shard == "auto":
            return dp if device.type == "cuda" else 1
        if dp % self.dp_shard:
            divisors = [d for d in range(1, dp + 1) if dp % d == 0]
            raise ValueError(
                f"parallel.dp_shard ({self.dp_shard}) must divide the data-parallel degree "
                f"({dp} = world size / parallel.ep); choose one of {divisors}"
            )
        return self.dp_shard

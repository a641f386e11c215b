"""ParallelDims: the parallel degrees of a run, and the process groups and device mesh they build.

Rank layout: `rank = dp_index * ep + ep_index`, `dp_index = replicate_index * dp_shard +
shard_index`. The `ep` axis is innermost, so an expert-parallel group is `ep` consecutive ranks (on
one node when `ep` <= GPUs per node, where the all-to-all is fastest). Every rank reads its own
shard of the data: the data-parallel world is all `dp * ep` ranks.

Replicated (`dp_shard` 1, `GradSync`):
- non-expert parameters are replicated on every rank: gradients averaged over the whole world;
- expert parameters are sharded over the `ep` axis and replicated along `dp` (the
  expert-data-parallel group, ranks with the same `ep_index`): gradients summed over that group and
  divided by the world size (each expert's gradient already holds the contributions of every rank of
  its `ep` group).

Sharded (`dp_shard` > 1, FSDP2: `moeflow.parallel.fsdp`), `dp = dp_replicate x dp_shard`:
- non-expert parameters are sharded over the `dp_shard x ep` ranks of a replica (`dense_mesh`,
  HSDP when `dp_replicate` > 1) and replicated over `dp_replicate`;
- expert parameters (this rank's part of the expert layout) are sharded over the `dp_shard` ranks
  that hold the same experts and replicated over `dp_replicate` (`expert_mesh`);
- the gradients are the replicated run's: reduce-scattered (then all-reduced over the replicas)
  with the sum divided by the world size.

Example:
    >>> ParallelDims(dp=2, ep=4).world_size
    8
    >>> ParallelDims(dp=4, ep=2, dp_shard=2).dp_replicate
    2
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from moeflow.utils.validate import check_int


@dataclass(kw_only=True, frozen=True)
class ParallelDims:
    """Degrees of parallelism. `dp_shard`: how many of the `dp` ranks shard the parameters,
    gradients and optimizer state between them (FSDP2; 1: replicated); it divides `dp`, and
    `dp_replicate = dp / dp_shard`. `timeout_s` bounds every collective on moeflow's own groups,
    so a dead peer ends the job with an error instead of a hang."""

    dp: int = 1
    ep: int = 1
    dp_shard: int = 1
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        for name in ("dp", "ep", "dp_shard"):
            check_int(f"parallel.{name}", getattr(self, name))
        if self.dp % self.dp_shard:
            raise ValueError(
                f"parallel.dp_shard ({self.dp_shard}) must divide the data-parallel degree "
                f"parallel.dp ({self.dp} = world size / ep); choose a divisor of {self.dp}"
            )
        if not self.timeout_s > 0:
            raise ValueError(f"parallel.timeout_s ({self.timeout_s!r}) must be > 0")

    @property
    def world_size(self) -> int:
        return self.dp * self.ep

    @property
    def dp_replicate(self) -> int:
        return self.dp // self.dp_shard

    def validate(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise ValueError(
                f"parallel.dp ({self.dp}) x parallel.ep ({self.ep}) = {self.world_size} must equal "
                f"the world size ({world_size}); set dp = world_size / ep"
            )

    def build(self, device_type: str = "cpu") -> ParallelContext:
        """Create the groups (collective: every rank must call it). Raises on every rank, before
        any communication, if the world size does not match."""
        if not dist.is_initialized():
            raise RuntimeError(
                "ParallelDims.build needs torch.distributed initialised (torchrun, or "
                "init_process_group); a single process needs no ParallelDims at all"
            )
        self.validate(dist.get_world_size())
        return ParallelContext(self, device_type)


class ParallelContext:
    """The groups of one run, built once and passed explicitly (never global): the one source of
    distributed state.

    `ep_group`, `edp_group` and `world_group` are created with the timeout at construction; the
    shard groups of a layout (`shard_group`) and the intra/inter-node groups of a two-level
    all-to-all (`node_groups`) on first use, once each (collective: every rank asks in the same
    order, as `parallelize` does). The node size comes from `ranks_per_node` (torchrun's
    `LOCAL_WORLD_SIZE`, read here and nowhere else).
    """

    def __init__(self, dims: ParallelDims, device_type: str) -> None:
        self.dims = dims
        rank = dist.get_rank()
        self.rank = rank
        self.dp_index, self.ep_index = divmod(rank, dims.ep)
        self.replicate_index, self.shard_index = divmod(self.dp_index, dims.dp_shard)
        timeout = datetime.timedelta(seconds=dims.timeout_s)
        # new_group is collective over the world: every rank creates every group, in order.
        self.ep_group = self.edp_group = None
        for d in range(dims.dp):
            group = dist.new_group([d * dims.ep + e for e in range(dims.ep)], timeout=timeout)
            if d == self.dp_index:
                self.ep_group = group
        for e in range(dims.ep):
            group = dist.new_group([d * dims.ep + e for d in range(dims.dp)], timeout=timeout)
            if e == self.ep_index:
                self.edp_group = group
        self.world_group = dist.new_group(list(range(dims.world_size)), timeout=timeout)
        self.device_type = device_type
        self.timeout_s = dims.timeout_s
        self._shard_groups: dict[int, dist.ProcessGroup | None] = {1: None}
        self._node_groups: dict[int, tuple[dist.ProcessGroup, dist.ProcessGroup]] = {}
        self._data_groups: dict[str, dist.ProcessGroup] | None = None

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    def groups(self) -> list[dist.ProcessGroup]:
        """Every group this context built (this rank's), and the default group."""
        found = [dist.group.WORLD, self.ep_group, self.edp_group, self.world_group]
        found += list(self._shard_groups.values())
        found += [g for pair in self._node_groups.values() for g in pair]
        found += list((self._data_groups or {}).values())
        return list({id(g): g for g in found if g is not None}.values())

    def set_timeout(self, seconds: float) -> None:
        """The collective timeout of every group from now on (and of groups built later): e.g.
        a generous one for start-up and checkpoints, a short one for training steps."""
        self.timeout_s = seconds
        for group in self.groups():
            dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=seconds), group)

    def ranks_per_node(self, requested: int | None = None) -> int | None:
        """Ranks per node: `requested`, else torchrun's `LOCAL_WORLD_SIZE`, else None (unknown);
        capped at `ep` (an expert group inside one node is one node for its all-to-all)."""
        value = requested
        if value is None and os.environ.get("LOCAL_WORLD_SIZE"):
            value = int(os.environ["LOCAL_WORLD_SIZE"])
        return None if value is None else min(value, self.dims.ep)

    def shard_group(self, shards: int) -> dist.ProcessGroup | None:
        """The group of the `shards` consecutive ranks of this rank's expert group that hold
        slices of the same experts (`ExpertLayout`); None for 1. Collective on first use."""
        if shards not in self._shard_groups:
            if self.dims.ep % shards:
                raise ValueError(f"{shards} shards do not divide parallel.ep ({self.dims.ep})")
            timeout = datetime.timedelta(seconds=self.timeout_s)
            mine = None
            for first in range(0, self.world_size, shards):
                group = dist.new_group(list(range(first, first + shards)), timeout=timeout)
                if first <= self.rank < first + shards:
                    mine = group
            self._shard_groups[shards] = mine
        return self._shard_groups[shards]

    def data_groups(self) -> dict[str, dist.ProcessGroup]:
        """The groups of sharded data parallelism, this rank's (collective on first use):
        `replicate` (same shard index and `ep_index`, across replicas), `dense_shard` (the
        `dp_shard x ep` ranks of this replica), `expert_shard` (the `dp_shard` ranks of this
        replica holding the same experts)."""
        if self._data_groups is None:
            d = self.dims
            rep, shard, ep = d.dp_replicate, d.dp_shard, d.ep
            timeout = datetime.timedelta(seconds=self.timeout_s)
            mine = {}

            def make(name: str, ranks: list[int]) -> None:
                group = dist.new_group(ranks, timeout=timeout)
                if self.rank in ranks:
                    mine[name] = group

            for j in range(shard * ep):
                make("replicate", [r * shard * ep + j for r in range(rep)])
            for r in range(rep):
                make("dense_shard", [r * shard * ep + j for j in range(shard * ep)])
            for r in range(rep):
                for e in range(ep):
                    make("expert_shard", [(r * shard + s) * ep + e for s in range(shard)])
            self._data_groups = mine
        return self._data_groups

    def dense_mesh(self) -> DeviceMesh:
        """FSDP's mesh for non-expert parameters: `(dp_replicate, dp_shard x ep)`, or 1-D
        `(dp_shard x ep)` without replicas."""
        d, groups = self.dims, self.data_groups()
        ranks = torch.arange(self.world_size).view(d.dp_replicate, d.dp_shard * d.ep)
        return self._mesh(ranks, [groups["replicate"], groups["dense_shard"]])

    def expert_mesh(self) -> DeviceMesh:
        """FSDP's mesh for this rank's expert parameters: `(dp_replicate, dp_shard)` over the
        ranks with this `ep_index`, or 1-D `(dp_shard)` without replicas."""
        d, groups = self.dims, self.data_groups()
        ranks = torch.arange(self.world_size).view(d.dp_replicate, d.dp_shard, d.ep)
        return self._mesh(ranks[..., self.ep_index], [groups["replicate"], groups["expert_shard"]])

    def _mesh(self, ranks: torch.Tensor, groups: list[dist.ProcessGroup]) -> DeviceMesh:
        names = ("dp_replicate", "dp_shard")
        if ranks.shape[0] == 1:  # no replicas: a 1-D mesh shards over all of them (FSDP)
            ranks, groups, names = ranks[0], groups[1:], names[1:]
        return DeviceMesh.from_group(
            groups if len(groups) > 1 else groups[0], self.device_type, mesh=ranks,
            mesh_dim_names=names,
        )  # fmt: skip

    def node_groups(self, ranks_per_node: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
        """(intra-node, inter-node) groups of this rank's expert-parallel group, for a two-level
        all-to-all. Collective on first use: every rank creates every group, in the same order."""
        if ranks_per_node not in self._node_groups:
            self._node_groups[ranks_per_node] = self._make_node_groups(ranks_per_node)
        return self._node_groups[ranks_per_node]

    def _make_node_groups(self, ranks_per_node: int):
        ep, G = self.dims.ep, ranks_per_node
        if ep % G:
            raise ValueError(
                f"dispatch.ranks_per_node ({G}) must divide parallel.ep ({ep}) for a two-level "
                "all-to-all (an expert-parallel group must span whole nodes)"
            )
        timeout = datetime.timedelta(seconds=self.timeout_s)
        intra = inter = None
        for d in range(self.dims.dp):
            base = d * ep
            for node in range(ep // G):
                group = dist.new_group([base + node * G + g for g in range(G)], timeout=timeout)
                if d == self.dp_index and node == self.ep_index // G:
                    intra = group
            for g in range(G):
                group = dist.new_group(
                    [base + node * G + g for node in range(ep // G)], timeout=timeout
                )
                if d == self.dp_index and g == self.ep_index % G:
                    inter = group
        return intra, inter

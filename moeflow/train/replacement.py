"""The trainer's side of expert placement: routing statistics every micro-batch, and live
re-placement between optimizer steps (`[placement]` in the run config).

Schedule at a step where re-placement is due (see `PlacementRunConfig`), on every rank:
1. `RoutingStats.snapshot`: one all-reduce of the decayed window over the world group.
2. Rank 0 scores the current placement; if it is due (periodic, or above the imbalance
   threshold) it solves with `placement.method` and keeps the result if it scores at least
   `min_gain` lower. The other ranks wait in step 3: the solver's time limit bounds the wait.
3. Broadcast of the decision (maps, scores) from rank 0 over the world group.
4. `apply_placement`: the experts and their AdamW moments move over each `ep` group.
5. The decision is logged (`kind: "placement"` in metrics.jsonl) and the statistics file written.

Only `ep` > 1 re-places (one rank holds every expert otherwise); the statistics are always
collected when `placement.stats` is on.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from moeflow.moe.walk import moe_layers
from moeflow.parallel.dims import ParallelContext
from moeflow.parallel.replace import (
    apply_placement,
    current_expert_slots,
    layouts_placement,
    placement_slots,
)
from moeflow.parallel.routing_stats import RoutingStats
from moeflow.placement.planner import plan
from moeflow.placement.problem import PlacementConfig, evaluate
from moeflow.placement.trace import RoutingTrace
from moeflow.train.config import RunConfig

STATS_FILE = "routing_stats.json"


class Replacer:
    def __init__(self, cfg: RunConfig, ctx: ParallelContext, model, device: torch.device):
        self.cfg, self.ctx, self.model = cfg, ctx, model
        self.names = [n for n, _ in moe_layers(model)]
        self.layers = [m for _, m in moe_layers(model)]
        self.stats = None
        if cfg.placement.stats and self.layers:
            self.stats = RoutingStats(
                len(self.layers), self.layers[0].config.num_experts, cfg.placement.decay,
                device, self.names,
            )  # fmt: skip
        self.path = Path(cfg.train.out_dir) / STATS_FILE

    def problem(self) -> PlacementConfig:
        """The planning problem: a placement 'rank' is a shard group of the layout (a rank when
        every rank holds whole experts)."""
        p = self.cfg.placement
        rpn = self.ctx.ranks_per_node(p.ranks_per_node or self.cfg.parallel.ranks_per_node)
        layout = self.layers[0].layout
        groups, shards = layout.num_groups, layout.shards
        if rpn is None or rpn % shards or groups % (rpn // shards):
            group_rpn = None
        else:
            group_rpn = rpn // shards
        return p.problem(groups, group_rpn, layout.num_experts)

    # -- every micro-batch / step ---------------------------------------------------------------
    def observe(self) -> None:
        if self.stats is not None:
            self.stats.observe([layer.last_stats.expert_ids for layer in self.layers])

    def end_step(self) -> None:
        if self.stats is not None:
            self.stats.end_step()

    def due(self, step: int) -> tuple[bool, bool]:
        """(periodic re-placement due, imbalance check due) after `step` optimizer steps."""
        p = self.cfg.placement
        if not p.enabled or self.stats is None or self.ctx.dims.ep == 1 or step < p.min_steps:
            return False, False
        periodic = bool(p.every) and step % p.every == 0
        check = bool(p.imbalance_threshold) and step % p.check_every == 0
        return periodic, check

    # -- statistics file ------------------------------------------------------------------------
    def snapshot(self) -> RoutingTrace | None:
        """Collective over the world group."""
        if self.stats is None:
            return None
        return self.stats.snapshot(self.ctx.world_group)

    def write(self, trace: RoutingTrace | None = None) -> Path | None:
        """Write the statistics file (collective: the snapshot; rank 0 writes)."""
        if self.stats is None or (trace is None and self.stats.steps == 0):
            return None  # no step since the run (or its resume) started: nothing recorded
        trace = trace or self.snapshot()
        if self.ctx.rank == 0 and trace is not None and trace.loads.sum() > 0:
            trace.meta["expert_slots"] = current_expert_slots(self.model)
            trace.meta["ep"] = self.ctx.dims.ep
            trace.save(self.path)
        return self.path

    # -- re-placement ---------------------------------------------------------------------------
    def maybe_replace(self, step: int, optimizer) -> dict | None:
        """Steps 1-5 of the module doc when due; returns the log record (None when not due)."""
        periodic, check = self.due(step)
        if not (periodic or check):
            return None
        trace = self.stats.snapshot(self.ctx.world_group)
        decision = [None]
        if self.ctx.rank == 0:
            decision[0] = self._decide(trace, step, periodic)
        dist.broadcast_object_list(decision, src=0, group=self.ctx.world_group)
        record = decision[0]
        if record is None:
            return None
        start = time.perf_counter()
        if record["applied"]:
            maps = dict(zip(self.names, record.pop("maps"), strict=True))
            record["moved_experts"] = apply_placement(
                self.model, maps, self.ctx.ep_group, optimizer
            )
        else:
            record.pop("maps", None)
        record["migrate_s"] = round(time.perf_counter() - start, 4)
        self.write(trace)
        return record

    def _decide(self, trace: RoutingTrace, step: int, periodic: bool) -> dict | None:
        p, cfg = self.cfg.placement, self.problem()
        current = evaluate(trace, layouts_placement([x.layout for x in self.layers]), cfg)
        imbalance = current.max_mean
        if not periodic and imbalance <= p.imbalance_threshold:
            return None
        result = plan(trace, cfg, p.method)
        gain = 1.0 - result.metrics.objective / max(current.objective, 1e-12)
        applied = gain >= p.min_gain and gain > 0
        return {
            "kind": "placement",
            "step": step,
            "trigger": "every" if periodic else "imbalance",
            "method": p.method,
            "status": result.status,
            "solve_s": round(result.seconds, 4),
            "before": current.as_dict(),
            "after": result.metrics.as_dict(),
            "gain": round(gain, 4),
            "applied": applied,
            "maps": [placement_slots(result.placement, i) for i in range(len(self.layers))]
            if applied
            else None,
        }


def describe_placement(record: dict) -> str:
    """One line for a `kind: "placement"` record."""
    b, a = record["before"], record["after"]
    verb = "re-placed" if record["applied"] else "kept the placement"
    moved = f", {record['moved_experts']} experts moved" if record["applied"] else ""
    return (
        f"{verb} ({record['method']}, {record['status']}, {record['solve_s']:.2f} s{moved}): "
        f"max/mean load {b['max_mean_load']:.3f} -> {a['max_mean_load']:.3f}, cross-rank tokens "
        f"{b['cross_rank_fraction']:.1%} -> {a['cross_rank_fraction']:.1%}, objective "
        f"{record['gain']:+.1%} better"
    )

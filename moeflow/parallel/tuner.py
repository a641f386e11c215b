"""RuntimeTuner: choose each MoE layer's (mode, overlap degree, flat or two-level all-to-all) from
measurements while training.

Legend: T tokens per rank, rho max/mean load over the ranks (shard groups) that hold experts.

Schedule, after an optimizer step, on every rank (collective over the world group):
1. At step `first_check`, then every `check_every` steps: one all-reduce (max) of each layer's T
   and its share of routed pairs bound off the rank's shard group, and one (sum) of its kept
   tokens per expert give the layer's situation (T, rho over the current layout's shard groups,
   off-group share; see `moeflow.parallel.situation`). Within the thresholds of a situation
   measured before, its decision is reused and nothing else runs (a re-placement re-tunes only
   when it moves the loads or the traffic beyond them).
2. A new key: the candidates (`cost_model.candidates`, limited to the configured mode, overlap and
   all-to-all when they are fixed; two-level only where the layer has one) are predicted by the
   cost model and pruned to those within `prune` times the best prediction (the default, `ep`
   without overlap over the flat all-to-all, is always kept, as the reference).
3. Feasibility: each rank checks the transient memory of each candidate's weight gathers against
   its free memory; one all-reduce (min) of the flags, so a candidate any rank cannot run is
   dropped on every rank, with the reason logged.
4. Timing: the surviving candidates replay the layer's last training input, forward + backward
   (`torch.autograd.grad`, so no `.grad` changes; RNG state restored; as an activation-checkpoint
   recomputation, so no statistics change), in rounds that run every candidate once, in the same
   order on every rank (so a drift of the machine's speed hits them alike; a new random order
   each round, so none always follows the same one): `warmup` rounds
   untimed, then `samples` timed; the medians are maxed over ranks (one all-reduce). The
   candidates within `refine` of the best are timed `samples` rounds more and their medians over
   all their samples maxed again (one all-reduce): close calls get more evidence.
5. Rank 0 picks the fastest and broadcasts the decision with its record (one broadcast); every
   rank sets the layer's default mode and overlap degree and caches the decision under the key.

Every mode computes the same math, so a decision changes speed; in fp32 the candidates sum in
different orders, so two runs whose timings chose differently drift apart in the last bits (and
further, as training amplifies them). Two ways to get the same losses twice: pin the choices
(`parallel.mode`, `overlap_degree`, `two_level`), or replay the decisions an earlier run recorded
(`replay`: steps 2-4 are skipped and the recorded choice is taken, so the run makes the same
decisions at the same steps; a record of another run, or one that does not hold this run's
situation, stops it with one line: `moeflow.parallel.tuner_replay`). The decisions made so far
are part of a checkpoint (`state_dict`), so a resumed run carries on with them.

Example (one process: there is nothing to choose but `ep`):
    >>> from moeflow.moe.config import MoEConfig
    >>> from moeflow.moe.layer import MoELayer
    >>> from moeflow.parallel import ParallelDims, parallelize
    >>> from moeflow.parallel.cost_model import PRESETS
    >>> from moeflow.train.distributed import init_distributed, shutdown
    >>> runtime = init_distributed(60.0)
    >>> ctx = ParallelDims().build()
    >>> model = parallelize(torch.nn.Sequential(MoELayer(MoEConfig(hidden_size=8,
    ...     num_experts=2, ffn_hidden_size=8))), ctx)
    >>> tuner = RuntimeTuner(model, ctx, PRESETS["h100"], TunerConfig(samples=1, first_check=1))
    >>> model(torch.randn(6, 8)).sum().backward()
    >>> [r["choice"] for r in tuner.after_step(1)]
    ['ep']
    >>> tuner.close(); shutdown(runtime)
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

from moeflow.moe.ffn import gate_multiplier
from moeflow.moe.layer import MoELayer
from moeflow.moe.routing_context import RoutingContext
from moeflow.moe.walk import moe_layers
from moeflow.parallel.cost_model import Candidate, Hardware, LayerShape, candidates, predict
from moeflow.parallel.decision import decision_record, shape_fields
from moeflow.parallel.dims import ParallelContext
from moeflow.parallel.fsdp import unit_of, unsharded, unsharded_bytes
from moeflow.parallel.situation import group_imbalance, nearest, off_group_share
from moeflow.parallel.tuner_config import TunerConfig
from moeflow.parallel.tuner_replay import Replay, run_of
from moeflow.utils import device_clock


class RuntimeTuner:
    """Tunes every MoE layer of `model` (see the module doc). `mode` / `overlap` / `two_level`:
    None to choose them, or a fixed value. `after_step(step)` returns the step's decision
    records. `seed`: recorded with each decision beside the world size and layout. `replay`:
    recorded decisions by (layer, step), checked (`moeflow.parallel.tuner_replay`)."""

    def __init__(
        self,
        model: nn.Module,
        ctx: ParallelContext,
        hardware: Hardware,
        config: TunerConfig | None = None,
        mode: str | None = None,
        overlap: int | None = None,
        two_level: bool | None = None,
        replay: dict[tuple[str, int], dict] | None = None,
        seed: int | None = None,
    ) -> None:
        self.ctx, self.hw = ctx, hardware
        self.config = config or TunerConfig()
        self.mode, self.overlap, self.two_level = mode, overlap, two_level
        self.layers = moe_layers(model)
        self.run = run_of(ctx, seed)
        self.replay = None  # the recorded decisions, taken instead of timing
        if replay is not None:
            self.replay = Replay(replay, self.config.replay, self.run)
            self.replay.check({name: self._choices(layer) for name, layer in self.layers})
        # A sharded model's layer is gathered for a replay, as its block's forward gathers it.
        self.units = {id(layer): unit_of(model, layer) for _, layer in self.layers}
        self.cache: dict[tuple, dict] = {}
        self.inputs: dict[int, torch.Tensor] = {}
        self.keys: dict[str, tuple] = {}
        self.tuning_seconds = 0.0
        self._round = 0  # timing rounds so far: seeds each round's order, alike on every rank
        self._hooks = [
            layer.register_forward_pre_hook(self._keep_input, with_kwargs=True)
            for _, layer in self.layers
        ]

    def state_dict(self) -> dict:
        """The decisions so far (JSON-safe), for a checkpoint: a resumed run reuses them."""
        return {
            "cache": [[name, list(key), record] for (name, key), record in self.cache.items()],
            "current": {name: list(key) for name, key in self.keys.items()},
            "rounds": self._round,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` and set every layer to the decision it ran with."""
        self.cache = {(name, tuple(key)): record for name, key, record in state["cache"]}
        self.keys = {name: tuple(key) for name, key in state["current"].items()}
        self._round = int(state["rounds"])
        for name, layer in self.layers:
            if name in self.keys:
                self._apply(layer, self.cache[(name, self.keys[name])])

    def _choices(self, layer: MoELayer) -> tuple[dict, list[Candidate]]:
        """The layer's sizes and every choice the tuner may record for it (`ep` included: the
        choice where no candidate can run)."""
        shape = self._shape(layer, 1.0, 1.0)
        return shape_fields(shape), [*self._allowed(layer, shape), Candidate("ep")]

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _keep_input(self, layer: MoELayer, args, kwargs) -> None:
        context = kwargs.get("routing_context")
        if layer.training and torch.is_grad_enabled() and not getattr(context, "recomputing", 0):
            self.inputs[id(layer)] = args[0].detach()

    # -- step 1 ----------------------------------------------------------------------------------
    def _situations(self) -> list[tuple[float, float, float]]:
        """(T, rho, off-group share) of every layer from its last forward, T and the share maxed
        over ranks (two all-reduces)."""
        local, counts = [], []
        for _, layer in self.layers:
            x = self.inputs.get(id(layer))
            stats = layer.last_stats
            e = layer.config.num_experts
            mine = (
                torch.zeros(e, dtype=torch.float64)
                if stats is None
                else stats.tokens_per_expert.detach().to("cpu", torch.float64)
            )
            tokens = 0.0 if x is None else float(x.numel() // x.shape[-1])
            local.append([tokens, off_group_share(layer.layout, mine, self.ctx.ep_index)])
            counts.append(mine)
        mx = torch.tensor(local, dtype=torch.float64)
        flat = torch.cat(counts)
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=self.ctx.world_group)
        dist.all_reduce(flat, group=self.ctx.world_group)
        out, offset = [], 0
        for (_, layer), (tok, off) in zip(self.layers, mx.tolist(), strict=True):
            e = layer.config.num_experts
            out.append((tok, group_imbalance(layer.layout, flat[offset : offset + e]), off))
            offset += e
        return out

    # -- steps 2-5 -------------------------------------------------------------------------------
    def after_step(self, step: int) -> list[dict]:
        """Check (and where new, tune) every layer's situation; returns the decision records."""
        c = self.config
        if not self.layers or step < c.first_check or (step - c.first_check) % c.check_every:
            return []
        start = time.perf_counter()
        records = []
        for (name, layer), now in zip(self.layers, self._situations(), strict=True):
            seen = nearest(c, [k for n, k in self.cache if n == name], now)
            if seen is not None and self.replay is not None:
                self.replay.reused(name, step, now)
            if seen is not None:
                if self.keys.get(name) != seen:
                    self._apply(layer, self.cache[(name, seen)])
                    self.keys[name] = seen
                continue
            key = now
            record = self._tune(name, layer, step, now)
            self.cache[(name, key)] = record
            self.keys[name] = key
            self._apply(layer, record)
            records.append(record)
        self.tuning_seconds += time.perf_counter() - start
        return records

    def _apply(self, layer: MoELayer, record: dict) -> None:
        d = layer.expert_dispatch
        d.config = dataclasses.replace(
            d.config,
            mode=record["mode"],
            overlap_degree=record["overlap"],
            two_level=record["two_level"],
        )

    def _shape(self, layer: MoELayer, tokens: float, rho: float) -> LayerShape:
        cfg = layer.config
        return LayerShape(
            tokens=max(int(tokens), 1), hidden=cfg.expert_dim, ffn=cfg.ffn_hidden_size,
            experts=cfg.num_experts, top_k=cfg.router.top_k, group=layer.layout.group_size,
            gate_blocks=gate_multiplier(cfg.activation), imbalance=max(rho, 1.0),
        )  # fmt: skip

    def _allowed(self, layer: MoELayer, shape: LayerShape) -> list[Candidate]:
        """The candidates this tuner may choose for `layer` (the fixed settings kept), the
        default (the reference) first."""
        overlaps = (self.overlap,) if self.overlap else self.config.overlaps
        cands = [
            k
            for k in candidates(shape, _ranks_per_node(layer), overlaps)
            if (self.mode is None or k.mode == self.mode)
            and (self.two_level is None or k.two_level == self.two_level)
        ]
        default = Candidate(self.mode or "ep", self.overlap or 1, bool(self.two_level))
        return cands if default in cands else [default, *cands]

    def _candidates(self, layer: MoELayer, shape: LayerShape) -> tuple[list, dict]:
        c = self.config
        rpn = _ranks_per_node(layer)
        cands = self._allowed(layer, shape)
        default = Candidate(self.mode or "ep", self.overlap or 1, bool(self.two_level))
        predicted = {k: predict(shape, k, self.hw, rpn).seconds for k in cands}
        best = min(predicted.values())
        kept = sorted(
            (k for k in cands if predicted[k] <= c.prune * best or k == default),
            key=lambda k: predicted[k],
        )[: c.max_candidates]
        if default not in kept:
            kept[-1] = default
        return kept, predicted

    def _feasible(self, layer: MoELayer, cands: list[Candidate]) -> list[str | None]:
        """Step 3: per candidate None (every rank can run it) or why not (one all-reduce)."""
        lay, cfg = layer.layout, layer.config
        size, g = layer.experts.w1.element_size(), gate_multiplier(cfg.activation)
        gathered = unsharded_bytes(self.units[id(layer)])  # its block, under FSDP
        need = [
            gathered + size * lay.gather_peak_elements(k.mode, cfg.expert_dim, g, cfg.ffn_bias)
            for k in cands
        ]
        budget = self.free_bytes(layer.experts.w1.device)
        ok = torch.tensor([1.0 if n <= budget else 0.0 for n in need], dtype=torch.float64)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.ctx.world_group)
        return [
            None if flag else f"needs {n / 2**20:.1f} MiB of gathered weights; a rank has less free"
            for flag, n in zip(ok.tolist(), need, strict=True)
        ]

    def free_bytes(self, device: torch.device) -> float:
        """Transient memory this rank may spend on a candidate's gathered weights."""
        if self.config.memory_limit_mb:
            return self.config.memory_limit_mb * 2**20
        if device.type == "cuda":
            return float(torch.cuda.mem_get_info(device)[0])
        return math.inf

    def _time(self, layer: MoELayer, cand: Candidate) -> float:
        """One replay of the layer's last training input in `cand`, forward + backward: seconds."""
        x = self.inputs[id(layer)]
        with unsharded(self.units[id(layer)]):
            params = [p for p in layer.parameters() if p.requires_grad]

            def replay() -> None:
                xr = x.detach().requires_grad_(True)
                out = layer(xr, mode=cand.mode, overlap_degree=cand.overlap,
                            two_level=cand.two_level,
                            routing_context=RoutingContext(recomputing=True))  # fmt: skip
                torch.autograd.grad(out, [xr, *params], torch.ones_like(out), allow_unused=True)

            return device_clock.elapsed(replay, x.device)  # the device's time, not launches

    def _rounds(self, layer: MoELayer, cands: list[Candidate], rounds: int, samples: dict) -> None:
        """`rounds` rounds of one replay per candidate, appended to `samples`, each round in a
        new random order that is the same on every rank (seeded by the round), so none always
        runs right after the same one (a `dp` gather before a candidate slows it on CPUs)."""
        for _ in range(rounds):
            order = list(cands)
            self._round += 1
            random.Random(self._round).shuffle(order)
            for k in order:
                samples.setdefault(k, []).append(self._time(layer, k))

    def _measure(self, layer: MoELayer, cands: list[Candidate]) -> list[float]:
        """Step 4: every candidate's median, maxed over ranks; close ones timed again."""
        c = self.config
        rng = torch.get_rng_state()
        self._rounds(layer, cands, c.warmup, {})
        samples: dict[Candidate, list[float]] = {}
        self._rounds(layer, cands, c.samples, samples)
        measured = self._max_medians([samples.get(k, [0.0]) for k in cands])
        best = min(measured, default=0.0)
        close = [k for k, m in zip(cands, measured, strict=True) if m <= best * (1 + c.refine)]
        if c.refine and len(close) > 1:  # the same set on every rank: `measured` is reduced
            self._rounds(layer, close, c.samples, samples)
            again = self._max_medians([samples[k] for k in close])
            for k, m in zip(close, again, strict=True):
                measured[cands.index(k)] = m
        torch.set_rng_state(rng)
        return measured

    def _max_medians(self, samples: list[list[float]]) -> list[float]:
        medians = torch.tensor([statistics.median(s) for s in samples], dtype=torch.float64)
        dist.all_reduce(medians, op=dist.ReduceOp.MAX, group=self.ctx.world_group)
        return medians.tolist()

    def _tune(self, name: str, layer: MoELayer, step: int, now: tuple) -> dict:
        if self.replay is not None:
            return self.replay.take(name, step, now, self.config)
        tokens, rho, _ = now
        shape = self._shape(layer, tokens, rho)
        cands, predicted = self._candidates(layer, shape)
        why_not = self._feasible(layer, cands)
        runnable = [k for k, why in zip(cands, why_not, strict=True) if why is None]
        skipped = {k.label(): why for k, why in zip(cands, why_not, strict=True) if why}
        if id(layer) not in self.inputs or not runnable:
            runnable = []
        measured = self._measure(layer, runnable) if runnable else []
        record = [None]
        if self.ctx.rank == 0:
            record[0] = decision_record(name, step, shape, runnable, measured, predicted, skipped)
            record[0].update(situation=list(now), run=self.run)
        dist.broadcast_object_list(record, src=0, group=self.ctx.world_group)
        return record[0]


def _ranks_per_node(layer: MoELayer) -> int:
    """The node size the layer's all-to-alls see: its two-level exchange's, else one node."""
    two_level = layer.expert_dispatch.two_level_exchange
    return layer.layout.group_size if two_level is None else two_level.ranks_per_node

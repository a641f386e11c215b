"""MoELayer: a drop-in replacement for a model's feed-forward block.

Legend: T tokens, D model dim, E experts, K top-k, R rows of the expert buffer.

Data flow (docs/architecture.md): route (fp32) -> capacity (optional) -> permute into an
expert-sorted buffer -> grouped expert FFNs -> un-permute and weight by the router -> balancing
losses attached to the output so that an unchanged training loop trains them."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moeflow.comm.all_to_all import Exchange
from moeflow.comm.capacity import capacity_keep_mask, expert_capacity, nothing_dropped
from moeflow.comm.host_read import count_per_value
from moeflow.comm.permutation import pair_counts
from moeflow.moe.aux_loss import attach_loss
from moeflow.moe.balance_state import BalanceState
from moeflow.moe.config import MoEConfig
from moeflow.moe.dispatch_config import DispatchConfig
from moeflow.moe.expert_dispatch import ExpertDispatch
from moeflow.moe.experts import GroupedExperts, gated_bias
from moeflow.moe.ffn import FeedForward
from moeflow.moe.grouped_ffn import compute_dtype
from moeflow.moe.layer_init import reset_layer
from moeflow.moe.layout import ExpertLayout
from moeflow.moe.losses import layer_losses, masked_counts
from moeflow.moe.low_dim import LowDimProjection
from moeflow.moe.routers.base import RouterOutput
from moeflow.moe.routers.moepp import ZeroComputationExperts
from moeflow.moe.routers.registry import build_router
from moeflow.moe.routing_context import RoutingContext, token_mask
from moeflow.moe.shared_expert import SharedExpert
from moeflow.moe.stats import MoEStats, Traffic, measure_stats
from moeflow.moe.upcycle import check_upcycle
from moeflow.utils.cpu_alloc import apply_once


class MoELayer(nn.Module):
    """Mixture of `num_experts` FFNs (plus a router's null or zero-computation experts); input
    `[..., D]`, output the same shape.

    In training mode (with grad enabled) `aux_loss_coeff * aux + z_loss_coeff * z` reaches the
    router's gradient through the output's backward, scaled by `aux_loss_scale` (set it to `1 /
    grad_accum_steps` if the main loss is averaged over micro-batches). For `seq_aux_loss` the input
    is read as `[B, S, D]` (batch first; any further leading dims count as batch; `[S, B, D]` with
    `sequence_first`) and a 2-D input as one sequence. `router.type` picks the router
    (`moeflow.moe.routers`); `shared` holds modules the model shares between its MoE layers (RMoE's
    GRU cell).

    Pairs routed to a null or zero-computation expert are computed on this rank (0, `x`, or the
    constant expert) and never enter the dispatcher: `last_stats.traffic.sent_bytes` counts what
    the forward all-to-all sent to other ranks. After each optimizer step call
    `finish_optimizer_step(model)` (the trainer does): it resets the step's global-batch counts and
    updates the aux-loss-free bias.

    Example:
        >>> cfg = MoEConfig(hidden_size=16, num_experts=4, ffn_hidden_size=32)
        >>> moe = MoELayer(cfg)
        >>> y = moe(torch.randn(2, 5, 16))
        >>> y.shape, moe.last_stats.tokens_per_expert.sum().item()
        (torch.Size([2, 5, 16]), 20)
    """

    def __init__(self, config: MoEConfig, shared: nn.ModuleDict | None = None) -> None:
        super().__init__()
        self.config = config
        self.router = build_router(config, shared)
        D = config.hidden_size
        # BigMac's projections around the all-to-all (`a2a_dim`): the experts are r wide.
        self.a2a = None if config.a2a_dim is None else LowDimProjection(D, config.a2a_dim)
        self.experts = GroupedExperts(
            config.num_experts, config.expert_dim, config.ffn_hidden_size, config.activation,
            config.ffn_bias,
        )  # fmt: skip
        # Every expert's output bias b2 (`MoEConfig.ffn_bias`), whole on every rank (like the
        # router), added after the combine weighted by the kept pairs' gates.
        self.ffn_out_bias = None
        if config.ffn_bias:
            self.ffn_out_bias = nn.Parameter(torch.zeros(config.num_experts, config.expert_dim))
        extra_kinds = self.router.expert_kinds[config.num_experts :]
        self.zc_experts = None
        if any(kind in ("copy", "constant") for kind in extra_kinds):
            self.zc_experts = ZeroComputationExperts(extra_kinds, config.hidden_size)
        self.shared_expert = None  # always-on experts, computed while tokens travel
        if config.shared_expert_ffn_hidden_size:
            self.shared_expert = SharedExpert(
                config.hidden_size, config.shared_expert_ffn_hidden_size, config.activation,
                config.shared_expert_gate,
            )  # fmt: skip
        self.aux_loss_scale = 1.0
        self.sequence_first = False  # seq_aux_loss reads [S, B, D] (Megatron's layout) if set
        # What the last forward measured, detached: a graph kept here would pin the step's
        # activations until the next forward and break `copy.deepcopy(model)`.
        self.last_stats: MoEStats | None = None
        self.last_losses: tuple[torch.Tensor, torch.Tensor] | None = None
        # Where the experts live and how pairs reach them in each parallel mode: one layout
        # (all experts here until `attach`), every mode per call. Not saved: checkpoints keep
        # logical ids.
        self.expert_dispatch = ExpertDispatch(
            config.num_experts, config.ffn_hidden_size, config.activation, config.expert_kernel,
            carry_weights=config.ffn_hidden_size <= config.expert_dim,
        )  # fmt: skip
        self.balance = BalanceState(self.router.num_choices)

    def set_router(self, router: nn.Module, config: MoEConfig) -> None:
        """Install another router (e.g. AdaMoE's conversion, `convert_topk_to_null`) with the
        layer config it belongs to (same experts); the balancing counts start afresh, over the
        same group."""
        old = self.config
        if (config.num_experts, config.ffn_hidden_size) != (old.num_experts, old.ffn_hidden_size):
            raise ValueError("a new router must keep the layer's experts (num_experts, ffn size)")
        group = self.balance.group
        self.router, self.config = router, config
        self.balance = BalanceState(router.num_choices).to(self.expert_dispatch.slot_table.device)
        self.balance.group = group

    # -- layout ----------------------------------------------------------------------------------
    def attach(
        self,
        layout: ExpertLayout,
        exchange: Exchange,
        group: dist.ProcessGroup | None = None,
        shard_group: dist.ProcessGroup | None = None,
        dispatch: DispatchConfig | None = None,
        balance_group: dist.ProcessGroup | None = None,
        name: str = "moe",
        two_level_exchange: Exchange | None = None,
    ) -> None:
        """Lay the experts out over an expert group (`moeflow.parallel.parallelize` calls this on
        every rank): keep this rank's expert rows and F-slice, and communicate over `exchange`
        (tokens), `group` (the expert group: agreement, `dp` gathers) and `shard_group` (the
        ranks holding slices of the same experts). `balance_group`: ranks over which
        global-batch counts and aux-free loads are summed. `two_level_exchange`: the expert
        group's two-level all-to-all, if it spans several nodes. The layer must hold every
        expert."""
        cfg = self.config
        if layout.num_experts != cfg.num_experts or layout.ffn_hidden_size != cfg.ffn_hidden_size:
            raise ValueError(
                f"MoE layer '{name}': the layout is for {layout.num_experts} experts of FFN dim "
                f"{layout.ffn_hidden_size}, the layer has {cfg.num_experts} of "
                f"{cfg.ffn_hidden_size}"
            )
        if tuple(self.experts.w2.shape[:2]) != (cfg.num_experts, cfg.ffn_hidden_size):
            raise ValueError(f"MoE layer '{name}' is already parallelized")
        self.experts.keep(layout.local_experts(exchange.rank), *layout.ffn_range(exchange.rank))
        self.expert_dispatch.attach(
            layout,
            exchange,
            group,
            shard_group,
            dispatch or DispatchConfig(),
            f"MoE layer '{name}'",
            two_level_exchange,
        )
        self.balance.group = balance_group

    @property
    def layout(self) -> ExpertLayout:
        return self.expert_dispatch.layout

    def set_layout(self, layout: ExpertLayout) -> None:
        """Record a re-placement whose expert rows have already moved (`apply_placement`)."""
        old = self.layout
        if (layout.group_size, layout.slots_per_group) != (old.group_size, old.slots_per_group):
            raise ValueError(
                f"a re-placement keeps the group size ({old.group_size}) and the rows per rank "
                f"({old.slots_per_group}); got {layout.group_size} and {layout.slots_per_group}"
            )
        self.expert_dispatch.set_layout(layout)

    @property
    def local_expert_ids(self) -> list[int]:
        """Logical ids of the expert rows this rank holds, in row order."""
        return self.layout.local_experts(self.expert_dispatch.rank)

    @property
    def local_experts(self) -> torch.Tensor:
        """`local_expert_ids` as a tensor on the layer's device."""
        return torch.tensor(self.local_expert_ids, device=self.expert_dispatch.slot_table.device)

    @property
    def expert_map(self) -> torch.Tensor:
        """`[E]`: the dispatcher slot this rank sends each expert's tokens to first in `ep` mode
        (the logical-to-physical map when nothing is replicated or sharded)."""
        return self.expert_dispatch.slot_table[:, 0]

    def reset_parameters(
        self, generator: torch.Generator | None = None, seed: int | None = None, salt: int = 0
    ) -> None:
        """Initialise in place (`moeflow.moe.layer_init`): experts seeded by `(seed, salt)`."""
        reset_layer(self, generator, seed, salt)

    def reset_buffers(self) -> None:
        """Rewrite the placement buffers from the layout and zero the balancing counts, e.g.
        after `to_empty`."""
        self.expert_dispatch.write_tables()
        device = self.expert_dispatch.slot_table.device
        if device.type != "meta":
            self.balance.reset(device)

    @classmethod
    def from_dense(
        cls, ffn: FeedForward, config: MoEConfig, shared: nn.ModuleDict | None = None
    ) -> MoELayer:
        """Sparse upcycling: every expert starts as a copy of `ffn`; the router is fresh (with
        `shared`, the model's router modules shared by its MoE layers, e.g. RMoE's GRU)."""
        check_upcycle(ffn, config)
        layer = cls(config, shared).to(device=ffn.w1.device, dtype=ffn.w1.dtype)
        layer.experts = GroupedExperts.from_dense(ffn, config.num_experts)
        if layer.ffn_out_bias is not None:
            with torch.no_grad():
                layer.ffn_out_bias.copy_(ffn.b2.detach().expand_as(layer.ffn_out_bias))
        return layer

    def forward(
        self,
        x: torch.Tensor,
        overlap_degree: int | None = None,
        routing_context: RoutingContext | None = None,
        mode: str | None = None,
        two_level: bool | None = None,
    ) -> torch.Tensor:
        """`x: [..., D]` -> `[..., D]`. `overlap_degree`, `mode` (`ep`, `sharded`, `dp`; see
        `moeflow.moe.expert_dispatch`) and `two_level` (all-to-all within nodes, then across)
        override the dispatch config's for this call: every choice computes the same math from
        the same parameters. `routing_context`, passed by the model from one MoE layer to the
        next, carries router state and a token mask, and receives this layer's router logits."""
        out, _ = self.forward_with_losses(x, overlap_degree, routing_context, mode, two_level)
        return out

    def forward_with_losses(
        self,
        x: torch.Tensor,
        overlap_degree: int | None = None,
        routing_context: RoutingContext | None = None,
        mode: str | None = None,
        two_level: bool | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """`forward`, and the balancing losses `(aux, z)` before their coefficients, still
        attached to the graph (for callers that return them, as DeepSpeed's `l_aux`); the layer
        itself keeps only their detached values (`last_losses`)."""
        cfg = self.config
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            apply_once()  # glibc keeps freed blocks for reuse (moeflow.utils.cpu_alloc)
        if x.dim() < 1 or x.shape[-1] != cfg.hidden_size:
            raise ValueError(
                f"MoELayer input last dim ({x.shape[-1] if x.dim() else None}) must equal "
                f"moe.hidden_size ({cfg.hidden_size}); got input shape {tuple(x.shape)}"
            )
        # An activation-checkpointing recomputation must not count or communicate again.
        recomputing = routing_context is not None and routing_context.recomputing
        x_TD = x.reshape(-1, cfg.hidden_size)
        route = self.router(x_TD, routing_context)
        if routing_context is not None:
            routing_context.record(route.logits_TE)
        # Routed (token, slot) pairs per choice, before capacity: the losses and the stats use it.
        routed_E = count_per_value(route.expert_ids_TK, self.router.num_choices)
        out_TD, kept_E, keep_TK, traffic = self._dispatch_and_compute(
            x_TD, route, routed_E, (overlap_degree, mode, two_level)
        )
        if self.zc_experts is not None:
            # Ids relative to the zero-computation experts (FFN ids become negative: no match).
            rel_TK = route.expert_ids_TK - cfg.num_experts
            zc_TD = self.zc_experts(x_TD.to(out_TD.dtype), rel_TK, route.weights_TK)
            out_TD = out_TD + zc_TD
        training = self.training and torch.is_grad_enabled()
        mask_T = token_mask(routing_context, x_TD.shape[0])  # padding counts in no balancing
        counted_E = masked_counts(route.expert_ids_TK, routed_E, mask_T)
        losses = layer_losses(
            cfg.router, self.router, self.balance, x, route, counted_E,
            training and not recomputing, recomputing, self.sequence_first, mask_T,
        )  # fmt: skip
        total = cfg.router.aux_loss_coeff * losses[0] + cfg.router.z_loss_coeff * losses[1]
        if training:
            out_TD = attach_loss(out_TD, total, self.aux_loss_scale)
        if not recomputing:
            self.last_losses = (losses[0].detach(), losses[1].detach())
            if training:
                self.balance.add_step_counts(counted_E)
            self.last_stats = measure_stats(
                routed_E, kept_E, keep_TK, losses, route, cfg.num_experts, cfg.router.top_k, traffic
            )
        return out_TD.view(*x.shape[:-1], out_TD.shape[-1]), losses

    def _dispatch_and_compute(
        self,
        x_TD: torch.Tensor,
        route: RouterOutput,
        routed_E: torch.Tensor,
        call: tuple[int | None, str | None, bool | None],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, Traffic]:
        """FFN pairs through the dispatcher (`call`: this call's overlap degree, mode and
        two-level choice, None for the config's); returns (out, kept pairs per FFN expert, keep
        mask, what moved)."""
        rc = self.config.router
        n = self.config.num_experts
        ids_TK = route.expert_ids_TK
        num_tokens = x_TD.shape[0]
        keep_TK = route.keep_TK  # pairs a router drops itself (DeepSpeed's gating) stay out
        if self.router.num_choices > n:  # null/zero-computation pairs stay here, out as well
            keep_TK = (ids_TK < n) if keep_TK is None else keep_TK & (ids_TK < n)
        pad_to = None
        if rc.capacity_factor is not None:
            capacity = expert_capacity(num_tokens, n, rc.top_k, rc.capacity_factor, rc.min_capacity)
            pad_to = capacity if rc.pad_to_capacity else None
            if pad_to is not None or not nothing_dropped(routed_E[:n], capacity):
                # Non-FFN pairs go to a bucket of their own (id n): they take no FFN capacity.
                cap_ids = ids_TK if keep_TK is None else torch.where(keep_TK, ids_TK, n)
                in_capacity = capacity_keep_mask(
                    cap_ids, route.weights_TK, n + (keep_TK is not None), capacity, rc.drop_policy
                )
                keep_TK = in_capacity if keep_TK is None else in_capacity & keep_TK
        # Capacity is decided on this rank's own tokens, before anything moves, so every rank
        # knows its shapes from the count exchange alone.
        if keep_TK is None:  # every pair is an FFN pair and kept: the routed counts are final
            kept_E = routed_E
        else:
            kept_E = pair_counts(ids_TK, n, keep_TK)[:-1]
            ids_TK = ids_TK.clamp(max=n - 1)
        x_in = x_TD.to(compute_dtype(x_TD))
        side = None if self.shared_expert is None else self.shared_expert.side_compute(x_in)
        x_send = x_in if self.a2a is None else self.a2a.descend(x_in)  # r wide with a2a_dim
        result = self.expert_dispatch(
            x_send,
            route.weights_TK,
            ids_TK,
            keep_TK,
            pad_to,
            (self.experts.w1, self.experts.w2),
            overlap_degree=call[0],
            mode=call[1],
            two_level=call[2],
            side=side,
        )
        traffic = Traffic(
            mode=self.expert_dispatch.last_mode,
            sent_rows=result.sent_rows,
            sent_bytes=result.sent_bytes,
            gathered_bytes=self.expert_dispatch.last_gathered_bytes,
            dispatch=result.chunks,
        )
        out_TD = result.out_TD
        if self.ffn_out_bias is not None:  # sum_k gate_k * b2[expert_k] over kept FFN pairs
            bias = gated_bias(route.weights_TK, ids_TK, keep_TK, self.ffn_out_bias)
            out_TD = out_TD + bias.to(out_TD.dtype)
        if self.a2a is not None:
            out_TD = self.a2a.ascend(out_TD)
        out_TD = out_TD if side is None else out_TD + result.side_out
        return out_TD, kept_E, keep_TK, traffic

    def finish_optimizer_step(self, group: dist.ProcessGroup | None = None) -> None:
        """After each optimizer step: update the aux-loss-free bias from the step's loads (summed
        over `group`, default the layer's `balance_group`) and reset the step's counts."""
        rate = self.config.router.bias_update_rate
        if rate > 0:
            load_E = self.balance.step_loads(group if group is not None else self.balance_group)
            bias = self.router.expert_bias
            with torch.no_grad():
                bias += rate * torch.sign(load_E.mean() - load_E).to(bias.dtype)
        self.balance.reset(self.balance.step_counts.device)

    @property
    def balance_group(self) -> dist.ProcessGroup | None:
        """Ranks over which balancing counts are summed (`parallelize` sets the world group)."""
        return self.balance.group

    @balance_group.setter
    def balance_group(self, group: dist.ProcessGroup | None) -> None:
        self.balance.group = group

"""MoELayer: a drop-in replacement for a model's feed-forward block.

Legend: T tokens, D model dim, E experts, K top-k, R rows of the expert buffer.

Data flow (DESIGN.md): route (fp32) -> capacity (optional) -> permute into an expert-sorted buffer
-> grouped expert FFNs -> un-permute and weight by the router -> balancing losses attached to the
output so that an unchanged training loop trains them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moeflow.comm.all_to_all import LocalExchange
from moeflow.comm.capacity import capacity_keep_mask, expert_capacity
from moeflow.comm.dispatcher import TokenDispatcher
from moeflow.comm.permutation import pair_counts
from moeflow.moe.aux_loss import attach_loss
from moeflow.moe.config import MoEConfig
from moeflow.moe.expert_compute import GroupedExpertCompute
from moeflow.moe.experts import GroupedExperts
from moeflow.moe.ffn import FeedForward
from moeflow.moe.grouped_ffn import compute_dtype
from moeflow.moe.losses import load_balancing_loss, seq_load_balancing_loss, z_loss
from moeflow.moe.routers.topk import RouterOutput, TopKRouter
from moeflow.moe.routing_context import RoutingContext


@dataclass(frozen=True)
class MoEStats:
    """What the last forward measured, detached (read them with `.item()` when logging).

    `aux_loss` / `z_loss` are the unscaled loss values (before their coefficients);
    `tokens_per_expert` counts the pairs each expert computed (after drops); `dropped_fraction` is
    the share of (token, slot) pairs dropped by capacity; `max_load_violation` is `(max_i routed_i -
    mean) / mean` over the router's choices before drops (DeepSeek's MaxVio; 0 is perfect balance).

    Example:
        >>> moe = MoELayer(MoEConfig(hidden_size=8, num_experts=2, ffn_hidden_size=8))
        >>> _ = moe(torch.randn(6, 8))
        >>> moe.last_stats.dropped_fraction.item()
        0.0
    """

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped_fraction: torch.Tensor
    max_load_violation: torch.Tensor


class MoELayer(nn.Module):
    """Top-k mixture of `num_experts` FFNs; input `[..., D]`, output the same shape.

    In training mode (with grad enabled) `aux_loss_coeff * aux + z_loss_coeff * z` reaches the
    router's gradient through the output's backward, scaled by `aux_loss_scale` (set it to `1 /
    grad_accum_steps` if the main loss is averaged over micro-batches). For `seq_aux_loss` the input
    is read as `[B, S, D]` (batch first; any further leading dims count as batch) and a 2-D input as
    one sequence.

    Example:
        >>> cfg = MoEConfig(hidden_size=16, num_experts=4, ffn_hidden_size=32)
        >>> moe = MoELayer(cfg)
        >>> y = moe(torch.randn(2, 5, 16))
        >>> y.shape, moe.last_stats.tokens_per_expert.sum().item()
        (torch.Size([2, 5, 16]), 20)
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.router = TopKRouter(config.hidden_size, config.num_experts, config.router)
        self.experts = GroupedExperts(
            config.num_experts, config.hidden_size, config.ffn_hidden_size, config.activation
        )
        self.aux_loss_scale = 1.0
        self.last_stats: MoEStats | None = None
        self.last_sent_rows = 0  # (token, slot) rows the last forward sent to other ranks
        self.last_dispatch = None  # the last forward's ChunkPlan (split sizes, expert blocks)
        # Logical expert -> physical slot. Slot p is local slot p % L of expert-parallel rank p //
        # L;
        # `experts` holds this rank's L slots. Not saved: checkpoints keep logical ids.
        self.register_buffer("expert_map", torch.arange(config.num_experts), persistent=False)
        # Logical ids of the experts held here, in slot order (all of them until parallelized).
        self.register_buffer("local_experts", torch.arange(config.num_experts), persistent=False)
        # Host copies, so `reset_buffers` can restore both after `to_empty` from the meta device.
        self.expert_map_ids = list(range(config.num_experts))
        self.local_expert_ids = list(range(config.num_experts))
        self.dispatcher = TokenDispatcher(LocalExchange(), slots_per_rank=config.num_experts)
        self.compute = GroupedExpertCompute(config.activation)

    def set_expert_placement(self, expert_map: list[int], local_experts: list[int]) -> None:
        """Record the logical-to-physical map and the logical ids held here (`parallelize` and
        re-placement call this), and write them into the buffers."""
        self.expert_map_ids = [int(e) for e in expert_map]
        self.local_expert_ids = [int(e) for e in local_experts]
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Rewrite the map buffers from their host copies, e.g. after `to_empty`."""
        device = self.expert_map.device
        if device.type == "meta":
            return
        self.expert_map = torch.tensor(self.expert_map_ids, dtype=torch.int64, device=device)
        self.local_experts = torch.tensor(self.local_expert_ids, dtype=torch.int64, device=device)

    @classmethod
    def from_dense(cls, ffn: FeedForward, config: MoEConfig) -> MoELayer:
        """Sparse upcycling: every expert starts as a copy of `ffn`; the router is fresh."""
        if ffn.w1.shape[0] != config.hidden_size or ffn.w2.shape[0] != config.ffn_hidden_size:
            raise ValueError(
                f"dense FFN is {ffn.w1.shape[0]}->{ffn.w2.shape[0]} but moe.hidden_size="
                f"{config.hidden_size}, moe.ffn_hidden_size={config.ffn_hidden_size}"
            )
        if ffn.activation != config.activation:
            raise ValueError(
                f"moe.activation ({config.activation!r}) differs from the dense FFN's "
                f"({ffn.activation!r})"
            )
        layer = cls(config).to(device=ffn.w1.device, dtype=ffn.w1.dtype)
        layer.experts = GroupedExperts.from_dense(ffn, config.num_experts)
        return layer

    def forward(
        self,
        x: torch.Tensor,
        overlap_degree: int | None = None,
        routing_context: RoutingContext | None = None,
    ) -> torch.Tensor:
        """`x: [..., D]` -> `[..., D]`. `overlap_degree` overrides the dispatcher's for this
        call; `routing_context`, passed by the model from one MoE layer to the next, receives this
        layer's router logits."""
        cfg = self.config
        if x.dim() < 1 or x.shape[-1] != cfg.hidden_size:
            raise ValueError(
                f"MoELayer input last dim ({x.shape[-1] if x.dim() else None}) must equal "
                f"moe.hidden_size ({cfg.hidden_size}); got input shape {tuple(x.shape)}"
            )
        x_TD = x.reshape(-1, cfg.hidden_size)
        route = self.router(x_TD)
        if routing_context is not None:
            routing_context.record(route.logits_TE)
        # Routed (token, slot) pairs per expert, before capacity: the aux loss and the stats use it.
        routed_E = torch.bincount(route.expert_ids_TK.reshape(-1), minlength=cfg.num_experts)
        out_TD, kept_E = self._dispatch_and_compute(x_TD, route, routed_E, overlap_degree)
        losses = self._losses(x, route, routed_E)
        total = cfg.router.aux_loss_coeff * losses[0] + cfg.router.z_loss_coeff * losses[1]
        if self.training and torch.is_grad_enabled():
            out_TD = attach_loss(out_TD, total, self.aux_loss_scale)
        self.last_stats = self._stats(routed_E, kept_E, losses, route.expert_ids_TK.numel())
        return out_TD.view(*x.shape[:-1], out_TD.shape[-1])

    def _dispatch_and_compute(
        self,
        x_TD: torch.Tensor,
        route: RouterOutput,
        routed_E: torch.Tensor,
        overlap_degree: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rc = self.config.router
        num_tokens = x_TD.shape[0]
        keep_TK = pad_to = None
        if rc.capacity_factor is not None:
            capacity = expert_capacity(
                num_tokens, self.config.num_experts, rc.top_k, rc.capacity_factor, rc.min_capacity
            )
            keep_TK = capacity_keep_mask(
                route.expert_ids_TK,
                route.weights_TK,
                self.config.num_experts,
                capacity,
                rc.drop_policy,
            )
            pad_to = capacity if rc.pad_to_capacity else None
        # Capacity is decided on this rank's own tokens, before anything moves, so every rank
        # knows its shapes from the count exchange alone.
        kept_E = routed_E
        if keep_TK is not None:
            kept_E = pair_counts(route.expert_ids_TK, self.config.num_experts, keep_TK)[:-1]
        slot_ids_TK = self.expert_map[route.expert_ids_TK]
        result = self.dispatcher(
            x_TD.to(compute_dtype(x_TD)),
            route.weights_TK,
            slot_ids_TK,
            self.compute,
            (self.experts.w1, self.experts.w2),
            keep_TK=keep_TK,
            pad_to=pad_to,
            overlap_degree=overlap_degree,
        )
        self.last_sent_rows = result.sent_rows
        self.last_dispatch = result.chunks
        return result.out_TD, kept_E

    def _losses(
        self, x: torch.Tensor, route: RouterOutput, routed_E: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rc = self.config.router
        num_experts = self.config.num_experts
        zero = route.logits_TE.sum() * 0.0
        aux = zero
        if rc.aux_loss_type == "aux_loss":
            aux = load_balancing_loss(route.scores_TE, routed_E, rc.top_k)
        elif rc.aux_loss_type == "seq_aux_loss":
            seq_len = x.shape[-2] if x.dim() >= 3 else route.scores_TE.shape[0]
            num_seqs = route.scores_TE.shape[0] // max(seq_len, 1)
            one_hot = torch.zeros_like(route.scores_TE).scatter_(1, route.expert_ids_TK, 1.0)
            counts_BE = one_hot.view(num_seqs, seq_len, num_experts).sum(dim=1)
            aux = seq_load_balancing_loss(
                route.scores_TE.view(num_seqs, seq_len, num_experts), counts_BE, rc.top_k
            )
        zl = z_loss(route.logits_TE) if rc.z_loss_coeff > 0 else zero
        return aux, zl

    def _stats(self, routed_E, kept_E, losses, num_pairs: int) -> MoEStats:
        with torch.no_grad():
            routed_E = routed_E.float()
            mean = routed_E.mean().clamp(min=1e-9)
            dropped = (num_pairs - kept_E.sum()).float() / max(num_pairs, 1)
            return MoEStats(
                aux_loss=losses[0].detach(),
                z_loss=losses[1].detach(),
                tokens_per_expert=kept_E.detach(),
                dropped_fraction=dropped,
                max_load_violation=(routed_E.max() - mean) / mean if num_pairs else mean * 0,
            )


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """Set the balancing-loss gradient scale of every `MoELayer` in `model`.

    Example:
        >>> model = torch.nn.Sequential(MoELayer(MoEConfig(hidden_size=8, num_experts=2,
        ...                                                ffn_hidden_size=8)))
        >>> set_aux_loss_scale(model, 1 / 4)  # 4 micro-batches per optimizer step
        >>> model[0].aux_loss_scale
        0.25
    """
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.aux_loss_scale = float(scale)

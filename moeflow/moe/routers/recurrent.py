"""RMoE: a layerwise recurrent router (docs/methods.md, "RMoE").

Legend: T tokens, D model dim, E experts, r GRU width.

One GRU cell is shared by all MoE layers of a model; each layer has a projector `W_p: D -> r` and a
head `W_r: r -> E` (no biases): `x' = W_p x; h_l = GRU(x', h_{l-1}), h_0 = 0; logits = W_r h_l`.
The recurrence runs over depth (the hidden state travels in the routing context, with its graph),
never over the sequence. The model owns the shared cell (`shared["rmoe_gru"]`); a layer built alone
owns its own. Init: `W_p` N(0, 1/D) so `x'` has unit scale, `W_r` N(0, 0.02) so early routing is
near uniform like the top-k gate, the GRU PyTorch's default U(-1/sqrt(r), 1/sqrt(r)).

Example:
    >>> from moeflow.moe.config import MoEConfig, RouterConfig
    >>> from moeflow.moe.routing_context import RoutingContext
    >>> cfg = MoEConfig(hidden_size=8, num_experts=4, ffn_hidden_size=8,
    ...                 router=RouterConfig(type="rmoe", rnn_dim=6))
    >>> ctx = RoutingContext()
    >>> _ = RecurrentRouter(cfg)(torch.randn(5, 8), ctx)
    >>> ctx.state[STATE_KEY].shape
    torch.Size([5, 6])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moeflow.moe.config import MoEConfig
from moeflow.moe.routers.base import Router, RouterOutput
from moeflow.moe.routers.registry import register_router
from moeflow.moe.routers.topk import topk_routing

STATE_KEY = "rmoe.hidden"
SHARED_KEY = "rmoe_gru"


class RecurrentRouter(Router):
    def __init__(self, config: MoEConfig, shared: nn.ModuleDict | None = None) -> None:
        super().__init__(config)
        r = config.router.rnn_dim
        self.proj = nn.Parameter(torch.empty(r, config.hidden_size))
        self.head = nn.Parameter(torch.empty(config.num_experts, r))
        if shared is None:
            self.gru = nn.GRUCell(r, r)
            self._shared = None
        else:
            if SHARED_KEY not in shared:
                shared[SHARED_KEY] = nn.GRUCell(r, r)
            gru = shared[SHARED_KEY]
            if gru.hidden_size != r:
                raise ValueError(
                    f"moe.router.rnn_dim ({r}) differs from the model's shared RMoE GRU "
                    f"({gru.hidden_size}); every RMoE layer of a model shares one cell"
                )
            self._shared = [gru]  # a plain list: the model, not this router, registers the cell
        self.reset_parameters()

    @property
    def cell(self) -> nn.GRUCell:
        return self.gru if self._shared is None else self._shared[0]

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        nn.init.normal_(self.proj, std=1.0 / math.sqrt(self.proj.shape[1]), generator=generator)
        nn.init.normal_(self.head, std=0.02, generator=generator)
        if self._shared is None:
            reset_gru(self.gru, generator)

    def forward(self, x_TD: torch.Tensor, context=None) -> RouterOutput:
        dtype = self.compute_dtype(x_TD)
        cell = self.cell
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            xp_Tr = F.linear(self.prepare_input(x_TD), self.proj.to(dtype))
            h_Tr = None if context is None else context.state.get(STATE_KEY)
            if h_Tr is None:
                h_Tr = xp_Tr.new_zeros(xp_Tr.shape)
            h_Tr = torch._VF.gru_cell(
                xp_Tr, h_Tr.to(dtype),
                cell.weight_ih.to(dtype), cell.weight_hh.to(dtype),
                cell.bias_ih.to(dtype), cell.bias_hh.to(dtype),
            )  # fmt: skip
            if context is not None:
                context.state[STATE_KEY] = h_Tr
            logits_TE = F.linear(h_Tr, self.head.to(dtype))
            weights_TK, ids_TK, scores_TE = topk_routing(
                logits_TE, self.config, self.selection_bias()
            )
        return RouterOutput(weights_TK, ids_TK, scores_TE, logits_TE)


def reset_gru(gru: nn.GRUCell, generator: torch.Generator | None = None) -> None:
    bound = 1.0 / math.sqrt(gru.hidden_size)
    with torch.no_grad():
        for p in gru.parameters():
            p.uniform_(-bound, bound, generator=generator)


register_router("rmoe", lambda config, shared: RecurrentRouter(config, shared))

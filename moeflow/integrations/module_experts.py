"""Experts that are arbitrary modules, through moeflow's dispatcher: each rank holds its experts as
modules (any `nn.Module`, as DeepSpeed's `MoE` takes), tokens travel by the same all-to-all and
count exchange as the grouped FFN experts', and each module runs on the rows routed to it.

`ModuleExpertCompute` is the dispatcher's expert compute for them (`moeflow.comm.pipeline`'s
interface): the forward runs each local expert module on its block of received rows with
autograd on, keeping the small graph of that call; the backward differentiates it for the rows'
and the modules' gradients. The parameters travel as the op's inputs, so autograd accumulates
their gradients where the model keeps them. `ModuleExperts` lays `num_experts` copies of a
module over an expert-parallel group as DeepSpeed does (rank r of W holds experts `r*L ..
r*L + L - 1`, `L = num_experts / W`) and routes with a `TokenDispatcher`.

Example (one rank: every expert here):
    >>> experts = ModuleExperts(torch.nn.Linear(4, 4), num_experts=2)
    >>> x = torch.randn(3, 4)
    >>> ids, w = torch.tensor([[0], [1], [1]]), torch.ones(3, 1)
    >>> out = experts(x, w, ids)
    >>> torch.allclose(out[1], experts.local[1](x[1]))
    True
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call

from moeflow.comm.all_to_all import GroupExchange, LocalExchange
from moeflow.comm.dispatcher import TokenDispatcher


class ModuleExpertCompute:
    """The expert compute of `ModuleExperts` (see the module doc); `params` are the local
    modules' parameters in `modules`' order."""

    weighted = False  # the dispatcher weights the outputs when it un-permutes them

    def __init__(self, modules: nn.ModuleList) -> None:
        self.modules = modules
        self.names = [[n for n, _ in m.named_parameters()] for m in modules]

    def _split(self, params) -> list[dict[str, torch.Tensor]]:
        out, i = [], 0
        for names in self.names:
            out.append(dict(zip(names, params[i : i + len(names)], strict=True)))
            i += len(names)
        return out

    def reads_tokens(self, x_TD: torch.Tensor, params) -> bool:
        return False  # each module computes its own rows: always the buffered path

    def materialize(self, params):
        return params

    def forward(self, params, x_RD: torch.Tensor, blocks):
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(p.requires_grad) for p in params]
            x = x_RD.detach().requires_grad_(True)
            y = torch.zeros_like(x)
            per_module = self._split(leaves)
            for slot, start, end in blocks:
                out = functional_call(self.modules[slot], per_module[slot], (x[start:end],))
                out = out[0] if isinstance(out, tuple) else out  # DeepSpeed keeps the first
                y = y.index_copy(0, torch.arange(start, end, device=x.device), out.to(y.dtype))
        return y.detach(), [x, y, *leaves]

    def new_grads(self, params) -> list:
        return [None] * len(params)

    def backward(self, params, saved, grad_y, blocks, acc: list) -> torch.Tensor:
        x, y, leaves = saved[0], saved[1], saved[2:]
        if not y.requires_grad:  # no row reached a local expert in this chunk
            return torch.zeros_like(x)
        wanted = [x, *(p for p in leaves if p.requires_grad)]
        with torch.enable_grad():
            grads = torch.autograd.grad(y, wanted, grad_y, allow_unused=True)
        it = iter(grads[1:])
        for i, p in enumerate(leaves):
            g = next(it) if p.requires_grad else None
            if g is not None:
                acc[i] = g if acc[i] is None else acc[i] + g
        return torch.zeros_like(x) if grads[0] is None else grads[0]

    def finish(self, acc: list) -> tuple:
        return tuple(acc)


class ModuleExperts(nn.Module):
    """`num_experts` copies of `expert`, this rank's `local` ones held here, over `group` (the
    expert-parallel group; None: one rank holds them all). `forward(x_TD, weights_TK, ids_TK,
    keep_TK)` -> `[T, D]`: each kept pair's expert output, weighted, summed per token."""

    def __init__(
        self, expert: nn.Module, num_experts: int, group: dist.ProcessGroup | None = None
    ) -> None:
        super().__init__()
        size = 1 if group is None else dist.get_world_size(group)
        if num_experts % size:
            raise ValueError(f"{num_experts} experts cannot be split evenly over {size} ranks")
        self.per_rank = num_experts // size
        self.local = nn.ModuleList(copy.deepcopy(expert) for _ in range(self.per_rank))
        self.group = group

    def __deepcopy__(self, memo):
        """A copy shares the process group (a handle, not state)."""
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            clone.__dict__[key] = value if key == "group" else copy.deepcopy(value, memo)
        return clone

    def forward(self, x_TD, weights_TK, ids_TK, keep_TK=None) -> torch.Tensor:
        exchange = LocalExchange() if self.group is None else GroupExchange(self.group)
        dispatcher = TokenDispatcher(exchange, self.per_rank)
        dispatcher.name = "module experts"
        params = tuple(p for m in self.local for p in m.parameters())
        compute = ModuleExpertCompute(self.local)
        return dispatcher(x_TD, weights_TK, ids_TK, compute, params, keep_TK=keep_TK).out_TD

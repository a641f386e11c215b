"""RoutingStats: per-layer expert loads and the cross-layer co-routing matrix, measured while
training, decayed over a window of steps.

Shape legend: T tokens, K top-k, L MoE layers, E FFN experts per layer.

Cost per micro-batch: one `bincount` of T*K ids per layer and one of T*K*K pair ids per pair of
consecutive layers, on the device, with no host sync and no communication. Per optimizer step:
`decay * window + step` (L*E + (L-1)*E*E multiply-adds). Only `snapshot(group)` communicates: one
all-reduce of the window over `group`. Decay is linear, so reducing the ranks' decayed windows
equals decaying the reduced counts: ranks never talk between snapshots.

Ids at or above E (null and zero-computation experts) are not FFN work and are left out.

Example:
    >>> stats = RoutingStats(num_layers=2, num_experts=3, decay=0.5)
    >>> stats.observe([torch.tensor([[0, 1]]), torch.tensor([[2, 2]])])
    >>> stats.end_step()
    >>> trace = stats.snapshot()
    >>> trace.loads.tolist(), trace.co_routing[0][0].tolist()
    ([[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]], [0.0, 0.0, 1.0])
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moeflow.placement.trace import RoutingTrace


class RoutingStats:
    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        decay: float = 0.98,
        device: torch.device | str = "cpu",
        layer_names: list[str] | None = None,
    ) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"placement.decay ({decay}) must be in (0, 1]; 1 keeps every step")
        if num_layers < 1 or num_experts < 1:
            raise ValueError(f"RoutingStats needs layers and experts ({num_layers}, {num_experts})")
        self.num_layers, self.num_experts, self.decay = num_layers, num_experts, decay
        self.layer_names = layer_names or [f"moe.{i}" for i in range(num_layers)]
        e, pairs = num_experts, max(num_layers - 1, 0)
        opts = {"dtype": torch.float64, "device": device}
        self.step_loads = torch.zeros(num_layers, e, **opts)
        self.step_co = torch.zeros(pairs, e * e, **opts)
        self.loads = torch.zeros(num_layers, e, **opts)
        self.co = torch.zeros(pairs, e * e, **opts)
        self.steps = 0

    def observe(self, expert_ids: list[torch.Tensor]) -> None:
        """Add one micro-batch: `expert_ids[l]` is MoE layer l's `[T, K]` routing of the same T
        tokens (in the same order) as every other layer's."""
        if len(expert_ids) != self.num_layers:
            raise ValueError(
                f"RoutingStats tracks {self.num_layers} MoE layers, got ids for {len(expert_ids)}"
            )
        e = self.num_experts
        flat = []
        for layer, ids_TK in enumerate(expert_ids):
            ids_TK = ids_TK.detach().reshape(ids_TK.shape[0], -1)
            ffn = ids_TK[ids_TK < e]
            self.step_loads[layer] += torch.bincount(ffn, minlength=e)[:e].to(torch.float64)
            flat.append(ids_TK)
        for layer in range(self.num_layers - 1):
            a_TK, b_TK = flat[layer], flat[layer + 1]
            if a_TK.shape[0] != b_TK.shape[0]:
                raise ValueError(
                    f"MoE layers {layer} and {layer + 1} routed {a_TK.shape[0]} and "
                    f"{b_TK.shape[0]} tokens: co-routing needs the same tokens in both"
                )
            k_next = b_TK.shape[1]
            pair_TKK = a_TK[:, :, None] * e + b_TK[:, None, :]
            keep = (a_TK[:, :, None] < e) & (b_TK[:, None, :] < e)
            counts = torch.bincount(pair_TKK[keep], minlength=e * e)
            self.step_co[layer] += counts.to(torch.float64) / k_next

    def end_step(self) -> None:
        """Fold this optimizer step's counts into the decayed window (no communication)."""
        self.loads.mul_(self.decay).add_(self.step_loads)
        self.co.mul_(self.decay).add_(self.step_co)
        self.step_loads.zero_()
        self.step_co.zero_()
        self.steps += 1

    def reset(self) -> None:
        for t in (self.step_loads, self.step_co, self.loads, self.co):
            t.zero_()
        self.steps = 0

    def snapshot(self, group: dist.ProcessGroup | None = None) -> RoutingTrace:
        """The window summed over `group` (collective over it when given) as a `RoutingTrace`."""
        flat = torch.cat([self.loads.reshape(-1), self.co.reshape(-1)])
        if group is not None:
            flat = flat.clone()
            dist.all_reduce(flat, group=group)
        e, n = self.num_experts, self.num_layers
        loads = flat[: n * e].reshape(n, e).cpu().numpy()
        co = flat[n * e :].reshape(max(n - 1, 0), e, e).cpu().numpy()
        meta = {"steps": self.steps, "decay": self.decay}
        return RoutingTrace(loads, co, list(self.layer_names), meta)

"""DeepSpeed's gating decisions as a moeflow router, so the DeepSpeed-style `MoE` keeps the tokens
DeepSpeed keeps and returns its `l_aux` and `exp_counts`.

Legend: T tokens, E experts, K top-k, C capacity. `probs = softmax(x W^T)` in float32 (the gate
input is cast to float32, as DeepSpeed does, whatever the model's dtype).

- **k = 1**: each token's argmax expert (of `logits + Gumbel noise` with `noisy_gate_policy =
  "RSample"` in training). With `drop_tokens`, `C = max(ceil(T / E * capacity_factor),
  min_capacity)` and each expert keeps C of its tokens: those with the largest random key
  (`use_rts`, random token selection: one uniform draw per (token, expert), taken from the
  global RNG stream exactly where DeepSpeed takes it) or, without it, `torch.topk`'s pick among
  equal keys. The kept token's weight is its probability (not renormalised). `used_token`
  (a 0/1 mask per token) removes tokens from routing altogether.
- **k = 2**: the argmax expert, then the argmax of the other logits (plus Gumbel noise when
  `top2_2nd_expert_sampling`, DeepSpeed's default, in training and evaluation alike). Positions in
  an expert's buffer: every first choice in token order, then every second choice; with
  `drop_tokens`, `C = max(ceil(T / E * 2 * capacity_factor), min_capacity)` and pairs past C drop.
  The two weights are renormalised over the pairs kept (a token with one pair dropped gets weight
  1 on the other).
- **k >= 3**: top-k of the probabilities; with `drop_tokens`, `C = max(ceil(T / E * k *
  capacity_factor), min_capacity)` and each expert keeps its C pairs of largest probability; the
  weights are renormalised over the pairs kept.

`capacity_factor` applies in training, `eval_capacity_factor` in evaluation. `exp_counts` counts
every routed pair before drops; `l_aux = E * sum_i mean_t(probs_ti) * f_i` with `f_i` the share of
tokens whose first choice is i (k = 1, 2) or of the pairs routed to i over T*k (k >= 3).

Example (top-1, capacity 4 of 12 tokens on 2 experts: at most 4 kept per expert):
    >>> from moeflow.moe.config import MoEConfig
    >>> gate = DeepSpeedGate(MoEConfig(hidden_size=8, num_experts=2, ffn_hidden_size=8), k=1,
    ...                      capacity_factor=0.5, min_capacity=4, use_rts=False)
    >>> route = gate(torch.randn(12, 8))
    >>> kept = torch.zeros(2, dtype=torch.long).index_add_(
    ...     0, route.expert_ids_TK[:, 0], route.keep_TK[:, 0].long())
    >>> kept.max().item() <= 4, int(gate.last_exp_counts.sum())
    (True, 12)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeflow.moe.config import MoEConfig
from moeflow.moe.routers.base import Router, RouterOutput


class DeepSpeedGate(Router):
    """DeepSpeed's `TopKGate` semantics (module doc) behind moeflow's router interface. After
    each call `last_l_aux` (differentiable) and `last_exp_counts` hold DeepSpeed's two extra
    outputs until the caller takes them (`take_outputs`)."""

    def __init__(
        self,
        config: MoEConfig,
        k: int = 1,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float = 1.0,
        min_capacity: int = 4,
        noisy_gate_policy: str | None = None,
        drop_tokens: bool = True,
        use_rts: bool = True,
        top2_2nd_expert_sampling: bool = True,
    ) -> None:
        super().__init__(config)
        # DeepSpeed's gate has no selection bias (moeflow's aux-loss-free one stays 0 here): not
        # saved, so the layer's state dict is DeepSpeed's (`moeflow.integrations.deepspeed_keys`).
        self.register_buffer("expert_bias", self.expert_bias, persistent=False)
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        nn.init.normal_(self.weight, std=0.02)
        self.k, self.min_capacity = k, min_capacity
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.noisy_gate_policy = None if noisy_gate_policy == "None" else noisy_gate_policy
        self.drop_tokens, self.use_rts = drop_tokens, use_rts
        self.top2_2nd_expert_sampling = top2_2nd_expert_sampling
        self.used_token: torch.Tensor | None = None  # set for one call by the MoE layer
        self.last_l_aux: torch.Tensor | None = None
        self.last_exp_counts: torch.Tensor | None = None

    def take_outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(l_aux, exp_counts)` of the last call, released from the gate."""
        out = (self.last_l_aux, self.last_exp_counts)
        self.last_l_aux = self.last_exp_counts = None
        return out

    def _capacity(self, num_tokens: int, per_token: int) -> torch.Tensor:
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        # float32 arithmetic, as DeepSpeed's (a float64 product may round the other way)
        cap = torch.ceil((num_tokens / self.num_experts) * torch.tensor(factor * per_token))
        return torch.maximum(cap.to(torch.int64), torch.tensor(self.min_capacity))

    def forward(self, x_TD: torch.Tensor, context=None) -> RouterOutput:
        x = x_TD.float()
        if self.noisy_gate_policy == "Jitter" and self.training:
            low = torch.tensor(1.0 - 0.01, device=x.device)
            high = torch.tensor(1.0 + 0.01, device=x.device)
            x = x * (low + torch.rand(x.shape, device=x.device) * (high - low))
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x, self.weight.float())
            if self.k == 1:
                out = self._top1(logits)
            elif self.k == 2:
                out = self._top2(logits)
            else:
                out = self._topk(logits)
        weights_TK, ids_TK, keep_TK, probs, self.last_l_aux, self.last_exp_counts = out
        return RouterOutput(weights_TK, ids_TK, probs, logits, keep_TK)

    def _top1(self, logits: torch.Tensor):
        probs = F.softmax(logits, dim=1)
        num_tokens, num_experts = probs.shape
        choose = probs
        if self.noisy_gate_policy == "RSample" and self.training:
            choose = logits + _gumbel(logits)
        ids = torch.argmax(choose, dim=1)
        mask = F.one_hot(ids, num_classes=num_experts)
        if self.used_token is not None:
            mask = mask * self.used_token.reshape(-1, 1).to(mask.dtype)
        exp_counts = mask.sum(dim=0).detach()
        l_aux = (probs.mean(dim=0) * mask.float().mean(dim=0)).sum() * num_experts
        keys = mask
        if self.use_rts:  # drawn whenever DeepSpeed draws it, dropless or not
            keys = mask * torch.rand(mask.shape, device=mask.device)
        if self.drop_tokens:
            capacity = int(self._capacity(num_tokens, 1))
            top = torch.topk(keys, k=min(capacity, num_tokens), dim=0)[1]
            mask = mask * torch.zeros_like(mask).scatter_(0, top, 1)
        # Dropless, DeepSpeed's capacity is the largest expert count, so its top-k keeps every
        # routed token: the mask as it is, without reading that count on the host.
        keep = mask.sum(dim=1, keepdim=True) > 0
        weights = (probs * mask).sum(dim=1, keepdim=True)
        return weights, ids[:, None], keep, probs, l_aux, exp_counts

    def _top2(self, logits: torch.Tensor):
        probs = F.softmax(logits, dim=1)
        num_tokens, num_experts = probs.shape
        ids1 = torch.argmax(probs, dim=1)
        mask1 = F.one_hot(ids1, num_classes=num_experts)
        second = logits
        if self.top2_2nd_expert_sampling:
            second = logits + _gumbel(logits)
        ids2 = torch.argmax(second.masked_fill(mask1.bool(), float("-inf")), dim=1)
        mask2 = F.one_hot(ids2, num_classes=num_experts)
        where1 = torch.cumsum(mask1, dim=0) - 1
        where2 = torch.cumsum(mask2, dim=0) - 1 + mask1.sum(dim=0, keepdim=True)
        l_aux = (probs.mean(dim=0) * mask1.float().mean(dim=0)).sum() * num_experts
        exp_counts = (mask1 + mask2).sum(dim=0).detach()
        if self.drop_tokens:
            capacity = self._capacity(num_tokens, 2)
            mask1, mask2 = mask1 * (where1 < capacity), mask2 * (where2 < capacity)
        g1 = (probs * mask1.float()).sum(dim=1)
        g2 = (probs * mask2.float()).sum(dim=1)
        denom = torch.clamp(g1 + g2, min=torch.finfo(g1.dtype).eps)
        weights = torch.stack([g1 / denom, g2 / denom], dim=1)
        keep = torch.stack([mask1.sum(dim=1) > 0, mask2.sum(dim=1) > 0], dim=1)
        return weights, torch.stack([ids1, ids2], dim=1), keep, probs, l_aux, exp_counts

    def _topk(self, logits: torch.Tensor):
        probs = F.softmax(logits, dim=1)
        num_tokens, num_experts = probs.shape
        top_p, ids = torch.topk(probs, k=self.k, dim=1)
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, ids, True)
        exp_counts = mask.sum(dim=0).detach()
        f = mask.float().mean(dim=0)
        l_aux = (probs.mean(dim=0) * f).mean() * num_experts * num_experts / self.k
        if self.drop_tokens:
            capacity = self._capacity(num_tokens, self.k)
            ranked = torch.zeros_like(probs).scatter(1, ids, top_p)
            pick = min(int(capacity), num_tokens)
            _, rows = torch.topk(ranked, k=pick, dim=0, sorted=False)
            mask = mask & torch.zeros_like(mask).scatter_(0, rows, True)
        kept = probs * mask
        kept = kept / torch.clamp(kept.sum(dim=-1, keepdim=True), min=torch.finfo(kept.dtype).eps)
        return kept.gather(1, ids), ids, mask.gather(1, ids), probs, l_aux, exp_counts


def _gumbel(like: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise of `like`'s shape, drawn as DeepSpeed draws it."""
    zero = torch.tensor(0.0, device=like.device)
    return torch.distributions.gumbel.Gumbel(zero, zero + 1.0).rsample(like.shape)

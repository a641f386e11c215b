"""Slow, per-token float64 reference of one MoE layer, written from the papers' math
(docs/methods.md), not from moeflow.

Python loops over tokens, experts and slots; every rule spelled out. Used to check the vectorised
layer's forward, its gradients and its balancing losses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moeflow.moe.config import MoEConfig


def act(h: torch.Tensor, name: str) -> torch.Tensor:
    if name == "swiglu":
        f = h.shape[-1] // 2
        return F.silu(h[..., :f]) * h[..., f:]
    if name == "gelu":
        return F.gelu(h)
    if name == "gelu_tanh":  # 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3))), GPT-2's gelu_new
        return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))
    return torch.relu(h)


def route_token(logits_E: torch.Tensor, cfg: MoEConfig) -> tuple[list[int], list[torch.Tensor]]:
    rc = cfg.router
    k = rc.top_k
    if rc.score_function == "softmax":
        probs = torch.softmax(logits_E, -1)
        ids = sorted(range(len(probs)), key=lambda e: (-float(probs[e].detach()), e))[:k]
        if rc.pre_softmax:
            w = [probs[e] for e in ids]
            if rc.normalize_topk:
                s = sum(w)
                w = [wi / s for wi in w]
        else:
            sel = torch.stack([logits_E[e] for e in ids])
            w = list(torch.softmax(sel, -1))
    else:
        sig = torch.sigmoid(logits_E)
        ids = sorted(range(len(sig)), key=lambda e: (-float(sig[e].detach()), e))[:k]
        w = [sig[e] for e in ids]
        if rc.normalize_topk:
            s = sum(w) + 1e-20
            w = [wi / s for wi in w]
    return ids, w


def keep_pairs(ids: list[list[int]], weights: list[list[torch.Tensor]], cfg: MoEConfig) -> set:
    """Set of kept (t, k) pairs under capacity."""
    rc = cfg.router
    T, K, E = len(ids), rc.top_k, cfg.num_experts
    pairs = [(t, k) for t in range(T) for k in range(K)]
    if rc.capacity_factor is None:
        return set(pairs)
    cap = max(math.ceil(T * K / E * rc.capacity_factor), rc.min_capacity)
    kept = set()
    for e in range(E):
        mine = [(t, k) for (t, k) in pairs if ids[t][k] == e]
        if rc.drop_policy == "probs":
            mine.sort(key=lambda p: (-float(weights[p[0]][p[1]].detach()), p[0] * K + p[1]))
        else:  # first choices first, then token order
            mine.sort(key=lambda p: (p[1], p[0]))
        kept.update(mine[:cap])
    return kept


def reference_moe(
    x_TD: torch.Tensor,
    router_w: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    cfg: MoEConfig,
    seq_len: int | None = None,
    b1: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    a2a: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """Returns (out_TD, aux_loss, z_loss, kept_counts). With biases `b1 [E, gF]`, `b2 [E, H]`,
    expert e is `act(x w1[e] + b1[e]) w2[e] + b2[e]`. With `a2a = (down [D, r], up [r, D])`
    (the low-dimension all-to-all) the experts read `x down` and the weighted sum is multiplied
    by `up`; the router still reads x."""
    T = x_TD.shape[0]
    E, K = cfg.num_experts, cfg.router.top_k
    logits = [router_w @ x_TD[t] for t in range(T)]
    routes = [route_token(logits[t], cfg) for t in range(T)]
    ids = [r[0] for r in routes]
    weights = [r[1] for r in routes]
    kept = keep_pairs(ids, weights, cfg)
    outs = []
    counts = [0] * E
    for t in range(T):
        x_t = x_TD[t] if a2a is None else x_TD[t] @ a2a[0]
        acc = torch.zeros_like(x_t)
        for k in range(K):
            if (t, k) not in kept:
                continue
            e = ids[t][k]
            counts[e] += 1
            h = x_t @ w1[e] + (0.0 if b1 is None else b1[e])
            y = act(h, cfg.activation) @ w2[e] + (0.0 if b2 is None else b2[e])
            acc = acc + weights[t][k] * y
        outs.append(acc if a2a is None else acc @ a2a[1])
    out = torch.stack(outs) if outs else x_TD.new_zeros(0, x_TD.shape[1])

    def scores(lg):
        if cfg.router.score_function == "softmax":
            return torch.softmax(lg, -1)
        s = torch.sigmoid(lg)
        return s / (s.sum() + 1e-20)

    def aux_of(token_range):
        n = len(token_range)
        total = 0.0
        for i in range(E):
            p_sum = sum(scores(logits[t])[i] for t in token_range)
            cnt = sum(1 for t in token_range if i in ids[t])
            total = total + p_sum * cnt
        return total * E / (K * n * n)

    if cfg.router.aux_loss_type == "aux_loss":
        aux = aux_of(range(T))
    elif cfg.router.aux_loss_type == "seq_aux_loss":
        S = seq_len or T
        aux = sum(aux_of(range(b * S, (b + 1) * S)) for b in range(T // S)) / (T // S)
    else:
        aux = torch.zeros((), dtype=x_TD.dtype)
    z = sum(torch.logsumexp(lg, -1) ** 2 for lg in logits) / T
    return out, aux, z, counts

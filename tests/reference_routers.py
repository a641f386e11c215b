"""Slow per-token float64 references of the routers of docs/methods.md (AdaMoE, MoE++, RMoE),
written from the paper summaries, not from moeflow: Python loops over tokens and choices."""

from __future__ import annotations

import torch

from tests.reference import act


def gru_step(x, h, w_ih, w_hh, b_ih, b_hh):
    """The GRU equations (reset r, update z, candidate n), gate order r, z, n as in PyTorch."""
    gi = w_ih @ x + b_ih
    gh = w_hh @ h + b_hh
    r_dim = h.shape[0]
    r = torch.sigmoid(gi[:r_dim] + gh[:r_dim])
    z = torch.sigmoid(gi[r_dim : 2 * r_dim] + gh[r_dim : 2 * r_dim])
    n = torch.tanh(gi[2 * r_dim :] + r * gh[2 * r_dim :])
    return (1 - z) * n + z * h


def pick(values, k, order=None):
    """Indices of the k largest values; ties go to the earlier index in `order`."""
    order = list(range(len(values))) if order is None else order
    position = {e: i for i, e in enumerate(order)}
    return sorted(range(len(values)), key=lambda e: (-float(values[e].detach()), position[e]))[:k]


def reference_routed_layer(x_TD, logits, kinds, p, cfg, counts_override=None):
    """Output, aux loss and z loss of one layer, given per-token logits over all choices.

    kinds[e]: "ffn", "null", "zero", "copy" or "constant"; p: dict with w1, w2 (FFN experts),
    const_gate, const_value (constant experts). Weights: AdaMoE renormalises over the selected FFN
    experts; otherwise post-softmax top-k (softmax over the k selected logits).
    """
    T = x_TD.shape[0]
    K = cfg.router.top_k
    E = len(kinds)
    n = kinds.count("ffn")
    is_null = cfg.router.type == "null"
    order = None
    if is_null:
        m = E - n
        order = [c for i in range(n) for c in [i] + [n + j for j in range(m) if j % n == i]]
    outs, ids_all = [], []
    probs_all = [torch.softmax(lg, -1) for lg in logits]
    for t in range(T):
        probs = probs_all[t]
        ids = pick(probs if is_null else logits[t], K, order)
        ids_all.append(ids)
        if is_null:
            true_sum = sum(probs[e] for e in ids if e < n)
            w = [probs[e] / true_sum if e < n else probs[e] * 0 for e in ids]
        else:
            w = list(torch.softmax(torch.stack([logits[t][e] for e in ids]), -1))
        acc = torch.zeros_like(x_TD[t])
        const_ids = [e for e in range(E) if kinds[e] == "constant"]
        for e, we in zip(ids, w, strict=True):
            kind = kinds[e]
            if kind == "ffn":
                acc = acc + we * (act(x_TD[t] @ p["w1"][e], cfg.activation) @ p["w2"][e])
            elif kind == "copy":
                acc = acc + we * x_TD[t]
            elif kind == "constant":
                j = const_ids.index(e)
                a = torch.softmax(p["const_gate"][j] @ x_TD[t], -1)
                acc = acc + we * (a[0] * x_TD[t] + a[1] * p["const_value"][j])
        outs.append(acc)
    counts = [sum(1 for t in range(T) if e in ids_all[t]) for e in range(E)]
    if counts_override is not None:
        counts = list(counts_override)
    if is_null:
        null_mean = sum(counts[n:]) / (E - n)
        counts = counts[:n] + [null_mean] * (E - n)
    eta = [1.0 if kinds[e] == "ffn" else cfg.router.zc_tau for e in range(E)]
    if cfg.router.type != "moepp":
        eta = [1.0] * E
    total = sum(counts)
    aux = (
        sum(
            eta[e] * (counts[e] / total) * (sum(probs_all[t][e] for t in range(T)) / T)
            for e in range(E)
        )
        * E
    )
    z = sum(torch.logsumexp(lg, -1) ** 2 for lg in logits) / T
    return torch.stack(outs), aux, z, ids_all


def moepp_logits(x_TD, w, residual, previous):
    return [w @ x_TD[t] + (residual @ previous[t] if previous is not None else 0.0)
            for t in range(x_TD.shape[0])]  # fmt: skip


def rmoe_logits(x_TD, proj, head, gru, h_prev):
    logits, hs = [], []
    for t in range(x_TD.shape[0]):
        h0 = h_prev[t] if h_prev is not None else x_TD.new_zeros(proj.shape[0])
        h = gru_step(proj @ x_TD[t], h0, *gru)
        hs.append(h)
        logits.append(head @ h)
    return logits, torch.stack(hs)


def null_logits(x_TD, w_true, w_null):
    w = torch.cat([w_true, w_null])
    return [w @ x_TD[t] for t in range(x_TD.shape[0])]

"""The routers the option tests cross with the layer's other options, as `RouterConfig` keyword
arguments (top-k and capacity come from each case): one small instance of each."""

from __future__ import annotations

ROUTER_KINDS = {
    "topk": {},
    "null": {"type": "null", "num_null_experts": 4},
    "moepp": {"type": "moepp", "zero_experts": 1, "copy_experts": 1, "constant_experts": 1},
    "rmoe": {"type": "rmoe", "rnn_dim": 6},
    "seq-aux-z": {"aux_loss_type": "seq_aux_loss", "z_loss_coeff": 1e-2},
    "bias-balance": {"bias_update_rate": 0.1},
    "sigmoid": {"score_function": "sigmoid"},
}


def router_kinds(*names: str) -> dict[str, dict]:
    """The named kinds, in the order given."""
    return {name: ROUTER_KINDS[name] for name in names}

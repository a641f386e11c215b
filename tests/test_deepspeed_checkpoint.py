"""State dicts of the DeepSpeed-style `MoE` (`moeflow.integrations.deepspeed_keys`), beside the
ported DeepSpeed suite, in one process: a state dict of DeepSpeed's own `MoE` (ep 1) loads into the
drop-in, which then computes DeepSpeed's outputs, and the drop-in's state dict has DeepSpeed's keys
and loads into DeepSpeed's `MoE`, for every kind of expert; moeflow's own layout still loads; a
missing key is named as DeepSpeed names it. The engine's checkpoints (`save_checkpoint`,
`load_checkpoint`; ZeRO 0, 1, 2; ep 1 and 2; DeepSpeed's per-rank expert files) are checked in
`tests/test_integration_deepspeed.py`'s spawned world.
"""

from __future__ import annotations

import logging

import pytest
import torch

logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
from deepspeed.moe.layer import MoE as TheirMoE  # noqa: E402

from moeflow.integrations.deepspeed import MoE  # noqa: E402
from moeflow.moe.ffn import FeedForward  # noqa: E402

D = 8
EXPERTS = {
    "gelu-biased": lambda: torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.GELU(),
                                               torch.nn.Linear(16, D)),
    "relu-unbiased": lambda: torch.nn.Sequential(torch.nn.Linear(D, 16, bias=False),
                                                 torch.nn.ReLU(),
                                                 torch.nn.Linear(16, D, bias=False)),
    "feedforward-swiglu": lambda: FeedForward(D, 6, "swiglu", bias=True),
    "silu-modules": lambda: torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.SiLU(),
                                                torch.nn.Linear(16, D)),
}  # fmt: skip


def randomise(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def outputs(layer, x: torch.Tensor, seed: int = 3):
    torch.manual_seed(seed)
    out, l_aux, counts = layer(x)
    return out, l_aux, counts


@pytest.mark.filterwarnings("ignore:MoE\\(expert=")
@pytest.mark.parametrize("expert", list(EXPERTS))
def test_deepspeeds_moe_state_dict_loads_into_the_drop_in_and_back(expert):
    """DeepSpeed's `MoE` (ep 1) -> the drop-in: strict, the same outputs (DeepSpeed's defaults: k =
    1 with random token selection, the same seed); the drop-in's state dict has DeepSpeed's keys
    and shapes and loads into a fresh DeepSpeed `MoE`, giving back every tensor exactly."""
    make = EXPERTS[expert]
    torch.manual_seed(0)
    theirs = TheirMoE(D, make(), num_experts=4)
    randomise(theirs, 1)
    ours = MoE(D, make(), num_experts=4)
    assert ours.per_expert_modules == (expert == "silu-modules")
    result = ours.load_state_dict(theirs.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(2))
    for got, want in zip(outputs(ours, x), outputs(theirs, x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # fp32, summed in another order

    saved = ours.state_dict()
    assert {k: v.shape for k, v in saved.items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    back = TheirMoE(D, make(), num_experts=4)
    back.load_state_dict(saved)
    for key, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_moeflows_own_layout_still_loads_and_missing_keys_are_deepspeeds():
    """The drop-in's state dict before DeepSpeed's layout (`router.weight`, `experts.w1`, ...,
    `router.expert_bias`) loads strictly; a DeepSpeed-layout dict without one expert's bias names
    that key, as DeepSpeed names it, and a wrong shape is refused naming the key."""
    make = EXPERTS["gelu-biased"]
    torch.manual_seed(0)
    source = MoE(D, make(), num_experts=4)
    randomise(source, 4)
    old = {
        "router.weight": source.router.weight, "router.expert_bias": torch.zeros(4),
        "experts.w1": source.experts.w1, "experts.w2": source.experts.w2,
        "ffn_out_bias": source.ffn_out_bias,
    }  # fmt: skip
    ours = MoE(D, make(), num_experts=4)
    ours.load_state_dict(old)
    for key, value in source.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key

    partial = source.state_dict()
    gone = "deepspeed_moe.experts.deepspeed_experts.2.2.bias"
    del partial[gone]
    with pytest.raises(RuntimeError, match=rf'Missing key\(s\) in state_dict: "{gone}"'):
        MoE(D, make(), num_experts=4).load_state_dict(partial)
    partial[gone] = torch.zeros(D + 1)
    with pytest.raises(RuntimeError, match=rf"size mismatch for {gone}: .*\[?{D + 1}"):
        MoE(D, make(), num_experts=4).load_state_dict(partial)

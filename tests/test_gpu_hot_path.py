"""The MoE hot path on a CUDA GPU (skipped, with the reason, where there is none; `bench/
gpu_check.sh` runs them with its GPU benches): with capacity padding a layer's forward and
backward never make the host wait (`torch.cuda.set_sync_debug_mode("error")` raises at any
synchronising call), compiled too; dropless, the one read of the call (the count exchange's split
sizes) is the only synchronising call. On CPU the same budget is counted by
`tests/test_host_reads.py`."""

from __future__ import annotations

import warnings

import pytest
import torch

from moeflow import MoEConfig, MoELayer, RouterConfig
from moeflow.comm.host_read import count_reads

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: counts the host synchronisations of an MoE layer call on the GPU "
    "(tests/test_host_reads.py counts the host reads on CPU)",
)


def layer(router: RouterConfig) -> MoELayer:
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=64, num_experts=8, ffn_hidden_size=128, router=router)
    return MoELayer(cfg).to(device="cuda", dtype=torch.bfloat16)


def step(m, x):
    y = m(x)
    y.float().square().mean().backward()
    return y


def test_padded_layer_never_synchronises():
    m = layer(RouterConfig(top_k=2, capacity_factor=1.25, pad_to_capacity=True))
    x = torch.randn(4, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    step(m, x)  # first call: lazy initialisation (cuBLAS handles, allocator) may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with count_reads() as reads:
            for _ in range(3):
                step(m, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert reads == []


def test_dropless_layer_synchronises_once_per_call_at_its_one_read():
    m = layer(RouterConfig(top_k=2))
    x = torch.randn(4, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    step(m, x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught, count_reads() as reads:
            warnings.simplefilter("always")
            step(m, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert reads == ["dispatch counts"]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


def test_compiled_padded_layer_on_the_gpu_equals_eager():
    m = layer(RouterConfig(top_k=2, capacity_factor=1.25, pad_to_capacity=True)).float()
    x = torch.randn(4, 64, 64, device="cuda")
    want = m(x)
    torch._dynamo.reset()
    got = torch.compile(m, fullgraph=True)(x)
    # TF32 may be off or on for either; inductor fuses and reorders fp32 sums: 1e-3 relative.
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_fused_adamw_steps_from_state_made_before_the_first_step():
    """The trainer makes AdamW's state before the first step (to load a checkpoint into it);
    a fused update reads the step counter on the GPU (tests/test_optimizer_state.py checks
    where the counter is made on CPU)."""
    from moeflow.train.expert_keys import init_optimizer_state

    m = layer(RouterConfig(top_k=2)).float()
    optimizer = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
    init_optimizer_state(optimizer)
    step(m, torch.randn(4, 64, 64, device="cuda"))
    optimizer.step()
    assert all(s["step"].device.type == "cuda" for s in optimizer.state.values())

"""AdamW's state made before the first step (so a checkpoint can be loaded into it) and loaded
from a checkpoint is where torch's own first step would put it: fused and capturable groups keep
the step counter on the parameter's device in float32 (their kernels read it there: a counter on
the host fails in a fused update on an accelerator), the others on the host in the default float
precision."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moeflow.train.expert_keys import init_optimizer_state

KINDS = {
    "fused": {"fused": True},
    "foreach": {"foreach": True},
    "for_loop": {"foreach": False},
}  # capturable groups step on accelerators only: the meta test below


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def default_dtype(request):
    before = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(before)


def _counters(kind: str, made_by_torch: bool) -> list[tuple[torch.dtype, torch.device]]:
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, **KINDS[kind])
    if made_by_torch:
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
    else:
        init_optimizer_state(optimizer)
    return [(s["step"].dtype, s["step"].device) for s in optimizer.state.values()]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_step_counter_is_made_as_torch_makes_it(kind, default_dtype):
    assert _counters(kind, made_by_torch=False) == _counters(kind, made_by_torch=True)


def test_step_counter_of_a_capturable_group_is_on_the_parameters_device():
    """Parameters on another device than the host (meta stands in for an accelerator)."""
    param = nn.Parameter(torch.empty(4, 4, device="meta"))
    optimizer = torch.optim.AdamW([param], capturable=True)
    init_optimizer_state(optimizer)
    step = optimizer.state[param]["step"]
    assert step.device.type == "meta" and step.dtype == torch.float32


def test_a_loaded_step_counter_is_made_as_torch_makes_it(tmp_path, default_dtype):
    """`load_checkpoint` sets the counters from the checkpoint's step count, for a fused
    optimizer as a fused first step would (float32 whatever the default precision)."""
    from moeflow.train.checkpoint import load_checkpoint, save_checkpoint
    from moeflow.train.distributed import init_distributed, shutdown

    runtime = init_distributed(60.0)
    try:
        model = nn.Linear(3, 2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        init_optimizer_state(optimizer)
        meta = {"optimizer_steps": 7}
        path = save_checkpoint(tmp_path, 7, model, optimizer, meta, rank_state={})
        fused = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
        load_checkpoint(path, model, fused)
        steps = [s["step"] for s in fused.state.values()]
        assert [(s.dtype, s.device.type, s.item()) for s in steps] == [
            (torch.float32, "cpu", 7.0)
        ] * 2
    finally:
        shutdown(runtime)

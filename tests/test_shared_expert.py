"""Shared experts (always-on, optionally gated) beside the routed ones: the layer equals the
routed layer plus the shared FFN, gradients included; the shared expert runs while the first
dispatch transfer is in flight, forward and backward; bad settings name the field."""

from __future__ import annotations

import copy

import pytest
import torch

from moeflow import MoEConfig, MoELayer, RouterConfig
from moeflow.comm.all_to_all import LocalExchange
from moeflow.comm.pipeline import ChunkPlan, SideCompute, exchange_compute
from moeflow.moe.shared_expert import SharedExpert

D = 6


def config(**shared) -> MoEConfig:
    return MoEConfig(
        hidden_size=D, num_experts=4, ffn_hidden_size=8, router=RouterConfig(top_k=2), **shared
    )


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_layer_is_routed_layer_plus_shared_ffn(gate, activation):
    cfg = config(shared_expert_ffn_hidden_size=10, shared_expert_gate=gate)
    cfg = MoEConfig.from_dict({**cfg.to_dict(), "activation": activation})
    torch.manual_seed(0)
    layer = MoELayer(cfg).double()
    routed = MoELayer(MoEConfig.from_dict({**cfg.to_dict(), "shared_expert_ffn_hidden_size": 0,
                                           "shared_expert_gate": False})).double()  # fmt: skip
    missing = routed.load_state_dict(layer.state_dict(), strict=False)
    assert not missing.missing_keys and all("shared_expert" in k for k in missing.unexpected_keys)
    shared = copy.deepcopy(layer.shared_expert)
    x = torch.randn(2, 7, D, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    g = torch.randn(2, 7, D, dtype=torch.float64)
    out = layer(x)
    want = routed(x_ref) + shared(x_ref)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    (out * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    for name, p in layer.named_parameters():
        if name.startswith("shared_expert."):
            ref = shared.get_parameter(name.removeprefix("shared_expert.")).grad
        else:
            ref = routed.get_parameter(name).grad
        torch.testing.assert_close(p.grad, ref, rtol=1e-12, atol=1e-12, msg=name)
    assert (layer.shared_expert.gate is not None) == gate
    with torch.no_grad():  # inference: no graph is kept for the shared expert
        torch.testing.assert_close(layer(x), out, rtol=0, atol=0)


class _Recorder:
    """A one-rank exchange that logs when transfers are issued and waited for."""

    size, rank, needs_matrix = 1, 0, False

    def __init__(self, events: list) -> None:
        self.events, self.inner = events, LocalExchange()

    def all_to_all(self, x, output_splits, input_splits, matrix=None):
        self.events.append("issue")
        out, _ = self.inner.all_to_all(x, output_splits, input_splits)
        events = self.events

        class Handle:
            def wait(self):
                events.append("wait")

        return out, Handle()


class _Double:
    """The pipeline's compute protocol: y = 2 x (no parameters)."""

    def materialize(self, params):
        return params

    def forward(self, params, x, meta):
        return 2 * x, []

    def new_grads(self, params):
        return None

    def backward(self, params, saved, grad_y, meta, acc):
        return 2 * grad_y

    def finish(self, acc):
        return ()


def test_side_compute_runs_while_the_first_transfer_travels():
    events: list[str] = []
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)

    def side_fn(x_in, w_in):
        events.append("side")
        y = torch.tanh(x_in @ w_in)
        y.register_hook(lambda grad: events.append("side backward"))
        return y

    plan = ChunkPlan([[2], [2]], [[2], [2]], [None, None])
    chunks, side_out = exchange_compute(
        _Recorder(events), _Double(), plan, (), [x[:2], x[2:]], SideCompute(side_fn, (x, w))
    )
    # Forward: chunk 0 and 1 issued (1 is issued before 0 is waited for), side, then waits.
    assert events[:4] == ["issue", "side", "issue", "wait"], events
    loss = sum((c * c).sum() for c in chunks) + side_out.sum()
    events.clear()
    loss.backward()
    assert events[:3] == ["issue", "side backward", "issue"], events
    x_ref, w_ref = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ((2 * x_ref) ** 2).sum().add(torch.tanh(x_ref @ w_ref).sum()).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-12, atol=1e-12)


def test_shared_expert_settings_are_checked():
    with pytest.raises(ValueError, match=r"moe\.shared_expert_ffn_hidden_size \(-1\)"):
        config(shared_expert_ffn_hidden_size=-1)
    with pytest.raises(ValueError, match=r"moe\.shared_expert_gate needs a shared expert"):
        config(shared_expert_gate=True)
    assert SharedExpert(D, 4, "relu").gate is None

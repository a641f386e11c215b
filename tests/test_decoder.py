"""The reference MoE decoder: shapes, causality, meta-device init, routing context, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeflow import MoEConfig, MoELayer
from moeflow.models import DecoderConfig, MoEDecoder
from moeflow.moe.walk import moe_layers


def small(**kw) -> DecoderConfig:
    moe = MoEConfig(hidden_size=32, num_experts=4, ffn_hidden_size=48)
    fields = {"dim": 32, "n_layers": 3, "n_heads": 4, "max_seq_len": 16, "moe": moe, **kw}
    return DecoderConfig(**fields)


def test_shapes_and_moe_layer_pattern():
    model = MoEDecoder(small(moe_layer_freq=2))
    kinds = [isinstance(b.ffn, MoELayer) for b in model.blocks]
    assert kinds == [True, False, True]
    assert model(torch.randint(0, 256, (2, 10))).shape == (2, 10, 256)


def test_causal():
    torch.manual_seed(0)
    model = MoEDecoder(small()).eval()
    a = torch.randint(0, 256, (1, 16))
    b = a.clone()
    b[0, 9:] = torch.randint(0, 256, (7,))
    la, lb = model(a), model(b)
    torch.testing.assert_close(la[0, :9], lb[0, :9])
    assert not torch.allclose(la[0, 9:], lb[0, 9:])


def test_meta_device_build_then_init_equals_direct_build():
    cfg = small(moe_layer_freq=2)
    direct = MoEDecoder(cfg)
    direct.init_weights(seed=3)
    with torch.device("meta"):
        lazy = MoEDecoder(cfg)
    assert lazy.embed.weight.device.type == "meta"
    lazy.to_empty(device="cpu")
    lazy.init_weights(seed=3)
    for (name, p), (_, q) in zip(
        direct.state_dict().items(), lazy.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), name
    assert torch.equal(direct.rope_cos, lazy.rope_cos)
    tokens = torch.randint(0, 256, (2, 8))
    torch.testing.assert_close(direct(tokens), lazy(tokens))


def test_one_routing_context_flows_through_the_moe_layers():
    model = MoEDecoder(small())
    seen = []

    def hook(module, args, kwargs):
        ctx = kwargs["routing_context"]
        seen.append((id(ctx), ctx.layers_seen, ctx.previous_logits is None))

    for layer in [m for _, m in moe_layers(model)]:
        layer.register_forward_pre_hook(hook, with_kwargs=True)
    model(torch.randint(0, 256, (2, 5)))
    assert [s[1:] for s in seen] == [(0, True), (1, False), (2, False)]
    assert len({s[0] for s in seen}) == 1
    model(torch.randint(0, 256, (2, 5)))
    assert seen[3][0] != seen[0][0] or seen[3][1] == 0  # a fresh context per forward


def test_learns_a_repeating_pattern():
    torch.manual_seed(0)
    model = MoEDecoder(small())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.arange(17).repeat(4, 1) % 7
    losses = []
    for _ in range(40):
        logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"n_heads": 5}, r"model\.dim \(32\) must be divisible by model\.n_heads \(5\)"),
        ({"moe_layer_freq": 0}, r"model\.moe_layer_freq \(0\)"),
        ({"init_std": 0.0}, r"model\.init_std"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        small(**kw)


def test_moe_width_must_match_and_sequence_bounded():
    with pytest.raises(ValueError, match=r"moe\.hidden_size \(16\) must equal model\.dim \(32\)"):
        DecoderConfig(
            dim=32, n_heads=4, moe=MoEConfig(hidden_size=16, num_experts=2, ffn_hidden_size=8)
        )
    with pytest.raises(ValueError, match=r"sequence length 17 exceeds model\.max_seq_len \(16\)"):
        MoEDecoder(small())(torch.zeros(1, 17, dtype=torch.long))

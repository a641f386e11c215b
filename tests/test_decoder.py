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


def reference_attention(attn, x_BSD, cos, sin):
    """Per query head, float64, written from the definition: head h reads key/value head
    h // (H / G); causal softmax(q k^T / sqrt(d)) v; heads concatenated, then the projection."""
    from moeflow.models.decoder import apply_rotary

    b, s, _ = x_BSD.shape
    h, g, d = attn.n_heads, attn.n_kv, attn.width
    qkv = x_BSD @ attn.qkv.weight.T
    q = qkv[..., : h * d].view(b, s, h, d).transpose(1, 2)
    k = qkv[..., h * d : (h + g) * d].view(b, s, g, d).transpose(1, 2)
    v = qkv[..., (h + g) * d :].view(b, s, g, d).transpose(1, 2)
    q, k = apply_rotary(q, cos[:s], sin[:s]), apply_rotary(k, cos[:s], sin[:s])
    heads = []
    for head in range(h):
        kv = head // (h // g)
        scores = q[:, head] @ k[:, kv].transpose(-1, -2) / d**0.5
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        heads.append(scores.softmax(-1) @ v[:, kv])
    return (
        torch.cat([t.unsqueeze(2) for t in heads], dim=2).reshape(b, s, h * d) @ attn.proj.weight.T
    )


@pytest.mark.parametrize("kv_heads, head_dim", [(None, None), (2, None), (1, 6), (4, 12)])
def test_grouped_query_attention_and_head_dim_follow_the_definition(kv_heads, head_dim):
    torch.manual_seed(0)
    cfg = small(n_kv_heads=kv_heads, head_dim=head_dim)
    model = MoEDecoder(cfg).double()
    attn = model.blocks[0].attn
    d = head_dim or 32 // 4
    assert attn.qkv.weight.shape == ((4 + 2 * (kv_heads or 4)) * d, 32)
    assert attn.proj.weight.shape == (32, 4 * d) and model.rope_cos.shape == (16, d // 2)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    want = reference_attention(attn, x, model.rope_cos, model.rope_sin)
    torch.testing.assert_close(
        attn(x, model.rope_cos, model.rope_sin), want, rtol=1e-10, atol=1e-12
    )
    model(torch.randint(0, 256, (2, 11))).sum().backward()  # the whole model trains


def test_first_k_dense_blocks_come_before_the_moe_blocks():
    model = MoEDecoder(small(n_layers=5, first_k_dense=2, moe_layer_freq=1,
                             dense_ffn_hidden_size=40))  # fmt: skip
    kinds = [isinstance(b.ffn, MoELayer) for b in model.blocks]
    assert kinds == [False, False, True, True, True]
    assert model.blocks[0].ffn.w2.shape[0] == 40  # the dense blocks' own width
    assert [i for i in range(6) if small(n_layers=6, first_k_dense=1, moe_layer_freq=2)
            .is_moe_layer(i)] == [2, 4]  # fmt: skip


def test_flops_per_token_count_grouped_query_attention():
    from moeflow.train.metrics import flops_per_token

    mha, gqa = small(), small(n_kv_heads=1, head_dim=16)
    # q and the output projection: 2 * D * H * d; k and v: 2 * D * G * d (per layer, x6 for
    # training); scores and values: 12 * H * d * S per layer.
    diff = flops_per_token(gqa, 16) - flops_per_token(mha, 16)
    per_layer = 6 * 32 * ((2 * 64 + 2 * 16) - (2 * 32 + 2 * 32)) + 12 * (64 - 32) * 16
    assert diff == 3 * per_layer


@pytest.mark.parametrize(
    "kw, match",
    [({"n_kv_heads": 3}, r"model\.n_kv_heads \(3\) must divide model\.n_heads \(4\)"),
     ({"head_dim": 7}, r"model\.head_dim \(7\) must be even"),
     ({"n_kv_heads": 0}, r"model\.n_kv_heads \(0\) must be an integer >= 1"),
     ({"first_k_dense": 4}, r"model\.first_k_dense \(4\) must be an integer in 0\.\.n_lay"),
     ({"dim": 36, "moe": MoEConfig(hidden_size=36, num_experts=4, ffn_hidden_size=48)},
      r"into an even head dim .*, or set model\.head_dim")],
)  # fmt: skip
def test_attention_shapes_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        small(**kw)

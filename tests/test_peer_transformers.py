"""transformers' own MoE checks, run against models converted by `moeflow.integrations.hf.convert`
(tiny models from config classes, float64, the eager experts), each beside the unconverted HF
model in the same test.

Mirrors the MoE parts of transformers' `tests/models/mixtral/test_modeling_mixtral.py`,
`tests/models/qwen2_moe/test_modeling_qwen2_moe.py`,
`tests/models/qwen3_moe/test_modeling_qwen3_moe.py` and `tests/models/olmoe/test_modeling_olmoe.py`
(`test_load_balancing_loss`: router logits of shape `[B*S, E]` per layer, an aux loss that left
padding under its attention mask does not change and that padding without a mask does), and what
HF's fine-tuning recipes rely on: the loss `CE + router_aux_loss_coef * aux_loss`, its router
gradients, `router_jitter_noise`, and state dicts that move between the converted and the plain
model both ways.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from moeflow.integrations.hf import convert
from tests.test_integration_hf import sparse

KINDS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
TIGHT = {"rtol": 1e-10, "atol": 1e-12}  # float64: the same math, summed in another order


def left_padded(batch: int, seq: int, seed: int, vocab: int = 64) -> tuple:
    """Token ids `[batch, seq]` left-padded to random lengths (pad id 1, as HF's tests use), the
    attention mask, and labels with the padding ignored (-100)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, seq), generator=gen)
    pads = torch.randint(0, seq // 2, (batch,), generator=gen)
    mask = (torch.arange(seq)[None, :] >= pads[:, None]).long()
    ids = ids.masked_fill(mask == 0, 1)
    return ids, mask, ids.masked_fill(mask == 0, -100)


def pair(kind: str, **config) -> tuple:
    """(the HF model, a converted copy), both in training mode."""
    hf = sparse(kind)
    for key, value in config.items():
        setattr(hf.config, key, value)
        if hasattr(hf, key):  # the model reads router_aux_loss_coef once, when built
            setattr(hf, key, value)
        for layer in hf.model.layers:  # so do the blocks their jitter
            if key == "router_jitter_noise":
                layer.mlp.jitter_noise = value
    converted = copy.deepcopy(hf)
    convert(converted)
    return hf.train(), converted.train()


@pytest.mark.parametrize("kind", KINDS)
def test_router_logits_and_aux_loss_are_transformers(kind):
    hf, converted = pair(kind, router_aux_loss_coef=0.5)
    ids, mask, labels = left_padded(3, 9, seed=1)
    outs = []
    for model in (hf, converted):
        out = model(ids, attention_mask=mask, labels=labels, output_router_logits=True)
        out.loss.backward()
        outs.append(out)
    want, got = outs
    assert len(got.router_logits) == hf.config.num_hidden_layers
    assert [tuple(r.shape) for r in got.router_logits] == [(27, 4)] * 2
    for r_got, r_want in zip(got.router_logits, want.router_logits, strict=True):
        torch.testing.assert_close(r_got, r_want, **TIGHT)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, **TIGHT)
    torch.testing.assert_close(got.loss, want.loss, **TIGHT)
    # HF's sum; its loss function computes the cross-entropy in float32 (whatever the model's
    # dtype), hence float32's tolerance for this one check.
    ce = torch.nn.functional.cross_entropy(
        want.logits[:, :-1].float().reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(want.loss, ce + 0.5 * want.aux_loss, rtol=1e-6, atol=1e-7)
    for ours, theirs in zip(converted.model.layers, hf.model.layers, strict=True):
        want_grad = theirs.mlp.gate.weight.grad
        torch.testing.assert_close(ours.mlp.router.weight.grad, want_grad, **TIGHT)


@pytest.mark.parametrize("kind", KINDS)
def test_left_padding_under_its_mask_leaves_the_aux_loss_unchanged(kind):
    _, model = pair(kind)
    model.eval()
    ids = torch.randint(2, 64, (3, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(ids, output_router_logits=True).aux_loss
        padded_ids = torch.cat([torch.ones(3, 5, dtype=torch.long), ids], dim=1)
        padded_mask = padded_ids.ne(1).long()
        positions = (padded_mask.cumsum(-1) - 1).clamp(min=0)  # the real tokens' own
        padded = model(
            padded_ids, attention_mask=padded_mask, position_ids=positions,
            output_router_logits=True,
        )  # fmt: skip
        unmasked = model(padded_ids, output_router_logits=True).aux_loss
    assert padded.router_logits[0].shape == (36, 4)
    torch.testing.assert_close(padded.aux_loss, plain, **TIGHT)
    assert abs(unmasked.item() - plain.item()) > 1e-6  # padding counted without its mask


@pytest.mark.parametrize("aux_loss_type", ["aux_loss", "global_aux_loss", "seq_aux_loss"])
def test_moeflows_own_balancing_loss_leaves_padding_out(aux_loss_type):
    """With moeflow's per-layer loss (a coefficient given to convert), the attention mask is
    every layer's token mask: left-padded under its mask gives the unpadded losses (balancing
    per batch, global-batch and per sequence; z-loss) and counts."""
    from moeflow.integrations.hf import block_config

    hf = sparse("mixtral")
    cfg = block_config(hf.model.layers[0].mlp, hf.config, aux_loss_coeff=0.1)
    router = dataclasses.replace(cfg.router, aux_loss_type=aux_loss_type, z_loss_coeff=1e-3)
    convert(hf, moe_config=dataclasses.replace(cfg, router=router))
    hf.train()
    ids = torch.randint(2, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    padded_ids = torch.cat([torch.ones(2, 4, dtype=torch.long), ids], dim=1)
    mask = padded_ids.ne(1).long()
    padded = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    seen = []
    for call in ({"input_ids": ids}, {"input_ids": padded_ids, **padded}):
        hf(**call)
        layers = [m.mlp for m in hf.model.layers]
        seen.append([(m.last_losses, m.balance.step_counts.clone()) for m in layers])
        for m in hf.model.layers:
            m.mlp.balance.reset(torch.device("cpu"))
    for (losses_a, counts_a), (losses_b, counts_b) in zip(*seen, strict=True):
        torch.testing.assert_close(losses_b[0], losses_a[0], **TIGHT)
        torch.testing.assert_close(losses_b[1], losses_a[1], **TIGHT)
        torch.testing.assert_close(counts_b, counts_a, rtol=0, atol=0)  # aux-free/global counts
        assert counts_a.sum().item() == 2 * 6 * 2  # B * S * K: the padding counted in none


def test_router_jitter_noise_is_mixtrals():
    hf, converted = pair("mixtral", router_jitter_noise=0.2)
    ids, mask, labels = left_padded(2, 8, seed=4)
    losses = []
    for model in (hf, converted):
        torch.manual_seed(7)  # the same noise, drawn at the same point of the stream
        out = model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        losses.append(out.loss)
    torch.testing.assert_close(losses[1], losses[0], **TIGHT)
    want = hf.model.layers[0].mlp.gate.weight.grad
    torch.testing.assert_close(converted.model.layers[0].mlp.router.weight.grad, want, **TIGHT)
    with torch.no_grad():  # the noise changes the output in training, not in evaluation
        torch.manual_seed(8)
        noisy = converted(ids).logits
        assert not torch.allclose(noisy, converted.eval()(ids).logits)
        torch.testing.assert_close(converted(ids).logits, hf.eval()(ids).logits, **TIGHT)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_state_dicts_move_between_the_plain_and_the_converted_model(kind, tmp_path):
    """A Trainer-style `torch.save(model.state_dict())` from before conversion loads (strict)
    into the converted model, one from after conversion into the plain model, and the converted
    model's `save_pretrained` is a checkpoint plain transformers loads."""
    hf = sparse(kind).eval()
    ids = torch.randint(2, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    torch.save(hf.state_dict(), tmp_path / "before.pt")
    converted = copy.deepcopy(hf)
    convert(converted)
    assert sorted(converted.state_dict()) == sorted(hf.state_dict())
    with torch.no_grad():
        for p in converted.parameters():
            p.mul_(0.5)  # so that a load shows
        converted.load_state_dict(torch.load(tmp_path / "before.pt"), strict=True)
        torch.testing.assert_close(converted(ids).logits, hf(ids).logits, **TIGHT)
        for name, p in converted.named_parameters():
            if "mlp" in name:
                p.add_(0.01 * torch.randn_like(p))  # "fine-tuned" after conversion
        tuned = converted(ids).logits
    torch.save(converted.state_dict(), tmp_path / "after.pt")
    plain = sparse(kind).eval()
    plain.load_state_dict(torch.load(tmp_path / "after.pt"), strict=True)
    converted.save_pretrained(tmp_path / "pretrained")
    reloaded = type(hf).from_pretrained(tmp_path / "pretrained", experts_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, tuned, **TIGHT)
        torch.testing.assert_close(reloaded.double().eval()(ids).logits, tuned, **TIGHT)
    # moeflow's own keys load as well (a checkpoint written with hf_state_dict = False).
    for layer in converted.model.layers:
        layer.mlp.hf_state_dict = False
    own = converted.state_dict()
    assert "model.layers.0.mlp.experts.w1" in own
    plain_again = copy.deepcopy(converted)
    plain_again.load_state_dict(own, strict=True)


def test_a_converted_mixtral_fine_tunes_as_the_hf_one_for_50_steps():
    """Issue acceptance: `output_router_logits=True, router_aux_loss_coef=0.02`, left-padded
    batches, router jitter, AdamW, 50 steps: the same losses (float64, 1e-10) and the same router
    gradients as the unconverted model."""
    hf, converted = pair("mixtral", router_aux_loss_coef=0.02, router_jitter_noise=0.05)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (hf, converted)]
    worst_loss = worst_grad = 0.0
    for step in range(50):
        ids, mask, labels = left_padded(4, 10, seed=100 + step)
        results = []
        for model, opt in zip((hf, converted), optimizers, strict=True):
            torch.manual_seed(step)
            out = model(ids, attention_mask=mask, labels=labels, output_router_logits=True)
            opt.zero_grad()
            out.loss.backward()
            grads = [
                (layer.mlp.gate if model is hf else layer.mlp.router).weight.grad.clone()
                for layer in model.model.layers
            ]
            opt.step()
            results.append((out.loss.detach(), grads))
        (loss_hf, grads_hf), (loss_ours, grads_ours) = results
        worst_loss = max(worst_loss, ((loss_ours - loss_hf).abs() / loss_hf.abs()).item())
        for ours, theirs in zip(grads_ours, grads_hf, strict=True):
            worst_grad = max(worst_grad, ((ours - theirs).abs().max() / theirs.abs().max()).item())
    assert worst_loss < 1e-10, worst_loss
    assert worst_grad < 1e-10, worst_grad


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_generation_and_checkpointing_with_masks_and_router_logits(kind):
    """Left-padded greedy generation with the KV cache (the attention mask grows past the new
    tokens: each layer's token mask is its last columns) gives HF's tokens; non-reentrant gradient
    checkpointing with `output_router_logits=True` gives HF's loss and router gradients."""
    hf, converted = pair(kind, router_aux_loss_coef=0.1)
    ids, mask, labels = left_padded(2, 6, seed=9)
    generated = []
    for model in (hf, converted):
        model.eval()
        generated.append(model.generate(ids, attention_mask=mask, max_new_tokens=4,
                                        do_sample=False, pad_token_id=1))  # fmt: skip
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert torch.equal(generated[1], generated[0])
    losses = []
    for model in (hf, converted):
        out = model(ids, attention_mask=mask, labels=labels, output_router_logits=True)
        out.loss.backward()
        losses.append(out.loss)
    torch.testing.assert_close(losses[1], losses[0], **TIGHT)
    want = hf.model.layers[0].mlp.gate.weight.grad
    torch.testing.assert_close(converted.model.layers[0].mlp.router.weight.grad, want, **TIGHT)

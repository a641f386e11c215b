"""Models copy at any point: `copy.deepcopy(model)` and pickling (`torch.save(model)`) after a
training forward and after its backward, for moeflow's decoder (with activation checkpointing),
for converted Hugging Face models, and under expert parallelism in every mode at 2 gloo ranks. The
copy computes what the original computes, and trains on its own (EMA weights, a frozen reference
model, an evaluation copy)."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from moeflow.models.decoder import DecoderConfig, MoEDecoder
from moeflow.moe.config import MoEConfig, RouterConfig
from moeflow.parallel import MODES, ParallelDims, parallelize
from tests.distributed import run_on_ranks


def decoder(checkpointing: bool = False) -> MoEDecoder:
    torch.manual_seed(0)
    router = RouterConfig(top_k=2, aux_loss_coeff=1e-2, z_loss_coeff=1e-3)
    moe = MoEConfig(hidden_size=32, num_experts=4, ffn_hidden_size=32, router=router)
    cfg = DecoderConfig(dim=32, n_layers=2, n_heads=4, max_seq_len=16, moe=moe)
    model = MoEDecoder(cfg).double()
    model.activation_checkpointing = checkpointing
    return model


def copies(model: torch.nn.Module) -> list[torch.nn.Module]:
    """A deep copy and a pickled-and-loaded copy of `model`."""
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return [copy.deepcopy(model), torch.load(buffer, weights_only=False)]


def check_copies(model, run, ids) -> int:
    """Copies made after a forward and after its backward compute the original's outputs and
    gradients, and a step on a copy leaves the original alone. Returns the copies checked."""
    out = run(model, ids)
    after_forward = copies(model)
    out.sum().backward()
    after_backward = copies(model)
    want = run(model, ids)
    checked = 0
    for clone in after_forward + after_backward:
        got = run(clone, ids)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        for p in clone.parameters():
            p.grad = None
        got.sum().backward()
        with torch.no_grad():
            for p in clone.parameters():
                p.add_(1.0)
        checked += 1
    torch.testing.assert_close(run(model, ids), want, rtol=0, atol=0)
    return checked


def run_decoder(model, ids):
    return model(ids)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_decoder_copies_after_forward_and_backward(checkpointing):
    model = decoder(checkpointing)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    assert check_copies(model, run_decoder, ids) == 4
    layer = model.blocks[0].ffn
    assert all(not t.requires_grad for t in layer.last_losses)


def test_a_converted_hf_model_copies():
    from transformers import MixtralConfig, MixtralForCausalLM

    from moeflow.integrations.hf import convert

    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=16,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=32, num_local_experts=4,
                           num_experts_per_tok=2)  # fmt: skip
    torch.manual_seed(0)
    model = MixtralForCausalLM._from_config(config, experts_implementation="eager").double()
    convert(model)
    model.train()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    assert check_copies(model, lambda m, i: m(i).logits, ids) == 4


def _parallel_copies(rank, world):
    ctx = ParallelDims(ep=world).build()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(rank))
    model = parallelize(decoder(), ctx)
    checked = 0
    for mode in MODES:
        checked += check_copies(model, lambda m, i, mode=mode: run_mode(m, i, mode), ids)
    return checked


def run_mode(model, ids, mode):
    from moeflow.parallel import set_parallel_mode

    set_parallel_mode(model, mode)
    return model(ids)


def test_an_expert_parallel_model_copies_in_every_mode():
    assert run_on_ranks(_parallel_copies, 2, timeout=240) == [4 * len(MODES)] * 2

"""Document masking in the decoder (`document_ids_BS`): a window of packed documents gives each
document the logits it has when run alone (float64, 1e-10), through grouped-query attention, an
MoE block (dropless) and a dense one; all-zero ids give today's causal path; the chunked loss,
activation checkpointing (full and selective) and compiled blocks carry the mask."""

from __future__ import annotations

import pytest
import torch

from moeflow.models.decoder import DecoderConfig, MoEDecoder
from moeflow.models.documents import document_attention, document_ids
from moeflow.moe.config import MoEConfig
from moeflow.parallel.compile import compile_blocks

EOD = 0
# Two windows of 20 tokens, each packing 3 documents of different lengths (each ends in EOD).
LENGTHS = ((5, 9, 6), (8, 3, 9))


def model() -> MoEDecoder:
    moe = MoEConfig(hidden_size=32, num_experts=4, ffn_hidden_size=48)
    cfg = DecoderConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=24,
                        moe_layer_freq=2, moe=moe)  # fmt: skip
    m = MoEDecoder(cfg)
    m.init_weights(seed=0)
    assert [type(b.ffn).__name__ for b in m.blocks] == ["MoELayer", "FeedForward", "MoELayer"]
    assert m.blocks[0].attn.n_kv < m.blocks[0].attn.n_heads
    return m.double()


def documents() -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    docs = []
    for lengths in LENGTHS:
        row = [torch.randint(1, 256, (n,), generator=gen) for n in lengths]
        for doc in row:
            doc[-1] = EOD
        docs.append(row)
    return docs


def packed() -> tuple[list[list[torch.Tensor]], torch.Tensor]:
    docs = documents()
    return docs, torch.stack([torch.cat(row) for row in docs])


def test_document_ids_count_the_end_of_document_tokens_before_each_position():
    tokens = torch.tensor([[5, 7, 0, 3, 0, 9], [0, 0, 4, 4, 4, 0]])
    assert document_ids(tokens, EOD).tolist() == [[0, 0, 0, 1, 1, 2], [0, 1, 2, 2, 2, 2]]
    assert document_ids(tokens, EOD).dtype == torch.int64
    _, window = packed()
    assert document_ids(window, EOD).tolist() == [
        [i for i, n in enumerate(lengths) for _ in range(n)] for lengths in LENGTHS
    ]
    mask, positions = document_attention(torch.tensor([[3, 3, 1, 1, 1, 3]]))
    assert positions.tolist() == [[0, 1, 0, 1, 2, 0]]  # a recurring id starts a new document
    want = [[j <= i and (i < 2) == (j < 2) and (i == 5) == (j == 5) for j in range(6)]
            for i in range(6)]  # fmt: skip
    assert mask.shape == (1, 1, 6, 6) and mask[0, 0].tolist() == want


def test_each_packed_document_gets_the_logits_it_has_alone():
    m, (docs, window) = model(), packed()
    masked = m(window, document_ids_BS=document_ids(window, EOD))
    unmasked = m(window)
    for b, row in enumerate(docs):
        start = 0
        for i, doc in enumerate(row):
            alone = m(doc[None])[0]
            got = masked[b, start : start + len(doc)]
            torch.testing.assert_close(got, alone, atol=1e-10, rtol=0)
            if i > 0:  # without the mask, a later document reads the ones before it
                assert (unmasked[b, start : start + len(doc)] - alone).abs().max() > 1e-6
            start += len(doc)


def test_one_document_per_window_is_todays_causal_path():
    m, (_, window) = model(), packed()
    torch.testing.assert_close(
        m(window, document_ids_BS=torch.zeros_like(window)), m(window), atol=1e-12, rtol=0
    )


def test_the_chunked_loss_with_documents_equals_the_logits_path():
    m, (_, window) = model(), packed()
    ids, targets = document_ids(window, EOD), window.roll(-1, dims=1)
    logits = m(window, document_ids_BS=ids)
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    for chunk in (0, 7):
        got = m(window, targets, loss_chunk_tokens=chunk, document_ids_BS=ids)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("checkpointing", [True, "selective"])
def test_activation_checkpointing_carries_the_mask(checkpointing):
    _, window = packed()
    ids = document_ids(window, EOD)
    grads = []
    for mode in (False, checkpointing):
        m = model()
        m.activation_checkpointing = mode
        m(window, window.roll(-1, dims=1), document_ids_BS=ids).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-12, rtol=0, msg=name)


def test_compiled_blocks_take_the_mask():
    m, (_, window) = model(), packed()
    ids = document_ids(window, EOD)
    eager = m(window, document_ids_BS=ids)
    torch._dynamo.reset()
    assert compile_blocks(m, backend="eager") == 3
    torch.testing.assert_close(m(window, document_ids_BS=ids), eager, atol=1e-12, rtol=0)


def test_document_ids_of_another_shape_are_refused_in_one_line():
    m, (_, window) = model(), packed()
    line = r"document_ids_BS has shape \(2, 19\), tokens_BS \(2, 20\): give one document id"
    with pytest.raises(ValueError, match=line):
        m(window, document_ids_BS=torch.zeros(2, 19, dtype=torch.long))

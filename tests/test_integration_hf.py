"""Hugging Face transformers, on tiny models built from their config classes (nothing downloads):
upcycling the MLPs of Llama, Qwen2 and Mistral gives the dense model's logits at step 0 (float64),
and the upcycled model runs expert-parallel on 2 gloo ranks with the single process's outputs and
gradients; converting the sparse blocks of Mixtral, Qwen2-MoE (shared expert), Qwen3-MoE and OLMoE
gives their outputs and gradients (float64, dropless), and export + save_pretrained reloads in
plain transformers with the same logits; what cannot be matched is refused, naming why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from moeflow.integrations.hf import upcycle
from moeflow.moe.config import MoEConfig, RouterConfig
from moeflow.moe.layer import MoELayer
from moeflow.moe.walk import set_aux_loss_scale
from moeflow.parallel import GradSync, ParallelDims, parallelize
from tests.distributed import run_on_ranks

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_upcycle.py"

SHAPE = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 32}  # fmt: skip
MODELS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


# GPT-2: biases in both projections, gelu_new (tanh), its own config names.
GPT2 = {"vocab_size": 64, "n_embd": 32, "n_inner": 48, "n_layer": 2, "n_head": 4,
        "n_positions": 32, "bos_token_id": 0, "eos_token_id": 0}  # fmt: skip
MODELS["gpt2"] = (GPT2Config, GPT2LMHeadModel)


def tiny(kind: str, seed: int = 0) -> torch.nn.Module:
    config_cls, model_cls = MODELS[kind]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**(GPT2 if kind == "gpt2" else SHAPE))).double().eval()
    if kind == "gpt2":
        with torch.no_grad():  # HF initialises GPT-2's biases to 0: make them count
            for block in model.transformer.h:
                block.mlp.c_fc.bias.normal_(0.0, 0.5)
                block.mlp.c_proj.bias.normal_(0.0, 0.5)
    return model


def moe_cfg(kind: str = "llama", **router) -> MoEConfig:
    gpt2 = {"activation": "gelu_tanh", "ffn_bias": True} if kind == "gpt2" else {}
    return MoEConfig(hidden_size=32, num_experts=4, ffn_hidden_size=48, **gpt2,
                     router=RouterConfig(top_k=2, **router))  # fmt: skip


def layers_of(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("layers", [None, [1]])
def test_upcycled_model_computes_the_dense_logits(kind, layers):
    model = tiny(kind)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits
    replaced = upcycle(model, moe_cfg(kind), layers=layers)
    assert replaced == (layers or [0, 1])
    moe = [any(isinstance(m, MoELayer) for m in layer.mlp.modules()) for layer in layers_of(model)]
    assert moe.count(True) == len(replaced)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense, rtol=1e-10, atol=1e-12)


def test_a_llama_mlp_with_biases_upcycles_exactly():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, mlp_bias=True)).double().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                proj.bias.normal_(0.0, 0.5)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits
        upcycle(model, MoEConfig(hidden_size=32, num_experts=4, ffn_hidden_size=48, ffn_bias=True))
        torch.testing.assert_close(model(ids).logits, dense, rtol=1e-10, atol=1e-12)


def test_what_cannot_be_upcycled_is_refused():
    with pytest.raises(ValueError, match=r"neither model\.layers nor transformer\.h"):
        upcycle(torch.nn.Linear(2, 2), moe_cfg())
    with pytest.raises(
        ValueError, match=r"moe\.activation \('swiglu'\) must match .* \('gelu_tanh'\)"
    ):
        upcycle(tiny("gpt2"), moe_cfg())
    model = tiny("llama")
    with pytest.raises(
        ValueError, match=r"ffn_hidden_size \(64\) must match decoder layer 0's MLP \(48\)"
    ):
        upcycle(model, MoEConfig(hidden_size=32, num_experts=4, ffn_hidden_size=64))
    with pytest.raises(ValueError, match=r"layers \[5\] are not decoder layer indices"):
        upcycle(model, moe_cfg(), layers=[5])
    biased = LlamaForCausalLM(LlamaConfig(**SHAPE, mlp_bias=True))
    with pytest.raises(ValueError, match=r"moe\.ffn_bias \(False\) must match .* \(True\)"):
        upcycle(biased, moe_cfg())
    gelu = LlamaForCausalLM(LlamaConfig(**SHAPE, hidden_act="gelu"))
    with pytest.raises(ValueError, match="hidden_act = 'gelu'"):
        upcycle(gelu, moe_cfg())


def _expert_parallel(rank, world):
    """Each rank its own token ids; the parallel step against the single process on all of them
    (the mean of the ranks' losses)."""
    ctx = ParallelDims(ep=world).build()
    gen = torch.Generator().manual_seed(5)
    ids = [torch.randint(0, 64, (2, 8), generator=gen) for _ in range(world)]
    ref, par = tiny("llama"), tiny("llama")
    for m in (ref, par):
        upcycle(m, moe_cfg(aux_loss_coeff=1e-2))
        m.train()
        for layer in m.model.layers:  # varied routing
            torch.manual_seed(3)
            layer.mlp.router.weight.data.normal_(0.0, 1.0)
    parallelize(par, ctx)
    out = par(ids[rank], labels=ids[rank])
    out.loss.backward()
    GradSync(par, ctx).sync()
    set_aux_loss_scale(ref, 1.0 / world)
    ref_outs = [ref(i, labels=i) for i in ids]
    (sum(o.loss for o in ref_outs) / world).backward()
    tol = {"rtol": 1e-9, "atol": 1e-11}
    torch.testing.assert_close(out.logits, ref_outs[rank].logits, **tol)
    checked = 0
    for name, p in par.named_parameters():
        want = ref.get_parameter(name).grad
        if ".experts." in name:  # E >= G: this rank holds whole experts
            want = want[par.get_submodule(name.rsplit(".experts.", 1)[0]).local_experts]
        torch.testing.assert_close(p.grad, want, **tol, msg=lambda m, n=name: f"{n}: {m}")
        checked += 1
    return checked


def test_upcycled_hf_model_runs_expert_parallel():
    counts = run_on_ranks(_expert_parallel, 2, timeout=300)
    assert counts[0] == counts[1] > 10


# -- convert / export ----------------------------------------------------------------------------
SPARSE = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 32,
          "num_experts_per_tok": 2}  # fmt: skip


def sparse_models():
    from transformers import (
        MixtralConfig,
        MixtralForCausalLM,
        OlmoeConfig,
        OlmoeForCausalLM,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    return {
        "mixtral": (MixtralForCausalLM, MixtralConfig(**SPARSE, intermediate_size=16,
                                                      num_local_experts=4)),
        "qwen2_moe": (Qwen2MoeForCausalLM, Qwen2MoeConfig(
            **SPARSE, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24,
            norm_topk_prob=False)),
        "qwen3_moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig(
            **SPARSE, num_experts=4, moe_intermediate_size=16, norm_topk_prob=True, head_dim=8)),
        "olmoe": (OlmoeForCausalLM, OlmoeConfig(**SPARSE, num_experts=4, intermediate_size=16)),
    }  # fmt: skip


def sparse(kind: str) -> torch.nn.Module:
    model_cls, config = sparse_models()[kind]
    torch.manual_seed(0)
    model = model_cls._from_config(config, experts_implementation="eager").double()
    with torch.no_grad():  # varied routing, not the near-uniform initial one
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 1.0)
    return model


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_converted_block_gives_the_hf_outputs_and_gradients(kind):
    import copy

    from moeflow.integrations.hf import convert

    model = sparse(kind)
    block = copy.deepcopy(model.model.layers[0].mlp).train()
    names = convert(model)
    assert names == ["model.layers.0.mlp", "model.layers.1.mlp"]
    layer = model.model.layers[0].mlp.train()
    assert isinstance(layer, MoELayer)
    x = torch.randn(2, 7, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    g = torch.randn_like(x)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want, got = block(x1), layer(x2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    (want * g).sum().backward()
    (got * g).sum().backward()
    tol = {"rtol": 1e-9, "atol": 1e-11}
    torch.testing.assert_close(x2.grad, x1.grad, **tol)
    torch.testing.assert_close(layer.router.weight.grad, block.gate.weight.grad, **tol)
    torch.testing.assert_close(
        layer.experts.w1.grad, block.experts.gate_up_proj.grad.transpose(1, 2), **tol
    )
    torch.testing.assert_close(
        layer.experts.w2.grad, block.experts.down_proj.grad.transpose(1, 2), **tol
    )
    if kind == "qwen2_moe":
        assert layer.shared_expert is not None and layer.shared_expert.gate is not None
        torch.testing.assert_close(
            layer.shared_expert.gate.grad, block.shared_expert_gate.weight.grad.t(), **tol
        )


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "olmoe"])
def test_convert_export_and_save_pretrained_round_trip(kind, tmp_path):
    from moeflow.integrations.hf import convert, export

    model = sparse(kind).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        dense = model(ids).logits
        convert(model)
        torch.testing.assert_close(model(ids).logits, dense, rtol=1e-10, atol=1e-12)
        model.model.layers[1].mlp.experts.w2.mul_(1.5)  # a trained change, to see it travel
        trained = model(ids).logits
        assert not torch.allclose(trained, dense)
        assert export(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]
        torch.testing.assert_close(model(ids).logits, trained, rtol=1e-10, atol=1e-12)
    after = model.state_dict()
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert changed == ["model.layers.1.mlp.experts.down_proj"], changed
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path, experts_implementation="eager").double()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids).logits, trained, rtol=0, atol=0)


def test_convert_refuses_what_it_cannot_match():
    from moeflow.integrations.hf import convert

    model = sparse("mixtral")
    convert(model, aux_loss_coeff=0.01)  # moeflow's balancing loss, and HF's asked for too:
    with pytest.raises(ValueError, match=r"balanced twice.*aux_loss_coeff=0"):
        model(torch.zeros(1, 4, dtype=torch.long), output_router_logits=True)
    with pytest.raises(ValueError, match=r"router\.softmax_dtype \('bf16'\) must be one of"):
        RouterConfig(softmax_dtype="bf16")


# -- routing context and gradient checkpointing --------------------------------------------------
def upcycled(checkpointing: str | None, router_type: str) -> torch.nn.Module:
    """A tiny Llama upcycled with global-batch balancing and aux-free bias counts (every side
    effect visible); MoE++ routers read the previous layer's logits through the context."""
    model = tiny("llama").train()
    extra = {"moepp": {"zero_experts": 1, "copy_experts": 1, "constant_experts": 1},
             "rmoe": {"rnn_dim": 8}}.get(router_type, {})  # fmt: skip
    router = RouterConfig(type=router_type, top_k=2, aux_loss_type="global_aux_loss",
                          bias_update_rate=0.01, **extra)  # fmt: skip
    upcycle(model, MoEConfig(hidden_size=32, num_experts=4, ffn_hidden_size=48, router=router))
    torch.manual_seed(9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # varied routing and residual
    if checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
        )
    return model


def run_step(model, ids) -> tuple:
    seen = []
    model.model.layers[1].mlp.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["routing_context"].copy()), with_kwargs=True
    )
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    counts = [layer.mlp.balance.step_counts.clone() for layer in model.model.layers]
    return loss.detach(), grads, counts, seen


@pytest.mark.parametrize(("router_type", "checkpointing"),
                         [("moepp", "non-reentrant"), ("rmoe", "non-reentrant"),
                          ("topk", "non-reentrant"), ("topk", "reentrant")])  # fmt: skip
def test_routing_context_flows_and_checkpointing_counts_once(router_type, checkpointing):
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    loss, grads, counts, seen = run_step(upcycled(None, router_type), ids)
    # Layer 0's logits reached layer 1 through the context (MoE++: 4 experts + 3 zero-computation).
    assert seen[0].layers_seen == 1
    assert seen[0].previous_logits.shape == (18, 7 if router_type == "moepp" else 4)
    if router_type == "rmoe":  # layer 0's GRU state reached layer 1, through one shared cell
        assert seen[0].state["rmoe.hidden"].shape == (18, 8)
    assert all(c.sum() == 18 * 2 for c in counts)  # each token's k choices, counted once
    other_loss, other_grads, other_counts, other_seen = run_step(
        upcycled(checkpointing, router_type), ids
    )
    assert len(other_seen) == 2 and other_seen[1].layers_seen == 1  # recomputed from the same
    torch.testing.assert_close(other_loss, loss, rtol=1e-12, atol=0)
    assert other_grads.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(other_grads[name], g, rtol=1e-10, atol=1e-12, msg=name)
    for a, b in zip(other_counts, counts, strict=True):
        assert torch.equal(a, b), (a, b)


def test_rmoe_in_an_hf_model_follows_the_reference_recurrence():
    """Layer 1's router logits are W_r1 GRU(W_p1 x1, GRU(W_p0 x0, 0)) with the model's one shared
    GRU cell (the reference equations of tests/reference_routers.py)."""
    from tests.reference_routers import rmoe_logits

    model = upcycled(None, "rmoe")
    inputs, logits = [], []
    for layer in model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, 32)))
        layer.mlp.register_forward_hook(
            lambda m, a, kw, out: logits.append(kw["routing_context"].previous_logits),
            with_kwargs=True,
        )
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    model(ids)
    gru = model.moe_router_shared["rmoe_gru"]
    weights = [gru.weight_ih, gru.weight_hh, gru.bias_ih, gru.bias_hh]
    h = None
    for i, layer in enumerate(model.model.layers):
        r = layer.mlp.router
        want, h = rmoe_logits(inputs[i], r.proj, r.head, weights, h)
        torch.testing.assert_close(logits[i], torch.stack(want), rtol=1e-10, atol=1e-12)
    assert sum(p.numel() for p in model.moe_router_shared.parameters()) == sum(
        p.numel() for p in weights
    )  # one cell, registered once


@pytest.mark.parametrize("router_type", ["moepp", "rmoe"])
def test_reentrant_checkpointing_is_refused_where_routers_read_the_context(router_type):
    model = upcycled("reentrant", router_type)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match=r"use_reentrant\": False"):
        model(ids, labels=ids, use_cache=False).loss.backward()


def _check_example_output(model: str, out: str) -> None:
    assert "logits identical: True" in out and "after 60 steps" in out
    assert f"upcycled {model}:" in out and "dense model's: True" in out


def test_hf_upcycle_example_runs_end_to_end(tmp_path):
    """examples/hf_upcycle.py as a user runs it (it spawns its 2 ranks), shortened: upcycle (the
    dense logits at step 0), train at ep 2, lower the validation loss, save, reload with identical
    logits (the script asserts each)."""
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "60", "--out", str(tmp_path), "--model", "llama"],
        capture_output=True, text=True, timeout=300, cwd=EXAMPLE.parents[1],
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    _check_example_output("llama", done.stdout)


def _example_on_ranks(rank, world, models, out):
    """The example's `main` on these ranks for each model; rank 0's printed lines."""
    import argparse
    import contextlib
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location("hf_upcycle_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    printed = {}
    for model in models:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            example.main(argparse.Namespace(steps=60, model=model, out=f"{out}/{model}"))
        printed[model] = buffer.getvalue()
    return printed


def test_hf_upcycle_example_upcycles_qwen2_and_gpt2(tmp_path):
    """The same script's steps for Qwen2 and GPT-2 (biases, tanh GELU), on 2 ranks of one spawn:
    the script's own process handling is the Llama test's."""
    models = ("qwen2", "gpt2")
    printed = run_on_ranks(_example_on_ranks, 2, args=(models, str(tmp_path)), timeout=300)[0]
    assert sorted(printed) == sorted(models)
    for model, text in printed.items():
        _check_example_output(model, text)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_upcycle_reads_the_shapes_from_the_model(kind):
    """`upcycle(model, num_experts=, top_k=)`: the hidden size, FFN width, activation and biases
    come from the model (GPT-2 with a default-like config included, which a MoEConfig with the
    defaults refuses), and the result is what an explicit MoEConfig gives."""
    explicit, read = tiny(kind), tiny(kind)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)  # the routers' initial weights
    assert upcycle(explicit, moe_cfg(kind)) == [0, 1]
    torch.manual_seed(1)
    assert upcycle(read, num_experts=4, top_k=2) == [0, 1]
    for a, b in zip(layers_of(explicit), layers_of(read), strict=True):
        moe_a = next(m for m in a.mlp.modules() if isinstance(m, MoELayer))
        moe_b = next(m for m in b.mlp.modules() if isinstance(m, MoELayer))
        assert moe_a.config == moe_b.config
    torch.testing.assert_close(read(ids).logits, explicit(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"pass either a MoEConfig or num_experts"):
        upcycle(tiny(kind), moe_cfg(kind), num_experts=4)
    with pytest.raises(ValueError, match=r"pass num_experts \(and top_k"):
        upcycle(tiny(kind))
    if kind == "gpt2":  # the defaults (no biases, SwiGLU) do not fit GPT-2: named, with the fix
        with pytest.raises(ValueError, match=r"pass num_experts= instead of a MoEConfig"):
            upcycle(tiny(kind), MoEConfig(hidden_size=32, num_experts=4, ffn_hidden_size=48))

"""`moeflow train` on Hugging Face models built from their config (nothing downloads): the
`[model] hf_config` table, file or folder gives the run's shapes; what contradicts the HF model is
refused naming the field; the built model starts at the dense model's logits (upcycling) or from
saved weights (`[upcycle] weights`); a Llama is upcycled and trained at ep = 2 by `moeflow launch`,
resumed at ep = 1 with HF gradient checkpointing; a trained Qwen2-MoE checkpoint loads whole in one
process and exports to plain transformers with the same logits."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from moeflow.integrations.hf import export
from moeflow.integrations.hf_run import build_hf_model, hf_config_object
from moeflow.moe.layer import MoELayer
from moeflow.train.checkpoint import latest_checkpoint
from moeflow.train.config import RunConfig
from moeflow.train.hf_checkpoint import load_trained
from moeflow.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
LLAMA = {"model_type": "llama", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 48,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 64}  # fmt: skip
GPT2 = {"model_type": "gpt2", "vocab_size": 256, "n_embd": 32, "n_inner": 48, "n_layer": 2,
        "n_head": 4, "n_positions": 64, "bos_token_id": 0, "eos_token_id": 0}  # fmt: skip
QWEN2_MOE = {"model_type": "qwen2_moe", "vocab_size": 256, "hidden_size": 32,
             "intermediate_size": 64, "moe_intermediate_size": 24, "num_experts": 4,
             "num_experts_per_tok": 2, "shared_expert_intermediate_size": 32,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
             "max_position_embeddings": 64}  # fmt: skip


def run_dict(hf_config, out: Path | str = "unused", moe=None, **sections) -> dict:
    return {
        "model": {"hf_config": hf_config, "moe": moe if moe is not None else {"num_experts": 4}},
        "data": {"max_bytes": 100_000},
        "train": {"steps": 12, "seq_len": 32, "micro_batch_size": 4, "out_dir": str(out),
                  "eval_every": 0, "eval_windows": 8},
        "metrics": {"progress": False, "plot": False, "log_every": 4},
        "optim": {"warmup_steps": 2},
        **sections,
    }  # fmt: skip


def test_hf_config_from_a_table_a_file_and_a_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    built = [
        RunConfig.from_dict(run_dict(spec)).model
        for spec in (LLAMA, str(tmp_path / "config.json"), str(tmp_path))
    ]
    assert built[0] == built[1] == built[2]
    m = built[0]
    assert (m.vocab_size, m.dim, m.n_layers, m.n_heads, m.max_seq_len) == (256, 32, 2, 4, 64)
    assert (m.moe.hidden_size, m.moe.ffn_hidden_size, m.moe.num_experts) == (32, 48, 4)
    gpt2 = RunConfig.from_dict(run_dict(GPT2)).model
    assert (gpt2.dim, gpt2.n_layers, gpt2.max_seq_len, gpt2.moe.ffn_hidden_size) == (32, 2, 64, 48)
    assert (gpt2.moe.activation, gpt2.moe.ffn_bias) == ("gelu_tanh", True)
    sparse = RunConfig.from_dict(run_dict(QWEN2_MOE, moe={})).model.moe
    assert (sparse.num_experts, sparse.ffn_hidden_size, sparse.router.top_k) == (4, 24, 2)
    assert (sparse.shared_expert_ffn_hidden_size, sparse.shared_expert_gate) == (32, True)
    assert sparse.router.softmax_dtype == "fp32" and sparse.router.aux_loss_coeff == 0.001


@pytest.mark.parametrize(
    ("hf", "overrides", "message"),
    [
        (LLAMA, ["--model.dim", "64"], "model.dim (64) contradicts model.hf_config's hidden_size"),
        (LLAMA, ["--model.rope_theta", "5.0"], "model.rope_theta is the reference decoder's"),
        (LLAMA, ["--model.moe.ffn_hidden_size", "64"], "model.moe.ffn_hidden_size (64) must"),
        (LLAMA, ["--model.hf_config.hidden_sizee", "3"], "did you mean 'hidden_size'"),
        (LLAMA, ["--model.hf_config.model_type", "lama"], "'lama') is not a transformers model"),
        ({**LLAMA, "hidden_act": "gelu"}, [], "hidden_act = 'gelu'"),
        (GPT2, ["--model.moe.activation", '"swiglu"'], "model.moe.activation ('swiglu') must"),
        ({"vocab_size": 256}, [], "model.hf_config needs a model_type"),
        ("/nonexistent/config.json", [], "is not a config.json or a folder holding one"),
        (QWEN2_MOE, ["--model.moe.num_experts", "8"], "model.moe.num_experts (8) contradicts"),
        (QWEN2_MOE, ["--model.moe.router.top_k", "1"], "router.top_k (1) contradicts"),
        ({**QWEN2_MOE, "decoder_sparse_step": 2}, [], "sparse MoE blocks sit at decoder layers"),
        (LLAMA, ["--upcycle.weights", "/nonexistent"], "upcycle.weights ('/nonexistent') is not"),
    ],
)
def test_what_contradicts_the_hf_model_is_refused(hf, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RunConfig.from_dict(run_dict(hf, moe={}), overrides)


@pytest.mark.parametrize("hf", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_built_model_starts_at_the_dense_logits(hf):
    cfg = RunConfig.from_dict(run_dict(hf, train={"seed": 3, "seq_len": 32}))
    torch.manual_seed(3)
    dense = AutoModelForCausalLM.from_config(hf_config_object(hf)).eval()
    model = build_hf_model(cfg, torch.device("cpu")).eval()
    assert len([m for m in model.modules() if isinstance(m, MoELayer)]) == 2
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), dense(ids).logits)


def test_upcycle_weights_start_from_a_saved_model(tmp_path):
    torch.manual_seed(7)
    config = LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"})
    saved = LlamaForCausalLM(config).eval()
    saved.save_pretrained(tmp_path / "dense")
    cfg = RunConfig.from_dict({**run_dict(None), "upcycle": {"weights": str(tmp_path / "dense")}})
    assert cfg.model.hf_config["hidden_size"] == 32  # from the folder's config.json
    model = build_hf_model(cfg, torch.device("cpu")).eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), saved(ids).logits)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tmp_path / "dense/config.json").read_text())
    cfg = RunConfig.from_dict({**run_dict(None), "upcycle": {"weights": str(tmp_path / "empty")}})
    with pytest.raises(ValueError, match=r"upcycle\.weights .* could not be loaded"):
        build_hf_model(cfg, torch.device("cpu"))


def losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r.get("kind") == "train"]


def test_moeflow_train_upcycles_a_llama_at_ep2_and_resumes_at_ep1(tmp_path):
    out = tmp_path / "run"
    data = run_dict(LLAMA, out, parallel={"ep": 2}, checkpoint={"every": 6})
    lines = []
    for section, table in data.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items() if not isinstance(v, dict)]
        for k, v in table.items():
            if isinstance(v, dict):
                inline = ", ".join(f"{a} = {json.dumps(b)}" for a, b in v.items())
                lines.append(f"{k} = {{ {inline} }}")
    (tmp_path / "run.toml").write_text("\n".join(lines) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "moeflow", "launch", "--nproc", "2", "--", "train",
         str(tmp_path / "run.toml")],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "dp=1, ep=2" in done.stdout
    first = losses(out)
    assert len(first) == 3 and first[-1] < first[0] - 0.5, first
    meta = json.loads((latest_checkpoint(out / "checkpoints") / "moeflow.json").read_text())
    assert meta["step"] == 12 and meta["config"]["model"]["hf_config"] == LLAMA
    # Resume in one process at ep = 1 (the experts reshard) with HF gradient checkpointing.
    cfg = RunConfig.from_dict(
        data, ["--train.steps", "16", "--parallel.ep", "1", "--train.activation_checkpointing",
               "true"],
    )  # fmt: skip
    result = train(cfg, resume="latest", quiet=True)
    assert (result.first_step, result.last_step) == (12, 16)
    assert losses(out)[-1] < first[0] - 0.5


def test_trained_sparse_model_exports_to_plain_transformers(tmp_path):
    cfg = RunConfig.from_dict(
        run_dict(QWEN2_MOE, tmp_path / "run", moe={"router": {"z_loss_coeff": 1e-3}})
    )
    result = train(cfg, quiet=True)
    assert losses(tmp_path / "run")[-1] < losses(tmp_path / "run")[0]
    model = load_trained(result.checkpoint).eval()
    layer = model.model.layers[0].mlp
    assert isinstance(layer, MoELayer) and layer.config.router.z_loss_coeff == 1e-3
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = model(ids).logits
    export(model)
    model.save_pretrained(tmp_path / "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(reloaded.model.layers[0].mlp).__name__ == "Qwen2MoeSparseMoeBlock"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trained)


def test_example_config_is_valid():
    cfg = RunConfig.from_toml(ROOT / "examples/configs/hf_llama_upcycle.toml")
    model = build_hf_model(cfg, torch.device("meta"))
    assert [type(layer.mlp) for layer in model.hf.model.layers] == [MoELayer] * 4
    assert (cfg.model.dim, cfg.model.moe.num_experts, cfg.parallel.ep) == (128, 8, 2)

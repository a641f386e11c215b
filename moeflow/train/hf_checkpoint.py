"""A Hugging Face model trained by `moeflow train` (`[model] hf_config`), out of its checkpoint:
the trainer owns this, the integration only builds models (`moeflow.integrations.hf_run`).

Example (a 2-step run of a tiny Llama, then its model whole in this process):
    >>> import tempfile
    >>> from moeflow.train.trainer import train
    >>> cfg = RunConfig.from_dict({"model": {"hf_config": {"model_type": "llama",
    ...     "vocab_size": 256, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
    ...     "num_attention_heads": 4, "max_position_embeddings": 64}, "moe": {"num_experts": 2}},
    ...     "data": {"max_bytes": 20000}, "train": {"steps": 2, "seq_len": 16,
    ...     "micro_batch_size": 2, "out_dir": tempfile.mkdtemp()},
    ...     "metrics": {"progress": False, "plot": False}})
    >>> model = load_trained(train(cfg, quiet=True).checkpoint)
    >>> type(model).__name__, model(torch.zeros(1, 8, dtype=torch.long)).logits.shape
    ('LlamaForCausalLM', torch.Size([1, 8, 256]))
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moeflow.integrations.hf_run import build_hf_model
from moeflow.train.checkpoint import load_checkpoint, read_meta
from moeflow.train.config import RunConfig


def load_trained(checkpoint: str | Path) -> nn.Module:
    """The HF model of a `moeflow train` checkpoint (an HF run's), whole in one process (every
    expert, whatever `parallel.ep` wrote it), for evaluation, or for `export` and `save_pretrained`
    when its MoE layers were converted from HF blocks."""
    meta = read_meta(checkpoint)
    saved = meta.get("config", {})
    if not isinstance(saved.get("model"), dict) or saved["model"].get("hf_config") is None:
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} holds moeflow's reference decoder, not an HF model"
        )
    cfg = RunConfig.from_dict({"model": saved["model"], "train": saved.get("train", {})})
    model = build_hf_model(cfg, torch.device("cpu"))
    load_checkpoint(checkpoint, model, None)
    return model.hf

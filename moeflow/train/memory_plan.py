"""The dry run's memory planner: what one rank needs at its peak, item by item, from the model it
builds on the meta device (sharded as the run will be) and the run's shapes.

Items, per rank:
- `weights`, `gradients`, `optimizer`: the training state, summed over the rank's local tensors
  (shards under `dp_shard`), fp32 master weights and AdamW moments, 4 bytes of step count per
  tensor: what the trainer's `start` record measures;
- `root unsharded`: a sharded model's root unit (embedding, final norm, head) stays gathered from
  its forward to its backward, in the compute dtype;
- `largest transient`: the most a block adds while it runs: FSDP's gathered block (the running
  one and the next, prefetched) and its unsharded gradients before the reduce-scatter, or the
  expert weights a `dp` / `sharded` mode gathers, whichever layer needs most;
- `activations`: what a micro-batch keeps for backward: per block (tokens T, compute bytes b)
  `b T (6.1 D + 3.25 H d + 4.25 G d)` for attention and norms, plus `b T k (2 g F + 2 D)` for
  an MoE FFN (g = 2 for gated activations; routed rows, their expert activations and outputs),
  `b T (2 g F_s)` for a shared expert, `b T (2 g F_d)` for a dense FFN, and `2.1 b T D` for the
  embedding and final norm (coefficients measured with saved-tensor hooks on moeflow's decoder),
  and an unchunked loss's logits and log-softmax `(b + 4) T V`.
  With activation checkpointing: each block's input only, plus one block recomputed in backward;
  selective checkpointing also keeps each MoE layer's exchanged rows, `2 b T k D`;
- `loss buffers`: the fp32 logits of one loss chunk (`train.loss_chunk_tokens`), three times
  (logits, their softmax, its gradient), or of the whole micro-batch without chunking.

The peak is their sum. `verdict` compares it with a device's memory and names the largest item;
`moeflow.train.fit_advice` names what would make a run that does not fit fit.

Example:
    >>> plan = {"weights": 6e9, "gradients": 6e9, "optimizer": 12e9, "activations": 70e9,
    ...         "loss buffers": 1e9}
    >>> verdict(plan, 80e9)
    'does not fit 74.5 GiB: needs 88.5 GiB; the largest item is activations (65.2 GiB)'
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import DTensor

from moeflow.moe.dispatch_config import MODES
from moeflow.moe.ffn import gate_multiplier
from moeflow.moe.layer import MoELayer
from moeflow.moe.walk import moe_layers
from moeflow.parallel.fsdp import is_sharded, transformer_blocks, unsharded_bytes
from moeflow.train.config import RunConfig

COMPUTE_BYTES = {"fp32": 4, "bf16": 2}


def local_numel(p) -> int:
    """Elements of `p` on this rank (a DTensor's local shard)."""
    return p._local_tensor.numel() if isinstance(p, DTensor) else p.numel()


def state_bytes(model: nn.Module) -> dict[str, int]:
    """Training state on this rank: fp32 weights and gradients, AdamW's two moments and a step
    count per tensor, from the local tensors (what the trainer's `start` record measures)."""
    params = [p for p in model.parameters() if p.requires_grad]
    local = sum(local_numel(p) for p in params)
    return {"params": 4 * local, "grads": 4 * local, "optimizer": 8 * local + 4 * len(params)}


def _block_activations(cfg: RunConfig, block_is_moe: bool, tokens: int, b: int) -> float:
    m = cfg.model
    d, heads, kv = m.head_width, m.n_heads, m.kv_heads
    total = b * tokens * (6.1 * m.dim + 3.25 * heads * d + 4.25 * kv * d)
    if b < 4:  # rotary embeddings run on fp32 copies of the queries and keys
        total += 4 * tokens * (heads + kv) * d
    moe = m.moe
    g = gate_multiplier(moe.activation)
    if block_is_moe:
        k = moe.router.top_k
        total += b * tokens * k * (2 * g * moe.ffn_hidden_size + 2 * moe.expert_dim)
        total += b * tokens * 2 * g * moe.shared_expert_ffn_hidden_size
        total += 4 * tokens * 2 * moe.num_experts  # router logits and probabilities, fp32
    else:
        total += b * tokens * 2 * g * (m.dense_ffn_hidden_size or moe.ffn_hidden_size)
    return total


def activation_bytes(cfg: RunConfig, compute: str, checkpointing: bool | str) -> dict[str, float]:
    """`saved`: what one micro-batch keeps for backward; `recompute`: what checkpointing adds
    while one block is recomputed in backward (0 without). `checkpointing`: False, True, or
    "selective" (each MoE block also keeps its received and returned rows, `2 b T k D`)."""
    t, m = cfg.train, cfg.model
    tokens = t.micro_batch_size * t.seq_len
    b = COMPUTE_BYTES[compute]
    blocks = [_block_activations(cfg, m.is_moe_layer(i), tokens, b) for i in range(m.n_layers)]
    outer = 2.1 * b * tokens * m.dim
    chunk = t.loss_chunk_tokens
    if not chunk or tokens <= chunk:  # unchunked: the logits and their log-softmax are kept
        outer += (b + 4) * tokens * m.vocab_size
    if not checkpointing:
        return {"saved": outer + sum(blocks), "recompute": 0.0}
    saved = outer + m.n_layers * b * tokens * m.dim
    if checkpointing == "selective":
        moe_blocks = sum(m.is_moe_layer(i) for i in range(m.n_layers))
        saved += moe_blocks * 2 * b * tokens * m.moe.router.top_k * m.moe.expert_dim
    return {"saved": saved, "recompute": max(blocks)}


def loss_buffer_bytes(cfg: RunConfig) -> float:
    """The fp32 logits (and their softmax and gradient) of one loss chunk."""
    t = cfg.train
    tokens = t.micro_batch_size * t.seq_len
    chunk = min(tokens, t.loss_chunk_tokens) if t.loss_chunk_tokens else tokens
    return 3 * 4 * chunk * cfg.model.vocab_size


def transient_bytes(model: nn.Module, compute: str, mode: str) -> tuple[int, str]:
    """The largest transient of any block and what it is: FSDP's gathered block, twice (the
    running block and the prefetched next one), its unsharded fp32 gradients, and the experts
    the layers' mode gathers on top."""
    b = COMPUTE_BYTES[compute]
    best, what = 0, "nothing gathered"
    sharded = is_sharded(model)
    modes = MODES if mode == "auto" else (mode,)
    for block in transformer_blocks(model):
        gathered = unsharded_bytes(block, b) if sharded else 0
        grads = unsharded_bytes(block, 4) if sharded else 0
        extra = 0
        for _, layer in moe_layers(block) if not isinstance(block, MoELayer) else [("", block)]:
            cfg = layer.config
            g = gate_multiplier(cfg.activation)
            extra = max(
                b * layer.layout.gather_peak_elements(x, cfg.expert_dim, g, cfg.ffn_bias)
                for x in modes
            )
        total = 2 * gathered + grads + extra
        if total > best:
            best = total
            what = "gathered block x 2 and its gradients" if sharded else "gathered experts"
            if sharded and extra:
                what += " + gathered experts"
    return best, what


def root_bytes(model: nn.Module, compute: str) -> int:
    """A sharded model's root unit (what no block holds), gathered for the whole step."""
    if not is_sharded(model):
        return 0
    inner = {id(p) for block in transformer_blocks(model) for p in block.parameters()}
    b = COMPUTE_BYTES[compute]
    return sum(
        (p.numel() - p._local_tensor.numel()) * b
        for p in model.parameters()
        if isinstance(p, DTensor) and id(p) not in inner
    )


def human_bytes(n: float) -> str:
    """`n` bytes in the largest binary unit that keeps it at least 1.

    Example:
        >>> human_bytes(3 * 2**30), human_bytes(1536), human_bytes(12)
        ('3 GiB', '1.5 KiB', '12 B')
    """
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def verdict(plan: dict[str, float], device_bytes: float, startup: float = 0.0) -> str:
    """`fits` / `does not fit` a device of `device_bytes`, naming the largest item. `startup`:
    the rank's share built whole before sharding, a peak of its own (the start-up peak)."""
    training = sum(plan.values())
    need = max(training, startup)
    head = f"{human_bytes(device_bytes)}: needs {human_bytes(need)}"
    if need <= device_bytes:
        return f"fits {head} ({human_bytes(device_bytes - need)} to spare)"
    if startup > training:
        return (
            f"does not fit {head} at start-up (this rank's dense weights and experts are built "
            f"whole before they are sharded; {human_bytes(training)} while training)"
        )
    item, size = max(plan.items(), key=lambda kv: kv[1])
    return f"does not fit {head}; the largest item is {item} ({human_bytes(size)})"

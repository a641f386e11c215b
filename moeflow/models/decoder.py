"""The reference GPT-style MoE decoder: RMSNorm, rotary positions, causal attention, MoE FFNs.

Legend: B batch, S sequence, D model dim, H heads, V vocabulary, d half a head's width.

Every `moe_layer_freq`-th block (blocks 0, freq, 2*freq, ...) has an `MoELayer` as its FFN, the
others a dense `FeedForward` (Megatron's `moe_layer_freq`). One `RoutingContext` per forward pass
travels from MoE layer to MoE layer. Build large models on the meta device and materialise them
rank by rank:

    with torch.device("meta"):
        model = MoEDecoder(cfg)
    model.to_empty(device="cpu")   # or the rank's GPU, after parallelize() kept only local experts
    model.init_weights(seed=0)

Example:
    >>> cfg = DecoderConfig(dim=32, n_layers=2, n_heads=4, max_seq_len=16,
    ...                     moe=MoEConfig(hidden_size=32, num_experts=4, ffn_hidden_size=64))
    >>> MoEDecoder(cfg)(torch.zeros(2, 16, dtype=torch.long)).shape
    torch.Size([2, 16, 256])
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from moeflow.comm.replay import CollectiveReplay
from moeflow.models.documents import document_attention
from moeflow.models.lm_loss import chunked_token_loss, token_loss
from moeflow.moe.config import MoEConfig
from moeflow.moe.ffn import FeedForward
from moeflow.moe.layer import MoELayer
from moeflow.moe.routers.recurrent import reset_gru
from moeflow.moe.routing_context import RoutingContext


@dataclass(kw_only=True, frozen=True)
class DecoderConfig:
    """Shape of the decoder. `moe.hidden_size` must equal `dim`; dense blocks use
    `dense_ffn_hidden_size` (default: `moe.ffn_hidden_size`). Attention has `n_heads` query heads
    of width `head_dim` (default `dim / n_heads`) and `n_kv_heads` key/value heads (default
    `n_heads`; fewer is grouped-query attention, each key/value head serving `n_heads /
    n_kv_heads` query heads). Block i has an MoE FFN when `i >= first_k_dense` and `i %
    moe_layer_freq == 0` (DeepSeek's `first_k_dense_replace`: the first blocks stay dense).
    `hf_config`: a Hugging Face model's config (its keys) trained instead of this decoder, its
    shape fields copied here (`moeflow.integrations.hf_run`)."""

    vocab_size: int = 256
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256
    moe_layer_freq: int = 1
    n_kv_heads: int | None = None
    head_dim: int | None = None
    first_k_dense: int = 0
    dense_ffn_hidden_size: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    moe: MoEConfig = field(
        default_factory=lambda: MoEConfig(hidden_size=256, num_experts=8, ffn_hidden_size=512)
    )
    hf_config: dict | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "moe_layer_freq"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.{name} ({value!r}) must be an integer >= 1")
        for name in ("n_kv_heads", "head_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):  # fmt: skip
                raise ValueError(f"model.{name} ({value!r}) must be an integer >= 1 (or unset)")
        if not isinstance(self.first_k_dense, int) or not 0 <= self.first_k_dense <= self.n_layers:
            raise ValueError(
                f"model.first_k_dense ({self.first_k_dense!r}) must be an integer in 0..n_layers "
                f"({self.n_layers}): how many blocks before the first MoE block stay dense"
            )
        if self.hf_config is None:
            self._check_attention()
        if self.moe.hidden_size != self.dim:
            raise ValueError(
                f"moe.hidden_size ({self.moe.hidden_size}) must equal model.dim ({self.dim})"
            )
        if not self.init_std > 0:
            raise ValueError(f"model.init_std ({self.init_std!r}) must be > 0")

    def _check_attention(self) -> None:
        if self.head_dim is None and (self.dim % self.n_heads or (self.dim // self.n_heads) % 2):
            raise ValueError(
                f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads}) "
                "into an even head dim (rotary positions rotate pairs), or set model.head_dim"
            )
        if self.head_dim is not None and self.head_dim % 2:
            raise ValueError(
                f"model.head_dim ({self.head_dim}) must be even (rotary positions rotate pairs)"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"model.n_kv_heads ({self.kv_heads}) must divide model.n_heads ({self.n_heads}): "
                "each key/value head serves the same number of query heads"
            )

    @property
    def kv_heads(self) -> int:
        """Key/value heads (`n_kv_heads`, default `n_heads`)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_width(self) -> int:
        """Each head's width (`head_dim`, default `dim / n_heads`)."""
        return self.dim // self.n_heads if self.head_dim is None else self.head_dim

    def is_moe_layer(self, index: int) -> bool:
        return index >= self.first_k_dense and index % self.moe_layer_freq == 0


def rotary_tables(seq_len: int, head_dim: int, theta: float, device=None):
    """cos/sin `[S, head_dim/2]` for rotary position embeddings."""
    inv = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    )
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv)
    return angles.cos(), angles.sin()


def apply_rotary(x_BHSd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # At least fp32 (bf16 activations rotate in fp32); float64 stays float64.
    wide = x_BHSd.to(torch.promote_types(x_BHSd.dtype, torch.float32))
    x1, x2 = wide.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x_BHSd)


class Attention(nn.Module):
    """Causal attention with rotary positions: H query heads and G key/value heads of width d
    (`qkv` projects D -> (H + 2G) d, queries first; G < H is grouped-query attention).

    `cos`/`sin` are the shared tables `[>= S, d/2]` (position i at row i) or one row of
    positions per sequence `[B, 1, S, d/2]`; `mask_B1SS` (True = attend), when given, replaces
    the causal mask (packed documents: `document_attention`)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.width = cfg.n_heads, cfg.kv_heads, cfg.head_width
        self.qkv = nn.Linear(cfg.dim, (self.n_heads + 2 * self.n_kv) * self.width, bias=False)
        self.proj = nn.Linear(self.n_heads * self.width, cfg.dim, bias=False)

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask_B1SS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, s, _ = x_BSD.shape
        h, g = self.n_heads, self.n_kv
        q, k, v = self.qkv(x_BSD).view(b, s, h + 2 * g, self.width).split([h, g, g], dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, S, d]
        if cos.dim() == 2:  # the shared tables; per-sequence positions come cut to S
            cos, sin = cos[:s], sin[:s]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if g < h:  # each key/value head serves h / g consecutive query heads
            k, v = k.repeat_interleave(h // g, dim=1), v.repeat_interleave(h // g, dim=1)
        if mask_B1SS is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1SS)
        return self.proj(out.transpose(1, 2).reshape(b, s, h * self.width))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig, index: int, shared: nn.ModuleDict) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        if cfg.is_moe_layer(index):
            self.ffn: nn.Module = MoELayer(cfg.moe, shared)
        else:
            width = cfg.dense_ffn_hidden_size or cfg.moe.ffn_hidden_size
            self.ffn = FeedForward(cfg.dim, width, cfg.moe.activation, cfg.moe.ffn_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        routing_context: RoutingContext,
        mask_B1SS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask_B1SS)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoELayer):
            return x + self.ffn(h, routing_context=routing_context)
        return x + self.ffn(h)


class MoEDecoder(nn.Module):
    """Token ids `[B, S]` -> logits `[B, S, V]`."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        # Router modules shared by the MoE layers (RMoE's GRU cell), registered here once.
        self.router_shared = nn.ModuleDict()
        self.blocks = nn.ModuleList(Block(cfg, i, self.router_shared) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg.max_seq_len, cfg.head_width, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Recompute each block's activations in backward instead of keeping them: True, or
        # "selective" (the all-to-alls' results are kept); the trainer sets it from
        # train.activation_checkpointing.
        self.activation_checkpointing = False
        if self.embed.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initialise every parameter and buffer in place, e.g. after `to_empty` from the meta
        device. Linear and embedding weights N(0, init_std); output projections of attention scaled
        by 1/sqrt(2 * n_layers) (GPT-2); norms 1; experts and routers by their own rules."""
        cfg = self.config
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.embed.weight.device).manual_seed(seed)
        cos, sin = rotary_tables(
            cfg.max_seq_len, cfg.head_width, cfg.rope_theta, self.rope_cos.device
        )
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        nn.init.normal_(self.embed.weight, std=cfg.init_std, generator=gen)
        nn.init.normal_(self.head.weight, std=cfg.init_std, generator=gen)
        for index, block in enumerate(self.blocks):
            nn.init.normal_(block.attn.qkv.weight, std=cfg.init_std, generator=gen)
            nn.init.normal_(
                block.attn.proj.weight,
                std=cfg.init_std / math.sqrt(2 * cfg.n_layers),
                generator=gen,
            )
            if isinstance(block.ffn, MoELayer):  # experts seeded by (seed, block)
                block.ffn.reset_parameters(generator=gen, seed=seed, salt=index)
            else:
                block.ffn.reset_parameters(generator=gen)
        for module in self.router_shared.values():
            reset_gru(module, gen)
        for module in self.modules():
            if isinstance(module, nn.RMSNorm):
                module.reset_parameters()

    # `model_loss` hands this model its targets: the loss is computed inside `forward`, where a
    # sharded model's head weight is gathered.
    computes_loss = True

    def forward(
        self,
        tokens_BS: torch.Tensor,
        targets_BS: torch.Tensor | None = None,
        loss_chunk_tokens: int = 0,
        document_ids_BS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits `[B, S, V]`; with `targets_BS`, the mean next-token loss instead, computed
        `loss_chunk_tokens` tokens' logits at a time (0: all at once; `moeflow.models.lm_loss`).
        `document_ids_BS` (`document_ids`): each packed document attends only to itself, its
        rotary positions starting at 0, as if it ran alone; None: plain causal attention."""
        hidden = self.hidden_states(tokens_BS, document_ids_BS)
        if targets_BS is None:
            return self.head(hidden)
        if loss_chunk_tokens:
            return chunked_token_loss(hidden, self.head.weight, targets_BS, loss_chunk_tokens)
        return token_loss(self.head(hidden), targets_BS)

    def hidden_states(
        self, tokens_BS: torch.Tensor, document_ids_BS: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`[B, S, D]`: the final normalised states, the output head's input (a loss that never
        holds `[B, S, V]` logits takes these and `head.weight`: `moeflow.train.loss`)."""
        s = tokens_BS.shape[1]
        if s > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {s} exceeds model.max_seq_len ({self.config.max_seq_len})"
            )
        cos, sin, mask_B1SS = self.rope_cos, self.rope_sin, None
        if document_ids_BS is not None:
            if document_ids_BS.shape != tokens_BS.shape:
                raise ValueError(
                    f"document_ids_BS has shape {tuple(document_ids_BS.shape)}, tokens_BS "
                    f"{tuple(tokens_BS.shape)}: give one document id per token "
                    "(moeflow.models.documents.document_ids)"
                )
            # Built once per forward, shared by every block.
            mask_B1SS, positions_BS = document_attention(document_ids_BS)
            cos, sin = cos[positions_BS].unsqueeze(1), sin[positions_BS].unsqueeze(1)
        routing_context = RoutingContext()
        x = self.embed(tokens_BS)
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x, routing_context = self._checkpointed(
                    block, x, routing_context, (cos, sin, mask_B1SS)
                )
            else:
                x = block(x, cos, sin, routing_context, mask_B1SS)
        return self.norm(x)

    def _checkpointed(
        self,
        block: Block,
        x: torch.Tensor,
        routing_context: RoutingContext,
        attention: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    ):
        """Run `block` under non-reentrant activation checkpointing. The recomputation in backward
        starts from a copy of the routing context as it was before the block, so a router that
        reads the context recomputes exactly what it computed; the forward's context goes on.
        `activation_checkpointing = "selective"`: the block's token exchanges are kept from the
        forward and replayed by the recomputation, which then repeats no all-to-all
        (`moeflow.comm.replay`). `attention`: the blocks' (cos, sin, mask), as `Block` takes
        them."""
        cos, sin, mask_B1SS = attention
        before = routing_context.copy()
        # The forward's context leaves through `handed`, emptied before returning: `run` (kept by
        # the checkpoint until backward) must not hold it, or the router logits' graph it holds
        # would keep `run` alive in a cycle autograd's nodes hide from the garbage collector.
        handed: list[RoutingContext] = []
        calls = [0]
        replay = CollectiveReplay() if self.activation_checkpointing == "selective" else None

        def run(x_: torch.Tensor) -> torch.Tensor:
            ctx = before.copy()
            ctx.recomputing = calls[0] > 0  # the first call is the forward; later ones recompute
            calls[0] += 1
            if replay is None:
                kept = contextlib.nullcontext()
            else:
                kept = replay.replaying() if ctx.recomputing else replay.recording()
            with kept:
                out = block(x_, cos, sin, ctx, mask_B1SS)
            if not ctx.recomputing:
                handed.append(ctx)
            return out

        out = torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)
        return out, handed.pop()

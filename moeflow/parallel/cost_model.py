"""Cost model of one MoE layer call (forward + backward) in each parallel candidate: an alpha-beta
model of the collectives and a GEMM rate, from the layer's shapes and loads.

Legend: T tokens per rank, K top-k, D model dim, F FFN dim, c = 2 for SwiGLU (else 1), E experts,
G ranks in the expert group, S = G / E shards per expert when G > E (else 1), g ranks per node,
rho the max/mean load over the ranks (or shard groups) that compute experts, b bytes per element.

A candidate is `(mode, overlap degree, two-level all-to-all)`. Per rank and call:

- expert FLOPs, forward + backward: `6 * D * F * (c + 1)` per routed row at the full F; `ep`
  computes `rho * T * K` rows at F (the busiest rank), `sharded` `rho * T * K * S` rows at F / S
  (the same FLOPs), `dp` its own `T * K` rows at F (no imbalance: every rank its own tokens);
- token all-to-alls (`ep`, `sharded`): four per call (dispatch and combine, forward and backward),
  each of `T * K * D * b` bytes per rank (`* S` in `sharded`);
- weight gathers: `ep` with S > 1 all-gathers its shard group's slices twice (forward, and again in
  backward) and reduce-scatters the gradient once; `dp` does the same over the whole group.

Collectives (alpha-beta, `Link` figures): an all-to-all of m bytes per rank costs
`alpha + (G - 1) * alpha_peer + max(intra bytes / intra bandwidth, inter bytes / inter bandwidth)`
(flat), or the same for the intra-node exchange of all m bytes followed by the inter-node one among
the G / g ranks of a local index (two-level); a ring all-gather or reduce-scatter of w bytes per
rank over P ranks costs `(P - 1) * (alpha + w / bandwidth)`, at the slowest link the group spans.

GEMMs run at `rate * rows / (rows + half_rows)` (small GEMMs are slower). With overlap degree n the
rows are cut into n chunks: `n * gemm(rows / n)` of compute, the token all-to-alls split alike,
and the call takes `max(compute, tokens) + min(compute, tokens) / n + 4 * (n - 1) * alpha`; weight
gathers are blocking and add to it.

Example:
    >>> shape = LayerShape(tokens=4096, hidden=2048, ffn=1024, experts=64, top_k=8, group=64)
    >>> costs = predict_all(shape, PRESETS["h100"], ranks_per_node=8)
    >>> best = min(costs, key=lambda p: p.seconds)
    >>> best.candidate.mode, costs[0].seconds > 0
    ('ep', True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from moeflow.moe.dispatch_config import MODES, check_mode
from moeflow.moe.layout import check_sizes


@dataclass(frozen=True)
class Link:
    """One kind of link: bandwidth per rank and direction (bytes/s), latency (s) of a collective
    step, and the added cost of one more peer in an all-to-all (s)."""

    bandwidth: float
    alpha: float
    alpha_peer: float = 0.0

    def __post_init__(self) -> None:
        if not self.bandwidth > 0 or not self.alpha >= 0 or not self.alpha_peer >= 0:
            raise ValueError(f"link figures must be bandwidth > 0 and latencies >= 0, got {self}")


@dataclass(frozen=True)
class Hardware:
    """A machine's figures: `gemm_flops` (FLOP/s reached by large GEMMs in the training dtype),
    `half_rows` (rows at which a GEMM reaches half of it), `intra` and `inter` node links,
    `bytes_per_element` of activations and weights on the wire."""

    name: str
    gemm_flops: float
    intra: Link
    inter: Link
    half_rows: float = 64.0
    bytes_per_element: int = 2
    source: str = ""

    def __post_init__(self) -> None:
        if not self.gemm_flops > 0 or not self.half_rows >= 0:
            raise ValueError(f"hardware {self.name!r}: gemm_flops must be > 0, half_rows >= 0")


# Figures: vendor data sheets for peaks, scaled by what large bf16 GEMMs and NCCL collectives reach
# in published measurements (stated per figure). They are inputs a user overrides by flags.
PRESETS: dict[str, Hardware] = {
    "a100": Hardware(
        name="a100",
        # NVIDIA A100 SXM data sheet: 312 TFLOP/s dense bf16; large cuBLAS GEMMs reach ~70%.
        gemm_flops=0.7 * 312e12,
        # NVLink 3 (NVSwitch): 600 GB/s total = 300 GB/s per direction per GPU; NCCL all-to-all
        # bus bandwidth ~70% of it (nccl-tests on DGX A100). Latency ~10 us per collective step.
        intra=Link(bandwidth=0.7 * 300e9, alpha=10e-6, alpha_peer=1e-6),
        # One 200 Gb/s HDR InfiniBand NIC per GPU (DGX A100): 25 GB/s, ~80% reached; ~20 us.
        inter=Link(bandwidth=0.8 * 25e9, alpha=20e-6, alpha_peer=2e-6),
        half_rows=128.0,
        source="NVIDIA A100 and DGX A100 data sheets; nccl-tests bus bandwidth",
    ),
    "h100": Hardware(
        name="h100",
        # NVIDIA H100 SXM data sheet: 989 TFLOP/s dense bf16; large GEMMs reach ~65%.
        gemm_flops=0.65 * 989e12,
        # NVLink 4: 900 GB/s total = 450 GB/s per direction per GPU, ~70% in NCCL all-to-all.
        intra=Link(bandwidth=0.7 * 450e9, alpha=8e-6, alpha_peer=1e-6),
        # One 400 Gb/s NDR InfiniBand NIC per GPU (DGX H100): 50 GB/s, ~80% reached; ~15 us.
        inter=Link(bandwidth=0.8 * 50e9, alpha=15e-6, alpha_peer=2e-6),
        half_rows=256.0,
        source="NVIDIA H100 and DGX H100 data sheets; nccl-tests bus bandwidth",
    ),
}


@dataclass(frozen=True)
class LayerShape:
    """One MoE layer call: `tokens` per rank, sizes, the expert group `group`, and `imbalance`
    (max/mean load over the ranks that hold experts; 1 is perfect)."""

    tokens: int
    hidden: int
    ffn: int
    experts: int
    top_k: int
    group: int
    gate_blocks: int = 2  # SwiGLU
    imbalance: float = 1.0

    def __post_init__(self) -> None:
        check_sizes(self.experts, self.ffn, self.group)
        if not self.imbalance >= 1.0:
            raise ValueError(f"imbalance ({self.imbalance}) is a max/mean ratio: >= 1")

    @property
    def shards(self) -> int:
        return check_sizes(self.experts, self.ffn, self.group)


@dataclass(frozen=True)
class Candidate:
    mode: str
    overlap: int = 1
    two_level: bool = False

    def label(self) -> str:
        text = self.mode if self.overlap == 1 else f"{self.mode}/n{self.overlap}"
        return text + ("/2dh" if self.two_level else "")

    @classmethod
    def parse(cls, label: str) -> Candidate:
        """The candidate of a `label()`: `mode[/nC][/2dh]`.

        Example:
            >>> Candidate.parse("ep/n2/2dh")
            Candidate(mode='ep', overlap=2, two_level=True)
        """
        mode, *rest = label.split("/")
        two_level = rest[-1:] == ["2dh"]
        rest = rest[:-1] if two_level else rest
        if mode not in MODES or len(rest) > 1 or (rest and not rest[0][1:].isdigit()):
            raise ValueError(f"candidate label {label!r} is not mode[/nC][/2dh]")
        return cls(mode, int(rest[0][1:]) if rest else 1, two_level)


@dataclass(frozen=True)
class Prediction:
    candidate: Candidate
    seconds: float
    compute_s: float
    tokens_s: float  # token all-to-alls (before overlap)
    weights_s: float  # weight gathers and the gradient reduce-scatter
    token_bytes: float  # per rank and call, sent
    weight_bytes: float
    parts: dict = field(default_factory=dict)


def gemm_seconds(rows: float, flops_per_row: float, hw: Hardware) -> float:
    if rows <= 0:
        return 0.0
    rate = hw.gemm_flops * rows / (rows + hw.half_rows)
    return rows * flops_per_row / rate


def all_to_all_seconds(
    nbytes: float, group: int, ranks_per_node: int, hw: Hardware, two_level: bool = False
) -> float:
    """One all-to-all of `nbytes` per rank, spread evenly over the group."""
    if group == 1 or nbytes <= 0:
        return 0.0
    g = min(ranks_per_node, group)
    nodes = group // g
    if not two_level or nodes == 1 or g == 1:
        intra = nbytes * (g - 1) / group
        inter = nbytes * (group - g) / group
        link = hw.inter if nodes > 1 else hw.intra
        wire = max(intra / hw.intra.bandwidth, inter / hw.inter.bandwidth)
        return link.alpha + (g - 1) * hw.intra.alpha_peer + (group - g) * hw.inter.alpha_peer + wire
    stage1 = hw.intra.alpha + (g - 1) * hw.intra.alpha_peer
    stage1 += nbytes * (g - 1) / g / hw.intra.bandwidth
    stage2 = hw.inter.alpha + (nodes - 1) * hw.inter.alpha_peer
    stage2 += nbytes * (nodes - 1) / nodes / hw.inter.bandwidth
    return stage1 + stage2


def ring_seconds(nbytes: float, ranks: int, spans_nodes: bool, hw: Hardware) -> float:
    """A ring all-gather (or reduce-scatter) of `nbytes` per rank over `ranks` ranks."""
    if ranks == 1:
        return 0.0
    link = hw.inter if spans_nodes else hw.intra
    return (ranks - 1) * (link.alpha + nbytes / link.bandwidth)


def predict(shape: LayerShape, cand: Candidate, hw: Hardware, ranks_per_node: int) -> Prediction:
    """The predicted time of one forward + backward of the layer in `cand` (see the module doc)."""
    check_mode(cand.mode, "mode")
    s, b = shape.shards, hw.bytes_per_element
    d, f, c = shape.hidden, shape.ffn, shape.gate_blocks
    g = min(ranks_per_node, shape.group)
    flops_row = 6.0 * d * f * (c + 1)
    rows = float(shape.tokens * shape.top_k)
    weights_rank = shape.experts * (c + 1) * f * d * b / shape.group  # a rank's share, bytes
    n = 1 if cand.mode == "dp" else cand.overlap
    if cand.mode == "dp":
        compute = gemm_seconds(rows, flops_row, hw)
        token_bytes, tokens_s = 0.0, 0.0
        gathers = 3 * ring_seconds(weights_rank, shape.group, shape.group > g, hw)
        weight_bytes = 3 * weights_rank * (shape.group - 1)
    else:
        busy = rows * shape.imbalance
        if cand.mode == "ep":
            compute = n * gemm_seconds(busy / n, flops_row, hw)
        else:  # S sub-rows per row at F / S: the same FLOPs on S times the rows
            compute = n * gemm_seconds(busy * s / n, flops_row / s, hw)
        token_bytes = 4 * rows * d * b * (s if cand.mode == "sharded" else 1)
        per_chunk = token_bytes / 4 / n
        tokens_s = 4 * n * all_to_all_seconds(per_chunk, shape.group, g, hw, cand.two_level)
        gathers, weight_bytes = 0.0, 0.0
        if cand.mode == "ep" and s > 1:
            gathers = 3 * ring_seconds(weights_rank, s, s > g, hw)
            weight_bytes = 3 * weights_rank * (s - 1)
    overlapped = max(compute, tokens_s) + min(compute, tokens_s) / n
    link = hw.inter if shape.group > g else hw.intra
    seconds = overlapped + 4 * (n - 1) * link.alpha + gathers
    parts = {"overlapped": overlapped}
    return Prediction(cand, seconds, compute, tokens_s, gathers, token_bytes, weight_bytes, parts)


def candidates(
    shape: LayerShape,
    ranks_per_node: int,
    overlaps: tuple[int, ...] = (1, 2, 4),
) -> list[Candidate]:
    """Every candidate worth timing: each mode (`sharded` only when it differs from `ep`, S > 1),
    each overlap degree where tokens travel, two-level all-to-all only across nodes."""
    multi_node = shape.group > min(ranks_per_node, shape.group)
    out = [Candidate("dp")] if shape.group > 1 else []
    for mode in ("ep", "sharded"):
        if mode == "sharded" and shape.shards == 1:
            continue
        for n in overlaps if shape.group > 1 else (1,):
            for two in (False, True) if multi_node else (False,):
                out.append(Candidate(mode, n, two))
    return out or [Candidate("ep")]


def predict_all(
    shape: LayerShape, hw: Hardware, ranks_per_node: int, overlaps: tuple[int, ...] = (1, 2, 4)
) -> list[Prediction]:
    return [
        predict(shape, c, hw, ranks_per_node) for c in candidates(shape, ranks_per_node, overlaps)
    ]


def scaled(hw: Hardware, **figures: float) -> Hardware:
    """`hw` with some figures replaced: `gemm_flops`, `half_rows`, `intra_bandwidth`,
    `intra_alpha`, `inter_bandwidth`, `inter_alpha` (None leaves a figure as it is)."""
    out = hw
    for key, value in figures.items():
        if value is None:
            continue
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"--{key.replace('_', '-')} ({value!r}) must be a finite number >= 0")
        if key in ("gemm_flops", "half_rows"):
            out = replace(out, **{key: value})
        else:
            link, what = key.split("_", 1)
            out = replace(out, **{link: replace(getattr(out, link), **{what: value})})
    return out

"""TokenDispatcher: permute -> dispatch -> compute on local experts -> combine -> un-permute.

Legend: T local tokens, K top-k, W ranks in the expert-parallel group, L expert slots per rank, P =
W*L physical slots, C chunks (overlap degree).

Physical slot p lives on rank p // L as local slot p % L; the caller maps logical experts to slots,
so this module knows nothing of routers or models. With `LocalExchange` (W=1) this is exactly the
single-process layer; with `GroupExchange` it is expert parallelism: the same code path.

Schedule of one call:

1. Cut the T tokens into C contiguous chunks (C, `overlap_degree`, is the call's and the same on
   every rank; a chunk may be empty). For each chunk, count the rows per slot on the device
   (capacity drops already applied by the caller).
2. Exchange the counts with one all-to-all of `W*C*L` integers over the expert-parallel group, then
   copy local and received counts to the host together: the one host read of the call
   (`moeflow.comm.host_read`). With capacity padding (`pad_to`) every rank sends every slot
   `pad_to` rows: the sizes are static, nothing is exchanged or read. Every rank of the group
   must then pass the same `pad_to` (the MoE layer checks it on the device with its mode, see
   `moeflow.moe.expert_dispatch`): a rank's capacity follows its token count.
3. Permute each chunk's rows into slot order (= destination-rank order).
4. `exchange_compute`: dispatch chunk c+1 while chunk c computes and chunk c-1 returns (forward and
   backward; see `moeflow.comm.pipeline`); a side computation (a shared expert) runs while chunk
   0 travels.
5. Un-permute each chunk, weighting by the router, and concatenate the chunks. A `compute` with
   `weighted = True` (the MoE layer's) gets each row's router weight as column D in step 3
   (`moeflow.comm.permutation.carrier_width`) and weights its own outputs, so step 5 only sums
   (`moeflow.comm.permutation.combine`).

Where no row travels (W = 1, one chunk, no capacity padding) and the compute can read token order
(`reads_tokens`), steps 3-5 are one `moeflow.comm.local_compute` op instead: the compute gathers
each expert's rows of the tokens (and, in backward, of the output gradient) itself, so neither is
written as an `[R, D]` buffer; the side computation runs first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeflow.comm.all_to_all import Exchange
from moeflow.comm.compute import ExpertCompute, ReceivedBlocks
from moeflow.comm.host_read import start_read
from moeflow.comm.local_compute import local_compute
from moeflow.comm.permutation import (
    RoutingPlan,
    build_plan,
    carrier_width,
    combine,
    pair_counts,
    permute,
    plan_order,
    unpermute,
)
from moeflow.comm.pipeline import ChunkPlan, SideCompute, exchange_compute


def chunk_bounds(num_tokens: int, num_chunks: int) -> list[tuple[int, int]]:
    """`num_chunks` contiguous token ranges as equal as possible (earlier ones longer)."""
    base, extra = divmod(num_tokens, num_chunks)
    out, start = [], 0
    for c in range(num_chunks):
        end = start + base + (1 if c < extra else 0)
        out.append((start, end))
        start = end
    return out


@dataclass(frozen=True)
class DispatchResult:
    out_TD: torch.Tensor
    plans: list[RoutingPlan]
    chunks: ChunkPlan  # split sizes and received expert blocks of every chunk
    sent_rows: int  # rows this rank sent to other ranks (not to itself), all chunks
    sent_bytes: int  # their bytes: D values each, and the router weight where it travels
    side_out: torch.Tensor | None = None  # the side computation's output (e.g. shared expert)


class TokenDispatcher:
    """Moves (token, slot) pairs to the ranks that own their slots and back.

    Example:
        >>> from moeflow.comm.all_to_all import LocalExchange
        >>> d = TokenDispatcher(LocalExchange(), slots_per_rank=4)
        >>> d.num_slots
        4
    """

    def __init__(self, exchange: Exchange, slots_per_rank: int) -> None:
        self.exchange = exchange
        self.slots_per_rank = slots_per_rank
        self.name = "moe"  # set by the owner, so errors can name the layer

    @property
    def num_slots(self) -> int:
        return self.exchange.size * self.slots_per_rank

    def __call__(
        self,
        x_TD: torch.Tensor,
        weights_TK: torch.Tensor,
        slot_ids_TK: torch.Tensor,
        compute: ExpertCompute,
        params: tuple[torch.Tensor, ...],
        keep_TK: torch.Tensor | None = None,
        pad_to: int | None = None,
        overlap_degree: int = 1,
        side: SideCompute | None = None,
    ) -> DispatchResult:
        """Steps 1-5 of the module doc for the pairs `slot_ids_TK` (kept where `keep_TK`), each
        weighted by `weights_TK`, over `overlap_degree` chunks (with `pad_to`: one)."""
        if pad_to is not None and overlap_degree > 1:
            raise ValueError(
                f"router.pad_to_capacity needs overlap_degree 1 (got {overlap_degree}): capacity "
                "is per rank, so per-chunk padding is undefined"
            )
        bounds = chunk_bounds(x_TD.shape[0], overlap_degree)
        plans, chunk_plan = self._plan(slot_ids_TK, keep_TK, pad_to, bounds, x_TD.device)
        if _stays_local(compute, x_TD, params, self.exchange.size, overlap_degree, pad_to):
            # 3-5 where no row travels: the compute reads token order (`local_compute`).
            side_out = None if side is None else side.fn(*side.inputs)
            out = local_compute(
                compute, params, x_TD, weights_TK, plans[0], chunk_plan.chunk_meta[0]
            )
            return DispatchResult(out, plans, chunk_plan, 0, 0, side_out)
        return self._travel(x_TD, weights_TK, compute, params, plans, chunk_plan, bounds, side)

    def _plan(self, slot_ids_TK, keep_TK, pad_to, bounds, device):
        """Steps 1-2: each chunk's `RoutingPlan` and the call's `ChunkPlan` (split sizes and
        received blocks), from the exchanged counts or, with `pad_to`, static."""
        W, L, P = self.exchange.size, self.slots_per_rank, self.num_slots
        num_chunks = len(bounds)
        orders = [None] * num_chunks
        if pad_to is None:
            counts_host, send, recv, matrices, ends, orders = self._exchange_counts(
                slot_ids_TK, keep_TK, bounds
            )
        else:  # static shapes: every rank sends every slot pad_to rows, nothing read
            counts_host, send = [None], [[[pad_to] * L] for _ in range(W)]
            recv = send
            matrices = [[[pad_to * L] * W] * W] if self.exchange.needs_matrix else None
            ends = torch.arange(1, L + 1, device=device, dtype=torch.int32)[None] * (W * pad_to)
        plans = [
            build_plan(
                slot_ids_TK[t0:t1], P, None if keep_TK is None else keep_TK[t0:t1], pad_to,
                counts_host=counts_host[c], order=orders[c],
            )
            for c, (t0, t1) in enumerate(bounds)
        ]  # fmt: skip
        chunk_plan = ChunkPlan(
            input_splits=[[sum(send[j][c]) for j in range(W)] for c in range(num_chunks)],
            output_splits=[[sum(recv[i][c]) for i in range(W)] for c in range(num_chunks)],
            chunk_meta=[
                ReceivedBlocks(_received_blocks(recv, c, W, L), ends[c]) for c in range(num_chunks)
            ],
            matrices=matrices,
        )
        return plans, chunk_plan

    def _travel(self, x_TD, weights_TK, compute, params, plans, chunk_plan, bounds, side):
        """Steps 3-5: permute every chunk, dispatch, compute and combine them pipelined,
        un-permute."""
        W = self.exchange.size
        # 3. permute every chunk (with a weighted compute, each row carries its pair's weight)
        weighted = compute.weighted
        # Rows that stay on this rank carry the weight in a 16-byte aligned row; rows that travel
        # carry it in one extra column (no padding on the wire).
        width = carrier_width(x_TD.shape[1], x_TD.dtype, aligned=W == 1)
        x_chunks = [
            permute(_chunk(x_TD, t0, t1), plan, _chunk(weights_TK, t0, t1) if weighted else None,
                    width)
            for plan, (t0, t1) in zip(plans, bounds, strict=True)
        ]  # fmt: skip
        # 4. dispatch, compute, combine
        try:
            y_chunks, side_out = exchange_compute(
                self.exchange, compute, chunk_plan, params, x_chunks, side
            )
        except RuntimeError as exc:
            raise RuntimeError(f"{self.name}: expert all-to-all failed: {exc}") from exc
        # 5. un-permute (the rows come back weighted from a weighted compute)
        outs = [
            combine(y, plan) if weighted else unpermute(y, _chunk(weights_TK, t0, t1), plan)
            for y, plan, (t0, t1) in zip(y_chunks, plans, bounds, strict=True)
        ]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        sent = sum(
            splits[j]
            for splits in chunk_plan.input_splits
            for j in range(W)
            if j != self.exchange.rank
        )
        row_bytes = (width if weighted else x_TD.shape[1]) * x_TD.element_size()
        return DispatchResult(out, plans, chunk_plan, sent, sent * row_bytes, side_out)

    def _exchange_counts(self, slot_ids_TK, keep_TK, bounds):
        """Steps 1-2: rows per slot and chunk on the device, one count exchange, one host read.
        Returns (kept and dropped counts per chunk, rows sent [W][C][L], received [W][C][L], for
        exchanges that route via peers the rows i -> j per chunk, the chunks' local end rows on
        the device, and each chunk's pairs sorted by slot, queued while the counts travel to
        the host)."""
        W, L, P = self.exchange.size, self.slots_per_rank, self.num_slots
        num_chunks = len(bounds)
        counts = []
        for t0, t1 in bounds:
            keep = None if keep_TK is None else keep_TK[t0:t1]
            counts.append(pair_counts(slot_ids_TK[t0:t1], P, keep))
        counts_CP1 = torch.stack(counts)  # [C, P + 1]: the last column counts drops
        rows_CP = counts_CP1[:, :P]
        send_WCL = rows_CP.reshape(num_chunks, W, L).transpose(0, 1).contiguous()
        me, span = self.exchange.rank, num_chunks * L
        try:
            if self.exchange.needs_matrix:  # every rank's counts: [W_src, W_dst * C * L]
                full = self.exchange.gather_counts(send_WCL.view(-1))
                recv_WCL = full[:, me * span : (me + 1) * span]
            else:
                full = None
                recv_WCL = self.exchange.exchange_counts(send_WCL.view(-1))
        except RuntimeError as exc:
            raise RuntimeError(f"{self.name}: count exchange failed: {exc}") from exc
        parts = [counts_CP1.view(-1), send_WCL.view(-1), recv_WCL.reshape(-1)]
        if full is not None:
            # M[c][i][j]: rows rank i sends rank j in chunk c, for exchanges that route via peers.
            parts.append(full.view(W, W, num_chunks, L).sum(-1).permute(2, 0, 1).reshape(-1))
        # Each chunk's local expert end rows in the received buffer, grouped by expert (the
        # grouped GEMMs' offsets), made on the device from the counts: no copy back.
        ends_CL = recv_WCL.reshape(W, num_chunks, L).sum(0).cumsum(-1).to(torch.int32)
        pending = start_read(torch.cat(parts), "dispatch counts")  # the call's one read
        # The sorts need no count: queued now, the device runs them while the host waits.
        orders = [
            plan_order(slot_ids_TK[t0:t1], P, None if keep_TK is None else keep_TK[t0:t1])
            for t0, t1 in bounds
        ]
        host = pending.wait()
        n1, n2 = num_chunks * (P + 1), W * span
        counts_host = [host[c * (P + 1) : (c + 1) * (P + 1)] for c in range(num_chunks)]
        send = _as_wcl(host[n1 : n1 + n2], W, num_chunks, L)
        recv = _as_wcl(host[n1 + n2 : n1 + 2 * n2], W, num_chunks, L)
        matrices = None
        if full is not None:
            flat_m = host[n1 + 2 * n2 :]
            matrices = [
                [flat_m[(c * W + i) * W : (c * W + i + 1) * W] for i in range(W)]
                for c in range(num_chunks)
            ]
        return counts_host, send, recv, matrices, ends_CL, orders


def _stays_local(
    compute: ExpertCompute, x_TD, params, W: int, chunks: int, pad_to: int | None
) -> bool:
    """Whether the call runs `local_compute`: one rank, one chunk, no capacity padding, and a
    compute that reads token order for these inputs (`reads_tokens`)."""
    if W != 1 or chunks != 1 or pad_to is not None:
        return False
    return compute.reads_tokens(x_TD, params)


def _chunk(t: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
    """Rows `t0:t1` of `t`; `t` itself when that is all of it (a slice's backward would write
    the gradient into a zero-filled copy)."""
    return t if (t0, t1) == (0, t.shape[0]) else t[t0:t1]


def _as_wcl(flat: list[int], W: int, C: int, L: int) -> list[list[list[int]]]:
    return [[flat[(i * C + c) * L : (i * C + c + 1) * L] for c in range(C)] for i in range(W)]


def _received_blocks(recv, c: int, W: int, L: int) -> list[tuple[int, int, int]]:
    """Blocks `(local slot, first row, end row)` of chunk c's received buffer: source-rank major,
    then local slot (each sender's rows are in slot order)."""
    blocks, start = [], 0
    for i in range(W):
        for slot in range(L):
            n = recv[i][c][slot]
            if n:
                blocks.append((slot, start, start + n))
            start += n
    return blocks

"""ExpertDispatch: an MoE layer's FFN pairs through its experts in any parallel mode, per call.

Legend: T tokens, K top-k, E experts, G ranks in the expert group, S shards per expert, L expert
rows per rank, C copies of an expert a rank may send to (replicas), f = F / S.

The layer's experts are laid out once by an `ExpertLayout` (every rank 1/G of the parameters) and
every mode runs from that layout without moving a parameter (after Tutel):

- `ep`: every pair goes to one rank holding its expert (the copy in the sender's shard group if
  there is one, else spread over the copies by `(token + choice) mod copies`); with S > 1 it goes
  to member `sender % S` of the expert's shard group, whose whole experts are first all-gathered
  within the shard group (`ExpertWeightGather`); their gradient is reduce-scattered back.
- `sharded`: no weight moves. Every pair goes to all S ranks holding a slice of its expert (S
  sub-pairs with the router weight of the pair); each computes its partial FFN over its F-slice and
  the un-permute sums the partial outputs. With S = 1 this is `ep`.
- `dp`: all E experts are all-gathered over the expert group (from their first copies); every rank
  computes its own tokens with every expert, no token moves; the weight gradients are
  reduce-scattered back to the slices (replicas other than the first get zeros, and `GradSync`
  sums the copies).

Gathered weights are recomputed in backward (gathered again), never kept from forward to
backward: at most one layer's gathered experts exist at a time.

Schedule of one call with G > 1, on every rank of the expert group:
1. One all-gather of `(mode, overlap degree, two-level, padded capacity)` (four integers per
   rank). It is the one collective every mode issues first with the same shape (`dp` and padded
   calls exchange no counts), so it stays separate from the count exchange. The gathered rows
   are read on the host only when this rank's call differs from its previous one (its first
   call, a mode the tuner switched to, a new padded capacity): a rank whose call changed while
   another's did not is the one that sees the disagreement, and raises naming every rank's call
   and the fix, before any diverging collective. In steady state the check reads nothing (the
   call keeps its one dropless read, or none with padding); each change costs one read of 4 x G
   integers. (A device-side assertion would read nothing, but on an accelerator it kills the
   process's device context with a generic error, and CUDA's refuses messages of 255 characters
   or more; only the compiled padded path, which cannot leave its graph, checks that way, with
   a short message.)
2. The mode's collectives: `ep`/`sharded` as `TokenDispatcher` documents (count exchange, then the
   pipelined all-to-all, flat or two-level (`moeflow.comm.hierarchical`) per call where the layer
   was given both exchanges), preceded in `ep` with S > 1 by the shard group's weight all-gather;
   `dp`: the weight all-gather over the expert group, no token exchange.
3. Backward: the pipeline's reverse all-to-alls, and the weight gather again followed by the
   gradient's reduce-scatter where the forward gathered.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from torch import nn

from moeflow.comm.all_to_all import Exchange, LocalExchange
from moeflow.comm.compute import ReceivedBlocks
from moeflow.comm.dispatcher import DispatchResult, TokenDispatcher
from moeflow.comm.gather import all_gather_rows, group_size
from moeflow.comm.host_read import read_to_host
from moeflow.comm.pipeline import ChunkPlan, SideCompute
from moeflow.moe.dispatch_config import MODES, DispatchConfig, check_mode
from moeflow.moe.expert_compute import GroupedExpertCompute
from moeflow.moe.layout import ExpertLayout
from moeflow.moe.padded_experts import padded_experts
from moeflow.moe.weight_gather import ExpertWeightGather


class ExpertDispatch(nn.Module):
    """The routing tables and per-mode paths of one layer under its layout (no parameters)."""

    def __init__(
        self,
        num_experts: int,
        ffn_hidden_size: int,
        activation: str,
        kernel: str = "auto",
        carry_weights: bool = True,
    ) -> None:
        super().__init__()
        self.activation = activation
        self.kernel = kernel
        # Where the router weights are applied: by the experts, on their rows (the weights travel
        # with the rows, nothing is saved for their gradient), or by the combine (the rows come
        # back unweighted and are kept for the weights' gradient). See `MoEConfig`.
        self.carry_weights = carry_weights
        self.layout = ExpertLayout.canonical(num_experts, ffn_hidden_size, 1)
        self.exchange: Exchange = LocalExchange()
        self.two_level_exchange: Exchange | None = None  # within nodes, then across them
        self.group: dist.ProcessGroup | None = None
        self.shard_group: dist.ProcessGroup | None = None
        self.config = DispatchConfig()
        self.name = "moe"
        # Per logical expert: the dispatcher slots of its copies this rank sends to in `ep`
        # ([E, C]), the S slices of each in `sharded` ([E, C, S]), and how many copies.
        self.register_buffer("slot_table", torch.arange(num_experts)[:, None], persistent=False)
        self.register_buffer("shard_table", torch.arange(num_experts)[:, None, None], False)
        self.register_buffer("slot_count", torch.ones(num_experts, dtype=torch.int64), False)
        self._spread = False
        self._paths: dict[tuple[str, bool], tuple[TokenDispatcher, GroupedExpertCompute]] = {}
        self.last_mode = self.config.mode
        self.last_two_level = False
        self.last_gathered_bytes = 0  # expert-weight bytes the last call received
        self.last_gather_peak_bytes = 0  # the most its weight gather held at once
        self._agreed_call: tuple[int, int, int, int] | None = None  # this rank's last checked call

    @property
    def rank(self) -> int:
        return self.exchange.rank

    def attach(
        self,
        layout: ExpertLayout,
        exchange: Exchange,
        group: dist.ProcessGroup | None,
        shard_group: dist.ProcessGroup | None,
        config: DispatchConfig,
        name: str,
        two_level_exchange: Exchange | None = None,
    ) -> None:
        if config.two_level and two_level_exchange is None:
            raise ValueError(f"{name}: dispatch.two_level is set but no two-level exchange given")
        if exchange.size != layout.group_size or group_size(group) != layout.group_size:
            raise ValueError(
                f"{name}: the layout spans {layout.group_size} ranks but the exchange and the "
                f"expert group have {exchange.size} and {group_size(group)}"
            )
        if group_size(shard_group) != layout.shards:
            raise ValueError(
                f"{name}: the layout has {layout.shards} shards per expert but the shard group "
                f"has {group_size(shard_group)} ranks"
            )
        self.exchange, self.group, self.shard_group = exchange, group, shard_group
        self.two_level_exchange = two_level_exchange
        self.config, self.name = config, name
        self._agreed_call = None  # a new group: the next call is checked
        self.set_layout(layout)

    def set_layout(self, layout: ExpertLayout) -> None:
        """Record a (re-)placement and rebuild the tables and paths (weights already moved)."""
        self.layout = layout
        self._paths = {}
        self.write_tables()

    def write_tables(self) -> None:
        device = self.slot_table.device
        if device.type == "meta":
            return
        lay, rank = self.layout, self.rank
        rows = lay.slot_table(rank)
        width = max(len(r) for r in rows)
        self._spread = width > 1
        table = [r + [r[0]] * (width - len(r)) for r in rows]
        ep = [[lay.physical_slot(q, lay.shard_of(rank)) for q in r] for r in table]
        shards = [[[lay.physical_slot(q, s) for s in range(lay.shards)] for q in r] for r in table]
        self.slot_table = torch.tensor(ep, dtype=torch.int64, device=device)
        self.shard_table = torch.tensor(shards, dtype=torch.int64, device=device)
        self.slot_count = torch.tensor([len(r) for r in rows], dtype=torch.int64, device=device)

    def path(
        self, mode: str, two_level: bool = False
    ) -> tuple[TokenDispatcher, GroupedExpertCompute]:
        """The dispatcher and expert compute of `mode` (built on first use)."""
        if (mode, two_level) not in self._paths:
            lay, per = self.layout, self.layout.slots_per_group
            if mode == "dp":
                gather = ExpertWeightGather(lay, self.rank, "dp", self.group)
                dispatcher = TokenDispatcher(LocalExchange(), lay.num_experts)
            else:
                gather = None
                if mode == "ep" and lay.shards > 1:
                    gather = ExpertWeightGather(lay, self.rank, "ep", self.shard_group)
                exchange = self.two_level_exchange if two_level else self.exchange
                dispatcher = TokenDispatcher(exchange, per)
            dispatcher.name = self.name
            compute = GroupedExpertCompute(self.activation, gather, self.carry_weights, self.kernel)
            self._paths[(mode, two_level)] = (dispatcher, compute)
        return self._paths[(mode, two_level)]

    def _copy_index(self, ids_TK: torch.Tensor) -> torch.Tensor | int:
        """Which copy of its expert each pair goes to (0 unless spread over remote copies)."""
        if not self._spread:
            return 0
        t, k = ids_TK.shape
        order_TK = torch.arange(t, device=ids_TK.device)[:, None] + torch.arange(
            k, device=ids_TK.device
        )
        return order_TK % self.slot_count[ids_TK]

    def agree(
        self, mode: str, chunks: int, two_level: bool = False, pad_to: int | None = None
    ) -> None:
        """Step 1 of the schedule: raises if the ranks disagree on the call (or, with capacity
        padding, on the padded capacity, which sets the static all-to-all sizes). The rows are
        gathered on every call and read only when this rank's call changed (module doc)."""
        if group_size(self.group) == 1:
            return
        call = (MODES.index(mode), chunks, int(two_level), -1 if pad_to is None else pad_to)
        mine = torch.tensor([call], device=self.slot_table.device)
        try:
            rows = all_gather_rows(mine, self.group)
        except RuntimeError as exc:
            raise RuntimeError(f"{self.name}: agreeing on the call's mode failed: {exc}") from exc
        if call == self._agreed_call:
            return
        calls = [tuple(r) for r in read_to_host(rows, "call agreement")]
        if any(c != call for c in calls):
            raise RuntimeError(_disagree(self.name, calls))
        self._agreed_call = call

    def forward(
        self,
        x_TD: torch.Tensor,
        weights_TK: torch.Tensor,
        ids_TK: torch.Tensor,
        keep_TK: torch.Tensor | None,
        pad_to: int | None,
        params: tuple[torch.Tensor, torch.Tensor],
        mode: str | None = None,
        overlap_degree: int | None = None,
        two_level: bool | None = None,
        side: SideCompute | None = None,
    ) -> DispatchResult:
        """FFN pairs (`ids_TK` < E where `keep_TK`) through the experts in `mode` (default: the
        dispatch config's), over the flat or the two-level all-to-all (default: the config's);
        returns the weighted, un-permuted output and the dispatch plan."""
        mode = check_mode(mode or self.config.mode)
        chunks = 1 if mode == "dp" else overlap_degree or self.config.overlap_degree
        two = self.config.two_level if two_level is None else bool(two_level)
        if two and self.two_level_exchange is None:
            raise ValueError(
                f"{self.name}: two_level=True needs nodes that split the expert group; set "
                "dispatch.ranks_per_node (or LOCAL_WORLD_SIZE) to a divisor of parallel.ep "
                "smaller than it"
            )
        two = two and mode != "dp"  # dp moves no token
        if torch.compiler.is_compiling() and pad_to is not None and self._static(mode, two):
            return self._padded(x_TD, weights_TK, ids_TK, keep_TK, pad_to, params, mode, side)
        return self._dispatch(
            x_TD, weights_TK, ids_TK, keep_TK, pad_to, params, mode, chunks, two, side
        )

    def _static(self, mode: str, two_level: bool) -> bool:
        """Whether a padded call runs `moeflow.moe.padded_experts` while compiling: one rank (any
        mode: all experts are local), or whole experts (no slices), one copy each, in `ep` or
        `sharded` over the flat all-to-all. Other padded calls run `_dispatch` eagerly."""
        if group_size(self.group) == 1:
            return True
        whole = self.layout.shards == 1 and not self._spread
        return mode != "dp" and whole and not two_level

    def _padded(self, x_TD, weights_TK, ids_TK, keep_TK, pad_to, params, mode, side):
        """Capacity padding while compiling: static shapes, no host read, the all-to-alls as
        functional collectives, as plain tensor ops the compiler captures in the layer's graph
        (`moeflow.moe.padded_experts`); the ranks' agreement is checked as in `agree`."""
        W = group_size(self.group)
        if W > 1:
            mine = torch.tensor([[MODES.index(mode), 1, 0, pad_to]], device=x_TD.device)
            rows = fc.all_gather_tensor(mine, 0, self.group)
            torch._assert_async((rows == mine).all(), compiled_disagreement(self.name))
        slots_TK = self.slot_table[ids_TK, self._copy_index(ids_TK)]
        keep = torch.ones_like(ids_TK, dtype=torch.bool) if keep_TK is None else keep_TK
        w1, w2 = params
        group = self.group if W > 1 else None
        out = padded_experts(x_TD, weights_TK, slots_TK, keep, pad_to, w1, w2, self.activation,
                             group)  # fmt: skip
        side_out = None if side is None else side.fn(*side.inputs)
        L = w2.shape[0]
        blocks = [(slot, (i * L + slot) * pad_to, (i * L + slot + 1) * pad_to)
                  for i in range(W) for slot in range(L)]  # fmt: skip
        ends = torch.arange(1, L + 1, device=x_TD.device, dtype=torch.int32) * (W * pad_to)
        plan = ChunkPlan([[L * pad_to] * W], [[L * pad_to] * W], [ReceivedBlocks(blocks, ends)])
        sent = (W - 1) * L * pad_to
        self.last_mode, self.last_two_level = mode, False
        self.last_gathered_bytes = self.last_gather_peak_bytes = 0
        return DispatchResult(out, [], plan, sent, sent * x_TD.shape[1] * x_TD.element_size(),
                              side_out)  # fmt: skip

    @torch.compiler.disable
    def _dispatch(self, x_TD, weights_TK, ids_TK, keep_TK, pad_to, params, mode, chunks, two,
                  side):  # fmt: skip
        """The schedule of the module doc. Run eagerly under `torch.compile`: it holds the
        call's one host read (dropless) and its collectives, so the compiled layer breaks
        around it and traces the router, capacity and losses."""
        self.agree(mode, chunks, two, pad_to)
        dispatcher, compute = self.path(mode, two)
        if mode == "dp":
            slots_TK = ids_TK
        elif mode == "ep" or self.layout.shards == 1:
            slots_TK = self.slot_table[ids_TK, self._copy_index(ids_TK)]
        else:  # sharded: S sub-pairs per pair, one per slice of its expert
            s = self.layout.shards
            slots_TK = self.shard_table[ids_TK, self._copy_index(ids_TK)].flatten(1)
            weights_TK = weights_TK.repeat_interleave(s, dim=1)
            keep_TK = None if keep_TK is None else keep_TK.repeat_interleave(s, dim=1)
        result = dispatcher(
            x_TD, weights_TK, slots_TK, compute, params,
            keep_TK=keep_TK, pad_to=pad_to, overlap_degree=chunks, side=side,
        )  # fmt: skip
        gather = compute.gather
        self.last_mode = mode
        self.last_two_level = two
        self.last_gathered_bytes = 0 if gather is None else gather.gathered_bytes
        self.last_gather_peak_bytes = 0 if gather is None else gather.peak_bytes
        return result


def _describe(call: tuple[int, int, int, int]) -> str:
    mode, chunks, two_level, pad = call
    name = MODES[mode] if 0 <= mode < len(MODES) else f"mode {mode}"
    return (f"{name!r} x{chunks}{' two-level' if two_level else ''}"
            f"{'' if pad < 0 else f' capacity {pad}'}")  # fmt: skip


def _disagree(name: str, calls: list[tuple[int, int, int, int]]) -> str:
    """The message of ranks that disagree on a call (`ExpertDispatch.agree`): every rank's
    call, then the fix."""
    ranks = ", ".join(f"rank {r}: {_describe(c)}" for r, c in enumerate(calls))
    return (
        f"{name}: the ranks of the expert group called it with different parallel modes, "
        f"overlap degrees, all-to-alls or padded capacities ({ranks}); pass the same mode=, "
        "overlap_degree= and two_level= on every rank, and with router.pad_to_capacity the same "
        "number of tokens on every rank (pad the batches to one length)"
    )


def compiled_disagreement(name: str) -> str:
    """The device assertion's message of a compiled padded call whose ranks disagree: under 255
    characters (CUDA's limit), the layer name cut to fit."""
    return (f"{name[:80]}: ranks disagree on the mode or padded capacity; pass the same mode= "
            "and the same number of tokens on every rank")  # fmt: skip

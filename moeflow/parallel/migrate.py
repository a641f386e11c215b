"""Move per-expert rows (weights, gradients, optimizer moments) from one layout to another.

A layout (`ExpertLayout`) puts logical expert `slots[q]` in virtual slot q: row `q % L` of shard
group `q // L`, whose S ranks each hold one F-slice of it. Both layouts have the same sizes (only
the placement differs). Every tensor handed over holds this rank's L rows, in row order, before and
after. Slices never change hands between shards: rank `v*S + s` exchanges only with the ranks
`v'*S + s` of the same shard index.

Schedule, per tensor (every rank of `group` calls `migrate_rows` with the same two layouts):
1. Each rank works out, from the layouts alone (no communication), where every new slot's row comes
   from: the old copy in the destination shard group itself if there is one, else the expert's
   first old copy; and so which of its rows every rank needs, in the order of that rank's new rows.
2. One `all_to_all_single` over `group` with those uneven split sizes (rows that stay on this rank
   go through it too, as the self split). Waited for at once: migration happens between steps.
3. Each rank writes the received rows into its new rows: rows from source s arrive in the order
   of the new slots sourced from s.

With `group=None` (one process) the same plan runs as a local permutation.

Example:
    >>> from moeflow.moe.layout import ExpertLayout
    >>> old = ExpertLayout.canonical(num_experts=4, ffn_hidden_size=4, group_size=1)
    >>> w = torch.arange(4.0)[:, None]  # one rank, 4 experts: logical ids 0..3 in slots 0..3
    >>> migrate_rows([w], old, old.with_slots([3, 2, 1, 0]))[0].flatten().tolist()
    [3.0, 2.0, 1.0, 0.0]
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moeflow.moe.layout import ExpertLayout


def _sources(old: ExpertLayout, new: ExpertLayout) -> list[int]:
    """For every new virtual slot, the old virtual slot its row comes from."""
    same = (old.num_experts, old.ffn_hidden_size, old.group_size, len(old.slots)) == (
        new.num_experts,
        new.ffn_hidden_size,
        new.group_size,
        len(new.slots),
    )
    if not same:
        raise ValueError(
            f"a migration keeps the sizes and the slot count; got old {list(old.slots)} over "
            f"{old.group_size} ranks, new {list(new.slots)} over {new.group_size}"
        )
    per = old.slots_per_group
    copies: dict[int, list[int]] = {}
    for q, e in enumerate(old.slots):
        copies.setdefault(e, []).append(q)
    out = []
    for q, e in enumerate(new.slots):
        here = [p for p in copies[e] if p // per == q // per]
        out.append((here or copies[e])[0])
    return out


def _plan(old: ExpertLayout, new: ExpertLayout, rank: int):
    """(rows to send, in destination order; split sizes out and in, per rank; receive order)."""
    per, shards, ranks = old.slots_per_group, old.shards, old.group_size
    source = _sources(old, new)
    mine, shard = old.group_of(rank), old.shard_of(rank)
    send_rows, send_splits, recv_slots, recv_splits = [], [0] * ranks, [], [0] * ranks
    for v in range(old.num_groups):
        dest = v * shards + shard
        rows = [source[q] % per for q in range(v * per, (v + 1) * per) if source[q] // per == mine]
        send_rows += rows
        send_splits[dest] = len(rows)
        slots = [
            q - mine * per for q in range(mine * per, (mine + 1) * per) if source[q] // per == v
        ]
        recv_slots += slots
        recv_splits[dest] = len(slots)
    return send_rows, send_splits, recv_slots, recv_splits


def migrate_rows(
    tensors: list[torch.Tensor],
    old: ExpertLayout,
    new: ExpertLayout,
    group: dist.ProcessGroup | None = None,
) -> list[torch.Tensor]:
    """New tensors holding this rank's rows under `new` (see the module doc)."""
    rank = 0 if group is None else dist.get_rank(group)
    send_rows, send_splits, recv_slots, recv_splits = _plan(old, new, rank)
    out = []
    for t in tensors:
        if t.shape[0] != old.slots_per_group:
            raise ValueError(
                f"a tensor to migrate has {t.shape[0]} rows; this rank holds "
                f"{old.slots_per_group} expert rows"
            )
        index = torch.tensor(send_rows, dtype=torch.long, device=t.device)
        send = t.detach().index_select(0, index).contiguous()
        if group is None:
            received = send
        else:
            received = send.new_empty((sum(recv_splits), *t.shape[1:]))
            dist.all_to_all_single(received, send, recv_splits, send_splits, group=group)
        new_t = torch.empty_like(t.detach())
        new_t[torch.tensor(recv_slots, dtype=torch.long, device=t.device)] = received
        out.append(new_t)
    return out

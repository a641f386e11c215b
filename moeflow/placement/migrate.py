"""Move per-expert rows (weights, gradients, optimizer moments) from one placement to another.

A placement is given as a slot list: `slots[p]` is the logical expert in physical slot p; slot p is
local slot `p % L` of rank `p // L` of the group (L = len(slots) / group size, the same before and
after). An expert may sit in several slots (replicas, on distinct ranks). Every tensor handed over
holds this rank's L rows, in local slot order, before and after.

Schedule, per tensor (every rank of `group` calls `migrate_rows` with the same two slot lists):
1. Each rank works out, from the lists alone (no communication), where every new slot's row comes
   from: the old copy on the destination rank itself if there is one, else the expert's first
   old copy; and so which of its rows every rank needs, in the order of that rank's new slots.
2. One `all_to_all_single` over `group` with those uneven split sizes (rows that stay on this rank
   go through it too, as the self split). Waited for at once: migration happens between steps.
3. Each rank writes the received rows into its new slots: rows from source s arrive in the order
   of the new slots sourced from s.

With `group=None` (one process) the same plan runs as a local permutation.

Example:
    >>> w = torch.arange(4.0)[:, None]  # one rank, 4 experts: logical ids 0..3 in slots 0..3
    >>> migrate_rows([w], old_slots=[0, 1, 2, 3], new_slots=[3, 2, 1, 0])[0].flatten().tolist()
    [3.0, 2.0, 1.0, 0.0]
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _sources(old_slots: list[int], new_slots: list[int], ranks: int) -> list[int]:
    """For every new slot, the old slot its row comes from."""
    n = len(old_slots)
    if n != len(new_slots) or n % ranks or set(new_slots) - set(old_slots):
        raise ValueError(
            f"slot lists must have the same length, divisible by the group size {ranks}, and "
            f"the new one only experts the old one holds; got old {list(old_slots)}, new "
            f"{list(new_slots)}"
        )
    local = n // ranks
    copies: dict[int, list[int]] = {}
    for p, e in enumerate(old_slots):
        copies.setdefault(e, []).append(p)
    out = []
    for p, e in enumerate(new_slots):
        here = [q for q in copies[e] if q // local == p // local]
        out.append((here or copies[e])[0])
    return out


def _plan(old_slots, new_slots, rank: int, ranks: int):
    """(rows to send, per destination in order; split sizes in, out; receive order)."""
    local = len(old_slots) // ranks
    source = _sources(old_slots, new_slots, ranks)
    send_rows, send_splits = [], []
    for dest in range(ranks):
        rows = [
            source[p] % local
            for p in range(dest * local, (dest + 1) * local)
            if source[p] // local == rank
        ]
        send_rows += rows
        send_splits.append(len(rows))
    mine = range(rank * local, (rank + 1) * local)
    recv_slots, recv_splits = [], []
    for src in range(ranks):
        slots = [p - rank * local for p in mine if source[p] // local == src]
        recv_slots += slots
        recv_splits.append(len(slots))
    return send_rows, send_splits, recv_slots, recv_splits


def migrate_rows(
    tensors: list[torch.Tensor],
    old_slots: list[int],
    new_slots: list[int],
    group: dist.ProcessGroup | None = None,
) -> list[torch.Tensor]:
    """New tensors holding this rank's rows under `new_slots` (see the module doc)."""
    ranks = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    send_rows, send_splits, recv_slots, recv_splits = _plan(old_slots, new_slots, rank, ranks)
    out = []
    for t in tensors:
        if t.shape[0] != len(old_slots) // ranks:
            raise ValueError(
                f"a tensor to migrate has {t.shape[0]} rows; this rank holds "
                f"{len(old_slots) // ranks} expert slots"
            )
        index = torch.tensor(send_rows, dtype=torch.long, device=t.device)
        send = t.detach().index_select(0, index).contiguous()
        if group is None:
            received = send
        else:
            received = send.new_empty((sum(recv_splits), *t.shape[1:]))
            dist.all_to_all_single(received, send, recv_splits, send_splits, group=group)
        new = torch.empty_like(t.detach())
        new[torch.tensor(recv_slots, dtype=torch.long, device=t.device)] = received
        out.append(new)
    return out

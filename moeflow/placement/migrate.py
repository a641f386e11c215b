"""Move per-expert rows (weights, gradients, optimizer moments) from one placement to another.

A placement is given as an expert map: logical expert e -> physical slot p; slot p is local slot
`p % L` of rank `p // L` of the group (L = E / group size). Every tensor handed over holds this
rank's L rows, in local slot order, before and after.

Schedule, per tensor (every rank of `group` calls `migrate_rows` with the same two maps):
1. Each rank works out, from the maps alone (no communication), which of its rows every rank needs:
   for destination d, the experts of d's new slots (in slot order) that sit here now.
2. One `all_to_all_single` over `group` with those uneven split sizes (rows that stay on this rank
   go through it too, as the self split). Waited for at once: migration happens between steps.
3. Each rank writes the received rows into its new slots: rows from source s arrive in the order
   of the new slots whose expert was on s.

With `group=None` (one process) the same plan runs as a local permutation.

Example:
    >>> w = torch.arange(4.0)[:, None]  # one rank, 4 experts: logical ids 0..3 in slots 0..3
    >>> migrate_rows([w], old_map=[0, 1, 2, 3], new_map=[3, 2, 1, 0])[0].flatten().tolist()
    [3.0, 2.0, 1.0, 0.0]
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def local_ids(expert_map: list[int], rank: int, slots_per_rank: int) -> list[int]:
    """Logical ids in `rank`'s slots, in slot order."""
    out = [-1] * slots_per_rank
    for e, p in enumerate(expert_map):
        if p // slots_per_rank == rank:
            out[p % slots_per_rank] = e
    return out


def _plan(old_map, new_map, rank: int, ranks: int):
    """(rows to send, per destination in order; split sizes in, out; receive order)."""
    n = len(old_map)
    if n % ranks or sorted(old_map) != list(range(n)) or sorted(new_map) != list(range(n)):
        raise ValueError(
            f"expert maps must be permutations of 0..{n - 1} with {n} divisible by the group "
            f"size {ranks}; got old {list(old_map)}, new {list(new_map)}"
        )
    local = n // ranks
    send_rows, send_splits = [], []
    for dest in range(ranks):
        rows = [
            old_map[e] % local
            for e in local_ids(new_map, dest, local)
            if old_map[e] // local == rank
        ]
        send_rows += rows
        send_splits.append(len(rows))
    mine = local_ids(new_map, rank, local)
    recv_slots, recv_splits = [], []
    for src in range(ranks):
        slots = [s for s, e in enumerate(mine) if old_map[e] // local == src]
        recv_slots += slots
        recv_splits.append(len(slots))
    return send_rows, send_splits, recv_slots, recv_splits


def migrate_rows(
    tensors: list[torch.Tensor],
    old_map: list[int],
    new_map: list[int],
    group: dist.ProcessGroup | None = None,
) -> list[torch.Tensor]:
    """New tensors holding this rank's rows under `new_map` (see the module doc)."""
    ranks = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    send_rows, send_splits, recv_slots, recv_splits = _plan(old_map, new_map, rank, ranks)
    out = []
    for t in tensors:
        if t.shape[0] != len(old_map) // ranks:
            raise ValueError(
                f"a tensor to migrate has {t.shape[0]} rows; this rank holds "
                f"{len(old_map) // ranks} experts"
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

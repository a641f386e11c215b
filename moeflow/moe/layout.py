"""ExpertLayout: where every expert parameter of one MoE layer lives in its expert group.

Legend: E logical experts, F FFN hidden dim, G ranks in the expert group, S shards per expert,
V = G / S shard groups, L slots per shard group, f = F / S.

Tutel's canonical layout gives every rank 1/G of the expert parameters:

- E >= G (E % G == 0): S = 1, every rank is its own shard group and holds E / G whole experts;
- G > E (G % E == 0, F % (G / E) == 0): S = G / E, the G ranks form E shard groups of S consecutive
  ranks, and rank r holds F-slice `r % S` (columns `[s*f, (s+1)*f)` of the FFN hidden dim) of its
  group's expert.

Rank r belongs to shard group `v = r // S` and holds slice `s = r % S` of each of the L experts in
`slots[v*L:(v+1)*L]` (a *virtual slot* `q = v*L + l` is local row l of group v). Re-placement
(issue 6) permutes slots between shard groups and may add replicas: an expert in several slots (on
distinct groups). This is pure arithmetic, the one place that knows it: the layer, `parallelize`,
migration, checkpoints and the trainer ask it.

Example:
    >>> layout = ExpertLayout.canonical(num_experts=2, ffn_hidden_size=8, group_size=4)
    >>> layout.shards, layout.local_experts(3), layout.ffn_range(3)
    (2, [1], (4, 8))
    >>> ExpertLayout.canonical(num_experts=8, ffn_hidden_size=8, group_size=2).local_experts(1)
    [4, 5, 6, 7]
"""

from __future__ import annotations

from dataclasses import dataclass, field


def valid_group_sizes(num_experts: int, ffn_hidden_size: int, limit: int = 4096) -> list[int]:
    """Expert-group sizes G <= `limit` the canonical layout accepts for these sizes."""
    divisors = [g for g in range(1, num_experts + 1) if num_experts % g == 0]
    multiples = [
        num_experts * m for m in range(2, limit // num_experts + 1) if ffn_hidden_size % m == 0
    ]
    return divisors + multiples


def check_sizes(num_experts: int, ffn_hidden_size: int, group_size: int, where: str = "") -> int:
    """Shards per expert S for E experts of FFN dim F over G ranks; `ValueError` naming the sizes
    and the valid group sizes when the canonical layout cannot split them."""
    e, f, g = num_experts, ffn_hidden_size, group_size
    if e >= g and e % g == 0:
        return 1
    if g > e and g % e == 0 and f % (g // e) == 0:
        return g // e
    valid = valid_group_sizes(e, f, limit=max(64, 8 * e))
    rule = (
        "with E >= ep, E must be a multiple of ep"
        if e >= g
        else f"with ep > E, ep must be a multiple of E whose quotient ({g / e:g}) divides F"
    )
    raise ValueError(
        f"{where}moe.num_experts ({e}) and moe.ffn_hidden_size ({f}) cannot be laid out over an "
        f"expert group of {g} ranks (parallel.ep): {rule}. Valid expert-group sizes for these "
        f"sizes: {valid}"
    )


@dataclass(frozen=True)
class ExpertLayout:
    """One MoE layer's experts over an expert group of `group_size` ranks (see the module doc).

    `slots[q]` is the logical expert in virtual slot q, shard group after shard group."""

    num_experts: int
    ffn_hidden_size: int
    group_size: int
    slots: tuple[int, ...]
    shards: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "slots", tuple(int(x) for x in self.slots))
        s = check_sizes(self.num_experts, self.ffn_hidden_size, self.group_size)
        object.__setattr__(self, "shards", s)
        e, groups, slots = self.num_experts, self.num_groups, self.slots
        ok = len(slots) % groups == 0 and len(slots) >= e
        ok = ok and all(0 <= x < e for x in slots) and set(slots) == set(range(e))
        per = len(slots) // groups if ok else 0
        ok = ok and all(len(set(self.group_experts(v))) == per for v in range(groups))
        if not ok:
            raise ValueError(
                f"expert placement {list(slots)} must list, for each of {groups} shard groups "
                f"in turn, the same number (>= {e // groups}) of distinct expert ids, every id "
                f"in 0..{e - 1} at least once"
            )

    @classmethod
    def canonical(
        cls, num_experts: int, ffn_hidden_size: int, group_size: int, replica_slots: int = 0
    ) -> ExpertLayout:
        """Contiguous experts per shard group, then `replica_slots` more slots per group holding
        copies of the next groups' first experts (never one the group already holds)."""
        s = check_sizes(num_experts, ffn_hidden_size, group_size)
        groups = group_size // s
        own = num_experts // groups
        if replica_slots and own + replica_slots > num_experts:
            raise ValueError(
                f"placement.replica_slots ({replica_slots}) + {own} experts per shard group "
                f"exceeds the {num_experts} experts: a group holds at most one copy of each"
            )
        slots = []
        for v in range(groups):
            slots += list(range(v * own, (v + 1) * own))
            slots += [(v * own + own + j) % num_experts for j in range(replica_slots)]
        return cls(num_experts, ffn_hidden_size, group_size, tuple(slots))

    def with_slots(self, slots: list[int] | tuple[int, ...]) -> ExpertLayout:
        """The same sizes with another placement (validated)."""
        return ExpertLayout(self.num_experts, self.ffn_hidden_size, self.group_size, tuple(slots))

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        """V: shard groups (ranks holding whole experts together)."""
        return self.group_size // self.shards

    @property
    def slots_per_group(self) -> int:
        """L: expert rows every rank holds (slices of its group's L experts)."""
        return len(self.slots) // self.num_groups

    @property
    def ffn_per_rank(self) -> int:
        """f = F / S: the FFN columns of each expert row a rank holds."""
        return self.ffn_hidden_size // self.shards

    # -- where things are ------------------------------------------------------------------------
    def group_of(self, rank: int) -> int:
        return rank // self.shards

    def shard_of(self, rank: int) -> int:
        return rank % self.shards

    def group_experts(self, group: int) -> list[int]:
        per = len(self.slots) // self.num_groups
        return list(self.slots[group * per : (group + 1) * per])

    def local_experts(self, rank: int) -> list[int]:
        """Logical ids of the expert rows rank `rank` holds, in row order."""
        return self.group_experts(self.group_of(rank))

    def ffn_range(self, rank: int) -> tuple[int, int]:
        """The FFN hidden-dim columns `[lo, hi)` of its experts that rank `rank` holds."""
        s, f = self.shard_of(rank), self.ffn_per_rank
        return s * f, (s + 1) * f

    def copies(self) -> list[int]:
        """Slots (copies) of each logical expert."""
        out = [0] * self.num_experts
        for e in self.slots:
            out[e] += 1
        return out

    def first_slots(self) -> list[int]:
        """Per logical expert, its first virtual slot (the copy `dp` mode gathers)."""
        out = [-1] * self.num_experts
        for q, e in enumerate(self.slots):
            if out[e] < 0:
                out[e] = q
        return out

    def slot_table(self, rank: int) -> list[list[int]]:
        """Per logical expert, the virtual slots rank `rank` sends its tokens to: the copy in its
        own shard group if there is one, else every copy (tokens are spread over them)."""
        per, mine = self.slots_per_group, self.group_of(rank)
        rows: list[list[int]] = [[] for _ in range(self.num_experts)]
        for q, e in enumerate(self.slots):
            rows[e].append(q)
        return [[q for q in r if q // per == mine][:1] or r for r in rows]

    def physical_slot(self, slot: int, shard: int) -> int:
        """Dispatcher slot (rank * L + row) of shard `shard` of virtual slot `slot`."""
        per = self.slots_per_group
        return ((slot // per) * self.shards + shard) * per + slot % per

    # -- memory ----------------------------------------------------------------------------------
    def rank_fraction(self) -> float:
        """Expert parameters a rank holds, as a fraction of one copy of all E experts."""
        return self.slots_per_group / self.shards / self.num_experts

    def rank_elements(self, hidden_size: int, gate_blocks: int, bias: bool = False) -> int:
        """Expert-parameter elements a rank holds (`w1 [L, D(+1 with bias), c*f]` and `w2 [L, f,
        D]`, c = `gate_blocks`: 2 for SwiGLU)."""
        rows = hidden_size + int(bias)
        return self.slots_per_group * self.ffn_per_rank * (gate_blocks * rows + hidden_size)

    def gather_peak_elements(
        self, mode: str, hidden_size: int, gate_blocks: int, bias: bool = False
    ) -> int:
        """The most elements a call in `mode` holds at once beside the rank's own parameters,
        for the weights it gathers (`ExpertWeightGather`: receive buffer, reassembly, whole
        experts, w1 before w2): 0 where nothing is gathered.

        Example:
            >>> ExpertLayout.canonical(8, 16, 4).gather_peak_elements("dp", 4, 2)
            2048
        """
        per = self.slots_per_group
        if mode == "dp":
            members, rows = self.group_size, self.num_experts
            identity = members == 1 and self.first_slots() == list(range(per))
        elif mode == "ep":
            members, rows = self.shards, per
            identity = members == 1
        else:
            return 0
        if identity:
            return 0
        u = (hidden_size + int(bias)) * gate_blocks * self.ffn_per_rank  # one local row of w1
        v = hidden_size * self.ffn_per_rank  # of w2
        recv1 = members * per * u if members > 1 else 0
        recv2 = members * per * v if members > 1 else 0
        whole1, whole2 = rows * self.shards * u, rows * self.shards * v
        return max(recv1 + whole1, 2 * whole1, whole1 + recv2 + whole2)

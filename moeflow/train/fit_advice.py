"""What makes a run that does not fit its devices fit: the dry run's advice, each piece checked.

A piece of advice is named only if the dry run, planned again with it, says fits: no setting that
cannot change (a `dp_shard` already at `dp`, a micro-batch already at 1, bf16 already set) and no
setting that shrinks some item without changing the verdict. Two kinds:

1. One setting changed at this world size: `parallel.dp_shard` up to `dp` (the state sharded over
   every data-parallel rank), activation checkpointing (selective, then full), a smaller
   `train.micro_batch_size` (the largest that fits, with `grad_accum_steps` raised to keep the
   tokens per step), `train.loss_chunk_tokens`, `parallel.mode = "ep"` (no gathered experts),
   bf16 parameters on a GPU, a larger `parallel.ep`.
2. More ranks: the smallest world size `n x ep` (with `parallel.dp_shard = n`, the state sharded
   over all of them) at which the run fits, found by planning `n` = 1, 2, 4, ... and bisecting,
   and checked: there it fits, at `(n - 1) x ep` it does not. State shrinks with ranks;
   activations, loss buffers, a gathered block and the embedding and head gathered whole do not:
   when those alone exceed the device, no number of ranks makes it fit, and the advice says so.

`plan_peak(cfg, world_size)` is the dry run's planner (peak bytes per rank, and its items), passed
in so that this module does not import the dry run that calls it.

Example (a planner whose peak is 100 state bytes shared by the ranks, plus 10):
    >>> from moeflow.train.config import RunConfig
    >>> cfg = RunConfig.from_dict({"model": {"dim": 64, "n_layers": 2, "n_heads": 4}})
    >>> def plan(c, world):
    ...     return 10 + 100 / world, {"weights": 100 / world, "activations": 10}
    >>> smallest_world(cfg, 1, 40.0, plan)  # 3 is skipped: experts 64 wide cannot take it
    (4, 'the smallest world size that fits is 4 ranks (dp 4 x ep 1, parallel.dp_shard = 4, \
needs 35 B); 2 ranks need 60 B')
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from moeflow.train.config import RunConfig
from moeflow.train.memory_plan import human_bytes

PlanPeak = Callable[[RunConfig, int], tuple[float, dict[str, float]]]

# Items that more ranks do not shrink (per rank, whatever the world size), and the start-up peak
# (`plan_peak`'s item: a rank's share built whole before sharding), which a larger dp_shard does
# not shrink either.
FIXED_ITEMS = ("activations", "loss buffers", "largest transient")
START_UP = "start-up"
# The largest world size the search plans (a fake process group of that many ranks takes seconds).
MAX_WORLD = 4096


def _with(cfg: RunConfig, section: str, **changes) -> Callable[[], RunConfig]:
    """`cfg` with `changes` in `section`, made (and validated) when called."""
    part = getattr(cfg, section)
    return lambda: dataclasses.replace(cfg, **{section: dataclasses.replace(part, **changes)})


def _fits(
    make: Callable[[], RunConfig], world: int, device_bytes: float, plan_peak: PlanPeak
) -> float | None:
    """The peak if the config fits at `world`, else None (also for a config or layout that the
    validation refuses)."""
    try:
        peak, _ = plan_peak(make(), world)
    except ValueError:
        return None
    return peak if peak <= device_bytes else None


def candidates(cfg: RunConfig, world: int, dims, device: str):
    """`(advice, make config)` for each one-setting change that could lower the peak at
    `world`."""
    t, p = cfg.train, cfg.parallel
    out = []
    if dims.dp_shard < dims.dp:
        advice = f"parallel.dp_shard = {dims.dp} (now {dims.dp_shard})"
        out.append((advice, _with(cfg, "parallel", dp_shard=dims.dp)))
    order = {False: 0, "selective": 1, True: 2}
    now = str(t.activation_checkpointing).lower()
    for level, shown in (("selective", '"selective"'), (True, "true")):
        if order[level] > order[t.activation_checkpointing]:
            advice = f"train.activation_checkpointing = {shown} (now {now})"
            out.append((advice, _with(cfg, "train", activation_checkpointing=level)))
    micro = t.micro_batch_size // 2
    while micro >= 1:  # the largest micro-batch that fits comes first
        accum = t.grad_accum_steps * t.micro_batch_size // micro
        advice = (
            f"train.micro_batch_size = {micro} (now {t.micro_batch_size}) with "
            f"train.grad_accum_steps = {accum} (the same tokens per step)"
        )
        out.append((advice, _with(cfg, "train", micro_batch_size=micro, grad_accum_steps=accum)))
        micro //= 2
    chunk = min(t.loss_chunk_tokens or t.micro_batch_size * t.seq_len, 1024)
    if not t.loss_chunk_tokens or t.loss_chunk_tokens > chunk:
        advice = f"train.loss_chunk_tokens = {chunk} (now {t.loss_chunk_tokens})"
        out.append((advice, _with(cfg, "train", loss_chunk_tokens=chunk)))
    if p.mode != "ep":
        advice = f'parallel.mode = "ep" (now {p.mode!r}, which gathers experts)'
        out.append((advice, _with(cfg, "parallel", mode="ep")))
    if device == "cuda" and t.param_dtype == "fp32":
        out.append(
            ('train.param_dtype = "bf16" (now "fp32")', _with(cfg, "train", param_dtype="bf16"))
        )
    for bigger in range(dims.ep + 1, world + 1):
        if world % bigger == 0:
            advice = f"parallel.ep = {bigger} (now {dims.ep})"
            out.append((advice, _with(cfg, "parallel", ep=bigger, dp=None)))
    return out


def one_setting(
    cfg: RunConfig, world: int, dims, device: str, device_bytes: float, plan_peak: PlanPeak
) -> list[str]:
    """Each single setting that makes the run fit at `world` (of a family of settings, such as
    the micro-batch size, the one that changes the least)."""
    found, families = [], set()
    for advice, make in candidates(cfg, world, dims, device):
        family = advice.split(" = ")[0]
        if family in families:
            continue
        peak = _fits(make, world, device_bytes, plan_peak)
        if peak is not None:
            families.add(family)
            found.append(f"{advice}: needs {human_bytes(peak)}")
    return found


def _at_ranks(cfg: RunConfig, n: int) -> RunConfig:
    """`cfg` over `n x ep` ranks with the state sharded over all `n` data-parallel ranks."""
    return _with(cfg, "parallel", dp=None, dp_shard=n)()


def smallest_world(
    cfg: RunConfig, ep: int, device_bytes: float, plan_peak: PlanPeak
) -> tuple[int | None, str]:
    """`(world size, advice)`: the smallest `n x ep` ranks (dp_shard n) at which the run fits,
    or None and why no number of ranks makes it fit. A rank's memory depends on `dp_shard`, not
    on `dp_replicate`, so only fully sharded worlds are candidates; a `dp_shard` the layout
    refuses (experts are sharded along their width, which it must divide) is skipped."""

    fixed: dict[str, float] = {}  # what does not shrink with ranks, at the last n planned

    @functools.cache
    def peak(n: int) -> float | None:
        try:
            total, items = plan_peak(_at_ranks(cfg, n), n * ep)
        except ValueError:
            return None
        fixed.clear()
        fixed.update({k: v for k, v in items.items() if k in (*FIXED_ITEMS, START_UP) and v})
        return total

    width = cfg.model.moe.expert_dim
    lo, hi = 0, 1  # lo: the largest n known not to fit (0: none tried); hi: the next to try
    while (got := peak(hi)) is None or got > device_bytes:
        if got is not None:
            lo = hi
            if _floor(fixed) >= device_bytes:  # no larger n can fit either
                return None, _no_world(fixed, lo, ep, device_bytes, got)
        hi *= 2
        if hi * ep > MAX_WORLD:
            return None, _no_world(fixed, lo, ep, device_bytes, peak(lo))
    # The peak falls as dp_shard grows: bisect the widths' divisors between lo and hi.
    between = [n for n in range(lo + 1, hi) if width % n == 0]
    while between:
        mid = between[len(between) // 2]
        got = peak(mid)
        if got is not None and got <= device_bytes:
            hi, between = mid, [n for n in between if n < mid]
        else:
            lo = mid if got is not None else lo
            between = [n for n in between if n > mid] if got is not None else [
                n for n in between if n != mid]  # fmt: skip
    below = f"; {lo * ep} ranks need {human_bytes(peak(lo))}" if lo else ""
    return hi * ep, (
        f"the smallest world size that fits is {hi * ep} ranks (dp {hi} x ep {ep}, "
        f"parallel.dp_shard = {hi}, needs {human_bytes(peak(hi))}){below}"
    )


def _floor(fixed: dict[str, float]) -> float:
    """The least a rank needs at any dp_shard: the start-up peak, or the training items that do
    not shrink with ranks, whichever is more (they are not held at once)."""
    return max(fixed.get(START_UP, 0.0), sum(v for k, v in fixed.items() if k != START_UP))


def _no_world(fixed: dict[str, float], n: int, ep: int, device_bytes: float, total) -> str:
    """Why more ranks do not help: what does not shrink with them (at `n x ep` ranks, the largest
    world planned, where the peak was `total`)."""
    fixed_sum = _floor(fixed)
    start = fixed.get(START_UP, 0.0)
    if start >= device_bytes:
        return (
            f"no number of ranks at ep {ep} makes it fit: the start-up peak ({human_bytes(start)}: "
            "this rank's dense weights and experts, built whole before they are sharded) does "
            "not shrink with dp_shard"
        )
    fixed = {k: v for k, v in fixed.items() if k != START_UP}
    parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in fixed.items())
    if fixed_sum >= device_bytes:
        return (
            f"no number of ranks makes it fit: {parts} do not shrink with ranks and already "
            f"need {human_bytes(fixed_sum)}"
        )
    return (
        f"it does not fit at {n * ep} ranks either (dp {n} x ep {ep}, parallel.dp_shard = {n}: "
        f"needs {human_bytes(total)}; {parts} do not shrink with ranks); the dry run plans "
        f"worlds up to {MAX_WORLD} ranks"
    )


def advise(
    cfg: RunConfig, world: int, dims, device: str, device_bytes: float, plan_peak: PlanPeak
) -> str:
    """The advice of a run that does not fit: the settings that make it fit at this world size,
    and the smallest world size that fits (or why none does)."""
    settings = one_setting(cfg, world, dims, device, device_bytes, plan_peak)
    _, ranks = smallest_world(cfg, dims.ep, device_bytes, plan_peak)
    if settings:
        return f"at {world} ranks it fits with " + "; or ".join(settings) + f". Or: {ranks}"
    return f"no one setting makes it fit at {world} ranks; {ranks}"

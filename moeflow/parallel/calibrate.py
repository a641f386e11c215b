"""Calibrate the cost model on the run's own machine and groups: a few seconds of microbenchmarks
at start-up, cached as JSON in the output directory.

Schedule (collective over the world group; every rank runs every step in the same order):
1. GEMM: `[r, D] @ [D, F]` at two row counts in the run's compute dtype, timed `repeats` times
   on every rank (the device synchronised before the clock is read); the medians,
   maxed over ranks (one all-reduce), fit `t(r) = flops(r) * (r + half_rows) / (r * rate)`.
2. All-to-all over the expert group at two sizes (equal splits), timed in batches of
   back-to-back calls (so a rank is not charged for waiting on a late peer) and maxed alike; a line
   `t(m) = alpha + m * (G - 1) / G / bandwidth` through the two points gives the link figures.
3. The same for an all-gather over the expert group (a ring: `(G - 1) * (alpha + w / bandwidth)`).

Every rank fits the same maxed times, so every rank holds the same `Hardware`. The links measured
are the ones the expert group spans: on one node they stand for both the intra- and inter-node
figures. `load_or_calibrate` reuses `<out_dir>/calibration.json` when it was measured for the same
world, groups, shapes, dtype and torch version.

Example (one process: no link to measure, only the GEMM rate):
    >>> from moeflow.parallel.dims import ParallelDims
    >>> from moeflow.train.distributed import init_distributed, shutdown
    >>> runtime = init_distributed(60.0)
    >>> hw = calibrate(ParallelDims().build(), hidden=64, ffn=128, repeats=2)
    >>> hw.gemm_flops > 0, hw.name
    (True, 'measured')
    >>> shutdown(runtime)
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from moeflow.comm.gather import all_gather_rows
from moeflow.parallel.cost_model import Hardware, Link
from moeflow.parallel.dims import ParallelContext
from moeflow.utils import device_clock

FILE = "calibration.json"


def _timed(fn, repeats: int, batch: int = 1, device: torch.device | str = "cpu") -> float:
    """Median over `repeats` of the mean time of `batch` back-to-back calls (a collective timed
    in a batch is not charged for the ranks arriving at different times), the device
    synchronised around each batch (`moeflow.utils.device_clock`: an accelerator's launches
    return before its work is done)."""
    fn()  # warm-up
    return statistics.median(device_clock.elapsed(fn, device, batch) for _ in range(repeats))


def _max_over(ctx: ParallelContext, values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.world_group)
    return t.tolist()


def _line(x1: float, t1: float, x2: float, t2: float) -> tuple[float, float]:
    """(intercept, slope) through two points, each clamped to a tiny positive value."""
    slope = max((t2 - t1) / (x2 - x1), 1e-18)
    return max(t1 - slope * x1, 0.0), slope


def calibrate(
    ctx: ParallelContext,
    hidden: int,
    ffn: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    repeats: int = 5,
) -> Hardware:
    """Steps 1-3 of the module doc on `ctx`'s world and expert group."""
    size = torch.tensor([], dtype=dtype).element_size()
    rows = (32, 1024)
    w = torch.randn(hidden, ffn, dtype=dtype, device=device)
    xs = [torch.randn(r, hidden, dtype=dtype, device=device) for r in rows]
    gemm = [_timed(lambda x=x: torch.mm(x, w), repeats, device=device) for x in xs]
    group, g = ctx.ep_group, ctx.dims.ep
    small, large = 4096, 4 * 2**20  # bytes per rank
    a2a = gather = [0.0, 0.0]
    if g > 1:

        def a2a_of(nbytes: int):
            n = max(nbytes // size // g, 1) * g
            x, out = (torch.empty(n, dtype=dtype, device=device) for _ in range(2))
            return lambda: dist.all_to_all_single(out, x, group=group)

        def gather_of(nbytes: int):
            x = torch.empty(max(nbytes // size, 1), dtype=dtype, device=device)
            return lambda: all_gather_rows(x, group)

        a2a = [_timed(a2a_of(m), repeats, b, device) for m, b in ((small, 20), (large, 2))]
        gather = [
            _timed(gather_of(m // g), repeats, b, device) for m, b in ((small, 20), (large, 2))
        ]
    gemm_a, gemm_b, a2a_a, a2a_b, g_a, g_b = _max_over(ctx, [*gemm, *a2a, *gather])
    flops = [2.0 * r * hidden * ffn for r in rows]
    # t(r) = flops(r) / rate + flops_per_row * half_rows / rate: a line in r.
    intercept, slope = _line(rows[0], gemm_a, rows[1], gemm_b)
    rate = (flops[1] - flops[0]) / (rows[1] - rows[0]) / slope
    half_rows = intercept / slope
    link = Link(bandwidth=1e15, alpha=0.0)
    if g > 1:
        frac = (g - 1) / g
        alpha, per_byte = _line(small * frac, a2a_a, large * frac, a2a_b)
        ring_alpha, ring_per_byte = _line(small / g, g_a / (g - 1), large / g, g_b / (g - 1))
        link = Link(
            bandwidth=1.0 / max(per_byte, ring_per_byte),
            alpha=max(alpha, ring_alpha),
        )
    return Hardware(
        name="measured", gemm_flops=rate, half_rows=half_rows, intra=link, inter=link,
        bytes_per_element=size, source=f"calibrated on {ctx.world_size} ranks, ep {g}",
    )  # fmt: skip


def hardware_to_dict(hw: Hardware) -> dict:
    return dataclasses.asdict(hw)


def hardware_from_dict(data: dict) -> Hardware:
    """A `Hardware` from `hardware_to_dict` (e.g. `calibration.json`'s "hardware")."""
    try:
        return Hardware(
            **{k: v for k, v in data.items() if k not in ("intra", "inter")},
            intra=Link(**data["intra"]),
            inter=Link(**data["inter"]),
        )
    except (TypeError, KeyError) as exc:
        raise ValueError(f"not a hardware description ({exc}): {data!r:.200}") from None


def load_or_calibrate(
    ctx: ParallelContext,
    out_dir: str | Path,
    hidden: int,
    ffn: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[Hardware, bool]:
    """The cached calibration of `out_dir` if it matches this run, else a new one (written by
    rank 0). Collective. Returns `(hardware, measured now)`."""
    key = {
        "world": ctx.world_size, "ep": ctx.dims.ep, "hidden": hidden, "ffn": ffn,
        "dtype": str(dtype), "device": str(torch.device(device).type),
        "torch": torch.__version__, "local_world": os.environ.get("LOCAL_WORLD_SIZE"),
    }  # fmt: skip
    path = Path(out_dir) / FILE
    cached = [None]
    if ctx.rank == 0 and path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("key") == key:
                cached[0] = data["hardware"]
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            cached[0] = None  # a damaged cache is measured again and rewritten
    dist.broadcast_object_list(cached, src=0, group=ctx.world_group)
    if cached[0] is not None:
        return hardware_from_dict(cached[0]), False
    hw = calibrate(ctx, hidden, ffn, dtype, device)
    if ctx.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"key": key, "hardware": hardware_to_dict(hw)}, indent=1))
        os.replace(tmp, path)
    return hw, True

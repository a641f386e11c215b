"""Where one MoE layer's forward+backward goes, op by op: `bench/layer.py --profile`.

Every aten op of one step is intercepted (`TorchDispatchMode`) and charged to the phase running it
(router, counts and plan, permute, expert compute, un-permute, the losses and statistics, each
forward and backward; where no row travels, the experts' own gathers of token rows), with
its wall time and the bytes it reads (its tensor inputs) and writes (its outputs). Matrix products
of the expert compute and its activation (`gelu`, `silu` and SwiGLU's products, forward and
backward: the floor runs them too) are the floor's work and are listed apart; everything else is
the layer's own overhead (the router weights' products on the rows included), and every byte of
it appears in one row. Timing each op adds Python overhead (a few
microseconds per op), so read the shares, not the sum.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import ClassVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moeflow.comm.dispatcher as dispatcher_mod
import moeflow.comm.local_compute as local_compute
import moeflow.comm.permutation as permutation
import moeflow.moe.expert_compute as expert_compute
import moeflow.moe.layer as layer_mod

GEMMS = {"aten.mm.default", "aten.mm.out", "aten.addmm.default", "aten.addmm.out",
         "aten.addmm_.default", "aten.bmm.default", "aten._grouped_mm.default"}  # fmt: skip


GATHERS = {"index_select", "index", "gather", "embedding"}
ACTIVATIONS = {"gelu", "gelu_backward", "silu", "silu_backward", "relu", "threshold_backward"}
ACTIVATION_PHASE = "expert activation (floor)"


def _is_activation(func, args) -> bool:
    """An activation op of the expert compute: the activations themselves, and SwiGLU's products
    (`mul` of two `[n, F]` tensors; a product with an `[n, 1]` column applies router weights)."""
    name = str(func).split(".")[1]
    if name in ACTIVATIONS:
        return True
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return name in ("mul", "mul_") and all(t.dim() == 2 and t.shape[-1] > 1 for t in tensors)


class _Phases:
    stack: ClassVar[list[str]] = []


@contextmanager
def phase(name: str):
    _Phases.stack.append(name)
    try:
        yield
    finally:
        _Phases.stack.pop()


def _wrap(owner, attr: str, name: str, static: bool) -> None:
    fn = getattr(owner, attr)

    def inner(*args, **kwargs):
        with phase(name):
            return fn(*args, **kwargs)

    setattr(owner, attr, staticmethod(inner) if static else inner)


def instrument() -> None:
    """Charge the layer's pieces to named phases (idempotent)."""
    if getattr(instrument, "done", False):
        return
    instrument.done = True
    _wrap(permutation._Permute, "forward", "permute (fwd)", True)
    _wrap(permutation._Permute, "backward", "permute (bwd)", True)
    _wrap(permutation._Unpermute, "forward", "un-permute (fwd)", True)
    _wrap(permutation._Unpermute, "backward", "un-permute (bwd)", True)
    _wrap(permutation._Combine, "forward", "un-permute (fwd)", True)
    _wrap(permutation._Combine, "backward", "un-permute (bwd)", True)
    _wrap(permutation, "build_plan", "counts and plan", False)
    dispatcher_mod.build_plan = permutation.build_plan
    _wrap(expert_compute.GroupedExpertCompute, "forward", "experts (fwd)", False)
    _wrap(expert_compute.GroupedExpertCompute, "backward", "experts (bwd)", False)
    _wrap(expert_compute.GroupedExpertCompute, "finish", "experts (bwd)", False)
    # Where no row travels: the experts gather their rows themselves (their `index_select` rows);
    # the op around them sums the output rows per token (`combine_rows`) and gathers the router
    # weights per row, charged to the un-permute.
    _wrap(local_compute._LocalCompute, "forward", "un-permute (fwd)", True)
    _wrap(local_compute._LocalCompute, "backward", "un-permute (bwd)", True)
    _wrap(expert_compute.GroupedExpertCompute, "forward_tokens", "experts (fwd)", False)
    _wrap(expert_compute.GroupedExpertCompute, "backward_tokens", "experts (bwd)", False)
    _wrap(layer_mod, "layer_losses", "balancing losses (fwd)", False)
    _wrap(layer_mod, "measure_stats", "statistics", False)


def _nbytes(tree) -> int:
    total = 0
    for t in torch.utils._pytree.tree_leaves(tree):
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def _is_view(func) -> bool:
    """An op whose output aliases an input without `!` (write): slice, select, view, t, ..."""
    outs = func._schema.returns
    return bool(outs) and all(r.alias_info is not None and not r.alias_info.is_write for r in outs)


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.rows = defaultdict(lambda: [0.0, 0, 0, 0])  # (phase, op) -> [s, read, written, n]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        elapsed = time.perf_counter() - t0
        where = _Phases.stack[-1] if _Phases.stack else "router, losses (bwd), rest"
        if where.startswith("experts") and _is_activation(func, args):
            where = ACTIVATION_PHASE
        row = self.rows[(where, str(func))]
        row[0] += elapsed
        if _is_view(func):  # views move no bytes
            pass
        elif str(func).split(".")[1] in GATHERS:  # reads the rows it gathers, not its source
            row[1] += _nbytes(out) + _nbytes([a for a in args[1:] if isinstance(a, torch.Tensor)])
            row[2] += _nbytes(out)
        else:
            row[1] += _nbytes((args, kwargs))
            row[2] += _nbytes(out)
        row[3] += 1
        return out


def profile_step(layer, x: torch.Tensor, g: torch.Tensor, steps: int = 3) -> list[tuple]:
    """`[(phase, op, ms, MB read, MB written, calls)]` per step, averaged over `steps`."""
    instrument()
    _wrap(layer.router, "forward", "router (fwd)", False)

    def step() -> None:
        layer(x).backward(g)
        # As the timed steps do (`bench/layer.py`'s `clear_grads`): without it every step after
        # the first would add into the last step's gradients, work the timed steps never do.
        for p in (*layer.parameters(), x):
            p.grad = None

    step()  # warm
    rec = _Recorder()
    with rec:
        for _ in range(steps):
            step()
    return [
        (ph, op, s * 1e3 / steps, r / 1e6 / steps, w / 1e6 / steps, n // steps)
        for (ph, op), (s, r, w, n) in rec.rows.items()
    ]


def print_profile(rows: list[tuple], top: int = 3) -> None:
    """Per phase: time, bytes read and written, and its heaviest ops; the floor's work (expert
    GEMMs, expert activation) apart."""
    gemm = [r for r in rows if r[0].startswith("experts") and r[1] in GEMMS]
    act = [r for r in rows if r[0] == ACTIVATION_PHASE]
    rest = [r for r in rows if r not in gemm and r not in act]
    by_phase = defaultdict(list)
    for r in rest:
        by_phase[r[0]].append(r)
    total = sum(r[2] for r in rows)
    print(f"  {'phase':<26}{'ms':>8}{'share':>7}{'MB read':>9}{'MB written':>11}  heaviest ops")
    for name, items in (("expert GEMMs (floor)", gemm), (ACTIVATION_PHASE, act)):
        ms = sum(r[2] for r in items)
        print(f"  {name:<26}{ms:>8.2f}{ms / total:>7.1%}"
              f"{sum(r[3] for r in items):>9.1f}{sum(r[4] for r in items):>11.1f}")  # fmt: skip
    for name, items in sorted(by_phase.items(), key=lambda kv: -sum(r[2] for r in kv[1])):
        ms = sum(r[2] for r in items)
        heavy = sorted(items, key=lambda r: -r[2])[:top]
        ops = ", ".join(f"{r[1].split('.')[1]} {r[2]:.2f}" for r in heavy)
        print(f"  {name:<26}{ms:>8.2f}{ms / total:>7.1%}{sum(r[3] for r in items):>9.1f}"
              f"{sum(r[4] for r in items):>11.1f}  {ops}")  # fmt: skip
    over = total - sum(r[2] for r in gemm + act)
    print(f"  overhead outside the floor's work: {over:.2f} ms of {total:.2f} ({over / total:.1%})")

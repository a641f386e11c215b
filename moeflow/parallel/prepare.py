"""prepare_model(model, ctx, dispatch, materialise): a model built on the meta device made ready
to train, in the one order that works.

Steps, on every rank (collective over the world group):

1. `parallelize`: each MoE layer keeps this rank's expert slots (`expert_slots`, default
   contiguous blocks plus `replica_slots` replicas per shard group) and takes its exchange and
   the `DispatchConfig`. On the meta device nothing is allocated, so a large model is never whole
   on one rank.
2. `materialise(model)`, the caller's: allocate and initialise what this rank holds (the
   decoder's `to_empty` and `init_weights`, a `.to(device)`); this package knows no model.
3. With `compile`, every transformer block compiled in place (`moeflow.parallel.compile`): before
   sharding, as torchtitan orders them.
4. With `dp_shard` > 1 or bf16 `param_dtype`, sharded with FSDP2 (`moeflow.parallel.fsdp`): after
   initialisation, so the values do not depend on the sharding.

Example (one process, the same call on every rank of a job):
    >>> from moeflow.moe.config import MoEConfig
    >>> from moeflow.moe.dispatch_config import DispatchConfig
    >>> from moeflow.moe.layer import MoELayer
    >>> from moeflow.parallel import ParallelDims
    >>> from moeflow.parallel.fsdp import is_sharded
    >>> from moeflow.train.distributed import init_distributed, shutdown
    >>> runtime = init_distributed(60.0)
    >>> with torch.device("meta"):
    ...     model = nn.Sequential(MoELayer(MoEConfig(hidden_size=8, num_experts=2,
    ...                                              ffn_hidden_size=8)))
    >>> ready = prepare_model(model, ParallelDims().build(), DispatchConfig(),
    ...                       lambda m: m.to_empty(device="cpu"), param_dtype="bf16")
    >>> ready[0].local_expert_ids, ready[0].experts.w1.device.type, is_sharded(ready)
    ([0, 1], 'cpu', True)
    >>> shutdown(runtime)
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from moeflow.moe.dispatch_config import DispatchConfig
from moeflow.parallel.compile import compile_blocks
from moeflow.parallel.dims import ParallelContext
from moeflow.parallel.fsdp import shard_model
from moeflow.parallel.parallelize import parallelize


def prepare_model(
    model: nn.Module,
    ctx: ParallelContext,
    dispatch: DispatchConfig,
    materialise: Callable[[nn.Module], object],
    *,
    expert_slots: dict[str, list[int]] | None = None,
    replica_slots: int = 0,
    compile: bool = False,
    param_dtype: str = "fp32",
) -> nn.Module:
    """Parallelize `model` (built on the meta device) over `ctx`, `materialise` it, compile its
    blocks (`compile`) and shard it (`dp_shard` > 1 or `param_dtype` "bf16"), in place, in that
    order (see the module doc). Returns `model`."""
    parallelize(model, ctx, dispatch, expert_slots=expert_slots, replica_slots=replica_slots)
    materialise(model)
    if compile:
        compile_blocks(model)  # before sharding, as torchtitan orders them
    if ctx.dims.dp_shard > 1 or param_dtype != "fp32":  # bf16 compute copies are FSDP's
        shard_model(model, ctx, param_dtype)
    return model

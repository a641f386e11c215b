"""shard_model(model, ctx): sharded data parallelism (FSDP2) over moeflow's expert layout.

After `parallelize` (each rank holds its part of the expert layout), `shard_model` applies
`torch.distributed.fsdp.fully_shard` from outside the model, as torchtitan does:

- every transformer block (`transformer_blocks`), then the root (embedding, final norm, head and
  what else no block holds), is one FSDP unit: its parameters are all-gathered before its forward
  (and again before its backward), and freed after;
- the dense parameters of a unit are sharded over `ctx.dense_mesh()` (`dp_shard x ep` ranks,
  replicated over `dp_replicate`: HSDP); its expert parameters (`w1 [L, D, c*F]`, `w2 [L, F, D]`,
  this rank's L slots) over `ctx.expert_mesh()` (the `dp_shard` ranks holding the same experts)
  along the hidden dimension D. Every rank keeps all its slots, so re-placement moves whole rows
  between the ranks of an `ep` group (they share the shard index) and the replicas' gradient sum
  stays a row operation (`GradSync`);
- gradients are reduce-scattered in fp32 (then all-reduced over `dp_replicate`) and averaged over
  the unit's mesh: dense ones over the world, expert ones over `dp`; `GradSync.sync` then divides
  the expert ones by `ep` (each expert's gradient already sums its `ep` group's tokens), so both
  are the replicated run's and training computes what one process would;
- `param_dtype` (bf16): FSDP's `MixedPrecisionPolicy`, compute copies in bf16 from fp32 sharded
  master weights; the optimizer state stays fp32 (it is made from the sharded fp32 parameters).

Inside a unit's forward the parameters are plain tensors again, so every MoE mode, the tuner and
the routers run unchanged. The model is sharded in place; call it on an initialised model (its
weights are cut into shards; the full ones are freed).

Example (one process: a world of one, still sharded, so the same code runs at every size):
    >>> from moeflow.moe.config import MoEConfig
    >>> from moeflow.moe.layer import MoELayer
    >>> from moeflow.parallel import ParallelDims, parallelize
    >>> from moeflow.train.distributed import init_distributed, shutdown
    >>> runtime = init_distributed(60.0)
    >>> ctx = ParallelDims().build()
    >>> model = parallelize(nn.Sequential(MoELayer(MoEConfig(hidden_size=8, num_experts=2,
    ...                                                      ffn_hidden_size=8))), ctx)
    >>> _ = shard_model(model, ctx)
    >>> type(model[0].experts.w1).__name__, is_sharded(model)
    ('DTensor', True)
    >>> model(torch.randn(3, 8)).shape
    torch.Size([3, 8])
    >>> shutdown(runtime)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_common import (  # per-parameter meshes (MoE)
    FSDPMeshInfo,
    HSDPMeshInfo,
    ShardPlacementResult,
)
from torch.distributed.tensor import DTensor, Shard

from moeflow.moe.walk import expert_parameters, moe_layers
from moeflow.parallel.dims import ParallelContext

PARAM_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t` (the local shard of a DTensor; a plain tensor itself). In-place
    writes reach the parameter."""
    return t._local_tensor if isinstance(t, DTensor) else t


def is_sharded(model: nn.Module) -> bool:
    """Whether `shard_model` sharded `model`."""
    return isinstance(model, FSDPModule)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of `model`, one FSDP unit each: the items of the first `ModuleList`
    whose items hold an MoE layer (`MoEDecoder.blocks`, a Hugging Face model's `layers`), else
    every MoE layer itself.

    Example:
        >>> from moeflow.moe.config import MoEConfig
        >>> from moeflow.moe.layer import MoELayer
        >>> layer = MoELayer(MoEConfig(hidden_size=8, num_experts=2, ffn_hidden_size=8))
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ModuleList([nn.Sequential(layer)]))
        >>> transformer_blocks(model)[0][0] is layer
        True
    """
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and any(moe_layers(m) for m in module):
            return list(module)
    return [layer for _, layer in moe_layers(model)]


def _expert_placement(model: nn.Module, ctx: ParallelContext):
    """`shard_placement_fn` for `fully_shard`: expert weights along their hidden dimension D over
    the expert mesh; everything else by FSDP's default (dim 0 over the unit's mesh)."""
    mesh = ctx.expert_mesh()
    if mesh.ndim == 2:
        info = HSDPMeshInfo(mesh, shard_mesh_dim=1, replicate_mesh_dim=0)
    else:
        info = FSDPMeshInfo(mesh, shard_mesh_dim=0)
    shard = ctx.dims.dp_shard
    dims = {}
    for name, where in expert_parameters(model).items():
        param = getattr(where.layer.experts, where.name)
        dim = {"w1": 1, "w2": 2}[where.name]
        if param.shape[dim] % shard:
            hidden = where.layer.config.hidden_size
            extra = " (plus the bias row: moe.ffn_bias)" if param.shape[dim] != hidden else ""
            raise ValueError(
                f"parallel.dp_shard ({shard}) must divide the experts' hidden size "
                f"{param.shape[dim]}{extra} of '{name}' (experts are sharded along it); choose "
                f"a dp_shard dividing model.dim ({hidden})" + (", or ffn_bias = false" if extra
                                                                else "")
            )  # fmt: skip
        dims[id(param)] = dim

    def placement(param: nn.Parameter):
        dim = dims.get(id(param))
        return None if dim is None else ShardPlacementResult(Shard(dim), info)

    return placement


def shard_model(
    model: nn.Module,
    ctx: ParallelContext,
    param_dtype: str = "fp32",
    reshard_after_forward: bool = True,
    blocks: list[nn.Module] | None = None,
) -> nn.Module:
    """Shard `model` (parallelized over `ctx`) with FSDP2, in place (see the module doc).
    `param_dtype`: `fp32`, or `bf16` compute copies of fp32 master weights. `blocks`: the FSDP
    units below the root (default `transformer_blocks(model)`). Collective over the world."""
    if param_dtype not in PARAM_DTYPES:
        raise ValueError(
            f"train.param_dtype ({param_dtype!r}) must be one of {sorted(PARAM_DTYPES)}"
        )
    if is_sharded(model):
        raise ValueError("the model is already sharded (shard_model runs once)")
    dtype = PARAM_DTYPES[param_dtype]
    reduce = torch.float32 if dtype is not None else None
    placement = _expert_placement(model, ctx)
    mesh = ctx.dense_mesh()
    # Blocks take their inputs as the previous unit computed them: FSDP would copy a dataclass
    # argument (the routing context) to cast it, and the model's later layers read it.
    inner = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=reduce, cast_forward_inputs=False)
    root = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=reduce)
    # Parameters with no elements (e.g. MoE++ with no constant experts) hold nothing to shard.
    empty = {p for p in model.parameters() if p.numel() == 0}
    for block in transformer_blocks(model) if blocks is None else blocks:
        fully_shard(
            block, mesh=mesh, reshard_after_forward=reshard_after_forward,
            shard_placement_fn=placement, mp_policy=inner, ignored_params=empty,
        )  # fmt: skip
    fully_shard(
        model, mesh=mesh, shard_placement_fn=placement, mp_policy=root, ignored_params=empty
    )
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Sum, then divide: every backend has a sum (gloo has no average).
            module.set_force_sum_reduction_for_comms(True)
            # A parameter no token reached this step still takes part (as zeros), as GradSync
            # does, so every rank issues the same reduce-scatters.
            module.set_reduce_scatter_unused_params(True, recurse=False)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Inside, a sharded model's backward keeps its gradients unreduced when not `enabled` (all
    but the last micro-batch of an optimizer step: no reduce-scatter until the last one)."""
    if not is_sharded(model) or enabled:
        yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def unit_of(model: nn.Module, module: nn.Module) -> FSDPModule | None:
    """The innermost FSDP unit of `model` that holds `module` (None if `model` is not sharded)."""
    found = None
    for unit in model.modules():
        if isinstance(unit, FSDPModule) and any(m is module for m in unit.modules()):
            found = unit  # modules() lists outer units first
    return found


@contextlib.contextmanager
def unsharded(unit: FSDPModule | None) -> Iterator[None]:
    """`unit`'s parameters gathered (plain tensors again) for a call that does not go through its
    forward, e.g. the tuner replaying one MoE layer of a block; resharded after. None: nothing to
    do (a replicated model)."""
    if unit is None:
        yield
        return
    unit.unshard()
    try:
        yield
    finally:
        unit.reshard()


def unsharded_bytes(unit: nn.Module | None, element_bytes: int | None = None) -> int:
    """What gathering `unit` adds to this rank's memory: its parameters' full size less the local
    shards, at `element_bytes` per element (default the master weights': under bf16 mixed
    precision, pass 2)."""
    if unit is None:
        return 0
    total = 0
    for p in unit.parameters():
        if isinstance(p, DTensor):
            size = p.element_size() if element_bytes is None else element_bytes
            total += (p.numel() - p._local_tensor.numel()) * size
    return total

"""The tensors of a checkpoint, by name: parameters and AdamW moments with every expert weight
under its **logical** id, whatever the layout.

Expert weights are stored one key per logical expert (`blocks.0.ffn.experts.17.w1`,
`optim.blocks.0.ffn.experts.17.w1.exp_avg`), `w1` as `[D, c, F]` (c = 2 column blocks for SwiGLU:
gate, up), `w2` as `[F, D]`, so each rank saves and loads only the experts it holds, and a
checkpoint written at ep=2 loads at ep=1 or ep=4, or after re-placement. What a rank holds of an
expert is its part of that logical tensor, saved and loaded as a `DTensor` over the ranks holding
the other parts:
- an F-slice (ep > num_experts, see `ExpertLayout`): sharded over F across its shard group;
- under sharded data parallelism (`moeflow.parallel.fsdp`): also sharded over D across the
  `dp_shard` ranks holding the same experts.
So a checkpoint reshards across `ep`, `dp_shard` and `dp_replicate`, and one written replicated
loads sharded and back. The values are views of the model's (local) tensors, so DCP loads straight
into them. Dense parameters keep their names (a sharded run's are FSDP's DTensors).

Example:
    >>> from moeflow.moe.config import MoEConfig
    >>> from moeflow.moe.layer import MoELayer
    >>> model = nn.Sequential(MoELayer(MoEConfig(hidden_size=8, num_experts=2,
    ...                                          ffn_hidden_size=4)))
    >>> {k: tuple(v.shape) for k, v in model_state_dict(model).items() if ".experts." in k}
    {'0.experts.0.w1': (8, 2, 4), '0.experts.1.w1': (8, 2, 4), '0.experts.0.w2': (4, 8), \
'0.experts.1.w2': (4, 8)}
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from moeflow.moe.layer import MoELayer
from moeflow.moe.walk import expert_parameters
from moeflow.parallel.fsdp import local_tensor
from moeflow.train.optim import step_count


def _expert_value(
    row: torch.Tensor, pname: str, layer: MoELayer, sharded: DTensor | None, meshes: dict
) -> torch.Tensor | DTensor:
    """One expert row as saved: `w1` viewed `[D, c, f]`; a part of the logical expert (an F-slice,
    and/or a D-shard: `sharded` is the FSDP parameter) as a DTensor over the ranks holding the
    parts (a view of the row either way, so loading writes into it)."""
    layout = layer.layout
    f_dim, d_dim = (2, 0) if pname == "w1" else (0, 1)
    if pname == "w1":
        row = row.unflatten(-1, (-1, layout.ffn_per_rank))
    shape = list(row.shape)
    parts = []  # (group of the ranks holding the other parts, the row's dim it splits)
    if sharded is not None and sharded.device_mesh.size(sharded.device_mesh.ndim - 1) > 1:
        mesh = sharded.device_mesh
        group = mesh.get_group(mesh.ndim - 1)
        parts.append((group, d_dim))
        shape[d_dim] *= mesh.size(mesh.ndim - 1)
    if layout.shards > 1:
        parts.append((layer.expert_dispatch.shard_group, f_dim))
        shape[f_dim] = layout.ffn_hidden_size
    if not parts:
        return row
    key = tuple(id(g) for g, _ in parts)
    if key not in meshes:
        meshes[key] = _mesh([g for g, _ in parts], row.device.type)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        row, meshes[key], [Shard(d) for _, d in parts], run_check=False,
        shape=torch.Size(shape), stride=stride,
    )  # fmt: skip


def _mesh(groups: list, device_type: str) -> DeviceMesh:
    """The mesh of the ranks holding the parts of one expert: the D-shard group (outer) by the
    F-slice group (inner). Rank (i, j) holds D-shard i of F-slice j: it is to D-shard rank i what
    F-slice rank j is to this rank, `first[i] + second[j] - me`."""
    if len(groups) == 1:
        return DeviceMesh.from_group(groups[0], device_type)
    first, second = (dist.get_process_group_ranks(g) for g in groups)
    me = dist.get_rank()
    ranks = torch.tensor([[i + j - me for j in second] for i in first])
    return DeviceMesh.from_group(groups, device_type, mesh=ranks, mesh_dim_names=("d", "f"))


def _split_by_logical_id(
    name: str,
    tensor: torch.Tensor,
    experts: dict,
    out: dict,
    meshes: dict,
    prefix: str = "",
    suffix: str = "",
) -> None:
    if name in experts:
        base, pname, layer = experts[name]
        sharded = tensor if isinstance(tensor, DTensor) else None
        local = local_tensor(tensor)
        for slot, logical in enumerate(layer.local_expert_ids):
            value = _expert_value(local[slot], pname, layer, sharded, meshes)
            out[f"{prefix}{base}.{logical}.{pname}{suffix}"] = value
    else:
        out[f"{prefix}{name}{suffix}"] = tensor


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer, experts split by logical id. Values are views of the
    model's tensors, so DCP loads straight into the model."""
    experts = expert_parameters(model)
    out: dict[str, torch.Tensor] = {}
    meshes: dict = {}
    for name, tensor in model.state_dict().items():
        _split_by_logical_id(name, tensor, experts, out, meshes)
    return out


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's moments now (zeros, as its first step would), so a checkpoint can be loaded
    into them before any step."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = step_count(group, p, 0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """AdamW moments by parameter name (experts by logical id). The step count is the same for
    every parameter and lives in `moeflow.json`."""
    init_optimizer_state(optimizer)
    experts = expert_parameters(model)
    out: dict[str, torch.Tensor] = {}
    meshes: dict = {}
    for name, p in model.named_parameters():
        state = optimizer.state.get(p)
        if not state:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            _split_by_logical_id(
                name, state[key], experts, out, meshes, prefix="optim.", suffix=f".{key}"
            )
    return out

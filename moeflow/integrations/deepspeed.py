"""DeepSpeed: moeflow's MoE layers under `deepspeed.initialize` (ZeRO 0, 1, 2). The one public
entry; the parts import each other one way only (`deepspeed_moe` -> `deepspeed_prepare`,
`deepspeed_gating`, `deepspeed_keys`).

Two ways in:

- `prepare(model, ctx)` (`moeflow.integrations.deepspeed_prepare`), after
  `moeflow.parallel.parallelize(model, ctx)` and before `deepspeed.initialize`: a model holding
  moeflow `MoELayer`s, its expert parameters marked as the engine expects and its layers made
  `DeepSpeedMoELayer`s, which the engine counts as its own `MoE`.
- `MoE` (`moeflow.integrations.deepspeed_moe`): DeepSpeed's `deepspeed.moe.layer.MoE`
  constructor, outputs and state dict on a moeflow layer, for a one-line switch.

Checkpoints: with `MoE`, DeepSpeed's `engine.save_checkpoint` / `load_checkpoint` work as with
DeepSpeed's own layer (its per-expert files, ZeRO 0, 1, 2, ep 1 and more), and checkpoints of the
two layers are interchangeable (`moeflow.integrations.deepspeed_keys`). Layers made by `prepare`
keep moeflow's state dict, which DeepSpeed's MoE checkpoint code cannot parse: save those models
with `moeflow.train.checkpoint.save_checkpoint` (DCP, resharding across ep).

Example (one process: DeepSpeed's names in the state dict):
    >>> from torch import nn
    >>> moe = MoE(8, nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)), num_experts=2)
    >>> sorted(moe.state_dict())[-1]
    'deepspeed_moe.gate.wg.weight'
"""

from __future__ import annotations

from moeflow.integrations.deepspeed_moe import MoE
from moeflow.integrations.deepspeed_prepare import (
    DeepSpeedMoELayer,
    mark_expert_parameters,
    prepare,
)

__all__ = ["DeepSpeedMoELayer", "MoE", "mark_expert_parameters", "prepare"]

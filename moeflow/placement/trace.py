"""RoutingTrace: what routing measured, the input of every placement method.

Shape legend: L MoE layers, E experts per layer.

- `loads[L][E]`: (token, expert) pairs routed to each FFN expert (decayed sums over a window).
- `co_routing[L-1][E][E]`: `co_routing[l][i][j]` = tokens routed to expert i in MoE layer l and to
  expert j in MoE layer l+1. With top-k, each of a token's K pairs at layer l is split evenly over
  its K experts at layer l+1 (K x K pairs of weight 1/K), so row i sums to `loads[l][i]`.

Written by the trainer (`routing_stats.json` in the run's `out_dir`), read by `moeflow plan` and
`bench/placement.py`. The file is JSON (no pickle): a `format` tag, then the arrays as lists.

Example:
    >>> trace = RoutingTrace(np.array([[3.0, 1.0]]), np.zeros((0, 2, 2)))
    >>> trace.num_layers, trace.num_experts, trace.max_mean_load()
    (1, 2, 1.5)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "moeflow.routing_stats"
VERSION = 1


MAX_COUNT = 1e15  # tokens per expert in one statistics file: far past any run, far below overflow


@dataclass
class RoutingTrace:
    loads: np.ndarray  # [L, E] float64
    co_routing: np.ndarray  # [L-1, E, E] float64
    layer_names: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # steps, decay, ... (informational)

    def __post_init__(self) -> None:
        self.loads = np.asarray(self.loads, dtype=np.float64)
        self.co_routing = np.asarray(self.co_routing, dtype=np.float64)
        if self.loads.ndim != 2 or self.loads.shape[0] < 1 or self.loads.shape[1] < 1:
            raise ValueError(
                f"routing stats 'loads' must be [layers, experts] with at least one of each; got "
                f"shape {self.loads.shape}"
            )
        n_layers, n_experts = self.loads.shape
        want = (n_layers - 1, n_experts, n_experts)
        if self.co_routing.shape != want:
            raise ValueError(
                f"routing stats 'co_routing' must be [layers-1, experts, experts] = {want}; got "
                f"shape {self.co_routing.shape}"
            )
        for name, array in (("loads", self.loads), ("co_routing", self.co_routing)):
            bad = ~np.isfinite(array)
            if bad.any():
                where = tuple(int(i) for i in np.argwhere(bad)[0])
                raise ValueError(
                    f"routing stats '{name}' has a non-finite value ({array[where]}) at {where}: "
                    "the statistics are corrupt; record them again"
                )
            if (array < 0).any():
                where = tuple(int(i) for i in np.argwhere(array < 0)[0])
                raise ValueError(
                    f"routing stats '{name}' has a negative count ({array[where]}) at {where}: "
                    "token counts cannot be negative; record them again"
                )
        # Token counts: the planner sums them over layers, experts and ranks in float64.
        for name, array in (("loads", self.loads), ("co_routing", self.co_routing)):
            if array.size and array.max() > MAX_COUNT:
                where = tuple(int(i) for i in np.unravel_index(array.argmax(), array.shape))
                raise ValueError(
                    f"routing stats '{name}' holds {array[where]:.3g} at {where}, more than "
                    f"{MAX_COUNT:.0e} tokens: the statistics are corrupt; record them again"
                )
        if self.loads.sum() <= 0:
            raise ValueError("routing stats 'loads' are all zero: no tokens were recorded")
        if not self.layer_names:
            self.layer_names = [f"moe.{i}" for i in range(n_layers)]
        if len(self.layer_names) != n_layers:
            raise ValueError(
                f"routing stats name {len(self.layer_names)} layers but 'loads' has {n_layers}"
            )

    @property
    def num_layers(self) -> int:
        return self.loads.shape[0]

    @property
    def num_experts(self) -> int:
        return self.loads.shape[1]

    def max_mean_load(self) -> float:
        """Largest expert load over the mean, worst layer (1.0 = perfectly even)."""
        return float((self.loads.max(axis=1) / self.loads.mean(axis=1)).max())

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "layer_names": list(self.layer_names),
            "meta": self.meta,
            "loads": self.loads.tolist(),
            "co_routing": self.co_routing.tolist(),
        }

    def save(self, path: str | Path) -> Path:
        """Write atomically (a temporary file renamed over `path`)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict()))
        os.replace(tmp, path)
        return path

    @classmethod
    def from_dict(cls, data: dict, source: str = "routing stats") -> RoutingTrace:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(
                f'{source} is not a moeflow routing statistics file (no "format": "{FORMAT}"); '
                "`moeflow train` writes one as <out_dir>/routing_stats.json"
            )
        if data.get("version") != VERSION:
            raise ValueError(
                f"{source} has version {data.get('version')!r}; this moeflow reads version "
                f"{VERSION}"
            )
        missing = [k for k in ("loads", "co_routing") if k not in data]
        if missing:
            raise ValueError(f"{source} lacks {missing}")
        try:
            loads = np.array(data["loads"], dtype=np.float64)
            co = np.array(data["co_routing"], dtype=np.float64)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            msg = f"{source}: 'loads'/'co_routing' are not numeric arrays ({exc})"
            raise ValueError(msg) from None
        if co.size == 0 and loads.ndim == 2:  # one layer: JSON keeps no shape for an empty list
            co = np.zeros((0, loads.shape[1], loads.shape[1]))
        for key, axis in (("num_layers", 0), ("num_experts", 1)):
            if key in data and (loads.ndim != 2 or data[key] != loads.shape[axis]):
                raise ValueError(
                    f"{source}: the header's {key} ({data[key]!r}) disagrees with 'loads' (shape "
                    f"{loads.shape}): the file was edited or is corrupt; record it again"
                )
        names, meta = data.get("layer_names") or [], data.get("meta") or {}
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(
                f"{source}: 'layer_names' must be a list of strings, got {names!r:.80}"
            )
        if not isinstance(meta, dict):
            raise ValueError(f"{source}: 'meta' must be a table, got {type(meta).__name__}")
        try:
            return cls(loads, co, names, meta)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"routing statistics file {str(path)!r} does not exist")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            msg = f"routing statistics file {str(path)!r} is not valid JSON: {exc}"
            raise ValueError(msg) from None
        except RecursionError:  # hostile nesting
            msg = f"routing statistics file {str(path)!r} nests too deeply to be statistics"
            raise ValueError(msg) from None
        return cls.from_dict(data, source=f"routing statistics file {str(path)!r}")


def synthetic_trace(
    num_experts: int,
    num_layers: int = 4,
    tokens: int = 65536,
    top_k: int = 2,
    zipf: float = 1.0,
    affinity: float = 0.8,
    seed: int = 0,
) -> RoutingTrace:
    """Zipf-skewed expert loads (the hot experts differ per layer) with cross-layer affinity: a
    fraction `affinity` of the tokens at expert i in layer l go on to i's partner in layer l+1
    (a fixed random matching), the rest spread by the next layer's loads.

    Example:
        >>> t = synthetic_trace(8, num_layers=2, tokens=1000)
        >>> t.loads.shape, t.co_routing.shape, int(t.loads[0].sum())
        ((2, 8), (1, 8, 8), 2000)
    """
    if not 0.0 <= affinity <= 1.0:
        raise ValueError(f"affinity ({affinity}) must be in [0, 1]")
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, num_experts + 1) ** zipf
    probs = []
    for _ in range(num_layers):
        p = np.zeros(num_experts)
        p[rng.permutation(num_experts)] = weights
        probs.append(p / p.sum())
    pairs = tokens * top_k
    loads = np.zeros((num_layers, num_experts))
    co = np.zeros((max(num_layers - 1, 0), num_experts, num_experts))
    loads[0] = rng.multinomial(pairs, probs[0])
    for layer in range(num_layers - 1):
        partner = rng.permutation(num_experts)
        for i in range(num_experts):
            n = int(loads[layer, i])
            stay = rng.binomial(n, affinity)
            co[layer, i, partner[i]] += stay
            co[layer, i] += rng.multinomial(n - stay, probs[layer + 1])
        loads[layer + 1] = co[layer].sum(axis=0)
    meta = {"source": "synthetic", "zipf": zipf, "affinity": affinity, "seed": seed}
    return RoutingTrace(loads, co, meta=meta)

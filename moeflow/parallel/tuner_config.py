"""The runtime tuner's settings (`[tuner]`): how candidates are timed, when situations are
checked, and a replay of an earlier run's decisions (`moeflow.parallel.tuner.RuntimeTuner`).

Example:
    >>> TunerConfig(samples=5).check_every
    10
"""

from __future__ import annotations

from dataclasses import dataclass

from moeflow.utils.validate import check_int, check_path


@dataclass(kw_only=True, frozen=True)
class TunerConfig:
    """`samples` timed replays per candidate (median) after `warmup` untimed ones; `prune`: time
    only candidates predicted within this factor of the best prediction, at most
    `max_candidates`; `refine`: candidates measured within this fraction of the best are timed
    again (0: never); `overlaps`: the overlap degrees to consider; `first_check`: the step of the
    first situation check (the first steps run the default); `check_every`: steps between
    situation checks; `token_bucket`, `imbalance_step`, `traffic_step`: a decision holds while
    the tokens per rank stay within this factor, the max/mean load and the share of pairs
    leaving the rank's shard group within these distances of where it was measured;
    `memory_limit_mb`: transient memory a rank may spend on gathered weights (0: the device's
    free memory on GPUs, no limit on CPUs). `replay`: an earlier run's `metrics.jsonl` (or its
    `out_dir`) whose recorded decisions this run takes instead of timing candidates, for the same
    losses twice (read by the trainer, `moeflow.train.tuning`)."""

    samples: int = 3
    warmup: int = 0  # the median of 3 already discards a first call's outlier
    refine: float = 0.1
    prune: float = 2.0
    max_candidates: int = 6
    overlaps: tuple[int, ...] = (1, 2, 4)
    first_check: int = 50  # routing is still settling in the first steps
    check_every: int = 10
    token_bucket: float = 2.0
    imbalance_step: float = 0.5
    traffic_step: float = 0.25
    memory_limit_mb: float = 0.0
    replay: str | None = None

    def __post_init__(self) -> None:
        if self.replay is not None and (not isinstance(self.replay, str) or not self.replay):
            raise ValueError(
                f"tuner.replay ({self.replay!r}) must be the path of an earlier run's "
                "metrics.jsonl or out_dir"
            )
        if self.replay is not None:
            check_path("tuner.replay", self.replay)
        check_int("tuner.samples", self.samples)
        check_int("tuner.warmup", self.warmup, minimum=0)
        check_int("tuner.max_candidates", self.max_candidates)
        check_int("tuner.check_every", self.check_every)
        check_int("tuner.first_check", self.first_check)
        if not self.refine >= 0:
            raise ValueError(f"tuner.refine ({self.refine!r}) must be >= 0")
        for value in self.overlaps:
            check_int("tuner.overlaps[]", value)
        if not self.prune >= 1.0:
            raise ValueError(f"tuner.prune ({self.prune!r}) must be >= 1")
        if not self.token_bucket > 1.0:
            raise ValueError(f"tuner.token_bucket ({self.token_bucket!r}) must be > 1")
        for name in ("imbalance_step", "traffic_step"):
            if not getattr(self, name) > 0:
                raise ValueError(f"tuner.{name} ({getattr(self, name)!r}) must be > 0")
        if not self.memory_limit_mb >= 0:
            raise ValueError(f"tuner.memory_limit_mb ({self.memory_limit_mb!r}) must be >= 0")

"""Replaying an earlier run's tuner decisions (`tuner.replay`, `moeflow.parallel.tuner`) only where
they hold: a replay that meets a situation the record does not hold stops with one line.

Checked when the tuner is built (every record, before any work): the recorded run's seed, world
size and layout (`run`) are this run's; the recorded layer is one of this model's, with the same
sizes (`shape`); the recorded choice is one this tuner may make (its fixed `parallel.mode`,
`overlap_degree`, `two_level` and `tuner.overlaps`). Checked at each situation check: where this
run meets a new situation the record has a decision at that step, made in a situation within the
tuner's thresholds of this one (`situation`), and where this run reuses a decision the record has
none (the recorded run did the same).

Example:
    >>> run = {"seed": 0, "world_size": 2, "dp": 1, "ep": 2, "dp_shard": 1}
    >>> record = {"layer": "blocks.0.ffn", "step": 50, "mode": "ep", "overlap": 1,
    ...           "two_level": False, "run": {**run, "seed": 1}}
    >>> Replay({("blocks.0.ffn", 50): record}, "runs/a", run).check({})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: tuner.replay ('runs/a'): the recorded run had train.seed 1, this run has 0; ...
"""

from __future__ import annotations

from moeflow.parallel.cost_model import Candidate
from moeflow.parallel.situation import Situation, nearest

# What a replayed record must share with the run that replays it, and how a line names it.
RUN_FIELDS = {"seed": "train.seed", "world_size": "the world size", "dp": "parallel.dp",
              "ep": "parallel.ep", "dp_shard": "parallel.dp_shard"}  # fmt: skip
SAME_RUN = "replay a run of the same config, seed and world size, or drop tuner.replay"
DIVERGED = "the runs diverged (another config or data?); replay a run of the same config, or drop "


class Replay:
    """The decisions `records` ((layer, step) -> record) read from `where` (the `tuner.replay`
    path), replayed by the run `run` (its seed, world size and layout)."""

    def __init__(self, records: dict[tuple[str, int], dict], where: str | None, run: dict) -> None:
        self.records, self.run = records, run
        self.where = f"tuner.replay ({where!r})"

    def check(self, layers: dict[str, tuple[dict, list[Candidate]]]) -> None:
        """Every record against this run and its MoE layers (name -> (sizes, the candidates
        the tuner may choose)): the first that cannot be replayed raises, naming both values."""
        for record in self.records.values():
            problem = run_mismatch(record.get("run", {}), self.run) or layer_mismatch(
                record, layers
            )
            if problem is not None:
                raise ValueError(f"{self.where}: {problem}; {SAME_RUN}")

    def take(self, name: str, step: int, now: Situation, config) -> dict:
        """The recorded decision for `name` at `step`, where this run meets the new situation
        `now`: raises where the recorded run decided nothing there, or in another situation
        (beyond the thresholds of `config`, a `TunerConfig`)."""
        record = self.records.get((name, step))
        if record is None:
            raise self.diverged(name, step, now, "none it had measured")
        if nearest(config, [tuple(record["situation"])], now) is None:
            raise ValueError(
                f"{self.where}: at step {step}, {name} meets {situation_text(now)}; the recorded "
                f"run met {situation_text(record['situation'])}: {DIVERGED}tuner.replay"
            )
        reason = f"replayed ({record.get('reason', '')})"
        return {**record, "reason": reason, "situation": list(now), "run": self.run}

    def reused(self, name: str, step: int, now: Situation) -> None:
        """This run reuses a decision for `name` at `step`: raises where the recorded run met a
        new situation there."""
        if (name, step) in self.records:
            raise self.diverged(name, step, now, "one it had measured before")

    def diverged(self, name: str, step: int, now: Situation, mine: str) -> ValueError:
        theirs = "a new situation" if (name, step) in self.records else "one it had measured"
        return ValueError(
            f"{self.where}: at step {step}, {name} meets {situation_text(now)}, {mine}; the "
            f"recorded run met {theirs}: {DIVERGED}tuner.replay"
        )


def run_of(ctx, seed: int | None) -> dict:
    """What a decision records of the run it was made in: `seed` and the world size and layout
    of `ctx` (a `ParallelContext`)."""
    d = ctx.dims
    return {"seed": seed, "world_size": ctx.world_size, "dp": d.dp, "ep": d.ep,
            "dp_shard": d.dp_shard}  # fmt: skip


def run_mismatch(recorded: dict, run: dict) -> str | None:
    """The first of the seed, world size and layout in which the recorded run differs from
    `run` (a value of None in `run` is not checked)."""
    for key, name in RUN_FIELDS.items():
        if run.get(key) is not None and recorded.get(key) != run[key]:
            return f"the recorded run had {name} {recorded.get(key)}, this run has {run[key]}"
    return None


def layer_mismatch(record: dict, layers: dict[str, tuple[dict, list[Candidate]]]) -> str | None:
    """Why the recorded decision is for no layer of this model, another layer's sizes, or a
    choice this tuner may not make."""
    name = record["layer"]
    if name not in layers:
        return f"the recorded run decided for {name}, a MoE layer this model does not have"
    sizes, allowed = layers[name]
    for key, value in record.get("shape", {}).items():
        if sizes.get(key) != value:
            return f"{name} had {key} {value} in the recorded run, {sizes.get(key)} here"
    choice = Candidate(record["mode"], record["overlap"], record["two_level"])
    if choice not in allowed:
        return (
            f"the recorded run ran {name} as {choice.label()} from step {record['step']}, which "
            f"this run's settings do not allow (it may run {', '.join(k.label() for k in allowed)})"
        )
    return None


def situation_text(situation) -> str:
    """`(T, rho, off)` for a line.

    Example:
        >>> situation_text((1024.0, 1.613, 0.125))
        '1024 tokens per rank, load 1.61, 12% of pairs off-group'
    """
    tokens, rho, off = situation
    return f"{tokens:.0f} tokens per rank, load {rho:.2f}, {off:.0%} of pairs off-group"

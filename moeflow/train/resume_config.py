"""The config a resumed run (`--resume`) continues with: the checkpoint's `[model]`, as
Megatron's `--use-checkpoint-args` takes a checkpoint's model arguments, and the user's other
tables (`train.steps`, data, optimizer, logging, the parallel layout: checkpoints reshard).

A `[model]` key the user changed explicitly is taken from the user where a model may change on
resume (`RESUMABLE`: how a step is computed or its losses weighed, not what the weights are); an
explicit change of any other key (a shape, the expert count, the router's kind) is refused in one
line naming the key, both values and the fix. Explicit means a `--model.*` override on this
command line, or a `[model]` key of the config file changed since the checkpoint was written
(each checkpoint records the file's `[model]` table as written, `GivenModel`). A config given
whole (`train(cfg, resume=...)` from Python, no `GivenModel`) is explicit in every key.

Example:
    >>> saved = RunConfig.from_dict({"model": {"dim": 32, "n_layers": 1}}).to_dict()
    >>> meta = {"config": saved, "model_fingerprint": RunConfig.from_dict(saved).fingerprint()}
    >>> given = GivenModel(file="c.toml", table={"dim": 32}, overrides={})
    >>> cfg, note = resumed_config(RunConfig.from_dict({"model": {"dim": 32}}), meta, "ckpt",
    ...                             given)
    >>> cfg.model.n_layers, note  # the checkpoint's: the file did not change
    (1, "resumed with the checkpoint's [model]: model.n_layers = 1 (the config says 4)")
    >>> import textwrap
    >>> asked = GivenModel(file="c.toml", table={"dim": 32}, overrides={"model.n_layers": 2})
    >>> try:
    ...     resumed_config(RunConfig.from_dict({"model": {"dim": 32, "n_layers": 2}}), meta,
    ...                    "ckpt", asked)
    ... except ValueError as exc:  # one line, wrapped here
    ...     print(textwrap.fill(str(exc), 90))
    --resume: checkpoint 'ckpt' was written for another model: model.n_layers is 1 there, 2
    here (--model.n_layers); drop it to resume with the checkpoint's [model]
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from moeflow.models.decoder import DecoderConfig
from moeflow.train.config import RunConfig
from moeflow.train.config_loader import build_dataclass, parse_overrides

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# `[model]` keys a resumed run may change: how a step runs (the expert kernel, capacity and token
# dropping, the router's numerics) or weighs its losses, and what only initialisation or the
# positions' tables read. Every other key shapes or defines the weights the checkpoint holds.
_ROUTER_RESUMABLE = (
    "capacity_factor", "min_capacity", "drop_policy", "pad_to_capacity", "aux_loss_coeff",
    "z_loss_coeff", "input_jitter_eps", "router_dtype", "softmax_dtype", "bias_update_rate",
)  # fmt: skip
RESUMABLE = frozenset(
    {"model.max_seq_len", "model.rope_theta", "model.norm_eps", "model.init_std",
     "model.moe.expert_kernel", *(f"model.moe.router.{key}" for key in _ROUTER_RESUMABLE)}
)  # fmt: skip


@dataclass(frozen=True)
class GivenModel:
    """The `[model]` a user wrote for this run: the config file's table as written (before
    defaults and `hf_config` fill it in) and the command line's `--model.*` overrides (dotted key
    -> value). Checkpoints record `table`, so a later resume can tell a file changed since."""

    file: str
    table: dict
    overrides: dict

    @classmethod
    def read(cls, config_file: str | Path, overrides: list[str]) -> GivenModel:
        """From `moeflow train CONFIG --section.key VALUE ...` (CONFIG already read once by
        `RunConfig.from_toml`, so it is valid TOML)."""
        data = tomllib.loads(Path(config_file).read_text(encoding="utf-8"))
        table = data.get("model", {})
        given = {k: v for k, v in parse_overrides(overrides) if k.split(".")[0] == "model"}
        return cls(str(config_file), table if isinstance(table, dict) else {}, given)

    def record(self) -> dict:
        """What a checkpoint's `moeflow.json` keeps of it (`given`)."""
        return {"file": self.file, "model": self.table}


def resumed_config(
    cfg: RunConfig, meta: dict, checkpoint: str | Path, given: GivenModel | None
) -> tuple[RunConfig, str]:
    """`cfg` with the `[model]` of the checkpoint whose `moeflow.json` is `meta` (see the module
    doc), and a line naming the keys taken from the checkpoint where `cfg` says otherwise (""
    if none). Raises a one-line `ValueError` for an explicit change that cannot resume."""
    where = f"--resume: checkpoint {str(checkpoint)!r}"
    config = meta.get("config")
    saved = config.get("model") if isinstance(config, dict) else None
    if not isinstance(saved, dict):
        raise ValueError(f"{where} records no [model] section; resume it with the release that "
                         "wrote it, or start a new run")  # fmt: skip

    def with_model(model: dict) -> RunConfig:
        try:
            built = build_dataclass(DecoderConfig, model, "model.", RunConfig)
            return dataclasses.replace(cfg, model=built)
        except ValueError as exc:
            raise ValueError(f"--resume: with the [model] of {str(checkpoint)!r}, {exc}") from None

    resumed = with_model(saved)
    if resumed.fingerprint() != meta.get("model_fingerprint"):
        raise ValueError(f"{where} was written by another moeflow version (its [model] reads "
                         "differently here); resume it with the release that wrote it")  # fmt: skip
    old, new = _flatten(_plain(resumed.model), "model"), _flatten(_plain(cfg.model), "model")
    explicit = explicit_keys(given, meta.get("given"), new)
    conflicts, taken, notes = [], {}, []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, "unset"), new.get(key, "unset")
        if before == after:
            continue
        if key not in explicit:
            notes.append(f"{key} = {_short(before)} (the config says {_short(after)})")
        elif key in RESUMABLE:
            taken[key] = after
        else:
            conflicts.append((key, before, after, explicit[key]))
    if conflicts:
        raise ValueError(_refusal(where, conflicts, given))
    if taken:
        merged = _plain(resumed.model)
        for key, value in taken.items():
            _set(merged, key.split(".")[1:], value)
        resumed = with_model(merged)
    if not notes:
        return resumed, ""
    more = f"; and {len(notes) - 3} more" if len(notes) > 3 else ""
    return resumed, f"resumed with the checkpoint's [model]: {'; '.join(notes[:3])}{more}"


def explicit_keys(given: GivenModel | None, recorded: object, now: dict) -> dict[str, str]:
    """The `[model]` keys (flattened, `now`'s) the user set explicitly, each with where: a
    `--model.*` override, or the config file's `[model]` where it differs from the table the
    checkpoint recorded (`recorded`: its `given`). Without `given`, every key, from "here"."""
    if given is None:
        return dict.fromkeys(now, "")
    out: dict[str, str] = {}
    if isinstance(recorded, dict) and isinstance(recorded.get("model"), dict):
        was = _flatten(_plain(recorded["model"]), "model")
        is_ = _flatten(_plain(given.table), "model")
        changed = [k for k in was.keys() | is_.keys() if was.get(k, "unset") != is_.get(k, "unset")]
        name = Path(given.file).name
        for root in changed:
            out.update(dict.fromkeys(_under(root, now), f"{name}, changed since"))
    for root in given.overrides:
        out.update(dict.fromkeys(_under(root, now), f"--{root}"))
    return out


def _refusal(where: str, conflicts: list, given: GivenModel | None) -> str:
    shown = [
        f"{k} is {_short(a)} there, {_short(b)} here" + (f" ({w})" if w else "")
        for k, a, b, w in conflicts[:3]
    ]
    more = f" (and {len(conflicts) - 3} more)" if len(conflicts) > 3 else ""
    if given is None:
        fix = "resume with the same [model]"
    else:
        flags = {w.startswith("--") for *_, w in conflicts}  # an override, or the file
        verb = "drop or undo" if len(flags) > 1 else ("drop" if True in flags else "undo")
        it = "it" if len(conflicts) == 1 else "them"
        fix = f"{verb} {it} to resume with the checkpoint's [model]"
    return f"{where} was written for another model: {'; '.join(shown)}{more}; {fix}"


def _short(value, limit: int = 40) -> str:
    """`repr(value)`, cut to `limit` characters (an `hf_config` table is long)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _under(root: str, keys: dict) -> list[str]:
    """The flattened keys at or below `root` (an override may set a whole table)."""
    return [k for k in keys if k == root or k.startswith(root + ".")]


def _plain(data) -> dict:
    """JSON's view of a config table (tuples as lists), so saved and built values compare."""
    if dataclasses.is_dataclass(data):
        data = dataclasses.asdict(data)
    return json.loads(json.dumps(data))


def _set(table: dict, path: list[str], value) -> None:
    for part in path[:-1]:
        table = table.setdefault(part, {})
    table[path[-1]] = value


def _flatten(table: dict, prefix: str) -> dict:
    out = {}
    for key, value in table.items():
        if isinstance(value, dict) and key != "hf_config":
            out.update(_flatten(value, f"{prefix}.{key}"))
        else:
            out[f"{prefix}.{key}"] = value
    return out

"""Loading config dataclasses from nested dicts (TOML) and `--section.key VALUE` overrides: type
coercion, and unknown keys refused with the closest known ones.

Example:
    >>> from moeflow.train.config import CheckpointConfig
    >>> build_dataclass(CheckpointConfig, {"every": 5}, "checkpoint")
    CheckpointConfig(every=5, keep=2)
    >>> parse_overrides(["--train.steps", "3", "--optim.lr=1e-3"])
    [('train.steps', 3), ('optim.lr', 0.001)]
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def parse_overrides(args: list[str]) -> list[tuple[str, object]]:
    """`["--a.b", "3", "--c=x"]` -> `[("a.b", 3), ("c", "x")]`."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"override {arg!r} must look like --section.key VALUE")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise ValueError(f"override --{key} has no value")
            value, i = args[i + 1], i + 1
        pairs.append((key, _parse_value(value)))
        i += 1
    return pairs


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def deep_copy(data):
    if isinstance(data, dict):
        return {k: deep_copy(v) for k, v in data.items()}
    return data


def set_dotted(data: dict, key: str, value) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override --{key}: {part!r} is a value, not a section")
    node[parts[-1]] = value


def _known_keys(cls: type, prefix: str) -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        keys.append(path)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_known_keys(hints[f.name], f"{path}."))
    return keys


def _unknown_key_error(path: str, key: str, root: type) -> ValueError:
    full = f"{path}{key}"
    known = _known_keys(root, "")
    close = difflib.get_close_matches(full, known, n=3, cutoff=0.6)
    close += [k for k in known if k.rsplit(".", 1)[-1] == key and k not in close]
    hint = f"; did you mean {', '.join(close[:3])}?" if close else ""
    section = path.rstrip(".")
    siblings = sorted(
        k[len(path) :] for k in known if k.startswith(path) and "." not in k[len(path) :]
    )
    where = f"[{section}] has" if section else "the top level has"
    return ValueError(f"unknown config key {full!r}{hint} ({where}: {', '.join(siblings)})")


def _coerce(path: str, hint, value):
    """TOML values to the dataclass field's type (lists to tuples, ints to floats)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) > 1:  # e.g. `int | str` ("auto"): the first type the value has
            for option in options:
                if isinstance(value, typing.get_origin(option) or option):
                    return _coerce(path, option, value)
            names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
            raise ValueError(f"{path} ({value!r}) must be of type {names}")
        hint = options[0]
        origin = typing.get_origin(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    _check_finite(path, value)
    if origin is tuple and isinstance(value, list | tuple):
        if args and dataclasses.is_dataclass(args[0]):  # an array of tables
            return tuple(build_dataclass(args[0], v, f"{path}[{i}].") for i, v in enumerate(value))
        return tuple(value)
    expected = origin or hint
    if isinstance(expected, type) and not isinstance(value, expected):
        raise ValueError(
            f"{path} ({value!r}) must be of type {getattr(expected, '__name__', expected)}"
        )
    return value


def _check_finite(path: str, value) -> None:
    """TOML spells `inf` and `nan` as floats: no config field means either (a learning rate or a
    timeout of `inf` would pass a `> 0` check and break the run later)."""
    items = value if isinstance(value, list | tuple) else [value]
    for item in items:
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{path} ({value!r}) must be a finite number, not {item!r}")


def build_dataclass(cls: type, data, path: str, root: type | None = None):
    """`cls` from the table `data` found at `path` (nested tables build nested dataclasses);
    unknown keys are named with the closest keys of the `root` config (default `cls`)."""
    root = root or cls
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{path.rstrip('.')} must be a table of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise _unknown_key_error(path, key, root)
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build_dataclass(hint, value, f"{path}{key}.", root)
        else:
            kwargs[key] = _coerce(f"{path}{key}", hint, value)
    return cls(**kwargs)

"""The configuration reference (`docs/configuration.md`), generated from the config dataclasses so
that it cannot drift from them: one section per TOML table, its class's docstring, and every key
with its type and default. `python -m moeflow.train.config_reference > docs/configuration.md`
(`make docs`) writes it; a test fails when the file is stale.

Example:
    >>> text = render()
    >>> "| `top_k` | `int` | `2` |" in text and text.startswith("# Configuration reference")
    True
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing

from moeflow.train.config import RunConfig

HEADER = """# Configuration reference

Every key `moeflow train CONFIG.toml` reads, by TOML table. A key left out takes the default shown;
any key can also be set on the command line as `--table.key VALUE` (for example
`--model.moe.router.top_k 1`). Values are checked before any work, and a bad one is named with
its table and key. This page is generated from the config classes
(`python -m moeflow.train.config_reference > docs/configuration.md`, or `make docs`); do not edit it
by hand.
"""


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return "(table below)"
    else:
        return "(required)"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "unset"
    return repr(value)


def _type(f: dataclasses.Field) -> str:
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return text.replace("|", "or")


def _doc(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    generated = f"{cls.__name__}(" in doc.split("\n", 1)[0]  # dataclass's own signature line
    return "" if generated else doc.split("Example:")[0].strip()


def _section(table: str, cls: type, out: list[str]) -> None:
    fields = dataclasses.fields(cls)
    out += [f"## `[{table}]`", "", f"`{cls.__module__}.{cls.__name__}`", ""]
    doc = _doc(cls)
    if doc:
        out += [doc, ""]
    out += ["| key | type | default |", "|---|---|---|"]
    nested = []
    hints = typing.get_type_hints(cls)
    for f in fields:
        out.append(f"| `{f.name}` | `{_type(f)}` | `{_default(f)}` |")
        items = typing.get_args(hints[f.name])
        if (
            typing.get_origin(hints[f.name]) is tuple
            and items
            and dataclasses.is_dataclass(items[0])
        ):
            nested.append((f"[{table}.{f.name}]", items[0]))  # an array of tables
        if f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            if dataclasses.is_dataclass(value):
                nested.append((f"{table}.{f.name}", type(value)))
    out.append("")
    for name, sub in nested:
        _section(name, sub, out)


def render() -> str:
    """The whole reference as Markdown."""
    out = [HEADER]
    for f in dataclasses.fields(RunConfig):
        _section(f.name, type(f.default_factory()), out)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())

"""The command line's own arguments: a parser whose errors are one line, and the checks of the
values `--world-size` and `--gpu-memory` take (before any work is done with them).

Example:
    >>> dry_run_world_size("64"), memory_bytes("80GB"), memory_bytes("80GiB") / 2**30
    (64, 80000000000.0, 80.0)
    >>> memory_bytes("80")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    moeflow.launch.arguments.UsageError: --gpu-memory ('80') needs a unit: 80GB (10^9 bytes), ...
"""

from __future__ import annotations

import argparse
import math
import re

# The dry run lays every rank out on a fake process group, in time linear in the ranks (about
# 30 us a rank on one CPU core): 2^18 ranks, past the largest jobs run today, take seconds.
MAX_DRY_RUN_RANKS = 2**18

UNITS = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
UNIT_HINT = "80GB (10^9 bytes), 80GiB (2^30 bytes); MB, MiB, TB and TiB also work"


class UsageError(ValueError):
    """A command line that cannot run: one line (`moeflow.launch.cli.main`), exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors raise `UsageError` (one line, naming the command) instead
    of printing the usage block, and which reads a value that starts with `-` and a digit as the
    value of the option before it (`--gpu-memory -5GB` is then refused for its value, not
    misread as an unknown option)."""

    def error(self, message: str):  # argparse's hook: it must not return
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")

    def parse_known_args(self, args=None, namespace=None):
        if args is not None:
            args = _values_glued(list(args), self._one_value_options())
        return super().parse_known_args(args, namespace)

    def _one_value_options(self) -> set[str]:
        return {s for a in self._actions if a.nargs is None for s in a.option_strings}


def _values_glued(args: list[str], options: set[str]) -> list[str]:
    """`[--opt, -5GB]` -> `[--opt=-5GB]` for options that take one value."""
    out, i = [], 0
    while i < len(args):
        if args[i] in options and i + 1 < len(args) and re.match(r"-\.?\d", args[i + 1]):
            out.append(f"{args[i]}={args[i + 1]}")
            i += 2
        else:
            out.append(args[i])
            i += 1
    return out


def dry_run_world_size(text: str) -> int:
    """`--world-size`: a whole number of ranks the dry run can lay out."""
    try:
        ranks = int(text)
    except ValueError:
        ranks = 0
    if not 1 <= ranks <= MAX_DRY_RUN_RANKS:
        raise UsageError(
            f"--world-size ({text!r}) must be a whole number of ranks from 1 to "
            f"{MAX_DRY_RUN_RANKS:,} (the dry run lays out every rank on a fake process group)"
        )
    return ranks


def memory_bytes(text: str) -> float:
    """`--gpu-memory`: bytes from a size with its unit (`80GB`, `80GiB`, `512MiB`, ...); a plain
    number is refused (bytes or gigabytes? it does not say)."""
    raw = text.strip().upper().replace(" ", "")
    unit = re.search(r"[KMGT]I?B$", raw)
    if unit is None:
        raise UsageError(f"--gpu-memory ({text!r}) needs a unit: {UNIT_HINT}")
    try:
        value = float(raw[: unit.start()]) * UNITS[unit.group()]
    except ValueError:
        raise UsageError(
            f"--gpu-memory ({text!r}) must be a number and a unit: {UNIT_HINT}"
        ) from None
    if not math.isfinite(value):
        raise UsageError(f"--gpu-memory ({text!r}) must be a finite size, such as {UNIT_HINT}")
    if not value > 0:
        raise UsageError(f"--gpu-memory ({text!r}) must be more than 0 bytes, such as {UNIT_HINT}")
    return value

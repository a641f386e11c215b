"""A bench of this tree against the same bench of another revision, interleaved in one run.

    .venv/bin/python bench/before_after.py --base 472b4bc --rounds 3 -- bench/layer.py --repeats 5
    .venv/bin/python bench/before_after.py --base HEAD~3 -- bench/ep.py --ranks 2 --repeats 3

Checks the base revision out into a temporary git worktree, then runs the bench command
alternately there and here, `--rounds` times each (before, after, before, after, ...), so a slow
spell of a shared machine hits both. It reads what the bench prints: markdown table rows (keyed
by their text cells), whitespace-aligned tables (`bench/ep.py`: keyed by title and first cell)
and JSON lines (`bench/layer.py --worker moeflow`, keyed by text fields and `--key`); for every
number the medians over the rounds are printed side by side with after / before. The bench's
settings are whatever its command line says: the same for both.

    .venv/bin/python bench/before_after.py --base 472b4bc --key capacity -- \
        bench/layer.py --worker moeflow --repeats 5 --no-deepspeed
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"^[-+]?[\d,]*\.?\d+(?:e[-+]?\d+)?\s*(?:x|%|ms|s)?$")


def parse_tables(text: str) -> dict[tuple[str, ...], dict[str, float]]:
    """`{(header, row key): {column: value}}` for every markdown table row of `text`; the key is
    the row's non-numeric cells, the values its numeric ones (commas, `x`, `%`, `ms` stripped)."""
    rows: dict[tuple[str, ...], dict[str, float]] = {}
    header: list[str] = []
    for line in text.splitlines():
        if not line.startswith("|"):
            header = []
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if all(set(c) <= set("-: ") for c in cells):
            continue  # the separator row
        if not header:
            header = cells
            continue
        key = tuple(c for c in cells if not NUMBER.match(c))
        values = {}
        for name, cell in zip(header, cells, strict=False):
            if NUMBER.match(cell):
                values[name] = _number(cell)
        rows[(" | ".join(header), *key)] = values
    return rows


def parse_columns(text: str) -> dict[tuple[str, ...], dict[str, float]]:
    """Whitespace-aligned tables (`bench/ep.py`): a header of one-word column names, then rows
    whose first cells are numbers; each row keyed by the line above its header (the table's
    title) and its first cell."""
    rows: dict[tuple[str, ...], dict[str, float]] = {}
    header: list[str] = []
    title = previous = ""
    for line in text.splitlines():
        cells = line.split()
        numeric = [bool(NUMBER.match(c)) for c in cells]
        if header and cells and all(numeric[: len(header)]) and len(cells) >= len(header):
            values = {h: _number(c) for h, c in zip(header[1:], cells[1:], strict=False)}
            rows[(title, f"{header[0]} {cells[0]}")] = values
            continue
        header = []
        if len(cells) >= 3 and not any(numeric) and not line.startswith("|"):
            header, title = cells, previous
        if line.strip():
            previous = line.strip()
    return rows


def parse_json_lines(text: str, key_fields: list[str]) -> dict[tuple[str, ...], dict[str, float]]:
    """One JSON object per line (`bench/layer.py --worker ...`): keyed by its text fields and
    `key_fields`; its numbers, nested ones named `outer.inner`, are the values."""
    rows: dict[tuple[str, ...], dict[str, float]] = {}
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        obj = json.loads(line)
        key = tuple(f"{k}={v}" for k, v in obj.items()
                    if isinstance(v, str) or k in key_fields)  # fmt: skip
        values: dict[str, float] = {}
        for k, v in obj.items():
            if k in key_fields:
                continue
            for name, value in v.items() if isinstance(v, dict) else [("", v)]:
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    values[f"{k}.{name}" if name else k] = float(value)
        rows[("json", *key)] = values
    return rows


def _number(cell: str) -> float:
    value = float(re.sub(r"[,x%msa-z ]", "", cell) or "nan")
    return value / 100 if cell.endswith("%") else value


def run(cmd: list[str], cwd: Path) -> str:
    """The bench in the tree `cwd`, importing that tree's moeflow (ahead of the installed one)."""
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    out = subprocess.run([sys.executable, *cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{out.stderr[-3000:]}")
    return out.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", required=True, help="the revision to compare against (git rev)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--key", default="", help="JSON fields that name a row (comma-separated)")
    p.add_argument("bench", nargs=argparse.REMAINDER, help="-- the bench and its arguments")
    args = p.parse_args()
    bench = args.bench[1:] if args.bench[:1] == ["--"] else args.bench
    if not bench:
        raise SystemExit("name the bench after --, e.g. -- bench/layer.py --repeats 5")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=ROOT,
                       check=True, capture_output=True)  # fmt: skip
        try:
            results: dict[str, list[dict]] = {"before": [], "after": []}
            keys = [k for k in args.key.split(",") if k]

            def parse(text: str) -> dict:
                return {**parse_tables(text), **parse_columns(text),
                        **parse_json_lines(text, keys)}  # fmt: skip

            for _ in range(args.rounds):
                results["before"].append(parse(run(bench, base)))
                results["after"].append(parse(run(bench, ROOT)))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT,
                           check=False, capture_output=True)  # fmt: skip
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                          capture_output=True).stdout.strip()  # fmt: skip
    print(f"{' '.join(bench)}: before = {args.base}, after = this tree ({head}, with its "
          f"changes); medians of {args.rounds} interleaved rounds")  # fmt: skip
    print("| table row | column | before | after | after / before |")
    print("|---|---|---|---|---|")
    for key in results["after"][0]:
        for column in results["after"][0][key]:
            seen = {side: [r[key][column] for r in results[side]
                           if key in r and column in r[key]] for side in results}  # fmt: skip
            if not seen["before"] or not seen["after"]:
                continue
            before, after = (statistics.median(seen[s]) for s in ("before", "after"))
            ratio = after / before if before else float("nan")
            print(f"| {' / '.join(key[1:])} | {column} | {before:.4g} | {after:.4g} | "
                  f"{ratio:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()

"""A bench of this tree against the same bench of another revision, interleaved in one run.

    .venv/bin/python bench/before_after.py --base 472b4bc --rounds 3 -- bench/layer.py --repeats 5
    .venv/bin/python bench/before_after.py --base HEAD~3 -- bench/ep.py --ranks 2 --repeats 3

Checks the base revision out into a temporary git worktree, then runs the bench command
alternately there and here, `--rounds` times each (before, after, before, after, ...), so a slow
spell of a shared machine hits both. Every markdown table row the bench prints is keyed by its
text cells; for every numeric cell the medians over the rounds are printed side by side with
after / before. The bench's own settings are whatever its command line says: the same for both.
"""

from __future__ import annotations

import argparse
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
                values[name] = float(re.sub(r"[,x%msa-z ]", "", cell) or "nan")
        rows[(" | ".join(header), *key)] = values
    return rows


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
            for _ in range(args.rounds):
                results["before"].append(parse_tables(run(bench, base)))
                results["after"].append(parse_tables(run(bench, ROOT)))
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

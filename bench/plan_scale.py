"""`moeflow plan` at scale: time of each placement method on one layer of many experts.

    .venv/bin/python bench/plan_scale.py                      # 10^4 / 64, 10^5 / 512, 10^6 / 4096
    .venv/bin/python bench/plan_scale.py --sizes 100000:512

Loads are Zipf(1.5) counts (a few very hot experts), with a replica slot per two ranks. Every
method runs through `moeflow.placement.planner.plan` (placing and scoring), one process, one thread;
the ILP at these sizes is past `max_layer_binaries` and returns greedy's placement at once
(`too_large`). Prints seconds and the max/mean rank load per method.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeflow.placement.planner import METHODS, plan
from moeflow.placement.problem import PlacementConfig
from moeflow.placement.trace import RoutingTrace


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["10000:64", "100000:512", "1000000:4096"])
    args = p.parse_args()
    print("per method: seconds, max/mean rank load, status")
    print(f"{'experts':>9}{'ranks':>7}  " + "".join(f"{m:>28}" for m in METHODS))
    for size in args.sizes:
        experts, ranks = map(int, size.split(":"))
        loads = np.random.default_rng(0).zipf(1.5, size=(1, experts)).astype(float)
        trace = RoutingTrace(loads, np.zeros((0, experts, experts)))
        slots = experts + ranks // 2
        cfg = PlacementConfig(num_ranks=ranks, num_slots=slots, slots_per_rank=-(-slots // ranks))
        cells = []
        for method in METHODS:
            start = time.perf_counter()
            result = plan(trace, cfg, method)
            seconds = time.perf_counter() - start
            ratio = result.metrics.max_load[0] / result.metrics.mean_load[0]
            cells.append(f"{seconds:8.2f} s {ratio:6.3f} {result.status:>10}")
        print(f"{experts:>9}{ranks:>7}  " + "".join(f"{c:>28}" for c in cells))


if __name__ == "__main__":
    main()

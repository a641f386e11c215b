"""Run a function on N gloo ranks on CPU: spawned processes, a free port, a timeout, every rank's
exception reported.

    results = run_on_ranks(fn, world_size=4, args=(cfg,))   # fn(rank, world_size, *args)

`fn` must be importable (a module-level function of a test module). Each rank runs with
`OMP_NUM_THREADS=1`, a process group already initialised (gloo), and returns a picklable value;
`run_on_ranks` returns them in rank order. If any rank raises, or the job outlives `timeout`, all
ranks are stopped and one `DistributedTestError` lists every rank's traceback (or that it hung).
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue as queue_module
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from moeflow.train.distributed import free_port, local_rank_env


class DistributedTestError(AssertionError):
    pass


def _worker(rank, world_size, port, fn, args, env, queue, pg_timeout_s) -> None:
    os.environ.update(env)
    os.environ.update(local_rank_env(rank, world_size, port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
        result = fn(rank, world_size, *args)
        # Pickled here, by value: torch's queue pickler would pass tensors as shared-memory handles
        # that die with this process if it exits before the parent unpickles them.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException as exc:  # reported to the parent, never swallowed
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    timeout: float = 180.0,
    env: dict[str, str] | None = None,
    pg_timeout_s: float = 60.0,
) -> list[Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, fn, args, env or {}, queue, pg_timeout_s),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any]] = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        while len(results) < world_size:
            remaining = (deadline - datetime.datetime.now()).total_seconds()
            if remaining <= 0:
                break
            try:
                rank, status, payload = queue.get(timeout=min(remaining, 1.0))
            except queue_module.Empty:  # poll again, and notice ranks that died silently
                if all(not p.is_alive() for p in procs) and queue.empty():
                    break
                continue
            results[rank] = (status, payload)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    failures = []
    for rank in range(world_size):
        if rank not in results:
            code = procs[rank].exitcode
            failures.append(
                f"rank {rank}: no result (hung past {timeout:.0f}s or exit code {code})"
            )
        elif results[rank][0] == "error":
            failures.append(f"rank {rank}: {results[rank][1]}")
    if failures:
        raise DistributedTestError(
            f"{len(failures)} of {world_size} ranks failed:\n" + "\n".join(failures)
        )
    return [pickle.loads(results[r][1]) for r in range(world_size)]

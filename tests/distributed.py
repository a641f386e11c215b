"""Run a function on N gloo ranks on CPU: spawned processes, a free port, a timeout, every rank's
exception reported.

    results = run_on_ranks(fn, world_size=4, args=(cfg,))   # fn(rank, world_size, *args)

`fn` must be importable (a module-level function of a test module). Each rank runs with
`OMP_NUM_THREADS=1`, a process group already initialised (gloo), and returns a picklable value;
`run_on_ranks` returns them in rank order. If any rank raises, or the call outlives `timeout`
(counted from when the ranks get the call, not from their start), one `DistributedTestError` lists
every rank's traceback (or that it hung).

One spawn serves many calls: the ranks of a world size (and environment and process-group
timeout) stay up between calls, each rank running one call after another in the same process
group, so a call costs what its function costs, not a start of N interpreters importing torch
(several seconds at 4 ranks on 2 cores). Between calls each rank puts back what a call may change
globally (the environment, the default dtype, grad mode, the thread count, torch.compile's
caches). A call that fails, hangs, or leaves the process group destroyed ends its ranks: the next
call starts fresh ones, so a failure never reaches another test.
"""

from __future__ import annotations

import atexit
import datetime
import itertools
import os
import pickle
import queue as queue_module
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from moeflow.train.distributed import free_port, local_rank_env

START_TIMEOUT_S = 300.0  # spawning and joining the process group (imports on a loaded machine)
KEEP_WORLDS = 2  # worlds kept up at once (each rank holds a few hundred MB)


class DistributedTestError(AssertionError):
    pass


def _reset_globals(environ: dict[str, str]) -> None:
    """What a call may have changed for the next call in this process."""
    import torch

    os.environ.clear()
    os.environ.update(environ)
    torch.set_default_dtype(torch.float32)
    torch.set_grad_enabled(True)
    torch.set_num_threads(1)
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


def _serve(rank, world_size, port, env, tasks, results, pg_timeout_s) -> None:
    """One rank of a world: join the process group, then run calls until told to stop."""
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
    except BaseException as exc:  # reported to the parent, never swallowed
        results.put((None, rank, "error", f"{type(exc).__name__}: {exc}"))
        return
    results.put((None, rank, "ready", None))
    environ = dict(os.environ)
    while (task := tasks.get()) is not None:
        call_id, fn, args = task
        try:
            result = fn(rank, world_size, *args)
            # Pickled here, by value: torch's queue pickler would pass tensors as shared-memory
            # handles that die with this process if it exits before the parent unpickles them.
            status, payload = "ok", pickle.dumps(result)
        except BaseException as exc:  # reported to the parent, never swallowed
            status = "error"
            payload = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        if not dist.is_initialized():  # the call ended the group: this world cannot go on
            status = "ok-last" if status == "ok" else status
        results.put((call_id, rank, status, payload))
        if status != "ok":
            break
        _reset_globals(environ)
    if dist.is_initialized():
        dist.destroy_process_group()


class _World:
    """The ranks of one world size, kept up between calls."""

    _ids = itertools.count()

    def __init__(self, world_size: int, env: dict[str, str], pg_timeout_s: float) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        port = free_port()
        self.procs = [
            ctx.Process(
                target=_serve,
                args=(rank, world_size, port, env, self.tasks[rank], self.results, pg_timeout_s),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in self.procs:
            p.start()
        replies = self._collect(None, START_TIMEOUT_S)
        failed = [f"rank {r}: {replies[r][1]}" for r in replies if replies[r][0] != "ready"]
        missing = [r for r in range(world_size) if r not in replies]
        if failed or missing:
            self.close()
            raise DistributedTestError(
                f"the {world_size} ranks did not start: "
                + "; ".join(failed + [f"rank {r}: no answer" for r in missing])
            )

    def _collect(self, call_id, timeout: float) -> dict[int, tuple[str, Any]]:
        """Each rank's (status, payload) for `call_id`, until all answered, the time is up, or
        every rank that has not answered is dead."""
        out: dict[int, tuple[str, Any]] = {}
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        while len(out) < self.world_size:
            remaining = (deadline - datetime.datetime.now()).total_seconds()
            if remaining <= 0:
                break
            try:
                got_id, rank, status, payload = self.results.get(timeout=min(remaining, 1.0))
            except queue_module.Empty:  # poll again, and notice ranks that died silently
                waiting = [r for r in range(self.world_size) if r not in out]
                if all(not self.procs[r].is_alive() for r in waiting) and self.results.empty():
                    break
                continue
            if got_id == call_id:
                out[rank] = (status, payload)
        return out

    def run(self, fn, args, timeout: float) -> tuple[dict[int, tuple[str, Any]], bool]:
        """Every rank's answer to `fn(rank, world_size, *args)`, and whether the world can serve
        another call."""
        call_id = next(self._ids)
        for q in self.tasks:
            q.put((call_id, fn, args))
        replies = self._collect(call_id, timeout)
        healthy = len(replies) == self.world_size and all(s == "ok" for s, _ in replies.values())
        return replies, healthy

    def close(self, kill: bool = False) -> None:
        """Stop the ranks: asked to leave (`kill`: at once, for ranks that may hang)."""
        for q, p in zip(self.tasks, self.procs, strict=True):
            if p.is_alive() and not kill:
                q.put(None)
        for p in self.procs:
            p.join(timeout=0 if kill else 5)
            if p.is_alive():
                p.kill()
                p.join()


_worlds: dict[tuple, _World] = {}


@atexit.register
def _close_all() -> None:
    while _worlds:
        _worlds.pop(next(iter(_worlds))).close()


def _world(world_size: int, env: dict[str, str], pg_timeout_s: float) -> _World:
    key = (world_size, tuple(sorted(env.items())), pg_timeout_s)
    if key in _worlds:
        _worlds[key] = _worlds.pop(key)  # most recently used last
        return _worlds[key]
    while len(_worlds) >= KEEP_WORLDS:
        _worlds.pop(next(iter(_worlds))).close()
    _worlds[key] = _World(world_size, env, pg_timeout_s)
    return _worlds[key]


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    timeout: float = 180.0,
    env: dict[str, str] | None = None,
    pg_timeout_s: float = 60.0,
) -> list[Any]:
    key_env = env or {}
    world = _world(world_size, key_env, pg_timeout_s)
    replies, healthy = world.run(fn, args, timeout)
    if not healthy:
        _worlds.pop((world_size, tuple(sorted(key_env.items())), pg_timeout_s), None)
        world.close(kill=True)
    failures = []
    for rank in range(world_size):
        if rank not in replies:
            code = world.procs[rank].exitcode
            failures.append(
                f"rank {rank}: no result (hung past {timeout:.0f}s or exit code {code})"
            )
        elif replies[rank][0] == "error":
            failures.append(f"rank {rank}: {replies[rank][1]}")
    if failures:
        raise DistributedTestError(
            f"{len(failures)} of {world_size} ranks failed:\n" + "\n".join(failures)
        )
    return [pickle.loads(replies[r][1]) for r in range(world_size)]

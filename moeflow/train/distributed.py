"""Start (or join) the process group of a training run, on one process or under torchrun.

- Under torchrun (`WORLD_SIZE` in the environment): `env://` rendezvous; NCCL for CUDA tensors and
  gloo for CPU ones when a GPU is present, gloo alone otherwise. Each rank takes `cuda:LOCAL_RANK`.
- A plain process: a one-rank gloo group on an in-memory store, so world size 1 runs the same code
  (the same collectives, the same checkpoint path) as many ranks.
- `fake_world_size` (dry runs): torch's fake backend; collectives return without moving data, so a
  2,048-rank layout can be built and checked on one CPU.

Example:
    >>> Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), owns_group=True)
    Runtime(rank=0, world_size=1, local_rank=0, device=device(type='cpu'), owns_group=True)
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this call created the group, so `shutdown` destroys it


def init_distributed(timeout_s: float, fake_world_size: int | None = None) -> Runtime:
    timeout = datetime.timedelta(seconds=timeout_s)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    owns = False
    if fake_world_size is not None:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        if dist.is_initialized():
            raise RuntimeError("a fake process group needs a process without one")
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=fake_world_size)
        return Runtime(0, fake_world_size, 0, torch.device("cpu"), True)
    if not dist.is_initialized():
        owns = True
        if "WORLD_SIZE" in os.environ:
            backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(
                "gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
    return Runtime(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)


def shutdown(runtime: Runtime) -> None:
    if runtime.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a single-machine rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The environment torchrun would give rank `rank` of a `world_size`-rank job on this machine
    (`env://` rendezvous on 127.0.0.1:`port`), for code that spawns ranks itself."""
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
    }

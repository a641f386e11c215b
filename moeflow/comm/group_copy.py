"""Copying and pickling a model that holds process groups (a parallelized model's layers keep the
groups they communicate over).

torch's `ProcessGroup` is a handle to live communicators: it can be neither copied nor pickled.
A copy of a parallelized model (EMA weights, a frozen reference model, an evaluation copy) runs on
the same ranks and must talk over the same groups, so `copy.deepcopy` keeps the group itself. A
pickled model (`torch.save(model)`) records each group by its global ranks and finds it again when
loaded in a process of the same job (the groups are created in the same order on every rank, so
every rank finds the same one); loading it where no such group exists raises, naming the ranks and
what to do instead.

Example (one process: the default group of a world of one):
    >>> import copy, pickle
    >>> import torch.distributed as dist
    >>> from moeflow.train.distributed import init_distributed, shutdown
    >>> runtime = init_distributed(60.0)
    >>> group = dist.new_group([0])
    >>> copy.deepcopy([group])[0] is group, pickle.loads(pickle.dumps(group)) is group
    (True, True)
    >>> shutdown(runtime)
"""

from __future__ import annotations

import copyreg

import torch.distributed as dist


def _live_groups() -> dict:
    """{group: {global rank: group rank}} of this process, in creation order."""
    from torch.distributed import distributed_c10d as c10d

    return dict(getattr(c10d._world, "pg_group_ranks", {}))


def _find_group(object_id: int, ranks: tuple[int, ...]) -> dist.ProcessGroup:
    """The group a pickled handle named: the same object in this process (a copy), else the first
    group created over the same global ranks (a load in another process of the job)."""
    groups = _live_groups()
    for group in groups:
        if id(group) == object_id and tuple(sorted(groups[group])) == ranks:
            return group
    for group, members in groups.items():
        if tuple(sorted(members)) == ranks:
            return group
    raise RuntimeError(
        f"this model was parallelized over a process group of global ranks {list(ranks)}, and "
        "this process has no such group: load it in a rank of a job that created that group, or "
        "save and load the model's state_dict (moeflow.train.checkpoint) to move it elsewhere"
    )


def _reduce_group(group: dist.ProcessGroup):
    ranks = tuple(sorted(_live_groups().get(group, {})))
    return _find_group, (id(group), ranks)


def register() -> None:
    """Teach `copy` and `pickle` the handles above (idempotent; moeflow.comm calls it)."""
    if dist.is_available():
        copyreg.pickle(dist.ProcessGroup, _reduce_group)

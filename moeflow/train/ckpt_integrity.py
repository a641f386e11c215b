"""Checkpoint integrity: a size and SHA-256 per file in the manifest, checked before bytes are used.

The manifest is the `files` table of `moeflow.json`, the file written last (so a checkpoint with a
manifest is complete): `{name: {"bytes": n, "sha256": hex}}` for every DCP file, `.metadata` and
every `rank_<r>.json`. On save each rank digests the files it wrote (`local_digests`) and rank 0
merges them (`moeflow.train.checkpoint.save_checkpoint`). On load:

- `SafeFileSystemReader` checks `.metadata` before unpickling it, confines every path the metadata
  names to the checkpoint directory (`confined`), and checks each data file the first time this
  rank reads from it: every rank verifies what it reads, nothing more;
- `verify_checkpoint` checks a whole checkpoint, the files split over the ranks (each file read
  once in all), for `--resume` to pick the newest intact checkpoint.

A mismatch raises `CorruptCheckpointError` naming the file and what differs. Checkpoints written
before manifests existed load unverified (their paths are still confined).

Example:
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); _ = (d / "a.distcp").write_bytes(b"weights")
    >>> manifest = {"a.distcp": digest(d / "a.distcp")}
    >>> verify_file(d, "a.distcp", manifest)
    >>> _ = (d / "a.distcp").write_bytes(b"weightz")
    >>> try:
    ...     verify_file(d, "a.distcp", manifest)
    ... except CorruptCheckpointError as exc:
    ...     print(str(exc)[:45])
    a.distcp: its SHA-256 is not the one recorded
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch.distributed as dist

CHUNK = 1 << 22


class CorruptCheckpointError(ValueError):
    """A checkpoint file is missing, truncated, altered, or named outside its directory."""


def digest(path: Path) -> dict:
    """`{"bytes": size, "sha256": hex digest}` of one file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
            size += len(block)
    return {"bytes": size, "sha256": h.hexdigest()}


def local_digests(directory: Path, rank: int) -> dict[str, dict]:
    """Digests of the files rank `rank` wrote into a checkpoint directory: its DCP data files
    (`__<rank>_<n>.distcp`, as `FileSystemWriter` names them) and its `rank_<r>.json`."""
    names = [p.name for p in directory.glob(f"__{rank}_*.distcp")]
    names.append(f"rank_{rank:05d}.json")
    return {name: digest(directory / name) for name in sorted(names)}


def confined(name: str, directory: Path) -> Path:
    """`directory / name` when `name` is a plain file name inside `directory` (DCP writes no
    other kind) and not a link out of it, else `CorruptCheckpointError`: a path in the metadata
    or a file swapped for a link must not reach other runs' files or the system's."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or Path(name).name != name
        or "\\" in name
        or "\0" in name
    ):
        raise CorruptCheckpointError(
            f"the checkpoint metadata names the file {name!r}, which is not a plain file name "
            f"inside {str(directory)!r}; refusing to read it (the metadata is corrupt or crafted)"
        )
    path = directory / name
    target = path.resolve()
    if target.parent != directory.resolve():  # a link (or a link's link) out of the folder
        raise CorruptCheckpointError(
            f"{name} in checkpoint {str(directory)!r} is a link to {str(target)!r}, outside the "
            "checkpoint folder; refusing to read it (replace the link with the file itself)"
        )
    return path


def verify_file(directory: Path, name: str, manifest: dict | None) -> None:
    """Check one file against the manifest (no manifest: only that it lies in `directory`)."""
    path = confined(name, directory)
    if manifest is None:
        return
    want = manifest.get(name)
    if not isinstance(want, dict):
        raise CorruptCheckpointError(f"{name}: not in the checkpoint's manifest (moeflow.json)")
    if not path.is_file():
        raise CorruptCheckpointError(f"{name}: the file is missing")
    size = path.stat().st_size
    if size != want.get("bytes"):
        raise CorruptCheckpointError(
            f"{name}: {size} bytes, {want.get('bytes')} when it was written (the file is "
            "truncated or damaged)"
        )
    if digest(path)["sha256"] != want.get("sha256"):
        raise CorruptCheckpointError(
            f"{name}: its SHA-256 is not the one recorded when it was written (the file is damaged)"
        )


def verify_checkpoint(
    directory: Path, manifest: dict | None, group: dist.ProcessGroup | None = None
) -> str | None:
    """Every file of the manifest checked, file i by rank `i % world` (collective over `group`
    when a process group exists); the first problem found as one line, or None. Every rank
    returns the same answer."""
    if manifest is None:
        return None
    initialized = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if initialized else (0, 1)
    problem = None
    for i, name in enumerate(sorted(manifest)):
        if i % world == rank and problem is None:
            try:
                verify_file(directory, name, manifest)
            except CorruptCheckpointError as exc:
                problem = str(exc)
    if not initialized:
        return problem
    problems: list = [None] * world
    dist.all_gather_object(problems, problem, group=group)
    return next((p for p in problems if p), None)

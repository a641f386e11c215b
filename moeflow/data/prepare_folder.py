"""The output folder of `moeflow data prepare`: what it holds before a run (nothing, a finished
prepare, an unfinished one, or someone else's files), the work folder a run keeps inside it, and
the lock that keeps two runs from writing it at once.

The work folder, `OUT/.prepare/`, exists until the manifest is written:

    plan.json        what this prepare reads and makes: the input files (path, bytes, mtime),
                     the units, the options and the tokenizer; a rerun resumes only the same plan
    lock             held (flock) by the running prepare
    parts/NNNNNN.*   unit N's tokens and metadata (`moeflow.data.prepare_parts`)
    hashes/NNNNNN.json  blake2b of a group of input files

Example:
    >>> plan_difference({"options": {"seed": 0}}, {"options": {"seed": 1}})
    'options.seed: 0 before, 1 now'
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from moeflow.data.manifest import MANIFEST

WORK = ".prepare"
PLAN_VERSION = 1
# Everything a prepare writes into its folder (nothing else is ever deleted).
OURS = (MANIFEST, f"{MANIFEST}.partial", "train-[0-9]*.bin", "train-[0-9]*.idx",
        "train-[0-9]*.partial", "val-[0-9]*.bin", "val-[0-9]*.idx", "val-[0-9]*.partial",
        "train.counts.npy", "val.counts.npy", "*.counts.npy.partial")  # fmt: skip


def plan_difference(before: dict, now: dict) -> str | None:
    """The first difference between two plans, in words (None: the same plan)."""
    for key in ("version", "kind", "tokenizer", "options"):
        a, b = before.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            for name in sorted(set(a) | set(b)):
                if a.get(name) != b.get(name):
                    return f"{key}.{name}: {a.get(name)!r} before, {b.get(name)!r} now"
        elif a != b:
            return f"{key}: {a!r} before, {b!r} now"
    files_a = {f[0]: f[1:] for f in before.get("inputs", [])}
    files_b = {f[0]: f[1:] for f in now.get("inputs", [])}
    for path in files_b:
        if path not in files_a:
            return f"input file {path} is new"
        if files_a[path] != files_b[path]:
            s0, s1 = files_a[path][0], files_b[path][0]
            change = f"{s0} -> {s1} bytes" if s0 != s1 else "modified since"
            return f"input file {path} changed ({change})"
    for path in files_a:
        if path not in files_b:
            return f"input file {path} is no longer read"
    if before.get("units") != now.get("units") or before.get("inputs") != now.get("inputs"):
        return "the order of the inputs or their units"
    return None


def claim(out: Path, plan: dict, overwrite: bool) -> bool:
    """Make `out` ready for `plan`, refusing (before writing anything) a folder it must not
    touch; True when an unfinished prepare of the same plan is there to resume."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder (new or empty) for the shards")
    if (out / MANIFEST).is_file():
        if not overwrite:
            raise ValueError(
                f"--out {out} already holds a finished prepared folder ({MANIFEST}): pass "
                "--overwrite to replace it, or choose another --out"
            )
        _remove_ours(out)
        return False
    plan_file = out / WORK / "plan.json"
    if plan_file.is_file():
        try:
            before = json.loads(plan_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            before = {}
        difference = plan_difference(before, plan)
        if difference is None:
            return True
        if not overwrite:
            raise ValueError(
                f"--out {out} holds an unfinished prepare of something else ({difference}): run "
                "the same command to resume it, or pass --overwrite to start over"
            )
        _remove_ours(out)
        return False
    if out.is_dir():
        work = out / WORK
        if work.is_dir() and {p.name for p in work.iterdir()} <= {"parts", "hashes", "lock"}:
            shutil.rmtree(work)  # a start killed before it wrote its plan: nothing to resume
        others = sorted(p.name for p in out.iterdir())
        if others:
            raise ValueError(
                f"--out {out} is a folder that is not a prepared folder and not empty (it holds "
                f"{others[:5]}{' ...' if len(others) > 5 else ''}); choose a new or empty folder"
            )
    return False


def _remove_ours(out: Path) -> None:
    """Delete what a prepare wrote into `out`, and nothing else."""
    for pattern in OURS:
        for path in out.glob(pattern):
            path.unlink()
    shutil.rmtree(out / WORK, ignore_errors=True)


def remove_unfinished(out: Path, created: bool) -> None:
    """After a first run failed on bad input: `out` as it was (gone, when this run made it)."""
    _remove_ours(out)
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


@contextlib.contextmanager
def locked(out: Path, plan: dict, resumed: bool) -> Iterator[Path]:
    """The work folder, with this process holding its lock and (on a fresh start) the plan
    written; another prepare of the same folder is refused while it is held."""
    work = out / WORK
    for sub in ("parts", "hashes"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    with open(work / "lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise ValueError(
                f"another moeflow data prepare (pid {lock.read().strip() or '?'}) is writing "
                f"{out} now; wait for it, or stop it"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        if not resumed:
            tmp = work / "plan.json.partial"
            tmp.write_text(json.dumps(plan, indent=1), encoding="utf-8")
            os.replace(tmp, work / "plan.json")
        yield work


def finish(out: Path) -> None:
    """After the manifest: the work folder goes (the lock's file with it)."""
    shutil.rmtree(out / WORK, ignore_errors=True)

"""The output folder of `moeflow data prepare`: what it holds before a run (nothing, a finished
prepare, an unfinished one, or someone else's files), the work folder a run keeps inside it, and
the lock that keeps two runs from writing it at once.

The work folder, `OUT/.prepare/`, exists until the manifest is written:

    plan.json        what this prepare reads and makes: the input files (path, bytes, mtime),
                     the units, the options and the tokenizer; a rerun resumes only the same plan
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
LOCK = ".prepare.lock"  # beside the work folder: held before anything in `out` is looked at
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


def claim(out: Path, plan: dict, overwrite: bool) -> str:
    """What `out` (locked, see `holding`) holds for `plan`, refusing (before writing anything) a
    folder it must not touch: `"resume"` (an unfinished prepare of the same plan), `"replace"`
    (a finished folder, replaced by `--overwrite` only once the new input has been read whole:
    `replace_old`), or `"fresh"`."""
    if (out / MANIFEST).is_file():
        if not overwrite:
            raise ValueError(
                f"--out {out} already holds a finished prepared folder ({MANIFEST}): pass "
                "--overwrite to replace it, or choose another --out"
            )
        shutil.rmtree(out / WORK, ignore_errors=True)  # an earlier replacement that failed
        return "replace"
    plan_file = out / WORK / "plan.json"
    if plan_file.is_file():
        try:
            before = json.loads(plan_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            before = {}
        difference = plan_difference(before, plan)
        if difference is None:
            return "resume"
        if not overwrite:
            raise ValueError(
                f"--out {out} holds an unfinished prepare of something else ({difference}): run "
                "the same command to resume it, or pass --overwrite to start over"
            )
        _remove_ours(out)
        return "fresh"
    work = out / WORK
    if work.is_dir() and {p.name for p in work.iterdir()} <= {"parts", "hashes"}:
        shutil.rmtree(work)  # a start killed before it wrote its plan: nothing to resume
    others = sorted(p.name for p in out.iterdir() if p.name != LOCK)
    if others:
        raise ValueError(
            f"--out {out} is a folder that is not a prepared folder and not empty (it holds "
            f"{others[:5]}{' ...' if len(others) > 5 else ''}); choose a new or empty folder"
        )
    return "fresh"


def replace_old(out: Path) -> None:
    """`--overwrite` of a finished folder, once the new input has been read: its manifest first
    (the folder is unfinished from then on), then its shards and counts."""
    (out / MANIFEST).unlink(missing_ok=True)
    for pattern in OURS:
        for path in out.glob(pattern):
            path.unlink()


def _remove_ours(out: Path) -> None:
    """Delete what a prepare wrote into `out`, and nothing else."""
    replace_old(out)
    shutil.rmtree(out / WORK, ignore_errors=True)


def after_failure(out: Path, state: str) -> None:
    """Bad input found while reading: `out` as it was before this run (a finished folder being
    replaced keeps its files; a fresh start leaves nothing)."""
    if state == "fresh":
        _remove_ours(out)
    elif state == "replace":
        shutil.rmtree(out / WORK, ignore_errors=True)


@contextlib.contextmanager
def holding(out: Path) -> Iterator[None]:
    """`out` (made if missing) locked against another prepare for the whole run: the lock is
    taken before `claim` looks at the folder. On the way out the lock file goes, and `out` too
    when this run made it and left it empty."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder (new or empty) for the shards")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with open(out / LOCK, "a+") as lock:
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
            try:
                yield
            finally:
                (out / LOCK).unlink(missing_ok=True)  # still held: no one else is in here
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


@contextlib.contextmanager
def work_folder(out: Path, plan: dict, state: str) -> Iterator[Path]:
    """The work folder, with the plan written on a fresh start (a resume keeps its own)."""
    work = out / WORK
    for sub in ("parts", "hashes"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    if state != "resume":
        tmp = work / "plan.json.partial"
        tmp.write_text(json.dumps(plan, indent=1), encoding="utf-8")
        os.replace(tmp, work / "plan.json")
    yield work


def finish(out: Path) -> None:
    """After the manifest: the work folder goes (the lock's file with it)."""
    shutil.rmtree(out / WORK, ignore_errors=True)

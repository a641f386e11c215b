"""The workers of `moeflow data prepare`: each tokenizes one unit of the input into a part file
of the work folder, or hashes a group of input files; `run_tasks` runs them on a process pool.

A part (`.prepare/parts/NNNNNN`) is the unit's documents in input order: `.bin` their tokens
back to back, each ending with the end-of-document id; `.npz` per document its token count
(`lengths`, eod included), its split (`val`) and its UTF-8 text bytes (`text_bytes`), and the
part's id counts per split (sparse: `train_ids`/`train_counts`, `val_ids`/`val_counts`). Both are
written under temporary names and renamed when complete, the `.npz` last: a part exists once its
`.npz` does, and a rerun skips it.

A document goes to validation iff `blake2b(text, digest_size=8, key=seed)`, read as a
little-endian integer, is below `val_percent / 100 * 2**64`: a pure function of its text, so
adding documents moves no other one, and copies of a document share a split.

Example:
    >>> is_val([b"a", b"b", b"a"], seed=0, val_percent=50.0).tolist()
    [True, False, True]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeflow.data.documents import Unit, read_unit
from moeflow.data.tokenizer import Tokenizer, load_tokenizer

SPLIT_RULE = (
    "a document is in val iff blake2b(its UTF-8 text, digest_size=8, key=seed as 8 little-endian "
    "bytes), read as a little-endian integer, is below val_percent / 100 * 2**64"
)
_STATE: dict = {}  # the worker's tokenizer, loaded once per process


def is_val(texts: list[bytes], seed: int, val_percent: float) -> np.ndarray:
    """bool [len(texts)]: which documents go to validation (`SPLIT_RULE`)."""
    key, threshold = seed.to_bytes(8, "little"), int(val_percent / 100 * 2**64)
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(t, digest_size=8, key=key).digest(), "little") < threshold
         for t in texts),
        dtype=bool, count=len(texts),
    )  # fmt: skip


def _worker_init(tokenizer: str | None, eod_token: str | None, token_hash: str, main: int) -> None:
    """Load the tokenizer once; one thread per worker; exit when the main process is gone (a
    killed `prepare` leaves no workers writing parts behind it)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    tok = load_tokenizer(tokenizer, eod_token)
    if tok.info.hash != token_hash:
        raise ValueError(f"tokenizer {tokenizer} changed while moeflow data prepare ran")
    _STATE["tokenizer"] = tok
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent or not _alive(main):
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _one_thread(tok: Tokenizer) -> Iterator[None]:
    """Run tasks in this process, its tokenizer on one thread (like a worker), then restore."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _STATE["tokenizer"] = tok
    try:
        yield
    finally:
        _STATE.pop("tokenizer", None)
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def run_tasks(
    calls: list[tuple[Callable, tuple]],
    workers: int,
    tok: Tokenizer,
    tokenizer_args: tuple[str | None, str | None],
    on_done: Callable[[object], None],
) -> None:
    """Run each `fn(*args)` of `calls` (in this process when `workers` is 1, else on a pool of
    `workers` processes that load the tokenizer from `tokenizer_args` once) and hand each result
    to `on_done` as it arrives. The first error stops the rest and is raised."""
    if workers == 1 or len(calls) <= 1:
        with _one_thread(tok):
            for fn, args in calls:
                on_done(fn(*args))
        return
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver":  # workers fork from one process that imported this module
        context.set_forkserver_preload([__name__])
    init = (*tokenizer_args, tok.info.hash, os.getpid())
    pool = ProcessPoolExecutor(min(workers, len(calls)), context, _worker_init, init)
    try:
        futures = [pool.submit(fn, *args) for fn, args in calls]
        for future in as_completed(futures):
            on_done(future.result())
    except BrokenProcessPool:
        raise RuntimeError(
            "a worker of moeflow data prepare died (killed, or out of memory: try fewer --workers "
            "or a smaller --unit-bytes); run the same command again: it resumes"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def part_path(work: Path, index: int) -> Path:
    return Path(work) / "parts" / f"{index:06d}"


def tokenize_unit(work: str, index: int, unit: dict, options: dict) -> dict:
    """Tokenize `unit` into part `index` of `work` (see the module's docstring); its summary."""
    tok: Tokenizer = _STATE["tokenizer"]
    dtype, vocab, eod = np.dtype(options["dtype"]), tok.info.vocab_size, tok.info.eod_id
    part = part_path(Path(work), index)
    tmp = f"{part}.bin.{os.getpid()}.partial"
    lengths, val, text_bytes = [], [], []
    counts = np.zeros((2, vocab), dtype=np.int64)
    empty = 0
    with open(tmp, "wb") as stream:
        for texts in read_unit(Unit.from_dict(unit)):
            data = [t.encode("utf-8") for t in texts]
            keep = [i for i, d in enumerate(data) if d]  # an empty text is no document
            empty += len(data) - len(keep)
            if not keep:
                continue
            texts, data = [texts[i] for i in keep], [data[i] for i in keep]
            ids, n = tok.encode_packed(texts, dtype)
            ends = np.cumsum(n + 1)
            tokens = np.empty(int(ends[-1]), dtype=dtype)
            is_eod = np.zeros(len(tokens), dtype=bool)
            is_eod[ends - 1] = True
            tokens[is_eod], tokens[~is_eod] = eod, ids
            split = is_val(data, options["seed"], options["val_percent"])
            in_val = np.repeat(split, n + 1)
            counts[0] += np.bincount(tokens[~in_val], minlength=vocab)[:vocab]
            counts[1] += np.bincount(tokens[in_val], minlength=vocab)[:vocab]
            stream.write(tokens.tobytes())
            lengths.append(n + 1)
            val.append(split)
            text_bytes.append(np.fromiter(map(len, data), dtype=np.int64, count=len(data)))
        stream.flush()
        os.fsync(stream.fileno())
    lengths_ = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    meta = {"lengths": lengths_, "val": np.concatenate(val) if val else np.zeros(0, bool),
            "text_bytes": np.concatenate(text_bytes) if text_bytes else np.zeros(0, np.int64),
            "empty": np.int64(empty)}  # fmt: skip
    for s, name in enumerate(("train", "val")):
        ids = np.flatnonzero(counts[s])
        meta[f"{name}_ids"], meta[f"{name}_counts"] = ids.astype(np.int32), counts[s][ids]
    _write_meta(part, tmp, meta)
    return {"bytes": unit["bytes"], "documents": len(lengths_), "tokens": int(lengths_.sum())}


def _write_meta(part: Path, tmp_bin: str, meta: dict) -> None:
    tmp = f"{part}.npz.{os.getpid()}.partial"
    with open(tmp, "wb") as stream:
        np.savez(stream, **meta)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp_bin, f"{part}.bin")
    os.replace(tmp, f"{part}.npz")


@dataclass(frozen=True)
class Part:
    """A finished part: its tokens (memory-mapped) and per-document metadata."""

    tokens: np.ndarray
    lengths: np.ndarray
    val: np.ndarray
    text_bytes: np.ndarray
    counts: dict  # split -> (ids int32, counts int64)
    empty: int


def read_part(work: Path, index: int, dtype) -> Part | None:
    """Part `index` when it is complete (its `.npz` written and its `.bin` of the right size)."""
    part = part_path(work, index)
    meta_file, bin_file = Path(f"{part}.npz"), Path(f"{part}.bin")
    if not meta_file.is_file() or not bin_file.is_file():
        return None
    with np.load(meta_file) as meta:
        data = {k: meta[k] for k in meta.files}
    dtype = np.dtype(dtype)
    if bin_file.stat().st_size != int(data["lengths"].sum()) * dtype.itemsize:
        return None
    tokens = np.memmap(bin_file, dtype, mode="r") if len(data["lengths"]) else np.zeros(0, dtype)
    counts = {s: (data[f"{s}_ids"], data[f"{s}_counts"]) for s in ("train", "val")}
    return Part(tokens, data["lengths"], data["val"], data["text_bytes"], counts,
                int(data["empty"]))  # fmt: skip


def hash_files(work: str, index: int, paths: list[str]) -> dict:
    """blake2b (b2sum's 512 bits) of each file, recorded as `.prepare/hashes/NNNNNN.json`."""
    digests = {}
    for path in paths:
        digest = hashlib.blake2b()
        with open(path, "rb") as stream:
            while chunk := stream.read(1 << 22):
                digest.update(chunk)
        digests[path] = digest.hexdigest()
    out = Path(work) / "hashes" / f"{index:06d}.json"
    tmp = f"{out}.{os.getpid()}.partial"
    Path(tmp).write_text(json.dumps(digests), encoding="utf-8")
    os.replace(tmp, out)
    return {"hashed": len(paths)}

"""`moeflow data prepare`: text, JSON lines, Parquet or a `datasets` folder, through a tokenizer,
into a prepared folder of Megatron indexed shards with a manifest (`moeflow.data.manifest`).

Steps (each resumable: a rerun of an interrupted prepare redoes nothing finished and gives the
same bytes as an uninterrupted run):

1. plan: the inputs become units of about `unit_bytes` (`moeflow.data.documents`); the plan (input
   files with sizes and mtimes, units, options, tokenizer) goes to `OUT/.prepare/plan.json`. Bad
   input is refused here, before anything is written.
2. tokenize: a pool of `workers` processes (one thread each, the tokenizer loaded once per
   process) turns each unit into a part (`moeflow.data.prepare_parts`): each document's ids and
   the end-of-document id, its split (a hash of its text and the seed), its text bytes, id
   counts; the same pool hashes the input files (blake2b).
3. merge: the parts, in input order, become `train-NNNNN` / `val-NNNNN` shards of about
   `shard_tokens` tokens cut at document ends (`moeflow.data.prepare_merge`), and
   `train.counts.npy` / `val.counts.npy`.
4. `manifest.json` is written last; then the work folder goes.

Memory is bounded by the workers' units, never by the corpus. A Megatron `.bin`/`.idx` pair given
as input is described in place instead (`moeflow.data.prepare_megatron`).

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "docs.jsonl").write_text('{"text": "hello"}\\n{"text": "world"}\\n')
    >>> m = prepare([str(folder / "docs.jsonl")], folder / "out", workers=1, val_percent=0,
    ...             progress=False)
    >>> m.tokenizer.kind, m.train.documents, m.train.tokens, m.train.text_bytes, m.dtype
    ('bytes', 2, 12, 10, 'uint16')
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from moeflow.data.documents import Inputs, plan_inputs
from moeflow.data.indexed import token_dtype
from moeflow.data.manifest import SPLITS, Manifest, TokenizerInfo
from moeflow.data.prepare_folder import (
    PLAN_VERSION,
    after_failure,
    claim,
    finish,
    holding,
    replace_old,
    work_folder,
)
from moeflow.data.prepare_merge import merge, save_counts
from moeflow.data.prepare_parts import SPLIT_RULE, hash_files, read_part, run_tasks, tokenize_unit
from moeflow.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

DEFAULT_UNIT_BYTES = 16 * 2**20
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_SAMPLE_TOKENS = 1 << 23
DTYPES = ("auto", "uint16", "int32")
COUNTS = {s: f"{s}.counts.npy" for s in SPLITS}


def default_workers() -> int:
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def prepare(
    inputs: list[str],
    out: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    *,
    field: str = "text",
    glob: str = "*",
    split: str | None = None,
    eod_token: str | None = None,
    workers: int | None = None,
    val_percent: float = 1.0,
    seed: int = 0,
    dtype: str = "auto",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    unit_bytes: int = DEFAULT_UNIT_BYTES,
    overwrite: bool = False,
    progress: bool = True,
    sample_tokens: int = DEFAULT_SAMPLE_TOKENS,
) -> Manifest:
    """Prepare `inputs` into the folder `out` (see the module's docstring) and return its
    manifest; `tokenizer` None means byte tokens. `sample_tokens` bounds the decoding that
    measures a Megatron pair's text bytes."""
    workers = default_workers() if workers is None else workers
    _check_options(inputs, field, workers, val_percent, seed, dtype, shard_tokens, unit_bytes)
    out = Path(out)
    tok = load_tokenizer(tokenizer, eod_token)
    ids = resolve_dtype(dtype, tok.info)
    found = plan_inputs(list(inputs), unit_bytes=unit_bytes, field=field, glob=glob, split=split,
                        exclude=out)  # fmt: skip
    options = {"field": field, "glob": glob, "split": split, "val_percent": float(val_percent),
               "seed": seed, "dtype": ids.name, "shard_tokens": shard_tokens,
               "unit_bytes": unit_bytes}  # fmt: skip
    if found.megatron:
        options = {"val_percent": float(val_percent), "sample_tokens": sample_tokens}
    plan = _plan(found, options, tok, tokenizer is not None, inputs)
    tokenizer_args = (None if tokenizer is None else str(tokenizer), eod_token)
    with holding(out):
        state = claim(out, plan, overwrite)
        replace = (lambda: replace_old(out)) if state == "replace" else (lambda: None)
        with work_folder(out, plan, state) as work:
            try:
                if found.megatron:
                    manifest = _describe(work, out, found, tok, options, workers, progress,
                                         replace)  # fmt: skip
                else:
                    manifest = _tokenize_and_merge(work, out, found, options, tok, tokenizer_args,
                                                   workers, progress, replace)  # fmt: skip
            except ValueError:  # bad input found while reading: `out` as it was
                after_failure(out, state)
                raise
            manifest.write(out)  # last: the folder is complete
            finish(out)
    return manifest


def _plan(found: Inputs, options: dict, tok: Tokenizer, given: bool, inputs) -> dict:
    """What `.prepare/plan.json` holds, as it holds it (lists, not tuples); refuses a plan
    with nothing to read."""
    if found.megatron and not given:
        raise ValueError(
            f"input {found.megatron[0]} is a Megatron .bin/.idx pair: describing it needs the "
            "tokenizer that made its ids (--tokenizer PATH), for its vocabulary and special ids"
        )
    if not found.megatron and not any(u.bytes for u in found.units):
        raise ValueError(
            f"no documents in {list(inputs)}: no file matched (--glob {options['glob']!r}) or "
            "every one is empty"
        )
    plan = {"version": PLAN_VERSION, "kind": "megatron" if found.megatron else "tokenize",
            "tokenizer": asdict(tok.info), "options": options,
            "inputs": [list(f) for f in found.files],
            "units": [u.to_dict() for u in found.units]}  # fmt: skip
    return json.loads(json.dumps(plan))


def _tokenize_and_merge(work: Path, out: Path, found: Inputs, options: dict, tok: Tokenizer,
                        tokenizer_args, workers: int, progress: bool,
                        replace: Callable[[], None]) -> Manifest:  # fmt: skip
    """Steps 2 and 3, and the manifest they make; `replace()` runs between them (the input read
    whole and good: a finished folder being replaced goes)."""
    _tokenize(work, found, options, tok, tokenizer_args, workers, progress)
    replace()
    ids = np.dtype(options["dtype"])
    with _bar(progress, "merge", "tok", _tokens(work, found)) as bar:
        splits, empty = merge(work, out, len(found.units), ids, tok.info.vocab_size,
                              options["shard_tokens"], bar)  # fmt: skip
    _check_documents(splits, empty, options["val_percent"])
    rule = {"rule": SPLIT_RULE, "seed": options["seed"], "val_percent": options["val_percent"],
            "empty_documents_skipped": empty}  # fmt: skip
    return _manifest(tok.info, ids.name, rule, splits, work, found)


def _check_options(inputs, field, workers, val_percent, seed, dtype, shard_tokens, unit_bytes):
    if isinstance(inputs, str) or not inputs:
        raise ValueError(f"inputs ({inputs!r}) must be a non-empty list of paths")
    if not isinstance(field, str) or not field:
        raise ValueError(f"--field ({field!r}) must name the field that holds each text")
    for flag, value in (("--workers", workers), ("--shard-tokens", shard_tokens),
                        ("--unit-bytes", unit_bytes)):  # fmt: skip
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{flag} ({value!r}) must be an integer >= 1")
    if not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"--seed ({seed!r}) must be an integer from 0 to 2**64 - 1")
    if not 0 <= val_percent < 100:  # also refuses NaN
        raise ValueError(
            f"--val-percent ({val_percent!r}) must be >= 0 and < 100 (the share of documents, "
            "in percent, that go to validation)"
        )
    if dtype not in DTYPES:
        raise ValueError(
            f"--dtype ({dtype!r}) must be one of {list(DTYPES)}: Megatron's indexed format has "
            "uint16 and int32 for token ids (no uint32; int32 holds any vocabulary)"
        )


def resolve_dtype(dtype: str, info: TokenizerInfo) -> np.dtype:
    """The shards' token dtype: `auto` is uint16 for vocabularies up to 65,536, else int32.

    Example:
        >>> info = TokenizerInfo(name="t", hash="h", kind="tokenizers", vocab_size=100_000,
        ...                      eod_id=0)
        >>> resolve_dtype("auto", info), resolve_dtype("int32", info)
        (dtype('int32'), dtype('int32'))
        >>> resolve_dtype("uint16", info)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: --dtype uint16 holds ids below 65,536, but tokenizer t has 100,000 ids: ...
    """
    if dtype == "auto":
        return token_dtype(info.vocab_size)
    if dtype == "uint16" and info.vocab_size > 65536:
        raise ValueError(
            f"--dtype uint16 holds ids below 65,536, but tokenizer {info.name} has "
            f"{info.vocab_size:,} ids: use --dtype int32 or auto (Megatron's format has no uint32)"
        )
    return np.dtype(dtype)


def _bar(progress: bool, what: str, unit: str, total: int, initial: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=what, unit=unit, unit_scale=True,
                unit_divisor=1000, disable=not progress, file=sys.stderr, mininterval=0.5,
                dynamic_ncols=True)  # fmt: skip


def _tokenize(work: Path, found: Inputs, options: dict, tok: Tokenizer, tokenizer_args,
              workers: int, progress: bool) -> None:  # fmt: skip
    """Step 2: every unit not yet a part, and every file group not yet hashed, on the pool."""
    position = {path: i for i, (path, _, _) in reversed(list(enumerate(found.files)))}
    calls, done_bytes = [], 0
    for i, unit in enumerate(found.units):
        if read_part(work, i, options["dtype"]) is not None:  # done before an interruption
            done_bytes += unit.bytes
            continue
        first = unit.files[0] if unit.files else unit.path
        where = position[first] if first in position else _first_under(position, first)
        calls.append((where, 0, (tokenize_unit, (str(work), i, unit.to_dict(), options))))
    for g, group in enumerate(_hash_groups(found.files, options["unit_bytes"])):
        if not (work / "hashes" / f"{g:06d}.json").is_file():
            calls.append((position[group[0]], 1, (hash_files, (str(work), g, group))))
    calls.sort(key=lambda c: c[:2])  # a file is hashed right after its units, while cached
    total = sum(u.bytes for u in found.units)
    with _bar(progress, "tokenize", "B", total, done_bytes) as bar:
        seen = {"documents": 0, "tokens": 0}

        def on_done(result: dict) -> None:
            if "bytes" in result:
                seen["documents"] += result["documents"]
                seen["tokens"] += result["tokens"]
                bar.update(result["bytes"])
                bar.set_postfix(documents=f"{seen['documents']:,}", tokens=f"{seen['tokens']:,}")

        run_tasks([c[2] for c in calls], workers, tok, tokenizer_args, on_done)


def _first_under(position: dict, folder: str) -> int:
    under = [i for path, i in position.items() if path.startswith(folder + os.sep)]
    return min(under, default=0)


def _hash_groups(files, unit_bytes: int) -> list[list[str]]:
    groups, size = [], unit_bytes
    for path, nbytes, _ in files:
        if size >= unit_bytes:
            groups.append([])
            size = 0
        groups[-1].append(path)
        size += nbytes
    return groups


def _tokens(work: Path, found: Inputs) -> int:
    total = 0
    for i in range(len(found.units)):
        with np.load(work / "parts" / f"{i:06d}.npz") as meta:
            total += int(meta["lengths"].sum())
    return total


def _check_documents(splits: dict, empty: int, val_percent: float) -> None:
    documents = splits["train"].documents + splits["val"].documents
    if documents == 0:
        raise ValueError(
            f"the inputs hold no documents: all {empty:,} texts are empty; check --field and "
            "the inputs"
        )
    if splits["train"].documents == 0:
        raise ValueError(
            f"no training documents: all {documents:,} went to validation (--val-percent "
            f"{val_percent}); lower --val-percent or give more documents"
        )


def _hashes(work: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for file in sorted((work / "hashes").glob("*.json")):
        found.update(json.loads(file.read_text(encoding="utf-8")))
    return found


def _manifest(info, dtype: str, rule: dict, splits: dict, work: Path, found: Inputs) -> Manifest:
    from moeflow import __version__

    hashes = _hashes(work)
    inputs = tuple({"path": p, "bytes": n, "blake2b": hashes[p]} for p, n, _ in found.files)
    return Manifest(tokenizer=info, dtype=dtype, split_rule=rule, train=splits["train"],
                    val=splits["val"], inputs=inputs, counts=dict(COUNTS),
                    created_by=f"moeflow {__version__} data prepare")  # fmt: skip


def _describe(work: Path, out: Path, found: Inputs, tok: Tokenizer, options: dict,
              workers: int, progress: bool, replace: Callable[[], None]) -> Manifest:  # fmt: skip
    """A Megatron pair (or several) in place: counts and hashes on the pool, then the manifest."""
    from moeflow.data import prepare_megatron as mg

    prefixes, val_percent = list(found.megatron), options["val_percent"]
    dtype, shards, ranges = mg.plan_pairs(prefixes, val_percent)
    calls = [(mg.count_tokens, (p, lo, hi, tok.info.vocab_size, i))
             for i, (p, lo, hi, _) in enumerate(ranges)]  # fmt: skip
    calls += [(hash_files, (str(work), g, [f[0]])) for g, f in enumerate(found.files)]
    counts = {s: np.zeros(tok.info.vocab_size, dtype=np.int64) for s in SPLITS}
    with _bar(progress, "count", "tok", sum(hi - lo for _, lo, hi, _ in ranges)) as bar:

        def on_done(result) -> None:
            if isinstance(result, tuple):
                _, lo, hi, split = ranges[result[0]]
                counts[split] += result[1]
                bar.update(hi - lo)

        run_tasks(calls, workers, ByteTokenizer(), (None, None), on_done)
    splits, how = mg.splits_of(shards, counts, tok, options["sample_tokens"])
    replace()
    for name in SPLITS:
        save_counts(out / COUNTS[name], counts[name])
    rule = {"rule": mg.RULE, "val_percent": val_percent,
            "text_bytes": {s: how[s] for s in SPLITS if how[s]}}  # fmt: skip
    return _manifest(tok.info, dtype, rule, splits, work, found)

"""Byte and nanoGPT token corpora: the embedded default (the running interpreter's standard
library source, present offline on every machine), a text file or folder (byte tokens), and
nanoGPT-style `train.bin` / `val.bin` token files (memory-mapped).

Byte sources split train/validation by file, by a hash of the file's relative path, so adding a
file never moves another one across the split.

Example:
    >>> from moeflow.data.config import DataConfig
    >>> source = byte_source(DataConfig(max_bytes=100_000))
    >>> source.bytes_per_token, len(source.train) <= 100_000
    (1.0, True)
"""

from __future__ import annotations

import functools
import sysconfig
import zlib
from pathlib import Path

import numpy as np

from moeflow.data.config import STDLIB_BYTES, DataConfig
from moeflow.data.source import Source

# Not prose-like source: the test suite, codec tables, bundled third-party and generated data.
STDLIB_SKIP = frozenset(
    {"test", "tests", "idlelib", "encodings", "lib2to3", "site-packages", "dist-packages",
     "pydoc_data", "turtledemo", "__pycache__", "__phello__"}
)  # fmt: skip


def _is_val(relative: str, val_percent: int) -> bool:
    return zlib.crc32(relative.encode()) % 100 < val_percent


def _read_split(files: list[Path], root: Path, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Files in a fixed pseudo-random order (by the hash of their path), so a `max_bytes` cap
    samples the whole tree instead of its alphabetical start."""
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    files = sorted(files, key=lambda p: (zlib.crc32(p.relative_to(root).as_posix().encode()), p))
    cap = _cap(cfg)
    budget = {False: cap, True: cap // 9 if cap else None}
    for path in files:
        is_val = _is_val(path.relative_to(root).as_posix(), cfg.val_percent)
        left = budget[is_val]
        if left is not None and left <= 0:
            continue
        data = path.read_bytes()
        if left is not None:
            data = data[:left]
            budget[is_val] = left - len(data)
        parts[is_val].append(data)
    train = np.frombuffer(b"".join(parts[False]), dtype=np.uint8)
    val = np.frombuffer(b"".join(parts[True]), dtype=np.uint8)
    return train, val


def _cap(cfg: DataConfig) -> int | None:
    """The training bytes to read: `max_bytes` where set (0: all), else all of a text corpus
    and `STDLIB_BYTES` of the embedded one."""
    if cfg.max_bytes is None:
        return STDLIB_BYTES if cfg.kind == "stdlib" else None
    return cfg.max_bytes or None


def _byte_source(files: list[Path], root: Path, cfg: DataConfig, what: str) -> Source:
    if not files:
        raise ValueError(f"data: no files found for {what}; check data.path and data.glob")
    if len(files) == 1:
        data, cap = files[0].read_bytes(), _cap(cfg)
        if cap:
            data = data[: cap + cap // 9]
        cut = len(data) * (100 - cfg.val_percent) // 100
        train = np.frombuffer(data[:cut], dtype=np.uint8)
        val = np.frombuffer(data[cut:], dtype=np.uint8)
    else:
        train, val = _read_split(files, root, cfg)
    return Source(
        what, train, val, f"{what} ({len(files)} files, byte tokens)", 1.0, vocab_size=256
    )


@functools.cache
def stdlib_files(root: Path) -> tuple[Path, ...]:
    """The standard library's own sources: walked once per process (13,000 files: most of a small
    run's start-up when walked for every run of a process that trains several)."""
    return tuple(
        p for p in root.rglob("*.py") if not STDLIB_SKIP.intersection(p.relative_to(root).parts)
    )


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def byte_source(cfg: DataConfig) -> Source:
    """Read (or memory-map) the tokens of a `stdlib`, `text` or `tokens` corpus."""
    if cfg.kind == "stdlib":
        root = stdlib_root()
        files = list(stdlib_files(root))
        return _byte_source(files, root, cfg, f"Python {sysconfig.get_python_version()} stdlib")
    path = Path(cfg.path)
    if not path.exists():
        raise ValueError(f"data.path ({cfg.path!r}) does not exist")
    if cfg.kind == "text":
        if path.is_file():
            _refuse_fields([path], cfg)
            return _byte_source([path], path.parent, cfg, str(path))
        files = sorted(p for p in path.rglob(cfg.glob) if p.is_file())
        _refuse_fields(files, cfg)
        return _byte_source(files, path, cfg, f"{path}/**/{cfg.glob}")
    arrays = []
    for split in ("train", "val"):
        file = path / f"{split}.bin"
        kind = cfg.token_dtype
        width = np.dtype(kind).itemsize
        if not file.is_file():
            raise ValueError(
                f"data.path ({cfg.path!r}) must hold train.bin and val.bin ({kind} token ids, "
                f"nanoGPT layout) for data.kind = 'tokens'; {file} is missing"
            )
        if file.stat().st_size == 0:
            raise ValueError(f"data.path: {file} is empty (0 bytes); it must hold {kind} tokens")
        if file.stat().st_size % width:
            raise ValueError(
                f"{file} has {file.stat().st_size} bytes, not a multiple of {width}: it is not a "
                f"{kind} token file (data.token_dtype)"
            )
        arrays.append(np.memmap(file, dtype=kind, mode="r"))
    what = f"{path} ({kind} tokens, memory-mapped)"
    return Source(path.name, *arrays, what, None, split_names=("train.bin", "val.bin"))


FIELD_FORMATS = (".jsonl", ".json", ".ndjson", ".parquet", ".arrow")


def _refuse_fields(files: list[Path], cfg: DataConfig) -> None:
    """JSONL, Parquet and Arrow hold their text in a field: read as bytes they would train on
    the JSON or the file format itself."""
    found = [p for p in files if p.suffix.lower() in FIELD_FORMATS]
    if found:
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        raise ValueError(
            f"data.path ({cfg.path!r}) holds {found[0].name}{more}: "
            f"data.kind = 'text' would train on its {found[0].suffix[1:].upper()} as bytes; "
            f"tokenize it with `moeflow data prepare {cfg.path} --out DIR` and set "
            "data.kind = 'prepared', data.path = DIR (or narrow data.glob)"
        )

"""The inputs of `moeflow data prepare`, as an ordered list of work units that each yield their
documents' texts in input order, reading at most about `unit_bytes` of input at a time.

An input is one of:

- a text file: one document (UTF-8); `.jsonl` / `.json` / `.ndjson`: JSON lines, one document per
  line, its text in `field`, read with `pyarrow.json` in byte ranges cut at line ends;
  `.parquet`: one document per row, read with `pyarrow.parquet` by row groups;
- a folder: its files matching `glob` (recursively, in sorted order of their relative paths,
  hidden ones skipped), each read as above;
- a `datasets` folder (`save_to_disk`: `state.json`, or `dataset_dict.json` with `split`), read
  with `datasets.load_from_disk` in row ranges;
- a Megatron prefix (`PREFIX.bin` + `PREFIX.idx`): not tokenized but described in place
  (`moeflow.data.prepare_megatron`);
- the word `stdlib`: the embedded corpus, the running interpreter's standard library sources,
  one document per file (write `./stdlib` for a folder of that name).

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "a.jsonl").write_text('{"text": "one"}\\n{"text": "two"}\\n')
    >>> _ = (folder / "b.txt").write_text("three")
    >>> plan = plan_inputs([str(folder)], unit_bytes=1 << 20)
    >>> [u.kind for u in plan.units], [t for u in plan.units for b in read_unit(u) for t in b]
    (['jsonl', 'text'], ['one', 'two', 'three'])
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from moeflow.data import jsonl

JSON_LINES = (".jsonl", ".json", ".ndjson")
PARQUET = (".parquet",)
BATCH_BYTES = 1 << 20  # texts handed to the tokenizer at a time
BATCH_ROWS = 1024
EXTRA = "pip install 'moeflow[data]'"


@dataclass(frozen=True)
class Unit:
    """A piece of the input read by one worker: `kind` `text` (`files`, one document each),
    `jsonl` (bytes `[start, stop)` of `path`), `parquet` (row groups `[start, stop)`) or
    `dataset` (rows `[start, stop)` of the `datasets` folder `path`)."""

    kind: str
    path: str = ""
    start: int = 0
    stop: int = 0
    bytes: int = 0  # input bytes it covers (the progress bar's measure)
    files: tuple[str, ...] = ()
    field: str = "text"
    split: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Unit:
        return cls(**{**data, "files": tuple(data["files"])})


@dataclass(frozen=True)
class Inputs:
    """The plan of the inputs: units in document order, every file they read (path, bytes,
    mtime_ns), and the Megatron prefixes to describe in place."""

    units: tuple[Unit, ...]
    files: tuple[tuple[str, int, int], ...]
    megatron: tuple[str, ...] = ()


def megatron_prefix(arg: str) -> Path | None:
    """The prefix when `arg` names a `.bin`/`.idx` pair (`PREFIX`, `PREFIX.bin` or `PREFIX.idx`)."""
    prefix = Path(arg[:-4] if arg.endswith((".bin", ".idx")) else arg)
    pair = (Path(f"{prefix}.bin"), Path(f"{prefix}.idx"))
    return prefix.resolve() if all(p.is_file() for p in pair) else None


def plan_inputs(
    inputs: list[str],
    *,
    unit_bytes: int,
    field: str = "text",
    glob: str = "*",
    split: str | None = None,
    exclude: Path | None = None,
) -> Inputs:
    """Units and files of `inputs`, checked (each exists; JSON lines, Parquet and `datasets`
    hold `field`) before anything is read in bulk; `exclude` (the output folder) is skipped."""
    units: list[Unit] = []
    files: list[Path] = []
    megatron: list[str] = []
    for arg in inputs:
        prefix = megatron_prefix(arg)
        if prefix is not None and not Path(arg).is_dir():
            megatron.append(str(prefix))
            continue
        for kind, found in _expand(arg, glob, exclude):
            path = found.absolute()
            if kind == "dataset":
                units += _dataset_units(path, field, split, unit_bytes)
                files += sorted(p for p in _dataset_folder(path, split).rglob("*") if p.is_file())
                continue
            files.append(path)
            if kind == "jsonl":
                units += _jsonl_units(path, field, unit_bytes)
            elif kind == "parquet":
                units += _parquet_units(path, field, unit_bytes)
            elif units and units[-1].kind == "text" and units[-1].bytes < unit_bytes:
                last = units.pop()
                size = last.bytes + path.stat().st_size
                units.append(Unit("text", bytes=size, files=(*last.files, str(path))))
            else:
                units.append(Unit("text", bytes=path.stat().st_size, files=(str(path),)))
    if megatron and (units or files):
        raise ValueError(
            f"input {megatron[0]} is a Megatron .bin/.idx pair, described in place: prepare it "
            "alone (other inputs go to another folder; a run blends the folders by weight)"
        )
    files += [Path(f"{prefix}{ext}") for prefix in megatron for ext in (".bin", ".idx")]
    # Absolute paths: a rerun from another directory resumes the same plan.
    stats = [(str(p.absolute()), (s := p.stat()).st_size, s.st_mtime_ns) for p in files]
    return Inputs(tuple(units), tuple(stats), tuple(megatron))


def _expand(arg: str, glob: str, exclude: Path | None) -> Iterator[tuple[str, Path]]:
    """(kind, path) of each file (or `datasets` folder) that input `arg` names, in order."""
    if arg == "stdlib":
        from moeflow.data.byte_corpus import stdlib_files, stdlib_root

        root = stdlib_root()
        for path in sorted(stdlib_files(root), key=lambda p: p.relative_to(root).as_posix()):
            yield "text", path
        return
    path = Path(arg)
    if not path.exists():
        raise ValueError(
            f"input {arg!r} does not exist (a file, a folder, a datasets folder, a Megatron "
            "PREFIX of PREFIX.bin/.idx, or `stdlib` for the embedded corpus)"
        )
    if path.is_dir() and _is_dataset(path):
        yield "dataset", path
        return
    if path.is_file():
        if path.suffix in (".bin", ".idx"):  # half of a Megatron pair (megatron_prefix: no pair)
            raise ValueError(
                f"input {arg!r} looks like half of a Megatron corpus: {path.with_suffix('')}.bin "
                "and .idx must both exist (give the PREFIX of the pair)"
            )
        yield _kind(path), path
        return
    skip = exclude.resolve() if exclude is not None else None
    found = []
    for file in path.rglob(glob):
        rel = file.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or not file.is_file():
            continue
        if skip is not None and skip in file.resolve().parents:
            continue
        found.append((rel.as_posix(), file))
    for _, file in sorted(found):
        yield _kind(file), file


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    return "jsonl" if suffix in JSON_LINES else "parquet" if suffix in PARQUET else "text"


def _is_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _dataset_folder(path: Path, split: str | None) -> Path:
    """The folder of the Dataset to read: `path`, or its split `split` for a DatasetDict."""
    if not (path / "dataset_dict.json").is_file():
        return path
    names = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
    if split not in names:
        raise ValueError(
            f"input {path} is a datasets DatasetDict with splits {names}: choose one with --split "
            f"(given: {split!r})"
        )
    return path / split


def _jsonl_units(path: Path, field: str, unit_bytes: int) -> list[Unit]:
    """Byte ranges of about `unit_bytes` cut at line ends, after checking the first line."""
    spans = jsonl.byte_ranges(path, field, unit_bytes)
    return [Unit("jsonl", str(path), a, b, b - a, field=field) for a, b in spans]


def _parquet_units(path: Path, field: str, unit_bytes: int) -> list[Unit]:
    """Runs of row groups of about `unit_bytes` (uncompressed), after checking the schema."""
    pq = _pyarrow_parquet()
    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as exc:  # pyarrow's ArrowInvalid names no file
        raise ValueError(f"{path} is not a Parquet file ({exc})") from None
    _check_column(path, meta.schema.to_arrow_schema(), field)
    units, first, size = [], 0, 0
    for group in range(meta.num_row_groups):
        size += meta.row_group(group).total_byte_size
        if size >= unit_bytes or group == meta.num_row_groups - 1:
            units.append(Unit("parquet", str(path), first, group + 1, size, field=field))
            first, size = group + 1, 0
    return units


def _check_column(where, schema, field: str) -> None:
    import pyarrow as pa

    if field not in schema.names:
        raise ValueError(
            f"{where} has no field {field!r} (its fields: {schema.names[:12]}); name the text's "
            "field with --field"
        )
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(
            f"{where}: field {field!r} holds {kind}, not text; name a text field with --field"
        )


def _dataset_units(path: Path, field: str, split: str | None, unit_bytes: int) -> list[Unit]:
    ds = _load_dataset(str(path), split)
    _check_column(path, ds.data.schema, field)
    folder = _dataset_folder(path, split)
    size = sum(p.stat().st_size for p in folder.glob("*.arrow"))
    n = ds.num_rows
    rows = max(1, unit_bytes * n // max(size, 1))
    spans = [(a, min(a + rows, n)) for a in range(0, n, rows)]
    return [Unit("dataset", str(path), a, b, size * (b - a) // n, field=field, split=split)
            for a, b in spans]  # fmt: skip


_DATASETS: dict[tuple[str, str | None], object] = {}


def _load_dataset(path: str, split: str | None):
    """`datasets.load_from_disk` once per process (memory-mapped Arrow files)."""
    if (path, split) not in _DATASETS:
        try:
            import datasets
        except ImportError:
            raise ValueError(
                f"input {path} is a datasets folder; reading it needs {EXTRA}"
            ) from None
        _dataset_folder(Path(path), split)  # the split exists
        ds = datasets.load_from_disk(path)
        _DATASETS[path, split] = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    return _DATASETS[path, split]


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"reading Parquet needs pyarrow: {EXTRA}") from None
    return pq


def read_unit(unit: Unit) -> Iterator[list[str]]:
    """The texts of `unit`'s documents, in order, in batches of about a megabyte."""
    if unit.kind == "text":
        yield from _text_batches(unit.files)
    elif unit.kind == "jsonl":
        yield from jsonl.read_texts(Path(unit.path), unit.start, unit.stop, unit.field, BATCH_ROWS)
    elif unit.kind == "parquet":
        pq = _pyarrow_parquet()
        file = pq.ParquetFile(unit.path)
        row = sum(file.metadata.row_group(g).num_rows for g in range(unit.start))
        groups = list(range(unit.start, unit.stop))
        for batch in file.iter_batches(BATCH_ROWS, groups, [unit.field], use_threads=False):
            yield _texts(batch.column(0), unit, row)
            row += batch.num_rows
    else:
        ds = _load_dataset(unit.path, unit.split).select_columns([unit.field])
        table = ds.with_format("arrow")
        for row in range(unit.start, unit.stop, BATCH_ROWS):
            part = table[row : min(row + BATCH_ROWS, unit.stop)]
            yield _texts(part.column(unit.field), unit, row)


def _text_batches(files: tuple[str, ...]) -> Iterator[list[str]]:
    batch, size = [], 0
    for name in files:
        data = Path(name).read_bytes()
        try:
            batch.append(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{name} is not UTF-8 text ({exc.reason} at byte {exc.start}): it is read as one "
                "text document; leave it out (--glob) or convert it to UTF-8"
            ) from None
        size += len(data)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _texts(column, unit: Unit, first_row: int) -> list[str]:
    """A text column as strings; a null names its row and the field to pick instead."""
    if column.null_count:
        row = first_row + column.is_null().to_pylist().index(True)
        raise ValueError(
            f"{unit.path} row {row} has no {unit.field!r} (null); drop the row or name the "
            "text's field with --field"
        )
    return column.to_pylist()

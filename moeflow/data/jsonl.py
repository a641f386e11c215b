"""JSON lines, the text of each document in a field: cut into byte ranges at line ends, read with
`pyarrow.json`, a bad line named by its line number in the file.

Example:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "docs.jsonl"
    >>> _ = path.write_text('{"text": "one", "id": 1}\\n{"text": "two"}\\n')
    >>> byte_ranges(path, "text", unit_bytes=8)
    [(0, 25), (25, 41)]
    >>> [t for a, b in byte_ranges(path, "text", 8) for batch in read_texts(path, a, b, "text", 10)
    ...  for t in batch]
    ['one', 'two']
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path


def byte_ranges(path: Path, field: str, unit_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges `[a, b)` of about `unit_bytes` cut at line ends, after checking the first
    line holds `field`."""
    size = path.stat().st_size
    cuts = [0]
    with open(path, "rb") as stream:
        first = next((line for line in stream if line.strip()), b"")
        if first:
            check_line(path, 1, first, field)
        while cuts[-1] + unit_bytes < size:
            stream.seek(cuts[-1] + unit_bytes - 1)
            stream.readline()  # to the end of the line holding the target byte
            cuts.append(stream.tell())
    cuts[-1] = min(cuts[-1], size)
    if cuts[-1] < size:
        cuts.append(size)
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]


def check_line(path: Path, line_no: int, line: bytes, field: str) -> None:
    """One line as JSON lines want it: an object with a string in `field`."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{path} line {line_no} is not JSON ({exc}): a {path.suffix} file is read as JSON "
            "lines, one object per line"
        ) from None
    if not isinstance(row, dict):
        raise ValueError(
            f"{path} line {line_no} is a JSON {type(row).__name__}, not an object: JSON lines "
            "hold one object per line, its text in a field (--field)"
        )
    if not isinstance(row.get(field), str):
        what = "has no" if field not in row else f"has a {type(row[field]).__name__} in"
        raise ValueError(
            f"{path} line {line_no} {what} field {field!r} (its fields: {sorted(row)[:12]}); "
            "name the text's field with --field"
        )


def read_texts(
    path: Path, start: int, stop: int, field: str, batch_rows: int
) -> Iterator[list[str]]:
    """The texts of bytes `[start, stop)` of `path` (whole lines), `batch_rows` at a time, parsed
    by `pyarrow.json` (only `field`); a bad line is named by its line number in the file."""
    import pyarrow as pa
    import pyarrow.json as pj

    with open(path, "rb") as stream:
        stream.seek(start)
        data = stream.read(stop - start)
    if not data.strip():
        return
    schema = pa.schema([(field, pa.large_string())])
    parse = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    read = pj.ReadOptions(use_threads=False, block_size=min(len(data) + 1, 2**31 - 1))
    try:
        column = pj.read_json(pa.BufferReader(data), read, parse).column(0)
    except pa.ArrowInvalid as exc:
        _find_bad_line(path, start, data, field)
        raise ValueError(f"{path}{_arrow_line(path, start, data, str(exc))}: {exc}") from None
    if column.null_count:
        _find_bad_line(path, start, data, field)
    texts = column.to_pylist()
    for i in range(0, len(texts), batch_rows):
        yield texts[i : i + batch_rows]


def _lines_before(path: Path, start: int, chunk: int = 1 << 24) -> int:
    """Lines of the file before byte `start`, counted a chunk at a time."""
    count, left = 0, start
    with open(path, "rb") as stream:
        while left:
            part = stream.read(min(chunk, left))
            count, left = count + part.count(b"\n"), left - len(part)
    return count


def _arrow_line(path: Path, start: int, data: bytes, message: str) -> str:
    """` line N` for pyarrow's "row R" (0-based among the range's non-blank lines), or ``."""
    found = re.search(r"\brow (\d+)", message)
    if found is None:
        return ""
    rows = int(found.group(1))
    for at, line in enumerate(data.splitlines()):
        if line.strip():
            if rows == 0:
                return f" line {_lines_before(path, start) + at + 1}"
            rows -= 1
    return ""


def _find_bad_line(path: Path, start: int, data: bytes, field: str) -> None:
    """Raise the error of the first line of `data` that is not an object with a text `field`."""
    line_no = _lines_before(path, start)
    for line in data.splitlines():
        line_no += 1
        if line.strip():
            check_line(path, line_no, line, field)

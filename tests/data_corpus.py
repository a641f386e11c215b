"""Shared fixtures of the data tests: the test tokenizer (a byte-level BPE of about 2,000 ids
trained offline by examples/train_tokenizer.py on the embedded corpus, once per process), a small
list of documents (a few hundred KB of the embedded corpus and a few hand-written ones with
non-ASCII text), and writers of the same documents as JSON lines, Parquet, a `datasets` folder
and a folder of text files.

    from tests.data_corpus import documents, tokenizer_folder, write_jsonl

    def test_x(tmp_path):
        prepare([str(write_jsonl(tmp_path / "d.jsonl", documents()))], tmp_path / "out",
                tokenizer_folder(), workers=1, progress=False)

(`bpe_tokenizer` is the same folder as a session fixture, for a module that imports it.)
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_tokenizer.py"
# Documents no source file has: several scripts, emoji, a tab, Windows line ends, no final newline.
HANDWRITTEN = (
    "Grüße aus Köln: ½ Maß für 3,50 € — «ça va?»\n",
    "東京の天気は晴れ。🙂 naïve café\tend",
    "line one\r\nline two\r\n\r\n   indented   \n",
    "x" * 3000,
)


def train_tokenizer_module():
    """examples/train_tokenizer.py, imported from its path (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("train_tokenizer", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def tokenizer_folder() -> Path:
    """The test tokenizer's folder (tokenizer.json + tokenizer_config.json), trained once per
    process into a temporary folder removed at exit (training takes well under a second)."""
    example = train_tokenizer_module()
    folder = Path(tempfile.mkdtemp(prefix="moeflow-test-tokenizer-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return example.train_bpe(example.stdlib_sample(), folder, vocab_size=2000)


@pytest.fixture(scope="session")
def bpe_tokenizer() -> Path:
    return tokenizer_folder()


@functools.cache
def documents(max_bytes: int = 300_000) -> tuple[str, ...]:
    """Non-empty documents: every 13th file of the embedded corpus (path order) up to
    `max_bytes`, with `HANDWRITTEN` spread among them."""
    from moeflow.data.byte_corpus import stdlib_files, stdlib_root

    root = stdlib_root()
    files = sorted(stdlib_files(root), key=lambda p: p.relative_to(root).as_posix())
    texts, size = [], 0
    for path in files[3::13]:
        text = path.read_text(encoding="utf-8")
        if text and len(text) < 40_000:
            texts.append(text)
            size += len(text)
        if size >= max_bytes:
            break
    for i, text in enumerate(HANDWRITTEN):
        texts.insert(1 + i * len(texts) // len(HANDWRITTEN), text)
    return tuple(texts)


def write_jsonl(path: Path, texts, field: str = "text") -> Path:
    """One object per line: an id, the text under `field`, and a field the reader ignores."""
    with open(path, "w", encoding="utf-8") as out:
        for i, text in enumerate(texts):
            out.write(json.dumps({"id": i, field: text, "meta": {"n": [i]}}) + "\n")
    return path


def write_parquet(path: Path, texts, field: str = "text", row_group_size: int = 16) -> Path:
    """A Parquet file of small row groups (so a reader's units cut it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(texts))), field: list(texts)})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_dataset(path: Path, texts, field: str = "text") -> Path:
    """A `datasets` folder (`Dataset.save_to_disk`)."""
    import datasets

    datasets.Dataset.from_dict({field: list(texts)}).save_to_disk(str(path))
    return path


def write_text_folder(path: Path, texts) -> Path:
    """One file per document, named so that their sorted order is the documents' order."""
    path.mkdir(parents=True)
    for i, text in enumerate(texts):
        (path / f"{i:05d}.txt").write_bytes(text.encode("utf-8"))
    return path

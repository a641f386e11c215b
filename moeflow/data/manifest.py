"""The manifest of a prepared folder (`manifest.json`): which tokenizer made the ids, how the
documents were split, what each split's shards hold, and what was read to make them.

A prepared folder:

    manifest.json           this file (written last: a folder without it is not finished)
    train-00000.bin/.idx    Megatron indexed shards of the training documents
    val-00000.bin/.idx      ... and of the validation documents
    train.counts.npy        int64 [vocab_size]: how often each id occurs (the unigram baseline)
    val.counts.npy

A shard names a `.bin`/`.idx` pair by its prefix (relative to the folder, or absolute for a
Megatron corpus described in place) and a range of that pair's documents.

Example:
    >>> tok = TokenizerInfo(name="bytes", hash="bytes", kind="bytes", vocab_size=257, eod_id=256)
    >>> split = Split(documents=2, tokens=10, text_bytes=8, shards=(Shard("train-00000", 2, 10),))
    >>> m = Manifest(tokenizer=tok, dtype="uint16", split_rule={"rule": "all"}, train=split,
    ...              val=split, inputs=())
    >>> Manifest.from_dict(m.to_dict()) == m, m.bytes_per_token("train")
    (True, 0.8)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT = "moeflow-prepared"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


@dataclass(frozen=True)
class TokenizerInfo:
    """What made the ids: `kind` is `bytes` (ids are UTF-8 bytes, `eod_id` 256), `tokenizers`
    (a `tokenizer.json`) or `transformers` (a tokenizer folder); `hash` is the sha256 of its
    files, so two folders from the same tokenizer agree whatever their names."""

    name: str
    hash: str
    kind: str
    vocab_size: int
    eod_id: int
    bos_id: int | None = None
    pad_id: int | None = None


@dataclass(frozen=True)
class Shard:
    """Documents `[first_document, first_document + documents)` of the pair at `prefix`."""

    prefix: str
    documents: int
    tokens: int
    first_document: int = 0


@dataclass(frozen=True)
class Split:
    documents: int
    tokens: int  # end-of-document ids included
    text_bytes: int  # UTF-8 bytes of the documents' text (0: not known)
    shards: tuple[Shard, ...] = ()


@dataclass(frozen=True)
class Manifest:
    tokenizer: TokenizerInfo
    dtype: str
    split_rule: dict
    train: Split
    val: Split
    inputs: tuple[dict, ...]  # {"path", "bytes", "blake2b"} of each input file
    counts: dict = field(default_factory=dict)  # split -> counts file name
    created_by: str = ""

    def split(self, name: str) -> Split:
        return self.train if name == "train" else self.val

    def bytes_per_token(self, name: str) -> float | None:
        """Bytes of text each token of split `name` stands for (None when unknown): bits per byte
        = nats per token / ln 2 / this."""
        s = self.split(name)
        return s.text_bytes / s.tokens if s.text_bytes and s.tokens else None

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict, where: str = MANIFEST) -> Manifest:
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(
                f"{where} is not a moeflow manifest (format {data.get('format')!r}, version "
                f"{data.get('version')!r}; expected {FORMAT!r} {VERSION}): prepare the folder "
                "with `moeflow data prepare`"
            )
        try:
            splits = {}
            for name in SPLITS:
                shards = tuple(Shard(**s) for s in data[name]["shards"])
                splits[name] = Split(**{**data[name], "shards": shards})
            return cls(
                tokenizer=TokenizerInfo(**data["tokenizer"]),
                dtype=data["dtype"],
                split_rule=dict(data["split_rule"]),
                inputs=tuple(data["inputs"]),
                counts=dict(data.get("counts", {})),
                created_by=data.get("created_by", ""),
                **splits,
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"{where} is damaged ({type(exc).__name__}: {exc}); prepare the folder again"
            ) from None

    def write(self, folder: str | os.PathLike) -> Path:
        """Write `manifest.json` atomically (a temporary file renamed over it)."""
        path = Path(folder) / MANIFEST
        tmp = path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path


def read_manifest(folder: str | os.PathLike) -> Manifest:
    """The manifest of prepared folder `folder`, with an error that says what to do when there is
    none (an unfinished or a foreign folder)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ValueError(
            f"{folder} has no {MANIFEST}: it is not a prepared folder, or its `moeflow data "
            "prepare` did not finish (run it again: it resumes)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); prepare the folder again") from None
    return Manifest.from_dict(data, str(path))

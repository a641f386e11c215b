"""The tokenizer of `moeflow data prepare`: byte tokens, a `tokenizers` file or folder, or any
tokenizer folder `transformers` loads (sentencepiece, tiktoken), always from local files.

`load_tokenizer(path)` gives an object with `.info` (the manifest's `TokenizerInfo`: name, sha256
of the tokenizer's files, kind, vocabulary size with added tokens, end-of-document / begin / pad
ids), `.encode_batch(texts)` (ids of each text, no special tokens added) and `.decode(ids)`.

- `None`: byte tokens (ids are the text's UTF-8 bytes; 256 ends a document; 257 ids).
- a `tokenizer.json` file, or a folder holding one: `tokenizers.Tokenizer.from_file`; the
  folder's `tokenizer_config.json` / `special_tokens_map.json` name its eos / bos / pad tokens.
- a folder without `tokenizer.json`: `transformers.AutoTokenizer.from_pretrained(folder,
  local_files_only=True)` (sentencepiece `.model`, tiktoken files), imported only then.

The end-of-document id is `eod_token` when given, else the tokenizer's eos token, else an added
special token among `EOD_NAMES`; with none of them the load is refused (name one: --eod-token).

Example:
    >>> tok = load_tokenizer(None)
    >>> tok.info.kind, tok.info.vocab_size, tok.info.eod_id
    ('bytes', 257, 256)
    >>> ids = tok.encode_batch(["hé"])
    >>> ids, tok.decode(ids[0])
    ([[104, 195, 169]], 'hé')
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path

import numpy as np

from moeflow.data.manifest import TokenizerInfo

# Added special tokens that end a document, by the names the common tokenizers give them.
EOD_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")
# The files that make a tokenizer's ids (a model folder's weights are not hashed).
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*",
                   "merges*", "*.model", "*.tiktoken", "spiece*")  # fmt: skip
EXTRA = "pip install 'moeflow[data]'"


class Tokenizer:
    """Ids from text and back. Subclasses set `info` and implement `encode_batch` / `decode`."""

    info: TokenizerInfo

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def encode_packed(self, texts: list[str], dtype) -> tuple[np.ndarray, np.ndarray]:
        """The texts' ids back to back (`dtype`) and each text's id count (int64)."""
        ids = self.encode_batch(texts)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = itertools.chain.from_iterable(ids)
        return np.fromiter(flat, dtype=dtype, count=int(lengths.sum())), lengths


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids, 256 as the end of a document (moeflow's byte corpora)."""

    info = TokenizerInfo(name="bytes", hash="bytes", kind="bytes", vocab_size=257, eod_id=256)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def encode_packed(self, texts: list[str], dtype) -> tuple[np.ndarray, np.ndarray]:
        data = [t.encode("utf-8") for t in texts]
        lengths = np.fromiter(map(len, data), dtype=np.int64, count=len(data))
        return np.frombuffer(b"".join(data), dtype=np.uint8).astype(dtype), lengths

    def decode(self, ids) -> str:
        """The text of `ids`; the end-of-document id (256) is not text and is left out."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (a `tokenizer.json`), truncation and padding switched off."""

    def __init__(self, tok, info: TokenizerInfo) -> None:
        self._tok, self.info = tok, info
        tok.no_truncation()
        tok.no_padding()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class TransformersTokenizer(Tokenizer):
    """A `transformers` tokenizer loaded from a local folder (sentencepiece, tiktoken, ...)."""

    def __init__(self, tok, info: TokenizerInfo) -> None:
        self._tok, self.info = tok, info
        tok.model_max_length = 1 << 62  # documents are not cut to the model's context here

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        out = self._tok(texts, add_special_tokens=False, return_attention_mask=False)
        return list(out["input_ids"])

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(path: str | os.PathLike | None, eod_token: str | None = None) -> Tokenizer:
    """The tokenizer at `path` (None: byte tokens), its end of document `eod_token` when given.

    Example:
        >>> load_tokenizer("no/such/tokenizer.json")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: tokenizer (--tokenizer) 'no/such/tokenizer.json' does not exist: ...
    """
    if path is None:
        if eod_token is not None:
            raise ValueError(
                f"--eod-token ({eod_token!r}) needs --tokenizer: byte tokens end a document "
                "with id 256"
            )
        return ByteTokenizer()
    where = Path(path)
    if not where.exists():
        raise ValueError(
            f"tokenizer (--tokenizer) {str(path)!r} does not exist: give a tokenizer.json, a "
            "folder holding one, or a tokenizer folder transformers loads (sentencepiece, tiktoken)"
        )
    if where.is_file() or (where / "tokenizer.json").is_file():
        return _load_tokenizers(where, eod_token)
    return _load_transformers(where, eod_token)


def _load_tokenizers(where: Path, eod_token: str | None) -> HFTokenizer:
    try:
        from tokenizers import Tokenizer as RustTokenizer
    except ImportError:
        raise ValueError(f"--tokenizer needs the tokenizers package: {EXTRA}") from None
    file = where if where.is_file() else where / "tokenizer.json"
    try:
        tok = RustTokenizer.from_file(str(file))
    except Exception as exc:  # the library's parse errors name no file: name it here
        raise ValueError(
            f"tokenizer (--tokenizer) {str(file)!r} is not a tokenizers file ({exc}); give the "
            "tokenizer.json a tokenizers / transformers tokenizer saved"
        ) from None
    folder = where.parent if where.is_file() else where
    config = _special_tokens(folder) if where.is_dir() else {}
    vocab = tok.get_vocab(with_added_tokens=True)

    def ids_of(name: str) -> int | None:
        token = config.get(name)
        return None if token is None else tok.token_to_id(token)

    specials = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]
    eod = _eod_id(str(file), eod_token, ids_of("eos_token"), specials, tok.token_to_id)
    info = TokenizerInfo(  # `tokenizer.json` alone makes the ids: a file or its folder, alike
        name=folder.name if file.name == "tokenizer.json" else file.stem,
        hash=_files_hash([file], eod, single=True), kind="tokenizers",
        vocab_size=max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1),
        eod_id=eod, bos_id=ids_of("bos_token"), pad_id=ids_of("pad_token"),
    )  # fmt: skip
    return HFTokenizer(tok, info)


def _load_transformers(where: Path, eod_token: str | None) -> TransformersTokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ValueError(
            f"--tokenizer {str(where)!r} has no tokenizer.json: loading it needs transformers "
            "(pip install 'moeflow[hf]')"
        ) from None
    try:
        tok = AutoTokenizer.from_pretrained(str(where), local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError by case
        raise ValueError(
            f"tokenizer (--tokenizer) {str(where)!r} is not a tokenizer folder transformers can "
            f"load ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); give "
            "a tokenizer.json or a folder with tokenizer_config.json and the tokenizer's files"
        ) from None
    vocab = tok.get_vocab()
    specials = [t for t in getattr(tok, "all_special_tokens", []) if t in vocab]
    specials += [t for t in vocab if t in EOD_NAMES]
    eod = _eod_id(str(where), eod_token, tok.eos_token_id, specials, vocab.get)
    info = TokenizerInfo(
        name=where.name, hash=_files_hash(_tokenizer_files(where), eod), kind="transformers",
        vocab_size=max(len(tok), max(vocab.values()) + 1), eod_id=eod,
        bos_id=tok.bos_token_id, pad_id=tok.pad_token_id,
    )  # fmt: skip
    return TransformersTokenizer(tok, info)


def _eod_id(where: str, eod_token: str | None, eos_id: int | None, specials, id_of) -> int:
    """`eod_token` when given, else the eos token, else a special token named as EOD_NAMES."""
    if eod_token is not None:
        found = id_of(eod_token)
        if found is None:
            raise ValueError(
                f"--eod-token ({eod_token!r}) is not a token of {where}; name one of its "
                f"special tokens: {sorted(specials)[:12]}"
            )
        return int(found)
    if eos_id is not None:
        return int(eos_id)
    for name in EOD_NAMES:
        if name in specials:
            return int(id_of(name))
    raise ValueError(
        f"tokenizer {where} names no end-of-document token (no eos_token, no added "
        f"{' / '.join(EOD_NAMES)}): name the token that ends a document with --eod-token "
        f"(its special tokens: {sorted(specials)[:12]})"
    )


def _special_tokens(folder: Path) -> dict[str, str]:
    """eos/bos/pad token strings from a folder's tokenizer_config.json / special_tokens_map.json."""
    out: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
        file = folder / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{file} is not valid JSON ({exc}); repair or remove it") from None
        for key in ("eos_token", "bos_token", "pad_token"):
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                out[key] = value
    return out


def _tokenizer_files(folder: Path) -> list[Path]:
    found = {p for pattern in TOKENIZER_FILES for p in folder.glob(pattern) if p.is_file()}
    return sorted(found, key=lambda p: p.name)


def _files_hash(files: list[Path], eod_id: int, single: bool = False) -> str:
    """sha256 over each file's name and contents, in name order, and the end-of-document id
    (what separates the documents of the shards); a lone file counts as `tokenizer.json`."""
    digest = hashlib.sha256()
    for file in files:
        name = "tokenizer.json" if single else file.name
        digest.update(name.encode() + b"\0" + hashlib.sha256(file.read_bytes()).digest())
    digest.update(f"eod={eod_id}".encode())
    return digest.hexdigest()

"""`[data]`: where a run's tokens come from.

Example:
    >>> cfg = DataConfig(kind="prepared", sources=(SourceConfig(path="code", weight=0.3),
    ...                                            SourceConfig(path="web", weight=0.7)))
    >>> [s.label for s in cfg.source_list()], [s.weight for s in cfg.source_list()]
    (['code', 'web'], [0.3, 0.7])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from moeflow.utils.validate import check_choice, check_int, check_path

DATA_KINDS = ("stdlib", "text", "tokens", "prepared", "megatron")
WINDOW_STARTS = ("any", "document")
STDLIB_BYTES = 8_000_000  # the embedded corpus's size unless data.max_bytes says otherwise


@dataclass(kw_only=True, frozen=True)
class SourceConfig:
    """One source of a mixture: a prepared folder (or a Megatron prefix for `kind = "megatron"`),
    its weight (its share of the training windows, normalised over the sources) and its name in
    the metrics (default: the folder's or file's name)."""

    path: str
    weight: float = 1.0
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name or self.path


@dataclass(kw_only=True, frozen=True)
class DataConfig:
    """Where tokens come from.

    - `stdlib` (default): the Python standard library's own source (`*.py` under the running
      interpreter's stdlib, without its test suite and codec tables), byte tokens, its first 8 MB
      (in a fixed order that samples the whole tree) unless `max_bytes` says otherwise; a file
      goes to validation when `crc32(relative path) % 100 < val_percent`, so the split depends
      only on file names.
    - `text`: `path` is a text file or a folder (files matching `glob`, recursively), byte tokens,
      the same split by file; a single file is split by bytes (its last `val_percent`%). JSONL and
      Parquet are refused: their text is a field, read by `moeflow data prepare`.
    - `tokens`: `path` is a folder with nanoGPT-style `train.bin` and `val.bin` (`token_dtype`:
      `uint16`, or `uint32` for vocabularies past 65,536 ids; memory-mapped); `vocab_size` must
      cover the ids.
    - `prepared`: `path` is a folder written by `moeflow data prepare` (its manifest names the
      tokenizer, the split and the shards), or `sources` a weighted mixture of them.
    - `megatron`: `path` is a Megatron indexed corpus (`PREFIX` of `PREFIX.bin` / `PREFIX.idx`,
      read in place), or `sources` a weighted blend of them; its last `val_percent`% of documents
      validate.
    `sources` (a list of `{path, weight, name}` tables, `[[data.sources]]` in TOML) replaces `path`
    for a mixture: each source's share of the training windows is its weight, and validation reports
    each source's loss beside the mixture's. `max_bytes` caps the training bytes read by `text` and
    `stdlib` (unset: no cap for `text`, 8 MB for `stdlib`; 0: no cap); validation is capped at a
    tenth of it. `window_start = "document"` cuts every document into windows from its first token;
    `document_mask` keeps attention inside each document of a window (the decoder restarts its
    positions at each document: a window of packed documents computes what each document alone
    would). `tokenizer`: the tokenizer the run's model is trained for (a `tokenizer.json` or a
    folder); every prepared folder's manifest must name the same one.
    """

    kind: str = "stdlib"
    path: str | None = None
    sources: tuple[SourceConfig, ...] = ()
    glob: str = "*"
    val_percent: int = 10
    max_bytes: int | None = None
    token_dtype: str = "uint16"
    window_start: str = "any"
    document_mask: bool = False
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        check_choice("data.kind", self.kind, DATA_KINDS)
        check_choice("data.token_dtype", self.token_dtype, ("uint16", "uint32"))
        check_choice("data.window_start", self.window_start, WINDOW_STARTS)
        if self.path and self.sources:
            raise ValueError("data.path and data.sources are both set: give one folder or a list")
        if self.sources and self.kind not in ("prepared", "megatron"):
            raise ValueError(
                f"data.sources (a mixture) needs data.kind = 'prepared' or 'megatron', not "
                f"{self.kind!r}"
            )
        if self.kind != "stdlib" and not (self.path or self.sources):
            raise ValueError(f"data.path must be set for data.kind = {self.kind!r}")
        for i, source in enumerate(self.source_list()):
            check_path(f"data.sources[{i}].path" if self.sources else "data.path", source.path)
            weight = source.weight
            if not (isinstance(weight, int | float) and math.isfinite(weight) and weight > 0):
                raise ValueError(
                    f"data.sources[{i}].weight ({weight!r}) must be a number > 0 (a "
                    "source's share of the training windows; drop a source to leave it out)"
                )
        labels = [s.label for s in self.source_list()]
        if len(set(labels)) < len(labels):
            raise ValueError(f"data.sources have the same name twice ({labels}); set their name")
        if self.tokenizer:
            check_path("data.tokenizer", self.tokenizer)
        if not isinstance(self.val_percent, int) or not 0 < self.val_percent < 100:
            raise ValueError(f"data.val_percent ({self.val_percent!r}) must be in 1..99")
        if self.max_bytes is not None:
            check_int("data.max_bytes", self.max_bytes, minimum=0)
        if self.document_mask and self.kind in ("stdlib", "text", "tokens"):
            raise ValueError(
                f"data.document_mask needs documents ending in an end-of-document id: "
                f"data.kind = 'prepared' or 'megatron', not {self.kind!r}"
            )

    def source_list(self) -> list[SourceConfig]:
        """The sources: `sources`, or `path` as one source of weight 1."""
        if self.sources:
            return [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in self.sources]
        return [SourceConfig(path=self.path)] if self.path else []

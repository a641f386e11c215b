"""`Source`: one corpus a run reads (its training and validation tokens and what they are), and
`Corpus`: the sources of a run, with their mixture weights.

Example:
    >>> src = Source("web", np.arange(100, dtype=np.uint16), np.arange(20, dtype=np.uint16),
    ...              "web (tokens)", bytes_per_token=None)
    >>> corpus = Corpus([src])
    >>> corpus.names, corpus.weights, len(corpus.train)
    (['web'], [1.0], 100)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moeflow.data.manifest import TokenizerInfo


@dataclass
class Source:
    """Training and validation tokens (arrays or `TokenView`s, memory-mapped where they come from
    files) of one source. `bytes_per_token`: bytes of text per validation token (1.0 for byte
    tokens; None when unknown: bits per byte undefined). `vocab_size` / `tokenizer` / `eod_id`:
    what a manifest says of the ids (None: not known, the ids are scanned before the first
    step). `doc_starts`: the training split's document start offsets, computed when asked.
    `counts`: each id's count in the training and validation splits (the unigram baseline)."""

    name: str
    train: object
    val: object
    description: str
    bytes_per_token: float | None
    weight: float = 1.0
    vocab_size: int | None = None
    tokenizer: TokenizerInfo | None = None
    eod_id: int | None = None
    doc_starts: Callable[[], np.ndarray] | None = None
    counts: tuple[np.ndarray, np.ndarray] | None = None
    split_names: tuple[str, str] = ("training split", "validation split")  # in error messages
    val_remedy: str = "use more data or a larger data.val_percent"  # ... for a short one


@dataclass
class Corpus:
    """The sources of a run, in config order."""

    sources: list[Source]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def weights(self) -> list[float]:
        return [s.weight for s in self.sources]

    def _single(self) -> Source:
        if len(self.sources) != 1:
            raise ValueError(f"a mixture of {len(self.sources)} sources has no single split")
        return self.sources[0]

    # One source's splits (a run of one source; the examples read these).
    @property
    def train(self):
        return self._single().train

    @property
    def val(self):
        return self._single().val

    @property
    def bytes_per_token(self) -> float | None:
        return self._single().bytes_per_token

    @property
    def description(self) -> str:
        return "; ".join(s.description for s in self.sources)

    def train_tokens(self) -> int:
        return sum(len(s.train) for s in self.sources)

    def val_tokens(self) -> int:
        return sum(len(s.val) for s in self.sources)

"""A run's data: its sources (`[data]`), this rank's batch stream, document masks, validation
per source and the unigram baseline.

Example (one process, the embedded corpus):
    >>> cfg = RunConfig.from_dict({"data": {"max_bytes": 50_000}, "train": {"seq_len": 16,
    ...                            "micro_batch_size": 2}})
    >>> data = RunData(cfg, rank=0, world_size=1)
    >>> x, y, documents = data.next_batch_on(torch.device("cpu"))
    >>> x.shape, documents is None  # no document masking unless data.document_mask
    (torch.Size([2, 16]), True)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from moeflow.data.corpus import check_corpus, load_corpus
from moeflow.data.stream import BatchStream
from moeflow.data.unigram import corpus_baseline, mix_losses
from moeflow.models.documents import document_ids
from moeflow.train.config import RunConfig
from moeflow.train.loss import validation_loss


class RunData:
    """The sources and this rank's stream; `state_dict()` is the stream's position."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int) -> None:
        self.cfg, d, t = cfg, cfg.data, cfg.train
        self.corpus = load_corpus(d)
        sources = self.corpus.sources
        starts = None
        if d.window_start == "document":
            starts = [s.doc_starts() if s.doc_starts else None for s in sources]
            if any(s is None for s in starts):
                starts = None  # the stream names the source without boundaries
        self.stream = BatchStream(
            [s.train for s in sources], t.seq_len, t.micro_batch_size, rank, world_size, t.seed,
            weights=self.corpus.weights, doc_starts=starts, window_start=d.window_start,
            names=self.corpus.names,
        )  # fmt: skip
        self.eod = sources[0].eod_id if d.document_mask else None
        if d.document_mask and self.eod is None:
            raise ValueError(
                f"data.document_mask needs an end-of-document id; {sources[0].name} names none"
            )

    def check(self, group: dist.ProcessGroup) -> None:
        """Before the first step, on every rank (collective): the vocabulary, a validation window
        per source, and ids no manifest describes scanned on each rank's part; every rank raises
        the first problem found."""
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        problem = None
        try:
            check_corpus(self.corpus, self.cfg.model.vocab_size, self.cfg.train.seq_len, rank,
                         world)  # fmt: skip
        except ValueError as exc:
            problem = str(exc)
        problems: list = [None] * world
        dist.all_gather_object(problems, problem, group=group)
        first = next((p for p in problems if p), None)
        if first:
            raise ValueError(first)

    def next_batch_on(self, device: torch.device):
        """`(inputs, targets, document ids or None)` of the next micro-batch, on `device`."""
        x, y = self.stream.next_batch_on(device)
        return x, y, self.documents(x)

    def documents(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.eod is None else document_ids(x, self.eod)

    def evaluate(
        self, model: nn.Module, group: dist.ProcessGroup, device: torch.device, autocast: Callable
    ) -> tuple[float, float | None, dict | None]:
        """The validation loss (nats per token) and bits per byte of the mixture (its sources'
        weighted as they are drawn), and of each source when there are several."""
        t = self.cfg.train
        per = {}
        for s in self.corpus.sources:
            per[s.name] = validation_loss(
                model, s.val, t.seq_len, t.eval_windows, t.micro_batch_size, group, device,
                autocast, s.bytes_per_token, self.documents,
            )  # fmt: skip
        if len(per) == 1:
            (loss, bpb), = per.values()  # fmt: skip
            return loss, bpb, None
        loss, bpb = mix_losses(self.corpus, {k: v[0] for k, v in per.items()})
        return loss, bpb, {k: {"val_loss": v[0], "val_bpb": v[1]} for k, v in per.items()}

    def baseline(self) -> tuple[float, float | None]:
        """The unigram baseline: nats per token and bits per byte (None where bytes are unknown)."""
        nats, bpb, _ = corpus_baseline(self.corpus)
        return nats, bpb

    def describe(self) -> str:
        """What each source holds and how many steps a pass over this rank's part of it takes."""
        t = self.cfg.train
        per_step = t.micro_batch_size * t.grad_accum_steps
        weights = self.corpus.weights
        lines = []
        for s, n, w in zip(self.corpus.sources, self.stream.windows_per_source(), weights,
                           strict=True):  # fmt: skip
            share = w / sum(weights)
            steps = math.ceil(n / max(share * per_step, 1e-9))
            lines.append(
                f"data {s.name}: {len(s.train):,} training / {len(s.val):,} validation tokens"
                + (f", {share:.0%} of the windows" if len(weights) > 1 else "")
                + f"; an epoch of this rank's part is {steps:,} steps ({n:,} windows)"
            )
        return "\n".join(lines)

    def drawn(self, group: dist.ProcessGroup) -> dict:
        """`{"windows_by_source": {name: windows}}`: the training windows the job's ranks drew
        from each source in this run (since its start or resume), counted as they were drawn
        and summed over the ranks (one all-reduce), for a mixture; empty for one source."""
        if len(self.corpus.sources) == 1:
            return {}
        counted = torch.from_numpy(self.stream.counted.copy())
        dist.all_reduce(counted, group=group)
        return {"windows_by_source": dict(zip(self.corpus.names, counted.tolist(), strict=True))}

    def tokenizer_record(self) -> dict | None:
        """What a checkpoint records of the ids it was trained on (None: bytes or unknown)."""
        tok = self.corpus.sources[0].tokenizer
        return None if tok is None else {"name": tok.name, "hash": tok.hash}

    def check_resume(self, meta: dict, path) -> None:
        """A resumed run reads the ids its checkpoint's model was trained on."""
        saved, now = meta.get("tokenizer"), self.tokenizer_record()
        if saved and now and saved["hash"] != now["hash"]:
            raise ValueError(
                f"--resume: {path} was trained on ids of tokenizer {saved['name']!r} "
                f"({saved['hash'][:19]}); data.path holds ids of {now['name']!r} "
                f"({now['hash'][:19]}): resume on data prepared with {saved['name']!r}"
            )

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def skip(self, batches: int) -> None:
        self.stream.skip(batches)

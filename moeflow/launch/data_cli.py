"""`moeflow data prepare`: corpora through a tokenizer into a prepared folder.

    moeflow data prepare INPUT [INPUT ...] --out DIR [--tokenizer PATH] [--field text]
        [--glob G] [--split NAME] [--workers N] [--val-percent P] [--seed S]
        [--dtype auto|uint16|int32] [--shard-tokens N] [--unit-bytes N] [--eod-token T]
        [--overwrite] [--quiet]

    moeflow data prepare corpus/*.jsonl --tokenizer runs/tokenizer --out data/web
    moeflow data prepare stdlib --out data/stdlib                  # byte tokens
    moeflow data prepare /megatron/web_text_document --tokenizer tok/ --out data/web  # in place

Example:
    >>> size_arg("--unit-bytes", "32MB"), size_arg("--unit-bytes", "4096")
    (32000000, 4096)
"""

from __future__ import annotations

import argparse
import sys
import time

from moeflow.launch.arguments import UNITS, OneLineParser, UsageError


def size_arg(flag: str, text: str) -> int:
    """A whole number of bytes, plain (`4096`) or with a unit (`32MB`, `16MiB`)."""
    raw = text.strip().upper().replace("_", "")
    number, unit = raw.rstrip("KMGTIB"), raw[len(raw.rstrip("KMGTIB")) :]
    try:
        value = float(number) * (UNITS[unit] if unit else 1)
    except (KeyError, ValueError):
        value = 0
    if not value >= 1 or value != int(value):
        raise UsageError(
            f"{flag} ({text!r}) must be a whole number of bytes >= 1: 4096, 32MB, 16MiB"
        )
    return int(value)


def prepare_parser() -> argparse.ArgumentParser:
    from moeflow.data.prepare import DEFAULT_SHARD_TOKENS, DEFAULT_UNIT_BYTES, DTYPES

    p = OneLineParser(
        prog="moeflow data prepare", allow_abbrev=False,
        description="Tokenize text, JSON lines, Parquet or a datasets folder into a prepared "
        "folder (Megatron .bin/.idx shards and a manifest), resumably, on N processes.",
    )  # fmt: skip
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="files, folders, a datasets folder, a Megatron PREFIX, or `stdlib`",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="the prepared folder to write")
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="tokenizer.json or a tokenizer folder (default: byte tokens)",
    )
    p.add_argument("--field", default="text", help="the text's field in JSON lines / Parquet")
    p.add_argument("--glob", default="*", help="files of a folder to read (default: all)")
    p.add_argument("--split", default=None, help="the split of a datasets DatasetDict folder")
    p.add_argument(
        "--workers", type=int, default=None, metavar="N", help="processes (default: the CPU cores)"
    )
    p.add_argument(
        "--val-percent",
        type=float,
        default=1.0,
        metavar="P",
        help="percent of documents for validation (default 1)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument(
        "--dtype",
        default="auto",
        metavar="|".join(DTYPES),
        help="token type of the shards (auto: uint16 up to 65,536 ids, else int32)",
    )
    p.add_argument(
        "--shard-tokens",
        type=int,
        default=DEFAULT_SHARD_TOKENS,
        metavar="N",
        help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS:,})",
    )
    p.add_argument(
        "--unit-bytes",
        default=str(DEFAULT_UNIT_BYTES),
        metavar="N",
        help="input a worker reads at a time (default 16MiB)",
    )
    p.add_argument(
        "--eod-token",
        default=None,
        metavar="T",
        help="the token that ends a document (default: the tokenizer's eos)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a finished or different prepare in --out"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    return p


def cmd_data(argv: list[str]) -> int:
    """`moeflow data SUBCOMMAND ...` (one subcommand: prepare)."""
    if not argv or argv[0] != "prepare":
        if argv[:1] in (["-h"], ["--help"]):
            print("usage: moeflow data prepare INPUT [INPUT ...] --out DIR [options]")
            return 0
        raise UsageError(
            f"moeflow data: unknown subcommand {argv[0] if argv else None!r}; use: moeflow data "
            "prepare INPUT [INPUT ...] --out DIR [--tokenizer PATH] (see --help)"
        )
    args = prepare_parser().parse_args(argv[1:])
    from moeflow.data.prepare import prepare

    start = time.perf_counter()
    try:
        m = prepare(
            args.inputs, args.out, args.tokenizer, field=args.field, glob=args.glob,
            split=args.split, eod_token=args.eod_token, workers=args.workers,
            val_percent=args.val_percent, seed=args.seed, dtype=args.dtype,
            shard_tokens=args.shard_tokens, unit_bytes=size_arg("--unit-bytes", args.unit_bytes),
            overwrite=args.overwrite, progress=not args.quiet,
        )  # fmt: skip
    except KeyboardInterrupt:  # not the trainer's "nothing saved since the last checkpoint"
        print("moeflow: error: interrupted (Ctrl-C): run the same command again to finish; it "
              "resumes where this one stopped", file=sys.stderr)  # fmt: skip
        raise SystemExit(130) from None
    seconds = time.perf_counter() - start
    if not args.quiet:
        documents = m.train.documents + m.val.documents
        tokens = m.train.tokens + m.val.tokens
        text = m.train.text_bytes + m.val.text_bytes
        per_token = f"{text / tokens:.2f} bytes/token" if text else "bytes/token unknown"
        print(
            f"prepared {args.out}: {documents:,} documents (val {m.val.documents:,}), "
            f"{tokens:,} {m.dtype} tokens, {per_token}, "
            f"{len(m.train.shards) + len(m.val.shards)} shards, {seconds:.1f} s, "
            f"{text / 1e6 / max(seconds, 1e-9):.1f} MB/s of text"
        )
    return 0

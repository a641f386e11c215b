"""The training side of prepared data: how fast a 1 GB prepared folder opens and feeds windows
(against the nanoGPT `tokens` kind over the same ids), what a rank holds in memory, and how fast
a 100 GB folder opens.

    python bench/data_stream.py [--gb 1] [--big-gb 100] [--dir /tmp/moeflow_data_bench]

Each opening is timed in a fresh process (what a rank of a new run pays), with its resident
memory (`RssAnon`, the private memory a rank holds; pages of the memory-mapped shards are the
page cache's, shared and reclaimable) after opening and after drawing windows; the first draw of
an epoch builds its shuffled order (8 bytes per window of the rank's part). Windows/s:
`BatchStream.next_batch` of 8 windows on one rank, one thread. The 100 GB folder is made of
sparse shard files (their indexes are real: one document per 4,096 tokens), so it costs no disk;
opening reads its manifest and indexes' headers only, as for real data. The page cache is warm
for the 1 GB folder (just written): the windows/s compare the reader's own cost, not the disk's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moeflow.data.indexed import HEAD_BYTES, HEADER, IndexedWriter
from moeflow.data.manifest import Manifest, Shard, Split, TokenizerInfo

SHARD_TOKENS = 1 << 28  # 512 MB of uint16 per shard, as `moeflow data prepare` cuts them
TOK = TokenizerInfo(name="bench", hash="sha256:bench", kind="tokenizers", vocab_size=50_000,
                    eod_id=0)  # fmt: skip


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def write_folder(folder: Path, tokens: int, rng) -> None:
    """A prepared folder of `tokens` random ids (documents of ~1,000), and the same ids as
    nanoGPT's train.bin / val.bin beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    shards, left, i = [], tokens, 0
    nano = open(folder / "train.bin", "wb")  # noqa: SIM115
    while left:
        n = min(left, SHARD_TOKENS)
        ids = rng.integers(1, TOK.vocab_size, n, dtype=np.uint16)
        lengths = np.diff(np.r_[0, np.arange(1000, n, 1000), n])
        ids[np.cumsum(lengths) - 1] = 0
        w = IndexedWriter(folder / f"train-{i:05d}", np.uint16)
        w.add_documents(ids, lengths)
        w.finish()
        ids.tofile(nano)
        shards.append(Shard(f"train-{i:05d}", len(lengths), n))
        left, i = left - n, i + 1
    nano.close()
    val = rng.integers(1, TOK.vocab_size, 1 << 20, dtype=np.uint16)
    w = IndexedWriter(folder / "val-00000", np.uint16)
    w.add_documents(val, [len(val)])
    w.finish()
    val.tofile(folder / "val.bin")
    docs = sum(s.documents for s in shards)
    Manifest(tokenizer=TOK, dtype="uint16", split_rule={"rule": "bench"}, inputs=(),
             train=Split(docs, tokens, 0, tuple(shards)),
             val=Split(1, len(val), 0, (Shard("val-00000", 1, len(val)),)),
             ).write(folder)  # fmt: skip


def write_sparse_folder(folder: Path, gb: int) -> None:
    """`gb` GB of sparse shards with real indexes (one document per 4,096 tokens)."""
    folder.mkdir(parents=True, exist_ok=True)
    per_doc, shards = 4096, []
    n_shards = gb * (1 << 30) // (2 * SHARD_TOKENS)
    for i in range(n_shards):
        prefix = folder / f"train-{i:05d}"
        with open(f"{prefix}.bin", "wb") as f:
            f.truncate(2 * SHARD_TOKENS)
        docs = SHARD_TOKENS // per_doc
        lengths = np.full(docs, per_doc, dtype=np.int32)
        pointers = np.arange(docs, dtype=np.int64) * per_doc * 2
        index = np.arange(docs + 1, dtype=np.int64)
        head = HEADER + np.array([1], "<u8").tobytes() + bytes([8])
        head += np.array([docs, docs + 1], "<u8").tobytes()
        assert len(head) == HEAD_BYTES
        with open(f"{prefix}.idx", "wb") as f:
            f.write(head + lengths.tobytes() + pointers.tobytes() + index.tobytes())
        shards.append(Shard(prefix.name, docs, SHARD_TOKENS))
    val = shards[-1]
    Manifest(tokenizer=TOK, dtype="uint16", split_rule={"rule": "bench"}, inputs=(),
             train=Split(sum(s.documents for s in shards[:-1]), SHARD_TOKENS * (n_shards - 1), 0,
                         tuple(shards[:-1])),
             val=Split(val.documents, val.tokens, 0, (val,))).write(folder)  # fmt: skip


CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from moeflow.data.config import DataConfig
from moeflow.data.corpus import load_corpus
from moeflow.data.stream import BatchStream
imported = time.perf_counter()
kind, path, windows, seq = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def rss():  # private (anonymous) memory: file pages of the maps are the page cache's
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) * 1024
base = rss()
t1 = time.perf_counter()
corpus = load_corpus(DataConfig(kind=kind, path=path))
stream = BatchStream(corpus.train, seq, 8, rank=0, world_size=1, seed=0)
opened = time.perf_counter() - t1
after_open = rss()
t2 = time.perf_counter()
for _ in range(windows // 8):
    stream.next_batch()
drawn = time.perf_counter() - t2
print(json.dumps({"open_s": opened, "rss_open": after_open - base, "rss_drawn": rss() - base,
                  "windows_per_s": windows / drawn if windows else None,
                  "tokens": len(corpus.train)}))
"""


def child(kind: str, path: Path, windows: int, seq_len: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", CHILD, kind, str(path), str(windows), str(seq_len)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--big-gb", type=int, default=100)
    p.add_argument("--dir", default="/tmp/moeflow_data_bench")
    p.add_argument("--windows", type=int, default=20_000)
    args = p.parse_args()
    root = Path(args.dir)
    folder, big = root / f"prepared_{args.gb:g}gb", root / f"sparse_{args.big_gb}gb"
    if not (folder / "manifest.json").is_file():
        write_folder(folder, int(args.gb * (1 << 30)) // 2, np.random.default_rng(0))
    if not (big / "manifest.json").is_file():
        write_sparse_folder(big, args.big_gb)
    print(f"{cpu_model()}, 1 thread, numpy {np.__version__}; batch 8 windows, rank 0 of 1")
    print(f"{'corpus':34} {'seq_len':>7} {'open s':>7} {'RSS open':>9} {'RSS drawn':>10} "
          f"{'windows/s':>10} {'vs tokens':>9}")  # fmt: skip
    for seq_len in (256, 2048):
        runs = {
            f"tokens ({args.gb:g} GB train.bin)": child("tokens", folder, args.windows, seq_len),
            f"prepared ({args.gb:g} GB, shards)": child("prepared", folder, args.windows, seq_len),
        }
        floor = next(iter(runs.values()))["windows_per_s"]
        for name, r in runs.items():
            print(f"{name:34} {seq_len:>7} {r['open_s']:>7.3f} {r['rss_open'] / 2**20:>7.1f}MB "
                  f"{r['rss_drawn'] / 2**20:>8.1f}MB {r['windows_per_s']:>10,.0f} "
                  f"{r['windows_per_s'] / floor:>8.2f}x")  # fmt: skip
    r = child("prepared", big, 800, 2048)
    print(f"{f'prepared ({args.big_gb} GB, sparse shards)':34} {2048:>7} {r['open_s']:>7.3f} "
          f"{r['rss_open'] / 2**20:>7.1f}MB {r['rss_drawn'] / 2**20:>8.1f}MB "
          f"{r['windows_per_s']:>10,.0f}   ({r['tokens'] / 1e9:.1f}G tokens)")  # fmt: skip


if __name__ == "__main__":
    main()

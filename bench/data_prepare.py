"""Throughput of `moeflow data prepare`: documents/s and MB/s of text on 1 and 2 worker
processes, with the test tokenizer (a byte-level BPE of 2,000 ids, examples/train_tokenizer.py)
and with byte tokens, over the embedded corpus (the standard library's sources, as JSON lines,
repeated to about `--mb` megabytes).

    .venv/bin/python bench/data_prepare.py [--mb 50] [--unit-mb 4]

Each row is one `prepare` into a fresh folder, timed whole (plan, tokenize, merge, hashes,
manifest); the worker pool's start (a forkserver importing moeflow, once per process) is timed
apart on a tiny input first, so the rows measure steady work. Every worker runs one thread
(`TOKENIZERS_PARALLELISM=false`); "x 1 worker" is the speed-up of 2 workers over 1 in this
run. The peak resident memory of this process and of the largest worker closes the table
(bounded by a unit, not by the corpus).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moeflow.data.byte_corpus import stdlib_files, stdlib_root  # noqa: E402
from moeflow.data.prepare import prepare  # noqa: E402
from tests.data_corpus import tokenizer_folder  # noqa: E402


def cpu_name() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def write_corpus(path: Path, megabytes: float) -> tuple[int, int]:
    """The stdlib's files as JSON lines, repeated to about `megabytes`; (documents, bytes)."""
    root = stdlib_root()
    texts = [p.read_text(encoding="utf-8") for p in sorted(stdlib_files(root))]
    lines = [json.dumps({"text": t}) + "\n" for t in texts if t]
    documents = 0
    with open(path, "w", encoding="utf-8") as out:
        while out.tell() < megabytes * 1e6:
            out.writelines(lines)
            documents += len(lines)
    return documents, path.stat().st_size


def timed(source: Path, folder: Path, tokenizer, workers: int, unit_bytes: int):
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    m = prepare([str(source)], folder, tokenizer and str(tokenizer), workers=workers,
                unit_bytes=unit_bytes, progress=False)  # fmt: skip
    return time.perf_counter() - start, m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=50.0, help="corpus size in MB (JSON lines)")
    parser.add_argument("--unit-mb", type=float, default=4.0, help="--unit-bytes, in MB")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="moeflow-bench-prepare-"))
    try:
        source = work / "stdlib.jsonl"
        documents, size = write_corpus(source, args.mb)
        bpe = tokenizer_folder()
        unit = int(args.unit_mb * 1e6)
        tiny = work / "tiny.jsonl"
        tiny.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(64)))
        start, _ = timed(tiny, work / "tiny", bpe, 2, 64)
        print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, affinity "
              f"{len(os.sched_getaffinity(0))}; 1 thread per worker; python "
              f"{platform.python_version()}")  # fmt: skip
        print(f"input: {size / 1e6:.1f} MB of JSON lines, {documents:,} documents (the stdlib "
              f"repeated), units of {args.unit_mb:g} MB; pool start {start:.2f} s")  # fmt: skip
        print("\n| tokenizer | workers | seconds | documents/s | MB/s of text | tokens/s | "
              "bytes/token | x 1 worker |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
        for name, tok in (("BPE 2,000 (test)", bpe), ("bytes", None)):
            one = None
            for workers in (1, 2):
                seconds, m = timed(source, work / "out", tok, workers, unit)
                docs = m.train.documents + m.val.documents
                tokens = m.train.tokens + m.val.tokens
                text = m.train.text_bytes + m.val.text_bytes
                one = one or seconds
                print(f"| {name} | {workers} | {seconds:.2f} | {docs / seconds:,.0f} | "
                      f"{text / 1e6 / seconds:.2f} | {tokens / seconds / 1e6:.2f}M | "
                      f"{text / tokens:.2f} | {one / seconds:.2f} |")  # fmt: skip
        peak = [resource.getrusage(who).ru_maxrss / 1e3 for who in
                (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]  # fmt: skip
        torch = "holds torch" if "torch" in sys.modules else "without torch"
        print(f"\npeak RSS: this process {peak[0]:.0f} MB (1 worker runs in it; {torch}), the "
              f"largest worker {peak[1]:.0f} MB (the tokenizer, numpy and one unit)")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

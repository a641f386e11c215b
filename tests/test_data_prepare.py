"""`moeflow data prepare` (issue 40, scope 1): JSON lines, Parquet, a `datasets` folder and a
folder of text files holding the same documents give the same shards byte for byte, and the
shards decode back to the texts; the split is a function of each text; 2 workers write what 1
writes; a prepare killed with SIGKILL (mid-tokenizing) or stopped mid-merge finishes on a rerun
with the same bytes, redoing no finished part; megatron-core reads our shards and we read its
pairs (also described in place); bad input is refused in one line, leaving nothing that looks
complete."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moeflow.data import prepare as prepare_module
from moeflow.data import prepare_merge
from moeflow.data.indexed import IndexedTokens
from moeflow.data.manifest import read_manifest
from moeflow.data.prepare import prepare
from moeflow.data.prepare_parts import is_val
from moeflow.data.tokenizer import load_tokenizer
from tests.data_corpus import (
    ROOT,
    documents,
    tokenizer_folder,
    write_dataset,
    write_jsonl,
    write_parquet,
    write_text_folder,
)

SMALL = {"shard_tokens": 20_000, "val_percent": 10.0, "unit_bytes": 20_000}


def run(inputs, out: Path, tokenizer=None, **kw):
    kw = {"workers": 1, "progress": False, **kw}
    return prepare([str(i) for i in inputs], out, tokenizer and str(tokenizer), **kw)


def folder_bytes(out: Path) -> dict[str, bytes]:
    """Every file of a prepared folder but its manifest (which names the inputs)."""
    files = sorted(p for p in out.iterdir() if p.name != "manifest.json")
    assert not (out / ".prepare").exists()
    return {p.name: p.read_bytes() for p in files}


def shard_documents(out: Path, split: str) -> list[np.ndarray]:
    m = read_manifest(out)
    docs = []
    for shard in m.split(split).shards:
        pair = IndexedTokens.open(out / shard.prefix)
        first = shard.first_document
        docs += [np.array(pair.document(d)) for d in range(first, first + shard.documents)]
    return docs


def test_every_input_format_gives_the_same_shards_and_the_texts_back(tmp_path, monkeypatch):
    bpe = tokenizer_folder()
    docs = documents()
    inputs = {
        "jsonl": write_jsonl(tmp_path / "docs.jsonl", docs),
        "parquet": write_parquet(tmp_path / "docs.parquet", docs),
        "dataset": write_dataset(tmp_path / "docs_dataset", docs),
        "text": write_text_folder(tmp_path / "docs_text", docs),
    }
    outs = {name: tmp_path / f"out_{name}" for name in inputs}
    manifests = {}
    for name, source in inputs.items():  # the merge reads parts whole, then in small pieces
        monkeypatch.setattr(prepare_merge, "PIECE_TOKENS", 1 << 24 if name == "jsonl" else 700)
        manifests[name] = run([source], outs[name], bpe, **SMALL)
    reference = folder_bytes(outs["jsonl"])
    for name in ("parquet", "dataset", "text"):
        assert folder_bytes(outs[name]) == reference, name
        for key in ("tokenizer", "dtype", "split_rule", "train", "val", "counts"):
            assert getattr(manifests[name], key) == getattr(manifests["jsonl"], key), (name, key)
    m = manifests["jsonl"]
    assert len(m.train.shards) > 2 and m.val.documents > 0 and m.dtype == "uint16"
    assert m.tokenizer.vocab_size == 2000 and m.tokenizer.kind == "tokenizers"

    tok = load_tokenizer(bpe)
    val = is_val([d.encode() for d in docs], 0, SMALL["val_percent"])
    in_val = dict(zip(docs, val, strict=True))
    for split, expected in (("train", [d for d in docs if not in_val[d]]),
                            ("val", [d for d in docs if in_val[d]])):  # fmt: skip
        got = shard_documents(outs["jsonl"], split)
        assert all(d[-1] == tok.info.eod_id for d in got)
        assert [tok.decode(d[:-1]) for d in got] == expected
        counts = np.load(outs["jsonl"] / f"{split}.counts.npy")
        assert (counts == np.bincount(np.concatenate(got), minlength=2000)).all()
        assert m.split(split).text_bytes == sum(len(d.encode()) for d in expected)
    file = inputs["jsonl"]
    assert m.inputs == ({"path": str(file), "bytes": file.stat().st_size,
                         "blake2b": hashlib.blake2b(file.read_bytes()).hexdigest()},)  # fmt: skip
    assert len(manifests["text"].inputs) == len(docs)


def test_the_split_is_a_function_of_each_text(tmp_path):
    old = [f"document {i}: " + "words " * (i % 7) for i in range(60)]
    new = old[:30] + [f"added {i}" for i in range(25)] + old[30:] + [old[5], old[6]]
    splits = []
    for name, docs, seed in (("a", old, 0), ("b", new, 0), ("c", old, 1)):
        run([write_jsonl(tmp_path / f"{name}.jsonl", docs)], tmp_path / name, val_percent=30.0,
            seed=seed)  # fmt: skip
        texts = {s: [bytes(d[:-1].tolist()).decode() for d in shard_documents(tmp_path / name, s)]
                 for s in ("train", "val")}  # fmt: skip
        splits.append(texts)
    a, b, c = splits
    assert set(a["val"]) <= set(b["val"]) and set(a["train"]) <= set(b["train"])
    assert 0 < len(a["val"]) < len(old)
    for copy in (old[5], old[6]):  # both copies of a document in one split
        assert (b["val"].count(copy), b["train"].count(copy)) in ((2, 0), (0, 2))
    assert set(c["val"]) != set(a["val"])  # the seed moves the split


def test_two_workers_write_the_bytes_one_worker_writes(tmp_path):
    bpe = tokenizer_folder()
    source = write_jsonl(tmp_path / "docs.jsonl", documents())
    run([source], tmp_path / "one", bpe, **SMALL)
    run([source], tmp_path / "two", bpe, workers=2, **SMALL)
    assert folder_bytes(tmp_path / "two") == folder_bytes(tmp_path / "one")


def count_calls(monkeypatch, name: str) -> list:
    calls, real = [], getattr(prepare_module, name)

    def counted(*args):
        calls.append(args[1])
        return real(*args)

    monkeypatch.setattr(prepare_module, name, counted)
    return calls


def test_kill_9_mid_run_then_a_rerun_gives_the_same_bytes(tmp_path, monkeypatch):
    bpe = tokenizer_folder()
    paragraphs = [p for d in documents() for p in d.split("\n\n") if p.strip()]
    source = write_jsonl(tmp_path / "docs.jsonl", paragraphs)  # many short documents
    options = {"shard_tokens": 20_000, "val_percent": 10.0, "unit_bytes": 2_000}
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "moeflow", "data", "prepare", str(source), "--out", str(out),
           "--tokenizer", str(bpe), "--workers", "1", "--shard-tokens", "20000",
           "--val-percent", "10", "--unit-bytes", "2000", "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first_part = out / ".prepare" / "parts" / "000000.npz"
    deadline = time.monotonic() + 120
    while not first_part.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    output = proc.communicate()[0].decode()
    assert first_part.exists(), output
    units = len(json.loads((out / ".prepare" / "plan.json").read_text())["units"])
    done = len(list((out / ".prepare" / "parts").glob("*.npz")))
    # Killed before the end (not a timing-lucky pass): many units, some of them done.
    assert not (out / "manifest.json").exists() and units > 100 and 0 < done < units, done

    tokenized = count_calls(monkeypatch, "tokenize_unit")
    run([source], out, bpe, **options)  # the same command, resumed in this process
    assert len(tokenized) == units - done and min(tokenized) >= 1  # no finished part redone
    straight = tmp_path / "straight"
    run([source], straight, bpe, **{**options, "unit_bytes": 1 << 20})
    assert folder_bytes(out) == folder_bytes(straight)
    assert read_manifest(out) == read_manifest(straight)


def test_an_interrupted_merge_resumes(tmp_path, monkeypatch):
    source = write_jsonl(tmp_path / "docs.jsonl", documents())
    options = {"shard_tokens": 30_000, "val_percent": 10.0, "unit_bytes": 50_000}
    run([source], tmp_path / "straight", **options)
    finished, real = [], prepare_merge.IndexedWriter.finish

    def finish_twice(self):
        if len(finished) == 2:
            raise RuntimeError("stopped mid-merge")
        finished.append(self.prefix.name)
        real(self)

    monkeypatch.setattr(prepare_merge.IndexedWriter, "finish", finish_twice)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="mid-merge"):
        run([source], out, **options)
    assert finished == ["train-00000", "train-00001"] and not (out / "manifest.json").exists()
    monkeypatch.setattr(prepare_merge.IndexedWriter, "finish", real)
    tokenized = count_calls(monkeypatch, "tokenize_unit")
    run([source], out, **options)
    assert tokenized == [] and folder_bytes(out) == folder_bytes(tmp_path / "straight")


def test_megatron_core_reads_our_shards_and_we_read_its_pairs(tmp_path):
    bpe = tokenizer_folder()
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    docs = documents()
    out = tmp_path / "ours"
    run([write_jsonl(tmp_path / "d.jsonl", docs)], out, bpe, shard_tokens=10_000)
    for shard in read_manifest(out).train.shards:
        theirs, ours = (
            IndexedDataset(str(out / shard.prefix)),
            IndexedTokens.open(out / shard.prefix),
        )
        assert len(theirs) == ours.documents == shard.documents
        assert (theirs.document_indices == ours.document_indices).all()
        assert all((theirs[d] == ours.document(d)).all() for d in range(ours.documents))

    tok = load_tokenizer(bpe)
    ids = tok.encode_batch(list(docs))
    prefix = tmp_path / "megatron" / "web_text_document"
    prefix.parent.mkdir()
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for doc in ids:  # two sequences a document, as preprocess_data.py --split-sentences writes
        half = len(doc) // 2
        builder.add_document(torch.tensor([*doc, tok.info.eod_id]), [half, len(doc) + 1 - half])
    builder.finalize(f"{prefix}.idx")
    pair = IndexedTokens.open(prefix)
    assert [pair.document(d).tolist() for d in range(pair.documents)] == [
        [*doc, tok.info.eod_id] for doc in ids
    ]

    described = tmp_path / "described"
    m = run([f"{prefix}.bin"], described, bpe, val_percent=10.0)
    assert sorted(p.name for p in described.iterdir()) == [
        "manifest.json", "train.counts.npy", "val.counts.npy"]  # fmt: skip
    cut = len(docs) - round(len(docs) * 0.1)  # the last 10% of the documents are val
    assert [(s.prefix, s.first_document, s.documents) for s in m.train.shards + m.val.shards] == [
        (str(prefix), 0, cut), (str(prefix), cut, len(docs) - cut)]  # fmt: skip
    assert m.train.tokens + m.val.tokens == len(pair.tokens)
    assert m.train.text_bytes == sum(len(d.encode()) for d in docs[:cut])
    assert m.val.text_bytes == sum(len(d.encode()) for d in docs[cut:])
    counts = np.load(described / "train.counts.npy") + np.load(described / "val.counts.npy")
    assert (counts == np.bincount(pair.tokens, minlength=2000)).all()
    assert [Path(i["path"]).name for i in m.inputs] == ["web_text_document.bin",
                                                        "web_text_document.idx"]  # fmt: skip


def word_tokenizer(folder: Path, vocab: dict[str, int], special=()) -> Path:
    """A word-level tokenizer.json with ids of our choosing (70,000 needs int32 shards)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab, unk_token=next(iter(vocab))))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(special))
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def refused(call, *words: str) -> str:
    with pytest.raises(ValueError) as caught:
        call()
    line = str(caught.value)
    assert "\n" not in line and all(w in line for w in words), line
    return line


def test_bad_input_is_refused_in_one_line_before_writing(tmp_path):
    out = tmp_path / "out"
    docs = ["alpha beta", "gamma", "delta epsilon"] * 4
    jsonl = write_jsonl(tmp_path / "d.jsonl", docs)
    refused(lambda: run([tmp_path / "nope.jsonl"], out), "'", "nope.jsonl", "does not exist")
    refused(lambda: run([write_jsonl(tmp_path / "b.jsonl", docs, field="body")], out),
            "b.jsonl line 1 has no field 'text'", "'body'", "--field")  # fmt: skip
    (tmp_path / "arr.jsonl").write_text('[{"text": "a"}]\n')
    refused(lambda: run([tmp_path / "arr.jsonl"], out), "line 1 is a JSON list, not an object")
    refused(lambda: run([write_parquet(tmp_path / "b.parquet", docs, field="body")], out),
            "has no field 'text'", "'body'", "--field")  # fmt: skip
    (tmp_path / "empty").mkdir()
    refused(lambda: run([tmp_path / "empty"], out), "no documents")
    refused(lambda: run([jsonl], out, dtype="uint32"), "no uint32", "int32")
    refused(lambda: run([jsonl], out, val_percent=100.0), "--val-percent (100.0)")
    refused(lambda: run([jsonl], out, tmp_path / "no_tok"), "tokenizer", "does not exist")
    garbage = tmp_path / "garbage" / "tokenizer.json"
    garbage.parent.mkdir()
    garbage.write_text("{}")
    refused(lambda: run([jsonl], out, garbage.parent), "is not a tokenizers file")
    plain = word_tokenizer(tmp_path / "plain", {"a": 0, "b": 1})
    refused(lambda: run([jsonl], out, plain), "no end-of-document token", "--eod-token")
    refused(lambda: run([jsonl], out, plain, eod_token="zz"), "'zz'", "is not a token")
    wide = word_tokenizer(tmp_path / "wide", {"alpha": 0, "<|endoftext|>": 70000},
                          ["<|endoftext|>"])  # fmt: skip
    refused(lambda: run([jsonl], out, wide, dtype="uint16"), "--dtype uint16", "70,001 ids")
    (tmp_path / "dict").mkdir()
    (tmp_path / "dict" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    refused(lambda: run([tmp_path / "dict"], out), "DatasetDict", "['train', 'test']", "--split")
    assert not out.exists()  # refused before anything was written

    m = run([jsonl], out, wide, val_percent=0.0)  # auto: int32 for ids past 65,535
    assert (m.dtype, m.tokenizer.vocab_size, m.tokenizer.eod_id) == ("int32", 70001, 70000)
    tokens = IndexedTokens.open(out / "train-00000").tokens
    assert tokens.dtype == np.int32 and tokens[:3].tolist() == [0, 0, 70000]  # unknown -> 0
    m = run([jsonl], tmp_path / "plain_out", plain, eod_token="b")
    assert m.tokenizer.eod_id == 1


def test_bad_rows_found_while_reading_leave_nothing_behind(tmp_path):
    lines = [json.dumps({"text": f"document {i}"}) for i in range(40)]
    lines[33] = json.dumps({"body": "no text here", "id": 33})
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    refused(lambda: run([tmp_path / "bad.jsonl"], out, unit_bytes=100),
            "bad.jsonl line 34 has no field 'text'", "['body', 'id']", "--field")  # fmt: skip
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"row {i}" for i in range(40)]
    texts[21] = None
    pq.write_table(pa.table({"text": texts}), tmp_path / "null.parquet", row_group_size=8)
    refused(lambda: run([tmp_path / "null.parquet"], out, unit_bytes=10), "row 21", "null")
    # JSON that pyarrow refuses and Python's json takes (a lone surrogate): named by file line.
    (tmp_path / "odd.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "\\udc00x"}\n')
    refused(lambda: run([tmp_path / "odd.jsonl"], out), "odd.jsonl line 4: JSON parse error")
    write_jsonl(tmp_path / "blank.jsonl", ["", "", ""])
    refused(lambda: run([tmp_path / "blank.jsonl"], out), "no documents", "all 3 texts are empty")
    assert not out.exists()  # the parts written before the bad row are gone with the folder


def test_the_output_folder_is_refused_unless_it_is_ours(tmp_path, monkeypatch):
    jsonl = write_jsonl(tmp_path / "d.jsonl", ["one", "two", "three"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    for overwrite in (False, True):
        refused(lambda o=overwrite: run([jsonl], out, overwrite=o), "not a prepared folder", "mine")
    (tmp_path / "file").write_text("x")
    refused(lambda: run([jsonl], tmp_path / "file"), "is a file")

    out = tmp_path / "done"
    run([jsonl], out, val_percent=0.0)
    (out / "notes.txt").write_text("mine")
    refused(lambda: run([jsonl], out), "already holds a finished prepared folder", "--overwrite")
    assert run([jsonl], out, val_percent=0.0, overwrite=True).train.documents == 3
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite replaced only its own files
    # --overwrite with input found bad while reading: the finished folder stays as it was.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "late.jsonl"
    bad.write_text("".join(json.dumps({"text": f"d{i}"}) + "\n" for i in range(30)) + '{"x": 1}\n')
    refused(lambda: run([bad], out, overwrite=True, unit_bytes=64), "line 31 has no field")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # Another prepare holding the folder: refused before the folder is looked at.
    import fcntl

    with open(out / ".prepare.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        refused(lambda: run([jsonl], out, overwrite=True), "another moeflow data prepare")
    assert (out / "manifest.json").read_bytes() == before["manifest.json"]

    def stop(*args):
        raise RuntimeError("stopped")

    unfinished = tmp_path / "unfinished"
    monkeypatch.setattr(prepare_module, "merge", stop)
    with pytest.raises(RuntimeError):
        run([jsonl], unfinished)
    monkeypatch.undo()
    refused(lambda: run([jsonl], unfinished, seed=1), "unfinished", "options.seed: 0 before, 1 "
            "now", "--overwrite")  # fmt: skip
    with open(jsonl, "a") as stream:
        stream.write('{"text": "four"}\n')
    refused(lambda: run([jsonl], unfinished), f"input file {jsonl} changed (", " bytes)")
    assert run([jsonl], unfinished, seed=1, overwrite=True).split_rule["seed"] == 1


def test_broken_megatron_pairs_are_refused_in_one_line(tmp_path):
    bpe = tokenizer_folder()
    run([write_jsonl(tmp_path / "d.jsonl", ["one", "two", "three"])], tmp_path / "p", val_percent=0)
    prefix = tmp_path / "p" / "train-00000"
    out = tmp_path / "out"
    refused(lambda: run([prefix], out), "Megatron", "--tokenizer")
    refused(lambda: run([prefix, tmp_path / "d.jsonl"], out, bpe), "alone")
    plain = word_tokenizer(tmp_path / "plain", {"a": 0, "b": 1})
    refused(lambda: run([prefix], out, plain, eod_token="b"), "holds id", "vocabulary of 2")
    bin_, idx = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    with open(bin_, "ab") as stream:
        stream.write(b"\0\0")
    refused(lambda: IndexedTokens.open(prefix), "bytes but its index", "rebuild")
    refused(lambda: run([prefix], out, bpe), "bytes but its index")
    idx.write_bytes(idx.read_bytes()[:-5])
    refused(lambda: run([prefix], out, bpe), "is truncated", "rebuild")
    idx.unlink()
    refused(lambda: run([bin_], out, bpe), "half of a Megatron corpus", ".idx must both exist")
    assert not out.exists()


def test_the_cli_prints_a_summary_and_errors_in_one_line(tmp_path, capsys):
    from moeflow.launch.cli import main

    jsonl = write_jsonl(tmp_path / "d.jsonl", documents()[:5])
    args = ["data", "prepare", str(jsonl), "--workers", "1", "--unit-bytes", "4KB", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "quiet")]) == 0
    assert capsys.readouterr().out == ""
    assert main([*args[:-1], "--out", str(tmp_path / "out"), "--val-percent", "0"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"prepared {tmp_path / 'out'}: 5 documents (val 0)") and "MB/s" in line
    for argv, words in (
        (["data", "prepare", str(tmp_path / "nope"), "--out", str(tmp_path / "x")], "nope"),
        (["data", "prepare", str(jsonl), "--out", "x", "--unit-bytes", "4 apples"], "4 apples"),
        (["data", "prepare", str(jsonl)], "--out"),
        (["data", "frob"], "unknown subcommand 'frob'"),
    ):
        with pytest.raises(SystemExit) as caught:
            main(argv)
        err = capsys.readouterr().err
        assert caught.value.code == 2 and err.count("\n") == 1 and words in err, err
        assert err.startswith("moeflow: error:")


def test_a_folder_without_tokenizer_json_loads_through_transformers(tmp_path):
    """The same BPE as a slow GPT-2 tokenizer folder (vocab.json + merges.txt): the same shards;
    and the tokenizer's hash names its files' contents, not the folder."""
    import shutil

    from tokenizers import Tokenizer

    bpe = tokenizer_folder()
    slow = tmp_path / "gpt2_slow"
    slow.mkdir()
    Tokenizer.from_file(str(bpe / "tokenizer.json")).model.save(str(slow))
    config = {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>"}  # fmt: skip
    (slow / "tokenizer_config.json").write_text(json.dumps(config))
    jsonl = write_jsonl(tmp_path / "d.jsonl", documents()[:8])
    fast, slow_m = run([jsonl], tmp_path / "a", bpe), run([jsonl], tmp_path / "b", slow)
    assert (fast.tokenizer.kind, slow_m.tokenizer.kind) == ("tokenizers", "transformers")
    assert (slow_m.tokenizer.vocab_size, slow_m.tokenizer.eod_id) == (2000, 0)
    assert folder_bytes(tmp_path / "b") == folder_bytes(tmp_path / "a")
    shutil.copytree(bpe, tmp_path / "renamed")
    assert load_tokenizer(tmp_path / "renamed").info.hash == fast.tokenizer.hash
    alone = tmp_path / "alone"  # a folder of just tokenizer.json is that file, by any name
    alone.mkdir()
    shutil.copy(bpe / "tokenizer.json", alone / "tokenizer.json")
    shutil.copy(bpe / "tokenizer.json", tmp_path / "my.json")
    hashes = {load_tokenizer(p).info.hash for p in (alone, tmp_path / "my.json")}
    assert hashes == {fast.tokenizer.hash}  # tokenizer.json and the end-of-document id make the ids

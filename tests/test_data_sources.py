"""The training side of prepared folders and Megatron corpora: mixtures drawn by weight and resumed
exactly, windows at document starts, reading shards in place, the unigram baseline for any ids,
and every bad input refused in one line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from moeflow.data.config import DataConfig, SourceConfig
from moeflow.data.corpus import check_corpus, load_corpus
from moeflow.data.indexed import IndexedTokens, IndexedWriter
from moeflow.data.manifest import Manifest, Shard, Split, TokenizerInfo
from moeflow.data.mixture import Mixture
from moeflow.data.source import Source
from moeflow.data.stream import BatchStream, document_windows
from moeflow.data.unigram import source_baseline

EOD = 1


def write_prepared(folder, docs_by_split, vocab=500, tok_hash="sha256:aa", shard_docs=3):
    """A prepared folder by hand: shards of `shard_docs` documents each, counts, a manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    splits, counts = {}, {}
    for split, docs in docs_by_split.items():
        shards = []
        for i in range(0, len(docs), shard_docs):
            part = docs[i : i + shard_docs]
            w = IndexedWriter(folder / f"{split}-{i // shard_docs:05d}", np.uint16)
            w.add_documents(np.concatenate(part), [len(d) for d in part])
            w.finish()
            shards.append(Shard(f"{split}-{i // shard_docs:05d}", len(part), sum(map(len, part))))
        tokens = sum(len(d) for d in docs)
        splits[split] = Split(documents=len(docs), tokens=tokens, text_bytes=3 * tokens,
                              shards=tuple(shards))  # fmt: skip
        np.save(folder / f"{split}.counts.npy", np.bincount(np.concatenate(docs), minlength=vocab))
        counts[split] = f"{split}.counts.npy"
    tok = TokenizerInfo(name="test-bpe", hash=tok_hash, kind="tokenizers", vocab_size=vocab,
                        eod_id=EOD)  # fmt: skip
    Manifest(tokenizer=tok, dtype="uint16", split_rule={"rule": "by hand"}, inputs=(),
             counts=counts, **splits).write(folder)  # fmt: skip
    return folder


def documents(rng, n, low, high, vocab=500):
    """n documents of random ids in [2, vocab) ending with EOD, lengths in [low, high)."""
    out = []
    for _ in range(n):
        d = rng.integers(2, vocab, rng.integers(low, high)).astype(np.uint16)
        d[-1] = EOD
        out.append(d)
    return out


@pytest.fixture
def two_sources(tmp_path):
    rng = np.random.default_rng(0)
    a = write_prepared(tmp_path / "code", {"train": documents(rng, 40, 20, 90),
                                           "val": documents(rng, 4, 40, 60)})  # fmt: skip
    b = write_prepared(tmp_path / "web", {"train": documents(rng, 30, 20, 90),
                                          "val": documents(rng, 4, 40, 60)})  # fmt: skip
    return a, b


def test_mixture_shares_hold_within_one_percent_and_any_stretch():
    mix = Mixture([0.7, 0.3])
    for start in (0, 123, 9_500, 1_000_003):  # across the cycle's end too
        got = sum(mix.source(i) == 1 for i in range(start, start + 1000)) / 1000
        assert abs(got - 0.3) <= 0.01
        assert mix.drawn(1, start + 1000) - mix.drawn(1, start) == round(got * 1000)
    three = Mixture([5, 3, 2])
    assert [three.drawn(s, 10_000) for s in range(3)] == [5000, 3000, 2000]
    with pytest.raises(ValueError, match=r"must be positive"):
        Mixture([1.0, 0.0])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_drawn_windows_follow_the_weights_and_resume_exactly(two_sources, world):
    corpus = load_corpus(DataConfig(kind="prepared", sources=(
        SourceConfig(path=str(two_sources[0]), weight=0.7),
        SourceConfig(path=str(two_sources[1]), weight=0.3))))  # fmt: skip
    marks = [np.asarray(s.train) for s in corpus.sources]

    def stream(rank):
        return BatchStream([s.train for s in corpus.sources], 8, 4, rank, world, seed=3,
                           weights=corpus.weights)  # fmt: skip

    for rank in range(world):
        s = stream(rank)
        drawn = [s.next_batch()[0] for _ in range(250)]  # 1,000 windows, several epochs
        rows = np.concatenate([x.numpy() for x in drawn])
        # Each window is a slice of the source the mixture names (checked against its tokens).
        sources = s.sources_of(0, 1000)
        for row, src in zip(rows[:60], sources[:60], strict=False):
            text = marks[src].tobytes()
            assert row.astype(np.uint16).tobytes() in text
        assert abs(sources.count(1) / 1000 - 0.3) <= 0.01
        resumed = stream(rank)
        resumed.load_state_dict(json.loads(json.dumps(s.state_dict())))
        skipped = stream(rank)
        skipped.skip(250)
        for _ in range(30):
            x = s.next_batch()[0]
            assert (resumed.next_batch()[0] == x).all() and (skipped.next_batch()[0] == x).all()


def test_prepared_shards_read_in_place_back_to_back(two_sources):
    corpus = load_corpus(DataConfig(kind="prepared", path=str(two_sources[0])))
    src = corpus.sources[0]
    pairs = sorted(two_sources[0].glob("train-*.idx"))
    whole = np.concatenate([IndexedTokens.open(str(p)[:-4]).tokens for p in pairs])
    assert len(pairs) > 3 and np.array_equal(np.asarray(src.train), whole)
    assert np.array_equal(src.train[100:400].__array__(), whole[100:400])  # across shards
    starts = src.doc_starts()
    assert (whole[starts[1:] - 1] == EOD).all() and starts[0] == 0
    assert src.vocab_size == 500 and src.eod_id == EOD and src.bytes_per_token == 3.0


def test_windows_can_start_at_documents(two_sources):
    corpus = load_corpus(DataConfig(kind="prepared", path=str(two_sources[0])))
    src, L = corpus.sources[0], 16
    starts = src.doc_starts()
    s = BatchStream(src.train, L, 4, 0, 1, 0, doc_starts=[starts], window_start="document")
    picked = s.sources[0].picked
    # Every document is cut from its first token every L tokens: its window starts, by hand.
    ends = np.append(starts[1:], len(src.train))
    by_hand = [
        a + k * L for a, b in zip(starts, ends, strict=True) for k in range(-(-(b - a) // L))
    ]
    assert picked.tolist() == [p for p in by_hand if p + L + 1 <= len(src.train)]
    tokens = np.asarray(src.train)
    rows = {tokens[p : p + L + 1].tobytes(): p for p in picked.tolist()}
    for _ in range(20):
        x, y = s.next_batch()
        full = torch.cat([x, y[:, -1:]], dim=1).numpy().astype(np.uint16)
        assert all(row.tobytes() in rows for row in full)  # each window is one of those
    assert document_windows(np.array([0, 5, 6, 30]), 40, 8).tolist() == [0, 5, 6, 14, 22, 30]


def test_unigram_baseline_from_counts_is_the_counted_one(two_sources):
    src = load_corpus(DataConfig(kind="prepared", path=str(two_sources[1]))).sources[0]
    from_counts = source_baseline(src)
    src.counts = None
    assert source_baseline(src) == pytest.approx(from_counts, rel=1e-12)
    # By hand: add-one unigram of the training ids, scored on the validation ids.
    train, val = (np.asarray(v).astype(np.int64) for v in (src.train, src.val))
    p = (np.bincount(train, minlength=500) + 1) / (len(train) + 500)
    nats = -np.log(p[val]).mean()
    assert from_counts[0] == pytest.approx(nats, rel=1e-12)
    assert from_counts[1] == pytest.approx(nats / math.log(2) / 3.0, rel=1e-12)


def test_megatron_corpus_reads_in_place_with_its_split(tmp_path):
    rng = np.random.default_rng(1)
    docs = documents(rng, 50, 10, 30)
    w = IndexedWriter(tmp_path / "web_text_document", np.uint16)
    w.add_documents(np.concatenate(docs), [len(d) for d in docs])
    w.finish()
    cfg = DataConfig(kind="megatron", path=str(tmp_path / "web_text_document"), val_percent=10)
    src = load_corpus(cfg).sources[0]
    assert np.array_equal(np.asarray(src.val), np.concatenate(docs[45:]))
    assert np.array_equal(np.asarray(src.train), np.concatenate(docs[:45]))
    with pytest.raises(
        ValueError,
        match=r"web_text_document.bin \(training documents\) holds token id \d+ at position \d+",
    ):
        check_corpus(load_corpus(cfg), vocab_size=256, seq_len=8, rank=0, world=1)


def test_bad_inputs_are_one_line_each(two_sources, tmp_path):
    code, web = two_sources

    def refused(match, seq_len=64, **data):
        with pytest.raises(ValueError, match=match) as info:
            corpus = load_corpus(DataConfig(**data))
            check_corpus(corpus, vocab_size=500, seq_len=seq_len, rank=0, world=1)
        assert "\n" not in str(info.value)

    with pytest.raises(ValueError, match=r"data.sources\[1\].weight \(0.0\) must be a number > 0"):
        DataConfig(kind="prepared", sources=(SourceConfig(path="a"),
                                             SourceConfig(path="b", weight=0.0)))  # fmt: skip
    other = write_prepared(tmp_path / "other", {"train": documents(np.random.default_rng(2), 9,
                           20, 40), "val": documents(np.random.default_rng(3), 3, 80, 90)},
                           tok_hash="sha256:bb")  # fmt: skip
    mixed = (SourceConfig(path=str(code)), SourceConfig(path=str(other)))
    refused(r"data: other was tokenized by 'test-bpe' \(sha256:bb\), not by 'test-bpe'",
            kind="prepared", sources=mixed)  # fmt: skip
    with pytest.raises(ValueError, match=r"has 500 ids but model.vocab_size is 256; set model"):
        check_corpus(load_corpus(DataConfig(kind="prepared", path=str(code))), 256, 8, 0, 1)
    refused(r"has no manifest.json: it is not a prepared folder", kind="prepared",
            path=str(tmp_path))  # fmt: skip
    refused(r"validation split has \d+ tokens, fewer than one window of 513", seq_len=512,
            kind="prepared", path=str(web))  # fmt: skip
    # A shard cut short, and an index cut short: named, with what to do.
    bin_ = web / "train-00001.bin"
    bin_.write_bytes(bin_.read_bytes()[:-2])
    refused(r"train-00001.bin is \d+ bytes but its index train-00001.idx says \d+", kind="prepared",
            path=str(web))  # fmt: skip
    idx = code / "val-00000.idx"
    idx.write_bytes(idx.read_bytes()[:-8])
    refused(r"val-00000.idx is truncated: \d+ bytes where its header", kind="prepared",
            path=str(code))  # fmt: skip
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "docs.jsonl").write_text('{"text": "hello"}\n')
    refused(r"holds docs.jsonl: data.kind = 'text' would train on its JSONL as bytes; tokenize "
            r"it with `moeflow data prepare", kind="text", path=str(tmp_path / "t"))  # fmt: skip
    tiny = Source("tiny", np.arange(10, dtype=np.uint16), np.arange(10, dtype=np.uint16), "", None)
    with pytest.raises(ValueError, match=r"rank 0's part of tiny has 10 tokens, fewer than one "):
        BatchStream(
            [tiny.train, np.arange(999)], 16, 2, 0, 1, 0, weights=[1, 1], names=["tiny", "b"]
        )


def tiny_run(tmp_path, data: dict, steps=3) -> dict:
    from moeflow.train.config import RunConfig

    return RunConfig.from_dict({
        "model": {"dim": 16, "n_layers": 1, "n_heads": 2, "max_seq_len": 16, "vocab_size": 512,
                  "moe": {"num_experts": 2, "ffn_hidden_size": 16}},
        "data": data,
        "train": {"steps": steps, "seq_len": 16, "micro_batch_size": 2, "eval_windows": 4,
                  "out_dir": str(tmp_path / "run")},
        "metrics": {"progress": False, "plot": False},
    })  # fmt: skip


def test_a_mixture_trains_and_reports_validation_per_source(two_sources, tmp_path, capsys):
    from moeflow.train.trainer import train

    sources = [{"path": str(two_sources[0]), "weight": 0.7},
               {"path": str(two_sources[1]), "weight": 0.3, "name": "w"}]  # fmt: skip
    cfg = tiny_run(tmp_path, {"kind": "prepared", "window_start": "document",
                              "document_mask": True, "sources": sources})  # fmt: skip
    result = train(cfg)
    out = capsys.readouterr().out
    assert "data code:" in out and "70% of the windows" in out and "data w:" in out
    records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    (val,) = [r for r in records if r["kind"] == "val"]
    per = val["sources"]
    assert set(per) == {"code", "w"}
    assert val["val_loss"] == pytest.approx(
        0.7 * per["code"]["val_loss"] + 0.3 * per["w"]["val_loss"]
    )
    # bytes per token 3.0 in both manifests: bits per byte = nats / ln 2 / 3
    assert per["w"]["val_bpb"] == pytest.approx(per["w"]["val_loss"] / math.log(2) / 3.0)
    assert result.unigram_bpb is not None and result.val_bpb is not None


def test_a_megatron_blend_trains(tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from moeflow.train.trainer import train

    rng = np.random.default_rng(4)
    for name in ("a", "b"):  # written by megatron-core's own builder, as preprocess_data.py does
        prefix = tmp_path / f"{name}_text_document"
        builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
        for doc in documents(rng, 30, 10, 40):
            builder.add_item(torch.from_numpy(doc.astype(np.int64)))
            builder.end_document()
        builder.finalize(f"{prefix}.idx")
    cfg = tiny_run(tmp_path, {"kind": "megatron", "val_percent": 20, "sources": [
        {"path": str(tmp_path / "a_text_document"), "weight": 2},
        {"path": str(tmp_path / "b_text_document"), "weight": 1}]}, steps=2)  # fmt: skip
    result = train(cfg, quiet=True)
    assert result.last_step == 2 and math.isfinite(result.val_loss) and result.val_bpb is None
    assert result.unigram_loss is not None


def test_a_hugging_face_model_takes_the_manifests_special_ids(two_sources):
    from types import SimpleNamespace

    from moeflow.train.build import take_special_ids

    config = SimpleNamespace(eos_token_id=0, bos_token_id=7)
    take_special_ids(config, DataConfig(kind="prepared", path=str(two_sources[0])))
    assert config.eos_token_id == EOD and config.bos_token_id == 7  # the manifest has no bos


def test_a_manifest_from_another_tokenizer_than_the_runs_is_refused(two_sources):
    from moeflow.data.source import Corpus
    from moeflow.train.run_data import RunData
    from tests.data_corpus import tokenizer_folder

    with pytest.raises(
        ValueError,
        match=r"data: code was tokenized by 'test-bpe' \(sha256:aa\), "
        r"not by '.+' \([0-9a-f]+, .+\): one model reads one tokenizer",
    ):
        load_corpus(DataConfig(kind="prepared", path=str(two_sources[0]),
                               tokenizer=str(tokenizer_folder())))  # fmt: skip
    data = RunData.__new__(RunData)  # a resumed run: the checkpoint's ids against the data's
    data.corpus = Corpus([load_corpus(DataConfig(kind="prepared", path=str(two_sources[0])))
                          .sources[0]])  # fmt: skip
    data.check_resume({"tokenizer": {"name": "test-bpe", "hash": "sha256:aa"}}, "ckpt")
    with pytest.raises(ValueError, match=r"--resume: ckpt was trained on ids of tokenizer 'gpt2'"):
        data.check_resume({"tokenizer": {"name": "gpt2", "hash": "sha256:ff"}}, "ckpt")


def test_a_tokenizer_hashes_alike_as_a_file_or_its_folder(tmp_path):
    """The ids come from tokenizer.json: given as the file or as its folder (which also holds a
    tokenizer_config.json), a prepared folder's manifest and the run's data.tokenizer agree."""
    import shutil

    from moeflow.data.tokenizer import load_tokenizer
    from tests.data_corpus import tokenizer_folder

    folder = tmp_path / "tok"
    shutil.copytree(tokenizer_folder(), folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    as_folder, as_file = load_tokenizer(folder).info, load_tokenizer(folder / "tokenizer.json").info
    assert as_folder.hash == as_file.hash and as_folder.eod_id == as_file.eod_id


def test_edge_cases_of_documents_and_weights(tmp_path, two_sources):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    # A pair whose documents include empty ones (Megatron writes one for an empty text), last too.
    prefix = tmp_path / "gaps_text_document"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    docs = [np.array([5, 6, EOD]), np.array([], dtype=np.int64), np.array([7, EOD])] * 4
    for doc in [*docs, np.array([], dtype=np.int64)]:
        builder.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)] if len(doc) else [])
    builder.finalize(f"{prefix}.idx")
    pair = IndexedTokens.open(prefix)
    assert pair.starts().tolist() == [0, 3, 3, 5, 8, 8, 10, 13, 13, 15, 18, 18, 20, 20]
    assert pair.document(12).tolist() == [] and pair.document(11).tolist() == [7, EOD]
    # Windows at documents on every rank, a document under way at a part's start included.
    one_doc = np.arange(1000, dtype=np.uint16)
    for rank in range(2):
        s = BatchStream(one_doc, 8, 2, rank, 2, 0, doc_starts=[np.array([0])],
                        window_start="document")  # fmt: skip
        assert s.sources[0].count == (500 - 1) // 8
    # Document masking of a Megatron pair whose documents do not end with the eod id: refused.
    w = IndexedWriter(tmp_path / "noeod", np.uint16)
    w.add_documents(np.array([5, 6, 7, 8, 9, 10], dtype=np.uint16), [3, 3])
    w.finish()
    from moeflow.data.prepared import megatron_source

    with pytest.raises(ValueError, match=r"document 0 of .*noeod ends with id 7, not the "
                       r"end-of-document id 1 .* --append-eod"):  # fmt: skip
        megatron_source(SourceConfig(path=str(tmp_path / "noeod")), 50, EOD, masked=True)
    # A prepared folder's short validation split: the fix is in data prepare.
    with pytest.raises(ValueError, match=r"prepare it again with a larger --val-percent"):
        check_corpus(load_corpus(DataConfig(kind="prepared", path=str(two_sources[0]))), 500,
                     4096, 0, 1)  # fmt: skip
    with pytest.raises(ValueError, match=r"less than one window in 10,000: it would never be"):
        Mixture([1.0, 4e-5])
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "rows.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"holds rows.parquet: data.kind = 'text' would train on "
                       r"its PARQUET as bytes"):  # fmt: skip
        load_corpus(DataConfig(kind="text", path=str(tmp_path / "p")))

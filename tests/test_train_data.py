"""Token sources and the per-rank batch stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeflow.data.config import DataConfig
from moeflow.data.corpus import load_corpus
from moeflow.data.stream import BatchStream, eval_batches


def test_stdlib_corpus_is_deterministic_and_split_by_file():
    cfg = DataConfig(max_bytes=300_000)
    a, b = load_corpus(cfg), load_corpus(cfg)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert len(a.train) == 300_000 and 0 < len(a.val) <= 300_000 // 9
    assert a.bytes_per_token == 1.0 and a.train.dtype == np.uint8
    # No validation file's bytes appear in training: a 64-byte probe from the middle of val.
    probe = bytes(a.val[len(a.val) // 2 : len(a.val) // 2 + 64])
    assert probe not in bytes(a.train)


def test_text_folder_split_by_file_and_single_file(tmp_path):
    for i in range(40):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document {i} " * 50)
    (tmp_path / "skip.bin").write_bytes(b"\x00" * 100)
    corpus = load_corpus(DataConfig(kind="text", path=str(tmp_path), glob="*.txt", max_bytes=0))
    total = sum(len(f"document {i} " * 50) for i in range(40))
    assert len(corpus.train) + len(corpus.val) == total and len(corpus.val) > 0
    single = load_corpus(
        DataConfig(kind="text", path=str(tmp_path / "doc00.txt"), val_percent=20, max_bytes=0)
    )
    assert len(single.val) == len("document 0 " * 50) - len(single.train)
    with pytest.raises(ValueError, match="no files found"):
        load_corpus(DataConfig(kind="text", path=str(tmp_path), glob="*.md"))
    with pytest.raises(ValueError, match=r"data.path \('/nope'\) does not exist"):
        load_corpus(DataConfig(kind="text", path="/nope"))


def test_uint16_token_files_are_memory_mapped(tmp_path):
    np.arange(5000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(500, dtype=np.uint16).tofile(tmp_path / "val.bin")
    corpus = load_corpus(DataConfig(kind="tokens", path=str(tmp_path)))
    assert isinstance(corpus.train, np.memmap) and corpus.train[4999] == 4999
    assert corpus.bytes_per_token is None
    (tmp_path / "val.bin").unlink()
    with pytest.raises(ValueError, match=r"val\.bin is missing"):
        load_corpus(DataConfig(kind="tokens", path=str(tmp_path)))


def test_stream_shards_are_disjoint_and_resume_exactly():
    tokens = np.arange(10_000, dtype=np.int64) % 60_000
    streams = [BatchStream(tokens, 16, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    seen = [set(), set()]
    for r, s in enumerate(streams):
        for _ in range(200):  # several epochs
            x, y = s.next_batch()
            assert (y[:, :-1] == x[:, 1:]).all()
            seen[r].update(x.flatten().tolist())
    assert seen[0].isdisjoint(seen[1])
    assert streams[0].windows > 2 * streams[0].num_windows  # several epochs
    a = BatchStream(tokens, 16, 4, rank=1, world_size=2, seed=3)
    for _ in range(37):
        a.next_batch()
    b = BatchStream(tokens, 16, 4, rank=1, world_size=2, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(100):
        xa, _ = a.next_batch()
        xb, _ = b.next_batch()
        assert (xa == xb).all()


def test_batches_on_the_device_are_the_streams_batches():
    """`next_batch_on` (what the trainer draws): the same inputs and targets as `next_batch`,
    on the device (pinned and copied asynchronously there; on a CPU, the rows themselves)."""
    tokens = np.arange(3000, dtype=np.int64)
    a, b = (BatchStream(tokens, 16, 4, rank=0, world_size=1, seed=1) for _ in range(2))
    devices = [torch.device("cpu")] + [torch.device("cuda")] * torch.cuda.is_available()
    for device in devices:
        for _ in range(3):
            (x, y), (xd, yd) = a.next_batch(), b.next_batch_on(device)
            assert xd.device.type == device.type
            assert torch.equal(xd.cpu(), x) and torch.equal(yd.cpu(), y)
    assert a.state_dict() == b.state_dict()


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_eval_windows_do_not_depend_on_world_size(world_size):
    tokens = np.arange(3000, dtype=np.int64)
    rows, batches = [], []
    for rank in range(world_size):
        mine = list(eval_batches(tokens, 16, num_windows=10, batch_size=3, rank=rank,
                                 world_size=world_size))  # fmt: skip
        batches.append(len(mine))
        rows += [x[i, 0].item() for x, _, mask in mine for i in range(len(mask)) if mask[i]]
    assert len(set(batches)) == 1  # every rank runs the same number of forwards
    single = [x[i, 0].item() for x, _, m in eval_batches(tokens, 16, 10, 3, 0, 1)
              for i in range(len(m))]  # fmt: skip
    assert sorted(rows) == sorted(single) and len(single) == 10


def test_skip_lands_where_drawing_would():
    tokens = np.arange(5000, dtype=np.int64)
    drawn = BatchStream(tokens, 16, 4, rank=0, world_size=1, seed=5)
    for _ in range(170):  # past two epoch boundaries (77 batches per epoch)
        drawn.next_batch()
    skipped = BatchStream(tokens, 16, 4, rank=0, world_size=1, seed=5)
    skipped.skip(170)
    assert skipped.state_dict() == drawn.state_dict()
    assert (skipped.next_batch()[0] == drawn.next_batch()[0]).all()


def test_uint32_token_files_hold_vocabularies_past_65536(tmp_path):
    ids = np.arange(70_000, 75_000, dtype=np.uint32)
    ids.tofile(tmp_path / "train.bin")
    ids[:500].tofile(tmp_path / "val.bin")
    corpus = load_corpus(DataConfig(kind="tokens", path=str(tmp_path), token_dtype="uint32"))
    assert corpus.train.dtype == np.uint32 and corpus.train[0] == 70_000
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "train.bin").write_bytes(b"\x00" * 6)
    (tmp_path / "odd" / "val.bin").write_bytes(b"\x00" * 8)
    with pytest.raises(ValueError, match=r"6 bytes, not a multiple of 4: it is not a uint32"):
        load_corpus(DataConfig(kind="tokens", path=str(tmp_path / "odd"), token_dtype="uint32"))
    from moeflow.train.config import RunConfig

    # A vocabulary uint16 cannot hold is refused before any file is read, naming the fix.
    with pytest.raises(ValueError, match=r'set data.token_dtype = "uint32"'):
        RunConfig.from_dict({"model": {"vocab_size": 151_936},
                             "data": {"kind": "tokens", "path": str(tmp_path)}})  # fmt: skip

"""Pretraining data: documents -> packed token shards -> deterministic, resumable batches (nanoseek.data.corpus)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nanoseek.data.corpus import BatchSampler, build_shards, open_shards, read_documents, token_dtype
from nanoseek.errors import UsageError


class ByteTok:
    """A stand-in tokenizer (bytes + EOS): the corpus code needs only vocab_size, eos_id and encode."""

    def __init__(self, vocab_size: int = 260):
        self.vocab_size, self.eos_id = vocab_size, 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def test_text_jsonl_and_parquet_files_become_documents(tmp_path):
    (tmp_path / "a.txt").write_text("a whole file is one document\n")
    with open(tmp_path / "b.jsonl", "w") as f:
        f.write(json.dumps({"text": "first line"}) + "\n\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                         {"role": "assistant", "content": "hello"}]}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["row one", "row two"]}), tmp_path / "c.parquet")
    docs = list(read_documents(tmp_path))  # a folder: its files in sorted order
    assert docs[0] == "a whole file is one document\n"
    assert docs[1] == "first line"
    assert "hi" in docs[2] and "hello" in docs[2]      # a chat rendered as one document
    assert docs[3:] == ["row one", "row two"]


def test_shards_pack_documents_with_eos_separators(tmp_path):
    tok = ByteTok()
    ds = build_shards(["ab", "", "cde"], tok, tmp_path / "data", source="test", progress=False)
    expected = [97, 98, 256, 256, 99, 100, 101, 256]   # every document, even an empty one, ends with EOS
    assert ds.shards[0].dtype == np.uint16
    assert ds.shards[0].tolist() == expected
    head = json.loads((tmp_path / "data" / "header.json").read_text())
    assert head["num_tokens"] == 8 and head["num_documents"] == 3 and head["eos_id"] == 256
    # reopened from disk: the same tokens; windows of seq_len + 1 tokens; targets are inputs shifted by one
    ds = open_shards(tmp_path / "data")
    assert ds.num_sequences(3) == 2
    x, y = ds.batch([1, 0], 3)
    assert x.tolist() == [[256, 99, 100], [97, 98, 256]]
    assert y.tolist() == [[99, 100, 101], [98, 256, 256]]


def test_shards_split_across_files_and_use_uint32_for_large_vocabularies(tmp_path):
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32
    tok = ByteTok(vocab_size=100_000)
    ds = build_shards(["abcdefgh"] * 3, tok, tmp_path / "d", shard_tokens=10, progress=False)
    assert [len(s) for s in ds.shards] == [10, 10, 7]
    assert all(s.dtype == np.uint32 for s in ds.shards)
    assert ds.num_sequences(4) == 2 + 2 + 1            # windows never cross a shard boundary
    x, _ = ds.batch([4], 4)
    assert x.tolist() == [[99, 100, 101, 102]]          # the third shard holds "cdefgh<eos>"


def test_sampler_is_seeded_covers_each_epoch_and_resumes_exactly():
    a, b = BatchSampler(10, 4, seed=7), BatchSampler(10, 4, seed=7)
    seq_a = np.concatenate([a.next_batch() for _ in range(5)])  # 20 indices = two epochs
    seq_b = np.concatenate([b.next_batch() for _ in range(5)])
    assert seq_a.tolist() == seq_b.tolist()
    assert sorted(seq_a[:10]) == list(range(10)) and sorted(seq_a[10:]) == list(range(10))
    assert seq_a[:10].tolist() != seq_a[10:].tolist()          # a new order each epoch
    assert BatchSampler(10, 4, seed=8).next_batch().tolist() != seq_a[:4].tolist()
    # resume: a fresh sampler given the state after 2 batches continues with batch 3
    c = BatchSampler(10, 4, seed=0)
    c.load_state_dict({"seed": 7, "consumed": 8, "num_sequences": 10})
    assert c.next_batch().tolist() == seq_a[8:12].tolist()
    with pytest.raises(UsageError, match="sequences"):
        c.load_state_dict({"seed": 7, "consumed": 8, "num_sequences": 11})


def test_bad_data_paths_raise_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        read_documents(tmp_path / "missing.txt")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UsageError, match="empty"):
        read_documents(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(UsageError, match="bad.jsonl:1"):
        list(read_documents(tmp_path / "bad.jsonl"))
    (tmp_path / "cut.jsonl").write_text('{"text": "fine"}\n\n{"text": "cut sho\n')   # user data: no line skipped
    with pytest.raises(UsageError, match=r"cut.jsonl:3: not valid JSON"):
        list(read_documents(tmp_path / "cut.jsonl"))
    with pytest.raises(UsageError, match="no text"):
        build_shards([], ByteTok(), tmp_path / "none", progress=False)
    assert not (tmp_path / "none").exists()


def test_embedded_corpus_is_tasks_with_worked_solutions():
    from nanoseek.data.corpus import default_documents

    docs = default_documents(20, seed=0)
    assert len(docs) == 20 and docs == default_documents(20, seed=0)
    assert all(isinstance(d, str) and d for d in docs)
    assert any("<think>" in d or "Answer" in d or "answer" in d for d in docs)


def test_jsonl_reader_modes(tmp_path):
    # one reader: strict for user data (file:line), tolerant of a cut last line (our logs), or collecting every
    # bad line so one error can name them all
    from nanoseek.data.jsonl import iter_jsonl, read_jsonl

    f = tmp_path / "x.jsonl"
    f.write_text('{"a": 1}\n{oops\n\n[2]\n{"b": \n')
    with pytest.raises(UsageError, match="x.jsonl:2: not valid JSON"):
        list(iter_jsonl(f))
    assert read_jsonl(f) == [{"a": 1}]                      # tolerant: stops at the first bad line
    bad: list[int] = []
    assert list(iter_jsonl(f, bad_lines=bad)) == [(1, {"a": 1}), (4, [2])] and bad == [2, 5]
    assert read_jsonl(tmp_path / "missing.jsonl") == []

"""Pretraining data: documents -> tokenized, packed shards on disk -> deterministic shuffled batches.

    docs = read_documents("data/")                  # .txt / .jsonl / .parquet files, or "hf:NAME[:split]"
    ds = build_shards(docs, tok, "OUT/data")        # OUT/data/header.json + shard-00000.bin ... (numpy memmap)
    sampler = BatchSampler(ds.num_sequences(T), global_batch, seed)
    x, y = ds.batch(sampler.next_batch(), T)         # (B, T) inputs and next-token targets

Packing (GPT-2 / nanoGPT style): every document is followed by the tokenizer's EOS token and all documents are
concatenated, so no token is wasted on padding; a training sequence is a window of T + 1 consecutive tokens and
attention may cross a document boundary (the EOS tells the model a new document began). Token ids are stored as
uint16 when the vocabulary fits (<= 65535 ids, half the disk and page cache), else uint32.

The sampler's position (`consumed` sequences) is all it needs to continue exactly where a run stopped, so it is
saved in the trainer state and a resumed run sees the same batches as an unbroken one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..chat_template import render_chat
from ..errors import UsageError
from .jsonl import iter_jsonl

SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".parquet")
HEADER = "header.json"
SHARD_TOKENS = 1 << 26   # 64M tokens (128 MB as uint16) per shard file


# --------------------------------------------------------------------------------------------- reading documents
def data_files(path: str | os.PathLike) -> list[Path]:
    """The files behind --data: one file, or every supported file under a folder (sorted, so the order is fixed)."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--data {path}: no such file or folder (expected .txt, .jsonl or .parquet files, "
                         f"or hf:DATASET for a Hugging Face dataset)")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
        if not files:
            raise UsageError(f"--data {path}: the folder holds no {', '.join(SUFFIXES)} files")
        return files
    if p.suffix not in SUFFIXES:
        raise UsageError(f"--data {path}: unsupported file type {p.suffix!r}; expected one of {', '.join(SUFFIXES)}")
    if p.stat().st_size == 0:
        raise UsageError(f"--data {path}: the file is empty")
    return [p]


def _messages_text(messages: list[dict], tokenizer=None) -> str:
    """A chat as one training document, rendered with the tokenizer's chat template (nanoseek's default template
    when no tokenizer is given yet, e.g. while training the tokenizer itself)."""
    if tokenizer is not None and hasattr(tokenizer, "apply_chat_template"):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    return render_chat(messages, add_generation_prompt=False)


def _jsonl_documents(f: Path, tokenizer=None) -> Iterator[str]:
    for n, row in iter_jsonl(f):  # strict: a line that is not JSON is an error naming file:line
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            yield row["text"]
        elif isinstance(row, dict) and isinstance(row.get("messages"), list):
            yield _messages_text(row["messages"], tokenizer)
        else:
            raise UsageError(f"{f}:{n}: expected an object with a \"text\" string or a \"messages\" list")


def _parquet_documents(f: Path, tokenizer=None) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(f"{f}: reading parquet needs pyarrow (pip install 'nanoseek[parquet]')") from None
    pf = pq.ParquetFile(f)
    cols = pf.schema_arrow.names
    col = "text" if "text" in cols else "messages" if "messages" in cols else None
    if col is None:
        raise UsageError(f"{f}: parquet file has columns {cols}; expected a \"text\" or \"messages\" column")
    for batch in pf.iter_batches(columns=[col], batch_size=1024):
        for v in batch.column(0).to_pylist():
            if v:
                yield v if col == "text" else _messages_text(v, tokenizer)


def _hf_documents(spec: str, tokenizer=None) -> Iterator[str]:
    """hf:NAME[:SPLIT] -> the "text" (or "messages") field of a Hugging Face dataset, streamed (needs network)."""
    name, _, split = spec[3:].partition(":")
    try:
        import datasets
    except ImportError:
        raise UsageError(f"--data {spec}: Hugging Face datasets need `pip install datasets`") from None
    try:
        ds = datasets.load_dataset(name, split=split or "train", streaming=True)
    except Exception as e:  # network, unknown name, gated dataset: all user-fixable
        raise UsageError(f"--data {spec}: could not open the dataset ({type(e).__name__}: {e})") from None
    for row in ds:
        if row.get("text"):
            yield row["text"]
        elif row.get("messages"):
            yield _messages_text(row["messages"], tokenizer)


def read_documents(path: str | os.PathLike, tokenizer=None) -> Iterator[str]:
    """Yield the documents of --data: a .txt/.md file is one document, a .jsonl line or parquet row is one
    document ("text", or "messages" rendered with the chat template), hf:NAME[:split] streams a dataset.

    Raises UsageError at once for a missing, empty or unsupported path (before any document is read).
    """
    if str(path).startswith("hf:"):
        return _hf_documents(str(path), tokenizer)
    files = data_files(path)

    def gen():
        for f in files:
            if f.suffix in (".jsonl", ".json"):
                yield from _jsonl_documents(f, tokenizer)
            elif f.suffix == ".parquet":
                yield from _parquet_documents(f, tokenizer)
            else:
                text = f.read_text(encoding="utf-8", errors="replace")
                if text.strip():
                    yield text
    return gen()


def default_documents(n: int = 4000, seed: int = 0) -> list[str]:
    """The embedded corpus (offline): verifiable tasks mixed with their worked solutions (nanoseek.data.tasks)."""
    from .tasks import corpus_documents

    return list(corpus_documents(n, seed=seed))


# --------------------------------------------------------------------------------------------- packed shards
def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65535 else np.uint32


@dataclass
class PackedData:
    """Packed token shards (read-only memmaps) and their header."""
    folder: Path
    header: dict
    shards: list[np.ndarray]

    @property
    def num_tokens(self) -> int:
        return int(self.header["num_tokens"])

    def num_sequences(self, seq_len: int) -> int:
        """How many non-overlapping (seq_len + 1)-token windows the shards hold (windows never cross shards)."""
        return sum(max(0, (len(s) - 1) // seq_len) for s in self.shards)

    def batch(self, indices, seq_len: int):
        """Window indices -> (inputs, targets) int64 arrays of shape (len(indices), seq_len)."""
        counts = np.cumsum([max(0, (len(s) - 1) // seq_len) for s in self.shards])
        rows = np.empty((len(indices), seq_len + 1), dtype=np.int64)
        for r, i in enumerate(indices):
            k = int(np.searchsorted(counts, i, side="right"))
            j = int(i) - (int(counts[k - 1]) if k else 0)
            rows[r] = self.shards[k][j * seq_len:j * seq_len + seq_len + 1]
        return rows[:, :-1], rows[:, 1:]


def _encode_all(tok, docs: Iterable[str], batch: int = 256) -> Iterator[list[int]]:
    """Token ids per document; uses the tokenizer's batch encoder when it has one (Rust threads)."""
    enc_batch = getattr(tok, "encode_batch", None)
    buf: list[str] = []
    for d in docs:
        buf.append(d)
        if len(buf) == batch:
            yield from (enc_batch(buf) if enc_batch else (tok.encode(t) for t in buf))
            buf = []
    if buf:
        yield from (enc_batch(buf) if enc_batch else (tok.encode(t) for t in buf))


def build_shards(docs: Iterable[str], tok, folder: str | os.PathLike, source: str = "",
                 shard_tokens: int = SHARD_TOKENS, progress: bool = True) -> PackedData:
    """Tokenize `docs`, append EOS after each, and write packed shards + header.json into `folder`.

    Written to `folder`.tmp then renamed, so a folder with a header is always complete. Raises UsageError when
    there is no text at all.
    """
    from tqdm import tqdm

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = token_dtype(tok.vocab_size)
    eos = tok.eos_id
    shards, n_docs, total = [], 0, 0
    buf = np.empty(shard_tokens, dtype=dtype)
    fill = 0

    def flush():
        nonlocal fill
        name = f"shard-{len(shards):05d}.bin"
        mm = np.memmap(tmp / name, dtype=dtype, mode="w+", shape=(fill,))
        mm[:] = buf[:fill]
        mm.flush()
        del mm
        shards.append({"file": name, "num_tokens": fill})
        fill = 0

    bar = tqdm(desc="tokenizing", unit="doc", disable=not progress, leave=False)
    for ids in _encode_all(tok, docs):
        ids = list(ids) + [eos]
        n_docs += 1
        total += len(ids)
        bar.update(1)
        arr = np.asarray(ids, dtype=np.int64)
        if arr.max(initial=0) >= tok.vocab_size:
            raise UsageError(f"the tokenizer produced id {int(arr.max())} >= its vocab_size {tok.vocab_size}")
        while len(arr):
            take = min(len(arr), shard_tokens - fill)
            buf[fill:fill + take] = arr[:take]
            fill += take
            arr = arr[take:]
            if fill == shard_tokens:
                flush()
    bar.close()
    if fill:
        flush()
    if n_docs == 0 or total == n_docs:  # no documents, or only empty ones (just the separators)
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"--data {source or folder}: no text found (empty documents)")
    header = {"format": "nanoseek-packed-v1", "dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size,
              "eos_id": eos, "num_tokens": total, "num_documents": n_docs, "source": source, "shards": shards}
    (tmp / HEADER).write_text(json.dumps(header, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return open_shards(folder)


def open_shards(folder: str | os.PathLike) -> PackedData:
    folder = Path(folder)
    try:
        header = json.loads((folder / HEADER).read_text())
        shards = [np.memmap(folder / s["file"], dtype=header["dtype"], mode="r", shape=(s["num_tokens"],))
                  for s in header["shards"]]
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{folder}: not a readable packed-token folder ({e})") from None
    return PackedData(folder, header, shards)


# --------------------------------------------------------------------------------------------- sampling
class BatchSampler:
    """Shuffled, epoch-based, deterministic: epoch e visits every window once in the order
    numpy.random.default_rng((seed, e)).permutation(n). Its whole state is (seed, consumed)."""

    def __init__(self, num_sequences: int, batch_size: int, seed: int = 0):
        if num_sequences <= 0:
            raise ValueError("no sequences to sample from")
        self.n, self.batch_size, self.seed = num_sequences, batch_size, seed
        self.consumed = 0
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng((self.seed, epoch)).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    @property
    def epoch(self) -> int:
        return self.consumed // self.n

    def next_batch(self) -> np.ndarray:
        """The next batch_size window indices (continuing into the next epoch's order when one ends)."""
        out = np.empty(self.batch_size, dtype=np.int64)
        for k in range(self.batch_size):
            e, i = divmod(self.consumed + k, self.n)
            out[k] = self._permutation(e)[i]
        self.consumed += self.batch_size
        return out

    def state_dict(self) -> dict:
        return {"seed": self.seed, "consumed": self.consumed, "num_sequences": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_sequences", self.n) != self.n:
            raise UsageError(f"the checkpoint was taken on data with {state['num_sequences']} sequences but the data "
                             f"now has {self.n}; resume with the same --data, --tokenizer and --seq-len")
        self.seed, self.consumed = int(state["seed"]), int(state["consumed"])

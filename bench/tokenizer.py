"""Tokenizer encode throughput: nanoseek's batch encode vs transformers' AutoTokenizer on the same folder, same run.

    .venv/bin/python bench/tokenizer.py [--docs 20000] [--vocab-size 1024] [--repeat 3]

Trains one tokenizer on the embedded task corpus, saves it, loads it with transformers.AutoTokenizer, and times
encoding the same documents three ways: `tok.encode(list)` (one parallel Rust batch call), transformers'
`tokenizer(list)` (what HF pipelines use), and a Python loop of `tok.encode(text)` (what a naive data pipeline
does). Checks all three give the same ids, then prints documents/s and tokens/s, best of --repeat, and ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import time


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from nanoseek.data.tasks import corpus_documents
    from nanoseek.tokenizer import Tokenizer

    docs = list(corpus_documents(args.docs, seed=0))
    tok = Tokenizer.train(docs, args.vocab_size, progress=False)
    with tempfile.TemporaryDirectory() as folder:
        tok.save(folder)
        hf = AutoTokenizer.from_pretrained(folder)
    ours = tok.encode(docs)
    assert ours == hf(docs, add_special_tokens=False)["input_ids"]
    assert ours[:1000] == [tok.encode(d) for d in docs[:1000]]
    n_tokens = sum(map(len, ours))
    rows = [
        ("nanoseek tok.encode(list)", best_of(lambda: tok.encode(docs), args.repeat)),
        ("transformers tokenizer(list)", best_of(lambda: hf(docs, add_special_tokens=False), args.repeat)),
        ("nanoseek loop of tok.encode(str)", best_of(lambda: [tok.encode(d) for d in docs], args.repeat)),
    ]
    print(f"{len(docs)} documents, {n_tokens} tokens, vocab {tok.vocab_size}")
    print(f"{'method':<34}{'docs/s':>10}{'tokens/s':>12}")
    for name, t in rows:
        print(f"{name:<34}{len(docs) / t:>10.0f}{n_tokens / t:>12.0f}")
    base = rows[0][1]
    print(f"ratio nanoseek batch / transformers: {rows[1][1] / base:.2f}x")
    print(f"ratio nanoseek batch / python loop:  {rows[2][1] / base:.2f}x")


if __name__ == "__main__":
    main()

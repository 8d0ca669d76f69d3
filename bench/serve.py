"""Serving load test: N concurrent streaming clients against `nanoseek serve`, over loopback, same run as its peers.

    .venv/bin/python bench/serve.py [--model DIR | --preset cpu] [--clients 16] [--requests 64] [--max-tokens 64]
                                    [--streams 64] [--overload 256]

Starts `nanoseek serve` in a subprocess on a free 127.0.0.1 port (--max-concurrency = --clients, --max-queue), then
measures with vLLM's benchmark definitions: TTFT (request sent -> first streamed token), TPOT ((latency - TTFT) /
(output tokens - 1)), ITL (gaps between chunks), end-to-end latency, request and output-token throughput, errors.
Requests use EOS-ignoring sampling with a fixed max_tokens so every run generates the same number of tokens.

Phases: 1 client (sequential), --clients clients, --streams concurrent streams (one request each; more than the
engine batch, within what the queue admits: all must complete), then an overload of --overload concurrent streams,
more than --max-concurrency + --max-queue: the excess must be answered 429 with Retry-After at once, nothing may be
a 5xx or a reset, and the server must be healthy after (/health ok, no request or cache block left, and a normal
request completes). The run exits 1 on any error of the first three phases or any failed overload check.

Peers, measured in the same run on the same weights and prompts:
  * 1 client: the same requests one after the other through the server -> the gain of continuous batching;
  * engine.generate on the same prompts at the same batch size, no HTTP -> what the HTTP/SSE layer costs.
Bounded: at most --requests requests and --time-limit seconds per phase; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

WORDS = ("the model reads a prompt and writes an answer one token at a time while the cache keeps the latent of "
         "every token so that attention over the past costs little memory").split()


def build_model(preset: str, folder: Path):
    """A random-weight model of `preset` with a small BPE tokenizer: enough to time the serving path."""
    import nanoseek as ns
    from nanoseek.tokenizer import Tokenizer
    cfg = ns.ModelConfig.preset(preset)
    corpus = [" ".join(random.Random(i).choices(WORDS, k=200)) for i in range(50)]
    tok = Tokenizer.train(iter(corpus), vocab_size=min(cfg.vocab_size, 512), progress=False)
    torch.manual_seed(0)
    model = ns.Transformer(cfg.replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id))
    ns.save(model.eval(), folder, tokenizer=tok)
    return str(folder)


def prompts(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=words)) for _ in range(n)]


class Server:
    """`nanoseek serve` in its own process (as it runs for real: the load generator must not share its GIL)."""

    def __init__(self, folder: str, clients: int, queue: int, max_seq_len: int, threads: int, device: str):
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            port = sk.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.cmd = [sys.executable, "-m", "nanoseek", "serve", "--model", folder, "--port", str(port),
                    "--max-concurrency", str(clients), "--max-queue", str(queue), "--max-seq-len", str(max_seq_len),
                    "--device", device, "--served-model-name", "bench"]
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NANOSEEK_API_KEY": ""}

    def __enter__(self):
        import httpx
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.log.seek(0)
                raise RuntimeError("the server did not start:\n" + self.log.read().decode(errors="replace")[-3000:])
            time.sleep(0.2)

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def one_request(client, url: str, prompt: str, max_tokens: int) -> dict:
    """One streamed request's timings, or its "error" (with the HTTP "status", None when the connection failed)."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, stamps, usage, error, status = None, [], None, None, None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            status = r.status_code
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}", "status": r.status_code,
                        "retry_after": r.headers.get("retry-after"), "secs": time.perf_counter() - t0}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]["message"]
                    break
                if chunk.get("usage"):
                    usage = chunk["usage"]
                d = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
                if d.get("content") or d.get("reasoning_content"):
                    now = time.perf_counter()
                    first = first or now
                    stamps.append(now)
    except Exception as e:  # a load test counts failures, it does not stop at the first
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    if error or usage is None or first is None:
        return {"error": error or "no tokens / no usage", "status": status}
    n = usage["completion_tokens"]
    return {"status": 200, "ttft": first - t0, "latency": end - t0, "tokens": n,
            "tpot": (end - first) / (n - 1) if n > 1 else 0.0,
            "itl": [b - a for a, b in zip(stamps, stamps[1:])]}


async def load(url: str, texts: list[str], clients: int, max_tokens: int, time_limit: float) -> tuple[list, float]:
    import httpx
    queue = list(texts)
    results = []
    deadline = time.perf_counter() + time_limit

    async def client_loop(c):
        while queue and time.perf_counter() < deadline:
            results.append(await one_request(c, url, queue.pop(), max_tokens))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=max(60.0, time_limit), limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*[client_loop(c) for _ in range(clients)])
        return results, time.perf_counter() - t0


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def summarize(name: str, results: list, secs: float) -> dict:
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    toks = sum(r["tokens"] for r in ok)
    itl = [x for r in ok for x in r["itl"]]
    s = {"name": name, "requests": len(results), "errors": len(errors), "seconds": secs,
         "req_per_s": len(ok) / secs, "tok_per_s": toks / secs,
         "ttft_p50": pct([r["ttft"] for r in ok], 50), "ttft_p99": pct([r["ttft"] for r in ok], 99),
         "tpot_mean": statistics.fmean([r["tpot"] for r in ok]) if ok else float("nan"),
         "tpot_p99": pct([r["tpot"] for r in ok], 99), "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99),
         "e2e_p50": pct([r["latency"] for r in ok], 50)}
    if errors:
        print(f"  {name}: {len(errors)} errors, first: {errors[0]}", file=sys.stderr)
    return s


def overload_summary(results: list, secs: float) -> dict:
    """The overload phase's answers by kind: completed streams, 429s (with Retry-After, and how fast they came),
    5xx, and any other failure (a reset, a broken stream, another status)."""
    done = [r for r in results if "error" not in r]
    busy = [r for r in results if r.get("status") == 429]
    server_errors = [r for r in results if (r.get("status") or 0) >= 500]
    other = [r for r in results if "error" in r and r not in busy and r not in server_errors]
    for r in (server_errors + other)[:3]:
        print(f"  overload: {r['error']}", file=sys.stderr)
    return {"requests": len(results), "completed": len(done), "rejected_429": len(busy),
            "with_retry_after": sum(1 for r in busy if r.get("retry_after")), "server_errors": len(server_errors),
            "other_failures": len(other), "reject_p50": pct([r["secs"] for r in busy], 50),
            "reject_p99": pct([r["secs"] for r in busy], 99), "seconds": secs,
            "tok_per_s": sum(r["tokens"] for r in done) / secs}


async def health_burst(url: str, n: int) -> list[float]:
    """n concurrent GET /health from one client, as the overload's streams start: the seconds each answer took.
    The baseline of the 429s' latency (what connecting n clients at once costs on this machine)."""
    import httpx
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=60, limits=limits) as c:
        t0 = time.perf_counter()

        async def one():
            (await c.get(url + "/health")).raise_for_status()
            return time.perf_counter() - t0

        return await asyncio.gather(*[one() for _ in range(n)])


def healthy_after(url: str, prompt: str, max_tokens: int) -> dict:
    """After the overload: /health ok, every request and cache block released (within 10 s), and a normal
    (non-streamed) request completes with all its tokens."""
    import httpx

    def gauges() -> dict[str, float]:
        lines = httpx.get(url + "/metrics", timeout=10).text.splitlines()
        return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in lines if ln and not ln.startswith("#"))}

    health = httpx.get(url + "/health", timeout=10)
    deadline = time.time() + 10
    while True:
        g = gauges()
        drained = not (g["nanoseek_requests_running"] or g["nanoseek_requests_waiting"]
                       or g["nanoseek_cache_blocks_used"])
        if drained or time.time() > deadline:
            break
        time.sleep(0.1)
    r = httpx.post(url + "/v1/chat/completions", timeout=120,
                   json={"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                         "ignore_eos": True, "temperature": 0})
    return {"health_ok": health.status_code == 200 and health.json().get("status") == "ok", "drained": drained,
            "normal_request_ok": r.status_code == 200 and r.json()["usage"]["completion_tokens"] == max_tokens}


def overload_ok(over: dict) -> bool:
    return (over["server_errors"] == over["other_failures"] == 0 and over["rejected_429"] > 0
            and over["with_retry_after"] == over["rejected_429"] and over["health_ok"] and over["drained"]
            and over["normal_request_ok"])


def server_phases(srv, args, texts: list[str], seq_texts: list[str]) -> tuple[list[dict], dict]:
    """The load phases against a running server: (rows of the streaming phases, the overload's summary)."""
    asyncio.run(load(srv.url, prompts(2, args.prompt_words, seed=2), 2, 4, 30))          # warm-up
    rows = []
    res, secs = asyncio.run(load(srv.url, seq_texts, 1, args.max_tokens, args.time_limit))
    rows.append(summarize("server, 1 client", res, secs))
    res, secs = asyncio.run(load(srv.url, texts, args.clients, args.max_tokens, args.time_limit))
    rows.append(summarize(f"server, {args.clients} clients", res, secs))
    if args.streams:   # one request per stream, all at once: more than the engine batch, all admitted
        res, secs = asyncio.run(load(srv.url, prompts(args.streams, args.prompt_words, seed=3), args.streams,
                                     args.max_tokens, args.time_limit))
        rows.append(summarize(f"server, {args.streams} streams", res, secs))
    over = {}
    if args.overload:
        burst = asyncio.run(health_burst(srv.url, args.overload))
        res, secs = asyncio.run(load(srv.url, prompts(args.overload, args.prompt_words, seed=4), args.overload,
                                     args.max_tokens, args.time_limit))
        over = overload_summary(res, secs)
        over.update(health_burst_p50=pct(burst, 50), health_burst_p99=pct(burst, 99))
        over.update(healthy_after(srv.url, seq_texts[0], args.max_tokens))
    return rows, over


def print_overload(args, over: dict) -> None:
    admitted = args.clients + args.max_queue
    print(f"\noverload: {over['requests']} concurrent streams against --max-concurrency {args.clients} + --max-queue "
          f"{args.max_queue} = {admitted} admitted")
    print(f"  completed {over['completed']}, 429 {over['rejected_429']} "
          f"(with Retry-After: {over['with_retry_after']}; answered in p50 {over['reject_p50'] * 1e3:.0f} ms, "
          f"p99 {over['reject_p99'] * 1e3:.0f} ms; {over['requests']} concurrent GET /health: p50 "
          f"{over['health_burst_p50'] * 1e3:.0f} ms, p99 {over['health_burst_p99'] * 1e3:.0f} ms), "
          f"5xx {over['server_errors']}, other failures {over['other_failures']}; "
          f"{over['tok_per_s']:.1f} output tok/s over {over['seconds']:.1f} s")
    print(f"  after: /health ok {over['health_ok']}, all requests and cache blocks released {over['drained']}, "
          f"a normal request completes {over['normal_request_ok']} -> {'PASS' if overload_ok(over) else 'FAIL'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a model folder (default: a random --preset model)")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--clients", type=int, default=16, help="concurrent streaming clients (= engine batch)")
    ap.add_argument("--requests", type=int, default=64, help="requests in the concurrent phase")
    ap.add_argument("--max-queue", type=int, default=64, help="the server's --max-queue")
    ap.add_argument("--streams", type=int, default=64, help="concurrent streams of the streams phase (0: skip)")
    ap.add_argument("--overload", type=int, default=256,
                    help="concurrent streams of the overload phase, above --clients + --max-queue (0: skip)")
    ap.add_argument("--sequential-requests", type=int, default=8, help="requests in the 1-client phase")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=40)
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds per phase at most")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if not (1 <= args.clients <= 256 and 1 <= args.requests <= 10000 and args.max_tokens >= 2):
        ap.error("need 1 <= --clients <= 256, 1 <= --requests <= 10000, --max-tokens >= 2")
    admitted = args.clients + args.max_queue
    if not (0 <= args.streams <= admitted and (args.overload == 0 or admitted < args.overload <= 1000)):
        ap.error(f"need --streams <= --clients + --max-queue ({admitted}: all are admitted) and, unless 0, "
                 f"{admitted} < --overload <= 1000 (the excess must be refused)")
    torch.set_num_threads(args.threads)

    from nanoseek.infer.engine import SamplingParams
    from nanoseek.serve.app import load_engine

    tmp = tempfile.TemporaryDirectory()
    folder = args.model or build_model(args.preset, Path(tmp.name) / "model")
    ctx = args.prompt_words * 4 + args.max_tokens + 64
    texts = prompts(args.requests, args.prompt_words)
    seq_texts = prompts(args.sequential_requests, args.prompt_words, seed=1)

    # peer: the engine alone in this process, on the same weights and prompts (through the chat template), batched
    # the same way. Timed before and after the server phases (best of the two: the machine is shared); the prefix
    # cache is emptied first so that no phase reuses another's prompts.
    engine, tok = load_engine(folder, max_batch=args.clients, max_seq_len=ctx, device=args.device)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    ids = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=True) for t in texts]

    def engine_alone() -> tuple[float, int]:
        engine.reset_prefix_cache()
        t0 = time.perf_counter()
        comps = engine.generate(ids, params)
        return time.perf_counter() - t0, sum(c.completion_tokens for c in comps)

    engine.generate(ids[:2], SamplingParams(temperature=0, max_tokens=4))                    # warm-up
    eng_secs, eng_tokens = engine_alone()
    with Server(folder, args.clients, args.max_queue, ctx, args.threads, args.device) as srv:
        rows, over = server_phases(srv, args, texts, seq_texts)
    eng_secs = min(eng_secs, engine_alone()[0])
    eng_tps = eng_tokens / eng_secs
    tmp.cleanup()

    print(f"\nserve load test: {args.requests} requests x {args.max_tokens} tokens, prompts of ~{args.prompt_words} "
          f"words, model {args.model or 'random ' + args.preset}, {args.threads} torch thread(s), {args.device}\n")
    print(f"{'phase':<24}{'reqs':>6}{'errors':>7}{'req/s':>8}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}"
          f"{'TPOT mean':>11}{'TPOT p99':>10}{'ITL p99':>9}")
    for r in rows:
        print(f"{r['name']:<24}{r['requests']:>6}{r['errors']:>7}{r['req_per_s']:>8.2f}{r['tok_per_s']:>9.1f}"
              f"{r['ttft_p50'] * 1e3:>8.0f}ms{r['ttft_p99'] * 1e3:>8.0f}ms{r['tpot_mean'] * 1e3:>9.1f}ms"
              f"{r['tpot_p99'] * 1e3:>8.1f}ms{r['itl_p99'] * 1e3:>7.1f}ms")
    print(f"{'engine.generate':<24}{len(ids):>6}{0:>7}{len(ids) / eng_secs:>8.2f}{eng_tps:>9.1f}")
    seq, conc = rows[:2]
    print(f"\nratio {args.clients} clients / 1 client (continuous batching): "
          f"{conc['tok_per_s'] / seq['tok_per_s']:.2f}x output tokens/s")
    print(f"ratio server / engine.generate at batch {args.clients} (HTTP + SSE + worker thread cost): "
          f"{conc['tok_per_s'] / eng_tps:.2f}x output tokens/s")
    errors = sum(r["errors"] for r in rows)
    print(f"errors: {errors}")
    if over:
        print_overload(args, over)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "overload": over, "engine_tok_per_s": eng_tps,
                                               "args": vars(args)}, indent=2))
    return 1 if errors or (over and not overload_ok(over)) else 0


if __name__ == "__main__":
    sys.exit(main())

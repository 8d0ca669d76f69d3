"""The engine thread: the one thread that touches the (single-threaded) Engine, and the server's metrics.

The HTTP side runs on an asyncio loop; the engine runs here. A request becomes a `Job` with its own asyncio.Queue.
`EngineWorker.submit` admits it (or refuses at once when the bounded queue is full: backpressure, never an unbounded
queue), the thread moves at most `max_concurrency` jobs into the engine, calls `engine.step()` and hands each
StreamDelta to its job's queue with `loop.call_soon_threadsafe` (asyncio queues are not thread-safe).
`cancel` (a client that went away) asks the thread to `engine.abort` the request, which frees its cache blocks.

Metrics are written by hand in the Prometheus text format (exposition format 0.0.4): a few counters, gauges and
two histograms do not justify a dependency.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("nanoseek.serve")


class QueueFull(Exception):
    """More requests than max_concurrency running + max_queue waiting: the caller answers 429."""


class WorkerDead(Exception):
    """The engine thread is stopped (shutdown, or it crashed): the caller answers 503."""


class RequestFailed(RuntimeError):
    """This request alone failed inside the engine (its sampling, detokenising, stop rules, or the batched forward
    it was in); the others go on. The message is the engine's `error` ("sampling failed: ValueError: ..."),
    `completion` the Completion so far (finish_reason "error"). Not the client's fault (the engine checks a
    request's parameters when it is added): the caller answers 500 engine_error, for this request only."""

    def __init__(self, message: str, completion=None):
        super().__init__(message)
        self.completion = completion


@dataclass
class Job:
    """One request on its way through the engine. Items put on `queue`: StreamDelta, or an Exception (then done):
    the engine's refusal from add_request (UsageError / ValueError), RequestFailed, WorkerDead, or a RuntimeError
    when a whole engine step failed."""
    request_id: str
    prompt: list[int]
    params: Any                          # SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None     # perf_counter of the first delta that carried tokens
    last_token: float | None = None
    n_tokens: int = 0
    state: str = "pending"               # pending -> running -> done
    finish_reason: str | None = None

    def push(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:             # the loop is closed (server shutting down): nobody is listening
            pass


# --------------------------------------------------------------------------------------------- metrics
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # last one: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.buckets + (float("inf"),), self.counts):
            acc += c
            le = "+Inf" if b == float("inf") else repr(float(b))
            out.append(f'{name}_bucket{{le="{le}"}} {acc}')
        out += [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """Counters and histograms shared by the HTTP side and the engine thread (hence the lock)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}     # (endpoint, status) -> count
        self.finished: dict[str, int] = {}                  # finish_reason -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefix_hit_tokens = 0
        self.rejected = 0                                   # 429s from backpressure
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    def count_request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def render(self, worker: EngineWorker | None) -> str:
        """The Prometheus text exposition of everything above plus the engine's gauges."""
        L: list[str] = []

        def metric(name, kind, help_, samples):
            L.append(f"# HELP {name} {help_}")
            L.append(f"# TYPE {name} {kind}")
            L.extend(samples)

        with self.lock:
            metric("nanoseek_requests_total", "counter", "HTTP requests answered, by endpoint and status code.",
                   [f'nanoseek_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())] or ['nanoseek_requests_total{endpoint="",status=""} 0'])
            metric("nanoseek_request_finish_total", "counter", "Generations ended, by finish reason.",
                   [f'nanoseek_request_finish_total{{reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]
                   or ['nanoseek_request_finish_total{reason="stop"} 0'])
            metric("nanoseek_rejected_requests_total", "counter", "Requests refused with 429 because the queue was full.",
                   [f"nanoseek_rejected_requests_total {self.rejected}"])
            metric("nanoseek_prompt_tokens_total", "counter", "Prompt tokens admitted to the engine.",
                   [f"nanoseek_prompt_tokens_total {self.prompt_tokens}"])
            metric("nanoseek_generation_tokens_total", "counter", "Tokens generated.",
                   [f"nanoseek_generation_tokens_total {self.generation_tokens}"])
            metric("nanoseek_prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
                   [f"nanoseek_prefix_cache_hit_tokens_total {self.prefix_hit_tokens}"])
            metric("nanoseek_time_to_first_token_seconds", "histogram", "Request arrival to first generated token.",
                   self.ttft.lines("nanoseek_time_to_first_token_seconds"))
            metric("nanoseek_time_per_output_token_seconds", "histogram", "Latency per generated token after the first.",
                   self.tpot.lines("nanoseek_time_per_output_token_seconds"))
            metric("nanoseek_e2e_request_latency_seconds", "histogram", "Request arrival to its last token.",
                   self.e2e.lines("nanoseek_e2e_request_latency_seconds"))
        if worker is not None:
            s = worker.snapshot()
            gauges = [
                ("nanoseek_requests_running", "Requests inside the engine (at most --max-concurrency).", s["running"]),
                ("nanoseek_requests_waiting", "Requests queued for an engine slot (at most --max-queue).", s["waiting"]),
                ("nanoseek_engine_requests_running", "Requests the engine is decoding.", s["engine_running"]),
                ("nanoseek_engine_requests_waiting", "Requests admitted to the engine but waiting for cache blocks.",
                 s["engine_waiting"]),
                ("nanoseek_cache_blocks_used", "Latent KV-cache blocks in use.", s["blocks_used"]),
                ("nanoseek_cache_blocks_total", "Latent KV-cache blocks allocated.", s["blocks_total"]),
                ("nanoseek_cache_usage_ratio", "Fraction of the KV-cache blocks in use.",
                 s["blocks_used"] / s["blocks_total"] if s["blocks_total"] else 0.0),
                ("nanoseek_engine_alive", "1 while the engine thread runs.", int(worker.alive)),
            ]
            for name, help_, v in gauges:
                metric(name, "gauge", help_, [f"{name} {v}"])
        return "\n".join(L) + "\n"


# --------------------------------------------------------------------------------------------- the thread
class EngineWorker:
    """Owns the engine: one thread admits jobs, steps the engine and dispatches deltas."""

    def __init__(self, engine, max_concurrency: int = 16, max_queue: int = 64, metrics: Metrics | None = None):
        if max_concurrency < 1 or max_queue < 0:
            raise ValueError(f"max_concurrency must be >= 1 and max_queue >= 0 (got {max_concurrency}, {max_queue})")
        self.engine = engine
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._cv = threading.Condition()
        self._pending: deque[Job] = deque()        # accepted, not yet in the engine
        self._running: dict[str, Job] = {}         # in the engine
        self._aborts: list[Job] = []               # running jobs whose client went away
        self._stop = False
        self._ids = itertools.count()
        self._stats = self._engine_stats()
        self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ called from the event loop
    def start(self) -> EngineWorker:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop

    def submit(self, prompt: list[int], params, request_id: str | None = None) -> Job:
        """Queue a request (non-blocking). Raises QueueFull when max_concurrency + max_queue are taken."""
        loop = asyncio.get_running_loop()
        with self._cv:
            if not self.alive:
                raise WorkerDead("the engine thread is not running")
            if len(self._running) + len(self._pending) >= self.max_concurrency + self.max_queue:
                with self.metrics.lock:
                    self.metrics.rejected += 1
                raise QueueFull(f"{self.max_concurrency} requests running and {self.max_queue} waiting")
            job = Job(request_id or f"req-{next(self._ids)}", list(prompt), params, loop, asyncio.Queue())
            self._pending.append(job)
            self._cv.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job if it waits, abort it in the engine if it runs. Idempotent."""
        with self._cv:
            if job.state == "pending":
                try:
                    self._pending.remove(job)
                except ValueError:
                    pass
                job.state = "done"
                self._finish_metrics(job, "abort", None)
            elif job.state == "running" and job not in self._aborts:
                self._aborts.append(job)
                self._cv.notify()

    def snapshot(self) -> dict:
        """Server and engine gauges, as of the engine thread's last step (never touches the engine itself)."""
        with self._cv:
            s = dict(self._stats)
            s["running"], s["waiting"] = len(self._running), len(self._pending)
        return s

    # ------------------------------------------------------------------ the engine thread
    def _engine_stats(self) -> dict:
        st = dict(self.engine.stats())
        return {
            "engine_running": int(st.get("running", 0)), "engine_waiting": int(st.get("waiting", 0)),
            "blocks_used": int(st.get("blocks_used", 0)), "blocks_total": int(st.get("blocks_total", 0)),
            "engine": st,
        }

    def _finish_metrics(self, job: Job, reason: str, completion) -> None:
        job.finish_reason = reason
        with self.metrics.lock:
            m = self.metrics
            m.finished[reason] = m.finished.get(reason, 0) + 1
            if completion is not None:
                m.prefix_hit_tokens += int(getattr(completion, "cached_tokens", 0) or 0)
            if job.last_token is not None:
                m.e2e.observe(job.last_token - job.submitted)

    def _run(self) -> None:
        eng = self.engine
        while True:
            with self._cv:
                # (an aborted request's final delta is emitted by the engine's next step: step until it is out)
                while not (self._stop or self._pending or self._aborts or self._running or eng.has_unfinished()):
                    self._cv.wait()
                if self._stop:
                    break
                aborts, self._aborts = self._aborts, []
                admit = []
                while self._pending and len(self._running) + len(admit) < self.max_concurrency:
                    job = self._pending.popleft()
                    job.state = "running"
                    admit.append(job)
                for job in admit:
                    self._running[job.request_id] = job
            try:
                for job in aborts:
                    with self._cv:
                        was_running = self._running.pop(job.request_id, None) is not None
                        job.state = "done"
                    if was_running:
                        eng.abort(job.request_id)
                        self._finish_metrics(job, "abort", None)
                for job in admit:
                    try:
                        eng.add_request(job.prompt, job.params, request_id=job.request_id)
                    except Exception as e:  # a request the engine refuses must not take the others down
                        log.warning("engine refused request %s: %s", job.request_id, e)
                        with self._cv:
                            self._running.pop(job.request_id, None)
                            job.state = "done"
                        self._finish_metrics(job, "error", None)
                        job.push(e)
                        continue
                    with self.metrics.lock:
                        self.metrics.prompt_tokens += len(job.prompt)
                deltas = eng.step() if eng.has_unfinished() else []
                self._dispatch(deltas)
                stats = self._engine_stats()
            except Exception as e:  # an engine bug: fail the running requests cleanly, keep serving others
                log.exception("engine step failed")
                self.error = e
                stats = self._recover(e)
            with self._cv:
                self._stats = stats
        # shutdown: whoever still waits gets a clean error
        with self._cv:
            jobs = list(self._pending) + list(self._running.values())
            self._pending.clear()
            self._running.clear()
        for job in jobs:
            job.state = "done"
            job.push(WorkerDead("the server is shutting down"))

    def _dispatch(self, deltas) -> None:
        now = time.perf_counter()
        for d in deltas:
            job = self._running.get(d.request_id)
            if job is None:             # aborted between steps
                continue
            n = len(d.token_ids or ())
            if n:
                with self.metrics.lock:
                    m = self.metrics
                    m.generation_tokens += n
                    if job.first_token is None:
                        job.first_token = now
                        m.ttft.observe(now - job.submitted)
                        if n > 1:       # a speculative step can deliver several tokens at once
                            m.tpot.observe(0.0)
                    else:
                        m.tpot.observe((now - job.last_token) / n)
                job.last_token = now
                job.n_tokens += n
            if d.finished:
                with self._cv:
                    self._running.pop(d.request_id, None)
                    job.state = "done"
                self._finish_metrics(job, d.finish_reason or "stop", d.completion)
            if d.finish_reason == "error":
                job.push(RequestFailed(d.error or "the engine failed on this request", d.completion))
            else:
                job.push(d)

    def _recover(self, err: Exception) -> dict:
        with self._cv:
            jobs = list(self._running.values())
            self._running.clear()
        for job in jobs:
            try:
                self.engine.abort(job.request_id)
            except Exception:
                pass
            job.state = "done"
            self._finish_metrics(job, "error", None)
            job.push(RuntimeError(f"the engine failed: {type(err).__name__}: {err}"))
        try:
            return self._engine_stats()
        except Exception:
            return dict(self._stats)

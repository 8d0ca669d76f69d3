"""The serving engine: continuous batching over a paged cache (MLA's latent or GQA's K/V), sampling, stop rules, MTP.

    eng = Engine(model, tokenizer)
    eng.generate(["Hello", [1, 2, 3]], SamplingParams(temperature=0, max_tokens=32))   # -> list[Completion]
    for d in eng.stream("Hi", SamplingParams()): print(d.text, end="")

One `step()` = (1) admit waiting requests while a batch slot and enough cache blocks are free (their prompt prefix
is looked up in the prefix cache first), (2) a batched prefill forward for the admitted prompts (right-padded,
different lengths; long prompts in chunks), (3) one batched decode forward for the requests already running.
Requests leave as soon as they finish; their blocks return to the pool. Attention always runs against the paged
cache (nanoseek.infer.cache): MLA's absorbed path against the latent, grouped-query attention against K and V; the
cache computes the gather indices and mask once per forward (plan), the layers reuse them. DeepSeek-V3.2's sparse
attention needs nothing more here: its cache (PagedDSACache) also keeps each token's indexer key, and each decode
query's attention gathers only the index_topk latents its indexer selects (model/mla.py dsa_forward).
DeepSeek-V4 runs on a cache of one slot per sequence instead (infer/v4_cache.py: the window, each compressor's
entries and pending tokens, the indexer's keys), the slot being the sequence's one block of max_seq_len tokens:
chunked prefill and continuous batching as above; no prefix reuse or MTP speculation for it, and its compiled step
compiles the decode forward's pure pieces between the cache's calls (compiled.CompiledV4).

The plain decode forward (no MTP speculation) can run as one compiled graph, batch and context padded to buckets
(infer/compiled.py): Engine(compile=True), or "auto" (the default), which compiles once enough decode steps are run
or in sight to repay the compile, and says so when it stays eager.

MTP speculative decoding (DeepSeek-V3 Section 2.2 / 5.4.3): the MTP module, given the main model's last hidden
state h_n and the token t_{n+1}, drafts t_{n+2}. A decode step then feeds [t_{n+1}, draft] at positions [n+1, n+2]:
the main model's prediction at n+1 verifies the draft (accepted when equal, so greedy output is exactly plain
greedy decoding), and when accepted its prediction at n+2 is a second new token. Applied to greedy requests without
penalties; others in the same batch decode one token per step. A speculative step costs about 1.3 plain steps on
CPU (two positions and the MTP block), so with mtp=None (auto) speculation switches itself off when fewer than 25%
of the first 64 drafts are accepted (an untrained MTP head); reset_prefix_cache() (new weights) re-arms it.

Constraints (SamplingParams.constraint, a grammar.Grammar): each constrained row of a batch is masked to the tokens
its own matcher allows, the matcher advances with every token, and the request stops ("stop") when the grammar is
complete; a thinking prompt's reasoning is free (only EOS is barred) until the model writes </think>. Constrained
requests never speculate. Copies of a prompt admitted together (n > 1) share its cache blocks: the first computes
them, the others are admitted one step later and find them in the prefix cache.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..chat_template import partial_suffix
from ..errors import UsageError
from ..model.dsa import DSA
from .cache import block_keys, paged_cache_class
from .compiled import AUTO_MIN_STEPS, CompiledDecode, CompiledV4, compile_mode, say, steps_in_sight, unavailable
from .grammar import ConstraintError
from .sampling import Sampled, SamplingParams, Uniforms, sample
from .v4_cache import V4Cache

__all__ = ["Engine", "SamplingParams", "Completion", "StreamDelta"]

log = logging.getLogger("nanoseek.engine")

THINK_START, THINK_END = "<think>", "</think>"
DEFAULT_CACHE_BYTES = 2 << 30    # default cache pool size cap (pass num_blocks for more)
PREFILL_TOKENS = 4096           # tokens (rows x chunk) per prefill forward; longer prompts are chunked
MTP_PROBE, MTP_MIN_ACCEPT = 64, 0.25   # auto mode: drafts to judge the MTP head by, and the break-even acceptance


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]            # every generated token, a final EOS / stop token included
    text: str                       # the generated text as is (tags included), cut before a stop string
    reasoning_content: str          # the part inside <think>...</think>
    content: str                    # the answer: the rest
    finish_reason: str              # "stop" | "length" | "abort" | "error" (this request failed alone: see error)
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int              # prompt tokens whose cache entries (latents or K/V) came from the prefix cache
    logprobs: list[float] | None = None             # log p(token) per generated token (see SamplingParams)
    top_logprobs: list[dict[int, float]] | None = None   # per token: {token_id: logprob} of the top-n
    error: str | None = None        # finish_reason "error": what failed ("sampling failed: ValueError: ...")


@dataclass
class StreamDelta:
    request_id: str
    token_ids: list[int]            # tokens generated by this step (2 after an accepted MTP draft)
    text: str                       # new answer text (outside <think>)
    reasoning_text: str             # new reasoning text (inside <think>)
    finished: bool = False
    finish_reason: str | None = None
    completion: Completion | None = None          # set on the last delta
    logprobs: list[float] | None = None           # for token_ids, when requested
    top_logprobs: list[dict[int, float]] | None = None
    raw_text: str = ""              # the new text as generated, <think> tags included (for /v1/completions)
    error: str | None = None        # set with finish_reason "error" (an engine fault in this request alone)


# ----------------------------------------------------------------------------------------------- text output
class _ReasoningSplit:
    """Routes generated text to reasoning (inside <think>...</think>) or content, streaming-safe: a partial tag
    at the end of a chunk is held back until the next chunk shows whether it is one. Newlines right after <think>,
    right before </think> and right after </think> are dropped (the R1 format writes "<think>\\n...\\n</think>\\n\\n")."""

    def __init__(self, thinking: bool):
        self.state = "think" if thinking else "start"   # "start": nothing seen yet, a <think> may open the output
        self.lstrip = thinking
        self.buf = ""

    def feed(self, s: str, final: bool = False) -> tuple[str, str]:
        self.buf += s
        reasoning = content = ""
        while self.buf:
            if self.lstrip:
                self.buf = self.buf.lstrip("\n")
                if not self.buf:
                    break
                self.lstrip = False
            if self.state == "start":
                if self.buf.startswith(THINK_START):
                    self.buf, self.state, self.lstrip = self.buf[len(THINK_START):], "think", True
                elif THINK_START.startswith(self.buf) and not final:
                    break                                         # maybe the beginning of "<think>"
                else:
                    self.state = "content"
            elif self.state == "think":
                i = self.buf.find(THINK_END)
                if i >= 0:
                    reasoning += self.buf[:i].rstrip("\n")      # R1 writes "...\n</think>": not part of the reasoning
                    self.buf, self.state, self.lstrip = self.buf[i + len(THINK_END):], "content", True
                    continue
                keep = 0 if final else partial_suffix(self.buf, (THINK_END,))
                if not final:  # trailing newlines may be the ones before "</think>": hold them back too
                    body = self.buf[:len(self.buf) - keep]
                    keep += len(body) - len(body.rstrip("\n"))
                reasoning += self.buf[:len(self.buf) - keep]
                self.buf = self.buf[len(self.buf) - keep:]
                break
            else:
                content += self.buf
                self.buf = ""
        return reasoning, content


class _TextStream:
    """Incremental detokenization with stop strings.

    Decoding token by token would split multi-byte characters (byte-level BPE puts one UTF-8 byte sequence across
    several tokens), so each step decodes a short window of the latest tokens and only releases text that does not
    end in U+FFFD (an incomplete character); the window starts at the previous release point, which also keeps
    tokenizers whose decoding depends on the preceding token (leading-space rules) right. Text that could be the
    start of a stop string is held back until it is known not to be one.

    deferred=True (a generate() request without stop strings, whose text nobody reads before it ends): add() only
    records the ids and the final flush runs the same rules over all of them, so the text is the same and the
    per-token work of a batch job (GRPO's rollouts, evals) is not spent on deltas no one reads.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...], thinking: bool, deferred: bool = False):
        self.tok, self.stops, self.deferred = tokenizer, stops, deferred and not stops
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.text = ""        # released text, cut at a stop string
        self.sent = 0         # characters of self.text already handed on
        self.split = _ReasoningSplit(thinking)
        self.stopped = False

    def add(self, token_id: int) -> bool:
        """Append one generated token; True when a stop string has appeared (the text is cut before it)."""
        if self.tok is None:
            return False
        self.ids.append(token_id)
        if self.deferred:
            return False
        prefix = _decode(self.tok, self.ids[self.prefix_offset:self.read_offset])
        full = _decode(self.tok, self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False
        new = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._append(new)

    def catch_up(self) -> None:
        """A deferred stream's text so far: the streaming rules run over its ids, token by token (the same text)."""
        if self.deferred:
            ids, self.ids, self.deferred = self.ids, [], False
            for t in ids:
                self.add(t)

    def _append(self, new: str) -> bool:
        start = len(self.text)
        self.text += new
        if self.stops:
            longest = max(len(s) for s in self.stops)
            window = max(0, start - longest + 1)
            hits = [i for i in (self.text.find(s, window) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
        return self.stopped

    def flush(self, final: bool) -> tuple[str, str, str]:
        """(raw, reasoning, content) text released since the last flush."""
        if self.deferred:
            if not final:
                return "", "", ""
            self.catch_up()
        if final and not self.stopped and self.tok is not None and self.read_offset < len(self.ids):
            rest = _decode(self.tok, self.ids[self.prefix_offset:])[len(_decode(
                self.tok, self.ids[self.prefix_offset:self.read_offset])):]
            self.read_offset = len(self.ids)
            self._append(rest)                          # invalid bytes at the very end: U+FFFD, as decode gives
        end = len(self.text) if (final or self.stopped) else len(self.text) - partial_suffix(self.text, self.stops)
        chunk, self.sent = self.text[self.sent:end], max(self.sent, end)
        reasoning, content = self.split.feed(chunk, final)
        return chunk, reasoning, content


# ----------------------------------------------------------------------------------------------- requests
@dataclass(eq=False)   # identity semantics: requests are looked up in lists
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    max_new: int                        # max_tokens, clipped to the context
    blocks_needed: int                  # blocks this request holds at most (prompt + max_new - 1 cached tokens)
    stop_ids: frozenset
    gen: Uniforms | None                # its sampler's uniform numbers (None: greedy)
    text: _TextStream
    spec: bool                          # eligible for MTP speculation
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0                 # leading tokens whose cache entries are written (every layer)
    num_registered: int = 0             # leading blocks already offered to the prefix cache
    parent_hash: int = 0                # hash of the last registered block's key (the chain)
    cached_tokens: int = 0
    draft: int | None = None            # MTP draft of the token after the last one
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    matcher: object = None              # grammar.Matcher of params.constraint, once the constraint applies
    in_reasoning: bool = False          # constrained, thinking prompt, no </think> yet: free text, but no EOS

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


class Engine:
    """Batched generation with a paged cache (the model's attention picks which: cfg.attention "mla" | "gqa"), or
    deepseek_v4's slot cache. Single-threaded: one thread calls step() (or generate)."""

    def __init__(self, model, tokenizer=None, max_batch: int = 16, max_seq_len: int | None = None,
                 block_size: int = 16, num_blocks: int | None = None, mtp: bool | None = None,
                 sparse: bool = True, compile: bool | str = "auto"):
        cfg = model.cfg
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.device = model.embed_tokens.weight.device
        self.dtype = model.embed_tokens.weight.dtype
        has_mtp = len(getattr(model, "mtp", ())) > 0 and cfg.model_type != "deepseek_v4"
        if mtp and cfg.model_type == "deepseek_v4":
            raise UsageError("mtp=True: the engine does not speculate with deepseek_v4 models (a rejected draft "
                             "would have to be rolled back out of V4's window and compressor state); use mtp=None "
                             "or False")
        if mtp and not has_mtp:
            raise UsageError("mtp=True but this model has no MTP layer (num_nextn_predict_layers=0, or the checkpoint "
                             "was saved without it); use mtp=None or False")
        self.mtp = has_mtp if mtp is None else bool(mtp)
        self.mtp_active, self._mtp_auto, self._probe = self.mtp, mtp is None, [0, 0]   # probe: drafts, accepted
        if max_batch < 1 or block_size < 1:
            raise UsageError(f"max_batch={max_batch} and block_size={block_size} must be >= 1")
        self.max_batch, self.block_size = max_batch, block_size
        self.prefill_tokens = PREFILL_TOKENS
        # DeepSeek-V3.2 models: False attends to every cached token (dense MLA on the same weights; the indexer keys
        # are still cached), for comparisons such as bench/dsa.py. May be changed between steps.
        self.sparse = sparse
        # the decode step as one compiled graph (infer/compiled.py): True, False, or "auto" (once the decode steps
        # run and in sight reach compiled.AUTO_MIN_STEPS; plain decode only: MTP speculation stays eager)
        self.compile, self._compiled, self._compile_said = compile_mode(compile), None, False
        self._batch_job = False      # inside generate(): every request is known, so its steps are "in sight"
        # default context: the model's, capped at 4096 so the default pool stays small on CPU
        self.max_seq_len = int(max_seq_len or min(cfg.max_position_embeddings, 4096))
        if num_blocks is not None and num_blocks < 2:
            raise UsageError(f"num_blocks={num_blocks}: need at least 2 (one is the padding scratch block)")
        self.cache = self._slot_cache(num_blocks) if cfg.model_type == "deepseek_v4" else self._paged_cache(num_blocks)
        # prefix reuse needs pages (a block of tokens is then a unit two sequences can share); a prefill chunk
        # covers at least a block of them
        self.prefix_reuse = self.cache.paged
        self.min_chunk = self.block_size if self.cache.paged else 1
        self.pool = self.cache.pool
        self.kv_bytes_per_token = self.cache.bytes_per_token
        self.eos_id = getattr(tokenizer, "eos_id", None) if tokenizer is not None else None
        if self.eos_id is None:
            self.eos_id = cfg.eos_token_id
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self.requests: dict[str, _Request] = {}
        self._done: list[StreamDelta] = []            # finals of aborted requests, emitted by the next step()
        self._ids = itertools.count()
        self._rng = random.Random()
        self.counters = dict(prompt_tokens=0, prefix_hit_tokens=0, generated_tokens=0, mtp_drafts=0,
                             mtp_accepted=0, steps=0, prefill_forwards=0, decode_forwards=0)

    def _paged_cache(self, num_blocks: int | None):
        """MLA's latent, GQA's K/V or DSA's paged cache (infer/cache.py); the MTP layer's cache index is L."""
        cfg, bs = self.cfg, self.block_size
        n_layers = cfg.num_hidden_layers + (1 if self.mtp else 0)
        cache_cls = paged_cache_class(cfg)
        if num_blocks is None:
            # room for max_batch full-length sequences, within DEFAULT_CACHE_BYTES (then fewer run at once)
            blocks_per_seq = math.ceil(self.max_seq_len / bs)
            block_bytes = bs * n_layers * cache_cls.elems_per_token(cfg) * self.dtype.itemsize
            fit = max(blocks_per_seq, DEFAULT_CACHE_BYTES // block_bytes)
            num_blocks = min(self.max_batch * blocks_per_seq, fit) + 1       # + the scratch block
        return cache_cls(cfg, n_layers, num_blocks, bs, self.dtype, self.device)

    def _slot_cache(self, num_blocks: int | None) -> V4Cache:
        """deepseek_v4's cache: one slot per sequence (infer/v4_cache.py), each slot the engine's block of
        max_seq_len tokens (block_size is ignored), num_blocks - 1 slots (default: max_batch, within
        DEFAULT_CACHE_BYTES). No prefix reuse (copies of a prompt each compute it), no MTP speculation; a compiled
        decode step compiles the mHC only (compiled.CompiledV4)."""
        self.block_size = self.max_seq_len
        slots = num_blocks - 1 if num_blocks is not None else max(1, min(
            self.max_batch, DEFAULT_CACHE_BYTES // V4Cache.slot_bytes(self.cfg, self.max_seq_len, self.dtype)))
        return V4Cache(self.cfg, slots, self.max_seq_len, self.dtype, self.device)

    # ------------------------------------------------------------------------------------------ public API
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UsageError("a text prompt needs a tokenizer: Engine(model, tokenizer), or pass token ids")
            ids = _encode(self.tokenizer, prompt)
        else:
            ids = [int(t) for t in prompt]
        V = self.cfg.vocab_size
        if not ids:
            raise UsageError("the prompt is empty: give at least one token")
        if min(ids) < 0 or max(ids) >= V:
            raise UsageError(f"prompt token ids must be in [0, {V}) (the model's vocab_size)")
        if len(ids) >= self.max_seq_len:
            raise UsageError(f"the prompt has {len(ids)} tokens but the context is {self.max_seq_len} "
                             f"(max_seq_len); shorten it or raise max_seq_len")
        if any(not 0 <= t < V for t in params.stop_token_ids):
            raise UsageError(f"stop_token_ids must be in [0, {V}) (the model's vocab_size); got "
                             f"{[t for t in params.stop_token_ids if not 0 <= t < V][:5]}")
        if params.stop and self.tokenizer is None:
            raise UsageError("stop strings need a tokenizer; use stop_token_ids with a token-id-only engine")
        if params.logit_bias and max(params.logit_bias) >= V:
            raise UsageError(f"logit_bias token ids must be in [0, {V}) (the model's vocab_size); got "
                             f"{[t for t in params.logit_bias if t >= V][:5]}")
        if params.constraint is not None and params.constraint.vocab_size > V:
            raise UsageError(f"the constraint was built for a tokenizer of {params.constraint.vocab_size} tokens but "
                             f"the model has {V}: build it with this engine's tokenizer")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise UsageError(f"request id {rid!r} is already in use")
        max_new = min(params.max_tokens, self.max_seq_len - len(ids))
        blocks = math.ceil((len(ids) + max_new - 1) / self.block_size)
        if blocks > self.pool.capacity:
            raise UsageError(f"prompt + max_tokens need {blocks} cache blocks but the engine has {self.pool.capacity}; "
                             f"lower max_tokens or build the Engine with more num_blocks")
        gen = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
            gen = Uniforms(torch.Generator(device=self.device).manual_seed(seed % 2**64))   # (torch wraps -1 too)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos and self.eos_id is not None:
            stop_ids.add(self.eos_id)
        thinking, constrained = self._starts_thinking(ids), params.constraint is not None
        if constrained:     # the grammar alone decides where the answer ends (a "stop" always parses)
            stop_ids = set()
        req = _Request(rid, ids, params, max_new, blocks, frozenset(stop_ids), gen,
                       _TextStream(self.tokenizer, () if constrained else params.stop, thinking, self._batch_job),
                       spec=self.mtp and params.greedy and not params.has_penalties and not constrained)
        if constrained:     # a thinking prompt reasons freely first (unless this tokenizer has no </think> token)
            req.in_reasoning = thinking and getattr(self.tokenizer, "think_end_id", None) is not None
            req.matcher = None if req.in_reasoning else params.constraint.matcher()
        self.requests[rid] = req
        self.waiting.append(req)
        return rid

    def step(self) -> list[StreamDelta]:
        """Admit what fits, prefill it, decode one token (two with an accepted draft) for the others.

        A failure stays with its request: one that fails in its sampling, detokenising or stop rules ends alone
        with finish_reason "error" (and .error); a batched forward that raises (a model bug, out of memory) fails
        the requests of that forward, its prefill or its decode, and the engine goes on with the rest."""
        deltas, self._done = self._done, []
        self.counters["steps"] += 1
        with torch.inference_mode():
            admitted = self._admit()
            decoding = [r for r in self.running if r not in admitted]
            if admitted:
                self._fenced(self._prefill, admitted, deltas, "prefill")
            if decoding:
                self._fenced(self._decode, decoding, deltas, "decode")
        self.running = [r for r in self.running if r.finish_reason is None]
        return deltas

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; the next step() emits its final delta. False if unknown."""
        req = self.requests.get(request_id)
        if req is None or req.finish_reason is not None:
            return False
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
        try:
            self._done.append(self._finish(req, "abort"))
        except Exception as e:   # its last text would not decode: the request ends all the same
            self._done.append(self._fail(req, e, "ending the aborted request failed"))
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._done)

    def stats(self) -> dict:
        c = self.counters
        return {"running": len(self.running), "waiting": len(self.waiting),
                "blocks_used": self.pool.num_used(), "blocks_total": self.pool.capacity,
                "blocks_cached": len(self.pool.cached), "block_size": self.block_size,
                "kv_bytes_per_token": self.kv_bytes_per_token, **c,
                "mtp": self.mtp, "mtp_active": self.mtp_active, "mtp_acceptance": c["mtp_accepted"] / c["mtp_drafts"] if c["mtp_drafts"] else 0.0}

    def reset_prefix_cache(self) -> None:
        """Forget cached prefixes: call after the weights change (their cache entries are stale)."""
        self.pool.reset_prefix_cache()
        if self.mtp:                              # new weights: give the MTP head another chance
            self.mtp_active, self._probe = True, [0, 0]

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False, errors: str = "raise") -> list[Completion]:
        """Generate for every prompt (str or token ids; a single prompt is accepted too); results in order.

        A request that fails inside the engine (finish_reason "error", see _fail) fails alone; once every request
        is done, errors="raise" raises RuntimeError naming the first failure (a trainer or an eval must not score
        a broken completion as a wrong answer), errors="return" returns those completions as they are.

        generate() and stream() drive step() themselves and drop other requests' deltas: do not mix them with a
        step() loop of your own on the same engine (the server uses add_request/step only)."""
        if errors not in ("raise", "return"):
            raise UsageError(f"errors={errors!r}: expected 'raise' or 'return'")
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise UsageError(f"{len(prompts)} prompts but {len(plist)} SamplingParams: give one, or one per prompt")
        self._batch_job = True       # (its requests' text is read when they end: _TextStream's deferred)
        try:
            ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        finally:
            self._batch_job = False
        mine, out = set(ids), {}
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(ids), desc="generate", unit="req")
        self._batch_job = True
        try:
            while len(out) < len(ids):
                for d in self.step():
                    if d.finished and d.request_id in mine:
                        out[d.request_id] = d.completion
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in ids:
                self.abort(rid)
            raise
        finally:
            self._batch_job = False
            if bar is not None:
                bar.close()
        done = [out[rid] for rid in ids]
        failed = [c for c in done if c.finish_reason == "error"]
        if failed and errors == "raise":
            raise RuntimeError(f"{len(failed)} of {len(done)} generations failed in the engine; the first: "
                               f"{failed[0].error}")
        return done

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Yield this request's deltas as they are generated (other requests in the engine advance too)."""
        rid = self.add_request(prompt, params)
        finished = False
        try:
            while not finished:
                for d in self.step():
                    if d.request_id == rid:
                        finished = d.finished
                        yield d
        finally:
            if not finished:
                self.abort(rid)
                self.requests.pop(rid, None)

    # ------------------------------------------------------------------------------------------ scheduling
    def _reserved(self) -> int:
        return sum(r.blocks_needed - len(r.blocks) for r in self.running)

    def _admit(self) -> list[_Request]:
        """First come, first served: stop at the first waiting request that does not fit (no starvation), or that
        would compute prompt blocks another request admitted now computes (it comes in the next step)."""
        admitted, writing = [], set()    # writing: prefix keys of the blocks this step's prefill will fill
        bs, la = self.block_size, int(self.mtp)
        while self.waiting and len(self.running) < self.max_batch:
            req = self.waiting[0]
            # reuse full blocks strictly before the last prompt token (its logits must be computed)
            keys = block_keys(req.prompt, bs, (len(req.prompt) - 1) // bs, lookahead=la) if self.prefix_reuse else []
            hits = []
            for key in keys:
                b = self.pool.lookup(key)
                if b is None:
                    break
                hits.append(b)
            # A request admitted in this step is about to write this one's next block (n > 1 copies of a prompt, a
            # shared system prompt): wait one step and read it from the prefix cache instead of computing it twice.
            wait = len(hits) < len(keys) and keys[len(hits)] in writing
            if wait or self.pool.num_free() - self._reserved() < req.blocks_needed - len(hits):
                for b in hits:
                    self.pool.release(b)
                break
            self.waiting.popleft()
            req.blocks = hits
            req.num_cached = req.cached_tokens = len(hits) * bs
            req.num_registered = len(hits)
            req.parent_hash = hash(keys[len(hits) - 1]) if hits else 0
            self.counters["prefix_hit_tokens"] += req.cached_tokens
            self.counters["prompt_tokens"] += len(req.prompt)
            self.running.append(req)
            admitted.append(req)
            writing.update(keys[len(hits):])
        return admitted

    def _ensure_blocks(self, req: _Request, n_tokens: int) -> None:
        while len(req.blocks) * self.block_size < n_tokens:
            req.blocks.append(self.pool.allocate())

    def _register_full_blocks(self, req: _Request) -> None:
        """Offer newly completed blocks to the prefix cache (prompt and generated tokens alike)."""
        bs, la = self.block_size, int(self.mtp)
        tokens = None
        while self.prefix_reuse and (req.num_registered + 1) * bs <= req.num_cached:
            k = req.num_registered
            tokens = tokens or req.tokens
            if (k + 1) * bs + la > len(tokens):
                break
            key = (req.parent_hash, tuple(tokens[k * bs:(k + 1) * bs + la]))
            self.pool.register(req.blocks[k], key)
            req.parent_hash = hash(key)
            req.num_registered += 1

    # ------------------------------------------------------------------------------------------ forwards
    def _plan(self, reqs: list[_Request], ids: list[list[int]], starts: list[int]):
        """Pad a batch of new tokens and fix the cache indices for it (once for all layers: cache.plan).

        ids[b]: the tokens of row b to run, at positions starts[b], starts[b] + 1, ...  Returns input ids and
        positions (B, T) and the number of valid tokens per row.
        """
        lens = [len(x) for x in ids]
        qpos = self.cache.plan([r.blocks for r in reqs], starts, lens)                          # (B, T)
        T = max(lens)
        inp = torch.tensor([x + [0] * (T - len(x)) for x in ids], device=self.device)
        return inp, qpos, lens

    def _dsa(self) -> DSA | None:
        """The model's DeepSeek Sparse Attention option for this forward: None (sparse) unless self.sparse is off."""
        return None if self.sparse or not self.cfg.dsa else DSA(sparse=False)

    def _draft(self, h: torch.Tensor, next_ids: torch.Tensor, rope, rows: torch.Tensor, cols: torch.Tensor):
        """MTP depth 0 over the same positions (its cache layer is num_hidden_layers): h_i and t_{i+1} -> the
        greedy draft of t_{i+2} at (rows, cols)."""
        m = self.model
        hm = m.mtp_hidden(h, next_ids, cache=self.cache, depth=0, rope=rope, dsa=self._dsa())
        return m.head(hm[rows, cols]).argmax(-1).tolist() if len(rows) else []

    def _sample(self, reqs: list[_Request], logits: torch.Tensor) -> tuple[Sampled, dict[str, Exception]]:
        """One batched sampler call for the rows of logits (one per entry of reqs). Should it raise, the rows are
        sampled again one by one (the sampler draws its random numbers last, so a failed call has consumed none),
        and only the requests whose own row raises fail: (Sampled, {request id: exception}), placeholder token 0
        in a failed row. Constrained rows are masked to what their grammar allows (a grammar that fails here fails
        its request alone too)."""
        masks, failed = self._masks(reqs)
        masked = any(m is not None for m in masks)
        try:
            return sample(logits, [r.params for r in reqs], [r.gen for r in reqs], [r.prompt for r in reqs],
                          [r.output for r in reqs], **({"masks": masks} if masked else {})), failed
        except Exception:
            pass
        rows = []
        for i, r in enumerate(reqs):
            if r.id not in failed:
                try:
                    mask = {"masks": masks[i:i + 1]} if masks[i] is not None else {}
                    rows.append(sample(logits[i:i + 1], [r.params], [r.gen], [r.prompt], [r.output], **mask))
                    continue
                except Exception as e:
                    failed[r.id] = e
            rows.append(Sampled([0]))
        return _concat(rows), failed

    def _masks(self, reqs: list[_Request]) -> tuple[list[torch.Tensor | None], dict[str, Exception]]:
        """Each row's constraint mask over the model's vocabulary (0 / -inf to add; None: unconstrained), and
        {request id: error} for the constraints that failed. A constrained request still reasoning may write anything
        but end-of-sequence: ending there would give a "stop" without the answer the constraint promises."""
        V = self.cfg.vocab_size
        masks, failed = [None] * len(reqs), {}
        for i, r in enumerate(reqs):
            try:
                if r.matcher is not None:
                    masks[i] = r.matcher.logit_mask(V)
                elif r.in_reasoning and self.eos_id is not None:
                    masks[i] = torch.zeros(V)
                    masks[i][self.eos_id] = float("-inf")
            except Exception as e:
                failed[r.id] = e
        return masks, failed

    def _fenced(self, forward, reqs: list[_Request], deltas: list[StreamDelta], what: str) -> None:
        """Run one batched phase, forward(reqs, deltas). If it raises, the requests of that phase that have not
        answered in it fail with finish_reason "error"; the others' deltas, already in `deltas`, stand."""
        try:
            forward(reqs, deltas)
        except Exception as e:
            answered = {d.request_id for d in deltas}
            deltas += [self._fail(r, e, f"the batched {what} forward failed") for r in reqs
                       if r.finish_reason is None and r.id not in answered]

    def _prefill(self, reqs: list[_Request], deltas: list[StreamDelta]) -> None:
        """Run the admitted prompts (after their cached prefix) and sample each one's first token.

        Long prompts go in chunks of at most `prefill_tokens / rows` tokens per row and forward: absorbed attention
        holds (rows, chunk, heads, context) scores, which the chunking bounds. A row's chunks attend to the cache
        written by its earlier chunks, exactly as decoding does."""
        for r in reqs:
            self._ensure_blocks(r, len(r.prompt))
        todo, dev = list(reqs), self.device
        while todo:
            chunk = max(self.min_chunk, self.prefill_tokens // len(todo))
            starts = [r.num_cached for r in todo]
            inp, pos, lens = self._plan(todo, [r.prompt[s:s + chunk] for r, s in zip(todo, starts)], starts)
            h, rope = self.model.trunk(inp, pos, cache=self.cache, dsa=self._dsa())   # logits: model.head on rows
            self.counters["prefill_forwards"] += 1
            ends = [i for i, r in enumerate(todo) if starts[i] + lens[i] == len(r.prompt)]   # prompt done here
            rows = torch.tensor(ends, device=dev)
            last = torch.tensor([lens[i] - 1 for i in ends], device=dev)
            out, failed = self._sample([todo[i] for i in ends], self.model.head(h[rows, last])) if ends else (None, {})
            first = dict(zip(ends, out.tokens)) if ends else {}
            drafts = [None] * len(ends)
            if self.mtp_active:   # MTP over the same positions: h_i with t_{i+1} (the new token after the prompt)
                T = inp.shape[1]
                nxt = [r.prompt[s + 1:s + 1 + n] + ([first[i]] if i in first else [])
                       for i, (r, s, n) in enumerate(zip(todo, starts, lens))]
                nxt = torch.tensor([x + [0] * (T - len(x)) for x in nxt], device=dev)
                drafts = self._draft(h, nxt, rope, rows, last)
            for r, s, n in zip(todo, starts, lens):
                r.num_cached = s + n
                self._register_full_blocks(r)
            for k, i in enumerate(ends):
                todo[i].draft = drafts[k]
                deltas.append(self._deliver(todo[i], [out.tokens[k]], _pick(out, [k]), failed.get(todo[i].id)))
            todo = [r for i, r in enumerate(todo) if i not in first]

    def _decode(self, reqs: list[_Request], deltas: list[StreamDelta]) -> None:
        # speculate only when two more tokens are allowed (the draft's slot stays inside the reservation)
        spec = [self.mtp_active and r.spec and r.draft is not None and r.max_new - len(r.output) >= 2 for r in reqs]
        for r, s in zip(reqs, spec):
            self._ensure_blocks(r, r.num_cached + 1 + s)
        ids = [[r.output[-1], r.draft] if s else [r.output[-1]] for r, s in zip(reqs, spec)]
        si = [i for i, s in enumerate(spec) if s]
        logits, h, rope = self._decode_logits(reqs, ids, si)
        self.counters["decode_forwards"] += 1
        B, dev = len(reqs), self.device
        rows_req = reqs + [reqs[i] for i in si]
        out, failed = self._sample(rows_req, logits)
        new = [[out.tokens[i]] for i in range(B)]
        picks = [[i] for i in range(B)]
        accepted = [False] * B
        for k, i in enumerate(si):
            if out.tokens[i] == reqs[i].draft and reqs[i].id not in failed:
                accepted[i] = True
                new[i].append(out.tokens[B + k])
                picks[i].append(B + k)
        self.counters["mtp_drafts"] += len(si)
        self.counters["mtp_accepted"] += sum(accepted)
        if self._mtp_auto and self._probe[0] < MTP_PROBE:
            self._probe[0] += len(si)
            self._probe[1] += sum(accepted)
            if self._probe[0] >= MTP_PROBE and self._probe[1] < MTP_MIN_ACCEPT * self._probe[0]:
                self.mtp_active = False          # below break-even: plain decoding is faster
        drafts = [None] * B
        if self.mtp_active:
            T = h.shape[1]
            nxt = torch.tensor([x + [0] * (T - len(x)) for x in new], device=dev)
            cols = torch.tensor([len(x) - 1 for x in new], device=dev)
            drafts = self._draft(h, nxt, rope, torch.arange(B, device=dev), cols)
        for i, r in enumerate(reqs):
            r.num_cached += len(new[i])
            r.draft = drafts[i]
            deltas.append(self._deliver(r, new[i], _pick(out, picks[i]), failed.get(r.id)))
            if r.finish_reason is None:
                self._register_full_blocks(r)

    def _decode_logits(self, reqs: list[_Request], ids: list[list[int]], si: list[int]):
        """The decode forward: logits of position 0 of every row, then of position 1 of the speculating rows si;
        and the trunk's h and rope for MTP drafting. Through the compiled graph when the engine uses one and MTP is
        off (then h and rope are None); should the graph fail, the engine says so and goes on eager."""
        graph = self._graph(reqs) if not self.mtp_active else None
        if graph is not None:
            try:
                return graph.logits([x[0] for x in ids], [r.blocks for r in reqs], [r.num_cached for r in reqs],
                                    self.sparse), None, None
            except Exception as e:      # the step's slots are rewritten below with the same values
                log.error("the compiled decode step failed", exc_info=e)
                say(f"the compiled decode step failed ({type(e).__name__}: {e}); decoding eager from now on")
                self.compile, self._compiled = False, None
        inp, pos, _ = self._plan(reqs, ids, [r.num_cached for r in reqs])
        h, rope = self.model.trunk(inp, pos, cache=self.cache, dsa=self._dsa())
        hs = h[:, 0] if not si else torch.cat([h[:, 0], h[si, 1]])
        return self.model.head(hs), h, rope

    def _graph(self, reqs: list[_Request]) -> CompiledDecode | None:
        """The compiled decode step if this engine decodes through one now, building it on first use. "auto":
        once the decode steps run plus, inside generate() (eval, GRPO, distill: every request known), those its
        requests still need reach AUTO_MIN_STEPS of this device; below that the engine stays eager and says so once.
        A server's requests count only once run: their max_tokens is a bound, not a forecast, and compiling on the
        first long request would stall it for the compile's seconds."""
        if self._compiled is not None or self.compile is False:
            return self._compiled
        dev = self.device.type
        if self.compile == "auto":
            remaining = [r.max_new - len(r.output) for r in itertools.chain(reqs, self.waiting)] if self._batch_job else []
            steps = self.counters["decode_forwards"] + steps_in_sight(remaining, self.max_batch)
            bar = AUTO_MIN_STEPS.get(dev, math.inf)
            if steps < bar:
                if not self._compile_said:
                    self._compile_said = True
                    say(f"decoding eager (compile='auto': ~{steps} decode steps in sight, compiling pays from {bar} "
                        f"on {dev}; compile=True or --compile true forces it)")
                return None
        why = unavailable(self.device)
        if why:
            say(f"decoding eager: {why}")
            self.compile = False
            return None
        if self.compile == "auto":
            say(f"compiling the decode step (compile='auto': {steps} decode steps run or in sight >= {bar})")
        self._compiled = CompiledDecode(self.model, self.cache, self.max_batch, math.ceil(
            self.max_seq_len / self.block_size)) if self.cache.paged else CompiledV4(self.model, self.cache)
        return self._compiled

    # ------------------------------------------------------------------------------------------ bookkeeping
    def _deliver(self, req: _Request, tokens: list[int], lps, err: Exception | None) -> StreamDelta:
        """_emit, fenced: a failure of this request alone, in its sampling (err) or in its detokenising and stop
        rules (raised here), ends it with finish_reason "error" while the rest of the batch goes on."""
        if err is not None:
            return self._fail(req, err, "the constraint failed" if isinstance(err, ConstraintError) else
                              "sampling failed")
        try:
            return self._emit(req, tokens, lps)
        except ConstraintError as e:
            return self._fail(req, e, "the constraint failed")
        except Exception as e:
            return self._fail(req, e, "detokenising or stop handling failed")

    def _emit(self, req: _Request, tokens: list[int], lps) -> StreamDelta:
        """Append the new tokens one by one, applying the stop rules; return the request's delta."""
        taken = []
        reason = None
        for t in tokens:
            req.output.append(t)
            taken.append(t)
            if req.params.constraint is not None and self._constrain(req, t):
                reason = "stop"
            elif t in req.stop_ids:
                reason = "stop"
            elif req.text.add(t):
                reason = "stop"
            elif len(req.output) >= req.max_new:
                reason = "length"
            if reason:
                break
        self.counters["generated_tokens"] += len(taken)
        lp, top = lps
        if req.params.logprobs or req.params.top_logprobs:
            req.logprobs += lp[:len(taken)]
            if top is not None and req.params.top_logprobs:
                req.top_logprobs += top[:len(taken)]
        if reason:
            d = self._finish(req, reason)
            d.token_ids = taken
            d.logprobs = lp[:len(taken)] if req.params.logprobs else None
            d.top_logprobs = top[:len(taken)] if top is not None and req.params.top_logprobs else None
            return d
        raw, reasoning, content = req.text.flush(final=False)
        req.reasoning.append(reasoning)
        req.content.append(content)
        return StreamDelta(req.id, taken, content, reasoning, logprobs=lp[:len(taken)] if req.params.logprobs else None,
                           top_logprobs=top[:len(taken)] if top is not None and req.params.top_logprobs else None,
                           raw_text=raw)

    def _constrain(self, req: _Request, t: int) -> bool:
        """Advance a constrained request's grammar by token t: True when the grammar is complete (the answer is
        whole: the request stops). The constraint starts after the </think> of a thinking prompt."""
        if req.in_reasoning:
            if t == self.tokenizer.think_end_id:
                req.in_reasoning, req.matcher = False, req.params.constraint.matcher()
            return False
        req.matcher.advance(t)
        if req.matcher.is_finished:
            req.text.add(t)
            return True
        return False

    def _close(self, req: _Request, reason: str) -> None:
        """The request is over: its blocks go back to the pool (cached prefixes stay reusable), its id is free."""
        req.finish_reason = reason
        for b in req.blocks:
            self.pool.release(b)
        req.blocks = []
        self.requests.pop(req.id, None)

    def _completion(self, req: _Request, error: str | None = None) -> Completion:
        p = req.params
        return Completion(req.id, req.prompt, req.output, req.text.text, "".join(req.reasoning), "".join(req.content),
                          req.finish_reason, len(req.prompt), len(req.output), req.cached_tokens,
                          req.logprobs if p.logprobs else None, req.top_logprobs if p.top_logprobs else None, error)

    def _finish(self, req: _Request, reason: str) -> StreamDelta:
        self._close(req, reason)
        raw, reasoning, content = req.text.flush(final=True)
        req.reasoning.append(reasoning)
        req.content.append(content)
        return StreamDelta(req.id, [], content, reasoning, True, reason, self._completion(req), raw_text=raw)

    def _fail(self, req: _Request, err: Exception, where: str) -> StreamDelta:
        """End one request with finish_reason "error": its Completion holds the text streamed so far, `error` says
        what failed. Not the caller's fault (parameters are checked in add_request): the traceback is logged."""
        msg = f"{where}: {type(err).__name__}: {err}"
        log.error("request %s failed: %s", req.id, msg, exc_info=err)
        if req.text.deferred:              # its text so far, as the deltas of a streaming request carried it
            try:
                req.text.catch_up()
                _, reasoning, content = req.text.flush(final=False)
                req.reasoning.append(reasoning)
                req.content.append(content)
            except Exception:              # (the failure may be in the detokenising itself)
                pass
        self._close(req, "error")
        return StreamDelta(req.id, [], "", "", True, "error", self._completion(req, msg), error=msg)

    def _starts_thinking(self, prompt: list[int]) -> bool:
        """Does the prompt end inside an open <think> (R1 chat template with thinking on)? Then the generation
        begins in the reasoning section."""
        if self.tokenizer is None:
            return False
        tail = _decode(self.tokenizer, prompt[-8:]).rstrip()
        return tail.endswith(THINK_START)


def _concat(rows: list[Sampled]) -> Sampled:
    """One-row Sampled answers -> one answer for all the rows (placeholders where a row has no logprobs)."""
    lp = [r.logprobs[0] if r.logprobs else 0.0 for r in rows] if any(r.logprobs for r in rows) else None
    top = [r.top_logprobs[0] if r.top_logprobs else {} for r in rows] if any(r.top_logprobs for r in rows) else None
    return Sampled([r.tokens[0] for r in rows], lp, top)


def _pick(out, idx: list[int]):
    """The sampler's logprobs / top_logprobs for rows idx (None when not computed)."""
    lp = [out.logprobs[i] for i in idx] if out.logprobs is not None else []
    top = [out.top_logprobs[i] for i in idx] if out.top_logprobs is not None else None
    return lp, top


def _encode(tok, text: str) -> list[int]:
    ids = tok.encode(text)
    return list(ids.ids) if hasattr(ids, "ids") else list(ids)   # nanoseek Tokenizer, or a raw tokenizers.Tokenizer


def _decode(tok, ids: list[int]) -> str:
    """Generated ids -> text without control tokens (BOS/EOS/pad/role markers: a chat reply never carries them), but
    with <think> tags, which the reasoning split needs. A tokenizer without `control_ids` decodes everything."""
    control = getattr(tok, "control_ids", ())
    return tok.decode([i for i in ids if i not in control], skip_special_tokens=False)

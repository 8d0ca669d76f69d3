"""SamplingParams and the batched sampler: penalties, temperature, min-p, top-k, top-p, per-request seeds.

Everything runs on (N, vocab) tensors for the whole batch at once; the only Python loop is over requests, to read
their parameters and draw one uniform number from each request's own torch.Generator (so a seeded request samples
the same tokens whatever else shares its batch). The draws come last: a failure before them leaves every generator
as it was, so the engine can retry the rows one by one and fail only the request at fault.

Order, as vLLM applies it: logit_bias, penalties on the raw logits (repetition, then frequency/presence), the
constraint's mask (tokens the request's grammar does not allow get -inf: see grammar.py), temperature, min-p, top-k,
top-p, then one draw by inverse CDF. `logprobs` are computed before all of that, from log_softmax(logits /
temperature) (raw logits when greedy): the quantity a training forward recomputes (GRPO compares the two).
A request's uniform numbers come from its Uniforms: its generator's draws, taken BLOCK at a time (one call instead
of one a token), used one per sampled token.

Hostile values (a server passes its clients' numbers here) cannot break the arithmetic: SamplingParams refuses
NaN, infinities and non-integers; the sampler clamps what is left to the model and to float32. top_k beyond the
vocabulary is no limit; a temperature below MIN_TEMPERATURE is greedy (logits / 1e-38 overflow float32 to NaN);
temperatures and penalties are clamped to +-FLOAT_LIMIT (a repetition penalty to [1 / FLOAT_LIMIT, FLOAT_LIMIT]),
which keeps penalty * count and logit / temperature finite and is far beyond any gap between two logits. Reported
logprobs are never below LOGPROB_FLOOR = -9999.0, the value OpenAI's API reports for impossible tokens: a -inf
logit (a token the model rules out) or an underflow becomes -9999.0, so logprobs are always finite JSON numbers.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import UsageError

if TYPE_CHECKING:
    from .grammar import Grammar

MIN_TEMPERATURE = 1e-5      # below: greedy (vLLM's _SAMPLING_EPS)
FLOAT_LIMIT = 1e6           # bound on temperatures and penalties inside the sampler's float32 tensors
LOGPROB_FLOOR = -9999.0     # the lowest logprob reported (OpenAI's value for an impossible token)
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
INT_FIELDS = ("top_k", "max_tokens", "top_logprobs")
MAX_LOGIT_BIAS, MAX_BIAS_ENTRIES = 100.0, 300   # OpenAI's bounds: values in [-100, 100], at most 300 tokens


@dataclass
class SamplingParams:
    temperature: float = 1.0          # 0 (anything below MIN_TEMPERATURE) = greedy
    top_p: float = 1.0                # nucleus: keep the smallest set of tokens with probability mass >= top_p
    top_k: int = 0                    # keep the k most likely tokens (0 = all)
    min_p: float = 0.0                # drop tokens less likely than min_p * p(most likely token)
    presence_penalty: float = 0.0     # OpenAI: logit -= presence_penalty for every token already generated
    frequency_penalty: float = 0.0    # OpenAI: logit -= frequency_penalty * (times the token was generated)
    repetition_penalty: float = 1.0   # CTRL (Keskar et al. 2019): positive logits / r, negative * r, prompt included
    seed: int | None = None           # per-request generator: the same seed gives the same text in any batch
                                      # (any int; counted modulo 2^64, the generator's width)
    max_tokens: int = 256
    stop: tuple[str, ...] = ()        # stop strings (not included in the text)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False            # report log p(chosen token) per generated token
    top_logprobs: int = 0             # and the top-n alternatives (0-20)
    constraint: Grammar | None = None  # grammar.Grammar enforced while sampling (for a prompt that opens <think>:
                                       # from the model's </think> on, the reasoning is free); stop strings and
                                       # stop_token_ids do not apply: the answer ends where the grammar does
    logit_bias: dict[int, float] | None = None   # OpenAI: {token id: -100..100} added to the logits before sampling
                                                 # (-100 bans a token in practice, +100 forces it)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in (self.stop or ()) if s)
        _check_types(self)
        self.stop_token_ids = tuple(int(t) for t in (self.stop_token_ids or ()))
        self.logit_bias = _check_bias(self.logit_bias)
        if self.constraint is not None and not callable(getattr(self.constraint, "matcher", None)):
            raise UsageError(f"constraint={self.constraint!r}: expected a nanoseek.infer.grammar.Grammar "
                             "(Grammar.json_schema(tokenizer, schema), .json_object(tokenizer) or .lark(tokenizer, text))")
        checks = [
            (self.temperature >= 0, f"temperature={self.temperature}: expected >= 0 (0 = greedy)"),
            (0 < self.top_p <= 1, f"top_p={self.top_p}: expected 0 < top_p <= 1"),
            (self.top_k >= 0, f"top_k={self.top_k}: expected >= 0 (0 = no limit)"),
            (0 <= self.min_p <= 1, f"min_p={self.min_p}: expected 0 <= min_p <= 1"),
            (self.repetition_penalty > 0, f"repetition_penalty={self.repetition_penalty}: expected > 0 (1 = off)"),
            (self.max_tokens >= 1, f"max_tokens={self.max_tokens}: expected >= 1"),
            (0 <= self.top_logprobs <= 20, f"top_logprobs={self.top_logprobs}: expected 0..20"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


def _check_types(p: SamplingParams) -> None:
    """Numbers must be numbers: finite reals for the float fields, integers (not bools) for the int fields."""
    def integer(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    for name in FLOAT_FIELDS:
        v = getattr(p, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise UsageError(f"{name}={v!r}: expected a finite number")
    for name in INT_FIELDS:
        if not integer(getattr(p, name)):
            raise UsageError(f"{name}={getattr(p, name)!r}: expected an integer")
    if p.seed is not None and not integer(p.seed):
        raise UsageError(f"seed={p.seed!r}: expected an integer (or None for a random seed)")
    if not all(integer(t) for t in (p.stop_token_ids or ())):
        raise UsageError(f"stop_token_ids={p.stop_token_ids!r}: expected integer token ids")


def _check_bias(bias) -> dict[int, float] | None:
    """logit_bias as {int id: float}: keys may be ints or decimal strings (JSON object keys are strings)."""
    if not bias:
        return None
    if not isinstance(bias, dict):
        raise UsageError(f"logit_bias={bias!r}: expected a mapping of token ids to numbers")
    if len(bias) > MAX_BIAS_ENTRIES:
        raise UsageError(f"logit_bias has {len(bias)} entries: at most {MAX_BIAS_ENTRIES} tokens can be biased")
    out = {}
    for k, v in bias.items():
        if isinstance(k, str) and k.strip().isdigit():
            k = int(k)
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise UsageError(f"logit_bias key {k!r}: expected a token id (an integer >= 0)")
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS:
            raise UsageError(f"logit_bias[{k}]={v!r}: expected a number from -100 to 100")
        out[int(k)] = float(v)
    return out


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


class Uniforms:
    """One request's uniform numbers in [0, 1): its own torch.Generator's draws, BLOCK at a time, handed out in order
    (peek() the next, take() it once the token it chose stands). On the CPU torch.rand(n) gives the same numbers as
    n draws of one, so a seeded request samples what one draw per token would; the stream never depends on what
    else shares the batch. A sampler call that fails before take() leaves the next number where it was."""

    BLOCK = 64

    def __init__(self, generator: torch.Generator):
        self.generator, self.buf, self.next = generator, [], 0

    def peek(self, ahead: int = 0) -> float:
        """The number `ahead` places after the next one (a request with two rows in one call takes two)."""
        while self.next + ahead >= len(self.buf):
            g = self.generator
            self.buf, self.next = self.buf[self.next:] + torch.rand(self.BLOCK, generator=g, device=g.device).tolist(), 0
        return self.buf[self.next + ahead]

    def take(self) -> None:
        self.next += 1


@dataclass
class Sampled:
    """The sampler's answer for N rows, as Python lists (one device->host copy)."""
    tokens: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]],
                    outputs: list[list[int]]) -> torch.Tensor:
    """Repetition (prompt + output), then frequency and presence (output only) penalties, in place on rows that
    ask for them. Counts come from one scatter_add over the padded output ids, not from loops over the vocabulary."""
    rows = [i for i, p in enumerate(params) if p.has_penalties]
    if not rows:
        return logits
    V, dev = logits.shape[1], logits.device
    sub = logits[rows]
    L = max(1, max(len(outputs[i]) for i in rows))
    ids = torch.tensor([outputs[i] + [V] * (L - len(outputs[i])) for i in rows], device=dev)   # V = padding column
    counts = torch.zeros(len(rows), V + 1, device=dev).scatter_add_(1, ids, torch.ones(ids.shape, device=dev))[:, :V]
    rep = torch.tensor([_clamp(params[i].repetition_penalty, 1 / FLOAT_LIMIT, FLOAT_LIMIT) for i in rows],
                       device=dev)[:, None]
    if (rep != 1).any():
        P = max(len(prompts[i]) for i in rows)
        pids = torch.tensor([prompts[i] + [V] * (P - len(prompts[i])) for i in rows], device=dev)
        seen = torch.zeros(len(rows), V + 1, dtype=torch.bool, device=dev).scatter_(1, pids, True)[:, :V]
        seen |= counts > 0
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    freq = torch.tensor([_clamp(params[i].frequency_penalty, -FLOAT_LIMIT, FLOAT_LIMIT) for i in rows],
                        device=dev)[:, None]
    pres = torch.tensor([_clamp(params[i].presence_penalty, -FLOAT_LIMIT, FLOAT_LIMIT) for i in rows],
                        device=dev)[:, None]
    sub = sub - freq * counts - pres * (counts > 0)
    logits[rows] = sub
    return logits


def _uniform(g: Uniforms | torch.Generator, used: dict[int, int]) -> float:
    """The row's next uniform number: after the `used[id(g)]` this call already took from a Uniforms (a bare
    torch.Generator: one draw now, as Uniforms would hand it out)."""
    if not isinstance(g, Uniforms):
        return torch.rand((), generator=g, device=g.device).item()
    k = used.get(id(g), 0)
    used[id(g)] = k + 1
    return g.peek(k)


def _temperature(p: SamplingParams) -> float:
    return min(p.temperature, FLOAT_LIMIT)      # 1e300 would be inf in float32, and -inf / inf is NaN


def _floored(lp: torch.Tensor) -> torch.Tensor:
    """Logprobs as finite numbers: -inf (and NaN, from a broken model) become LOGPROB_FLOOR, as lower values do."""
    return torch.nan_to_num(lp, nan=LOGPROB_FLOOR).clamp_(min=LOGPROB_FLOOR)


def _filter(x: torch.Tensor, params: list[SamplingParams]):
    """Temperature-scaled logits (R, V) -> (filtered logits, sort order or None): min-p, top-k, top-p."""
    R, V = x.shape
    dev = x.device
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=dev)
        probs = x.softmax(-1)
        x = x.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), float("-inf"))
    if not any(0 < p.top_k < V or p.top_p < 1 for p in params):       # (most batches: no tensor built)
        return x, None
    top_k = torch.tensor([p.top_k if 0 < p.top_k < V else V for p in params], device=dev)   # 2^63: no limit
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    if not ((top_k < V).any() or (top_p < 1).any()):                   # (a top_p that rounds to 1.0 in float32)
        return x, None
    x, order = x.sort(-1, descending=True)
    x = x.masked_fill(torch.arange(V, device=dev) >= top_k[:, None], float("-inf"))
    probs = x.softmax(-1)
    # drop a token when the mass strictly before it already reaches top_p (the most likely token always stays)
    x = x.masked_fill(probs.cumsum(-1) - probs >= top_p[:, None], float("-inf"))
    return x, order


def apply_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """OpenAI's logit_bias: each row's {token id: bias} added to its logits, in place (ids checked by the engine)."""
    rows, cols, vals = [], [], []
    for i, p in enumerate(params):
        for t, b in (p.logit_bias or {}).items():
            rows.append(i)
            cols.append(t)
            vals.append(b)
    if rows:
        dev = logits.device
        logits.index_put_((torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)),
                          torch.tensor(vals, device=dev, dtype=logits.dtype), accumulate=True)
    return logits


def apply_masks(logits: torch.Tensor, masks: list[torch.Tensor | None]) -> torch.Tensor:
    """Constraint masks, in place: row i plus masks[i] (float (V,): 0 where the constraint allows the token, -inf
    where not; None = unconstrained). A row left with no finite logit is an error (its constraint allows nothing)."""
    rows = [i for i, m in enumerate(masks) if m is not None]
    for i in rows:
        logits[i] += masks[i].to(logits.device, non_blocking=True)
    if rows and not torch.isfinite(logits[rows].amax(-1)).all():
        raise ValueError("a constraint allows no token")
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[Uniforms | torch.Generator | None],
           prompts: list[list[int]], outputs: list[list[int]],
           masks: list[torch.Tensor | None] | None = None) -> Sampled:
    """Choose one token per row of logits (N, V). generators[i] is request i's randomness (None for greedy rows):
    its Uniforms (the engine's), or a torch.Generator drawn once here; masks[i] request i's constraint as a float
    (V,) to add: 0 where allowed, -inf where not (None: no constraint; grammar.Matcher.logit_mask)."""
    N, V = logits.shape
    dev = logits.device
    logits = logits.float()
    want_lp = any(p.logprobs or p.top_logprobs for p in params)
    lp = None
    if want_lp:       # (x / 1.0 == x exactly: all rows at temperature 1 or greedy divide nothing)
        t = [1.0 if p.greedy else _temperature(p) for p in params]
        lp = torch.log_softmax(logits if all(x == 1.0 for x in t) else logits / torch.tensor(t, device=dev)[:, None],
                               dim=-1)
    masked = masks is not None and any(m is not None for m in masks)
    if masked or any(p.logit_bias for p in params):
        logits = apply_bias(logits.clone(), params)      # (a copy: the caller's logits stay as the model made them)
    if any(p.has_penalties for p in params):
        logits = apply_penalties(logits.clone(), params, prompts, outputs)
    if masked:
        logits = apply_masks(logits, masks)
    rand_rows = [i for i, p in enumerate(params) if not p.greedy]
    # (when every row samples, no argmax, no row gather; x / 1.0 == x exactly, so temperature 1 divides nothing)
    tokens = logits.argmax(-1) if len(rand_rows) < N else torch.empty(N, dtype=torch.long, device=dev)
    if rand_rows:
        sub = [params[i] for i in rand_rows]
        x = logits if len(rand_rows) == N else logits[rand_rows]
        if any(_temperature(p) != 1.0 for p in sub):
            x = x / torch.tensor([_temperature(p) for p in sub], device=dev)[:, None]
        x, order = _filter(x, sub)
        cdf = x.softmax(-1).cumsum(-1)
        used: dict[int, int] = {}    # numbers handed to each Uniforms in this call (a request may have two rows)
        u = torch.tensor([_uniform(generators[i], used) for i in rand_rows], device=dev)
        # inverse CDF: the first token whose cumulative mass exceeds u (right=True skips zero-probability tokens)
        pos = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=V - 1)
        chosen = (pos if order is None else order.gather(1, pos))[:, 0]
        if len(rand_rows) == N:
            tokens = chosen
        else:
            tokens[rand_rows] = chosen
    out = Sampled(tokens.tolist())
    if lp is not None:
        out.logprobs = _floored(lp.gather(1, tokens[:, None])[:, 0]).tolist()
        n = min(max(p.top_logprobs for p in params), V)
        if n:
            vals, idx = lp.topk(n, dim=-1)
            vals, idx = _floored(vals).tolist(), idx.tolist()
            out.top_logprobs = [dict(zip(idx[i][:p.top_logprobs], vals[i][:p.top_logprobs])) for i, p in
                                enumerate(params)]
    for i in rand_rows:          # the numbers are used: the next call hands out the following ones
        if isinstance(generators[i], Uniforms):
            generators[i].take()
    return out

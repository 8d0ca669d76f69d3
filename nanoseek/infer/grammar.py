"""Constraints enforced while decoding: JSON Schema, any JSON object, or a Lark grammar, on llguidance.

    g = Grammar.json_schema(tok, {"type": "object", "properties": {...}, "required": [...]})
    m = g.matcher()                       # per request; the Grammar is immutable and shared
    logits[~m.allowed(vocab_size)] = -inf; t = sample(logits); m.advance(t)
    m.is_finished                         # the grammar is complete: the engine stops with finish_reason "stop"

Why llguidance (PyPI `llguidance`): a Rust core in an abi3 wheel with no Python dependencies, it runs on CPU, and
vLLM, SGLang and llama.cpp use it. It takes JSON Schema and a Lark-like grammar language in which `%json{...}` embeds
a schema and `<[123]>` is a token id, which is how DeepSeek's special tokens (<｜tool▁call▁begin｜>...) enter a
grammar. (xgrammar, the other candidate, needs torch, transformers, triton and tvm-ffi at run time.)

The library works on the tokenizer's own bytes (built from its tokenizer.json, once per Tokenizer), so a token that
spells several characters, or half of one, is allowed exactly when its bytes keep the text inside the grammar.
End of sequence is allowed only where the grammar may end. JSON is compiled without free whitespace (", " and ": "
between items): a model, however weak, cannot fill its budget with blanks, so a bounded schema always ends.
Compiling a grammar is the slow part (up to a second for a large schema); a Grammar keeps one matcher in its start
state and `matcher()` copies it, and the last CACHE_SIZE grammars per tokenizer are kept, so the same schema twice
is compiled once.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict

import numpy as np
import torch

from ..errors import UsageError

CACHE_SIZE = 64     # compiled grammars kept per tokenizer (a server sees the same few schemas again and again)
# How JSON is written under a constraint; these override any "x-guidance" options inside a client's schema.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

__all__ = ["Grammar", "Matcher", "ConstraintError"]


class ConstraintError(RuntimeError):
    """A request's constraint failed while decoding (a token outside the grammar, a parser limit hit): the engine
    ends that request alone with finish_reason "error"."""


def _llg():
    try:
        import llguidance
    except ImportError:   # a main dependency; only a broken install lands here
        raise UsageError("constrained decoding needs the llguidance package: pip install 'llguidance>=1.9'") from None
    return llguidance


class _Tokenizers:
    """One llguidance tokenizer (and a grammar cache) per nanoseek Tokenizer, dropped with the Tokenizer."""

    def __init__(self):
        self.lock = threading.Lock()
        self.entries = weakref.WeakKeyDictionary()   # Tokenizer -> (LLTokenizer, OrderedDict of Grammar)
        self.strong = {}                             # id -> (tokenizer, entry) for tokenizers without weakrefs

    def get(self, tokenizer):
        with self.lock:
            try:
                entry = self.entries.get(tokenizer)
            except TypeError:                           # not weakly referable: kept for the process's life
                entry = self.strong.get(id(tokenizer), (None, None))[1]
            if entry is None:
                entry = (_ll_tokenizer(tokenizer), OrderedDict())
                try:
                    self.entries[tokenizer] = entry
                except TypeError:
                    self.strong[id(tokenizer)] = (tokenizer, entry)
            return entry


_TOKENIZERS = _Tokenizers()


def _ll_tokenizer(tokenizer):
    """llguidance's view of a nanoseek Tokenizer (or a raw tokenizers.Tokenizer): the same tokenizer.json, so the
    token bytes, added tokens and special tokens are the ones we encode with."""
    llg = _llg()
    raw = getattr(tokenizer, "_tk", tokenizer)
    if not hasattr(raw, "to_str"):
        raise UsageError(f"constrained decoding needs a tokenizer with a tokenizer.json (nanoseek.Tokenizer); got "
                         f"{type(tokenizer).__name__}")
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        raise UsageError("constrained decoding needs the tokenizer's end-of-sequence token (eos_token in "
                         "tokenizer_config.json): a grammar ends by allowing it")
    try:
        return llg.LLTokenizer(raw.to_str(), eos_token=eos)
    except Exception as e:
        raise UsageError(f"llguidance cannot read this tokenizer: {e}") from None


class Grammar:
    """A compiled constraint for one tokenizer. Build with json_object / json_schema / lark; immutable, shareable
    between requests and threads; `matcher()` gives a request its own state."""

    def __init__(self, kind: str, source: str, ll_tokenizer, proto):
        self.kind, self.source = kind, source      # "json_object" | "json_schema" | "lark", and its text
        self.vocab_size = ll_tokenizer.vocab_size  # ids the tokenizer knows; the model's may be more (never allowed)
        self.eos_id = ll_tokenizer.eos_token
        self._proto = proto                        # an LLMatcher in the start state, copied for each request

    @classmethod
    def json_object(cls, tokenizer) -> Grammar:
        """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
        return cls._build(tokenizer, "json_object", json.dumps({"type": "object"}))

    @classmethod
    def json_schema(cls, tokenizer, schema: dict) -> Grammar:
        """JSON valid under `schema` (a JSON Schema as a dict). An invalid or unsupported schema is a UsageError that
        names the problem (e.g. 'Unimplemented keys: ["not"]')."""
        if not isinstance(schema, dict):
            raise UsageError(f"a JSON schema must be a JSON object, not {type(schema).__name__}")
        try:
            text = json.dumps(schema, allow_nan=False)     # property order is output order: no sort_keys
        except (TypeError, ValueError) as e:
            raise UsageError(f"the JSON schema is not plain JSON: {e}") from None
        return cls._build(tokenizer, "json_schema", text)

    @classmethod
    def lark(cls, tokenizer, text: str) -> Grammar:
        """A grammar in llguidance's Lark syntax (https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md):
        `start` is the top rule, `%json{...}` embeds a JSON schema, `<[123]>` is the token with id 123."""
        if not isinstance(text, str) or not text.strip():
            raise UsageError("a Lark grammar must be a non-empty string with a `start` rule")
        return cls._build(tokenizer, "lark", text)

    @classmethod
    def _build(cls, tokenizer, kind: str, source: str) -> Grammar:
        ll_tok, cache = _TOKENIZERS.get(tokenizer)
        key = (kind, source)
        with _TOKENIZERS.lock:
            if key in cache:
                cache.move_to_end(key)
                return cache[key]
        grammar = cls(kind, source, ll_tok, _compile(ll_tok, kind, source))
        with _TOKENIZERS.lock:
            cache[key] = grammar
            while len(cache) > CACHE_SIZE:
                cache.popitem(last=False)
        return grammar

    def matcher(self) -> Matcher:
        return Matcher(self._proto.deep_copy(), self.vocab_size)

    def __repr__(self) -> str:
        text = self.source if len(self.source) <= 60 else self.source[:57] + "..."
        return f"Grammar.{self.kind}({text!r})"


def _compile(ll_tok, kind: str, source: str):
    """The grammar's start-state matcher; UsageError with llguidance's reason when it does not compile."""
    llg = _llg()
    if kind == "lark":
        spec = llg.LLMatcher.grammar_from_lark(source)
    else:
        spec = llg.LLMatcher.grammar_from_json_schema(source, overrides=JSON_OPTIONS)
    limits = llg.LLParserLimits(verbose_errors=False)
    m = llg.LLMatcher(ll_tok, spec, log_level=0, limits=limits)
    if m.is_error():
        what = "Lark grammar" if kind == "lark" else "JSON schema"
        raise UsageError(f"invalid {what}: {_short(m.get_error())}")
    return m


def _short(err: str) -> str:
    return err.replace("<non-verbose/>", "").strip()


# llguidance's mask has one bit per token id (bit j of byte k: token 8k + j). Expanding it through a table of the
# 256 byte values is one gather, where bool masking over a 129k vocabulary (masked_fill, where) costs milliseconds.
_BYTE_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little").astype(np.bool_)
_BYTE_LOGITS = np.where(_BYTE_BITS, np.float32(0), np.float32(-np.inf)).astype(np.float32)   # (256, 8)


class Matcher:
    """One request's position in a Grammar: which tokens may come next, and whether the grammar is complete."""

    def __init__(self, ll_matcher, vocab_size: int):
        self._m, self._n = ll_matcher, vocab_size

    def _bytes(self) -> np.ndarray:
        if self._m.is_error():
            raise ConstraintError(_short(self._m.get_error()))
        bits = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
        if not bits.any():
            raise ConstraintError("the grammar allows no token here" +
                                  (f": {_short(self._m.get_error())}" if self._m.is_error() else ""))
        return bits

    def _expand(self, table: np.ndarray, fill, vocab_size: int | None) -> torch.Tensor:
        V = self._n if vocab_size is None else vocab_size
        n = min(V, self._n)
        out = np.full(V, fill, dtype=table.dtype)            # ids past the tokenizer's vocabulary: never allowed
        out[:n] = table[self._bytes()].reshape(-1)[:n]
        return torch.from_numpy(out)

    def allowed(self, vocab_size: int | None = None) -> torch.Tensor:
        """Bool tensor (vocab_size,): True for the tokens that may come next. vocab_size is the model's (default:
        the tokenizer's); ids past the tokenizer's vocabulary are never allowed. ConstraintError when none is."""
        return self._expand(_BYTE_BITS, False, vocab_size)

    def logit_mask(self, vocab_size: int | None = None) -> torch.Tensor:
        """The same as float32 (vocab_size,) to add to logits: 0 where allowed, -inf elsewhere (what the sampler
        takes: an addition is far cheaper than a boolean fill)."""
        return self._expand(_BYTE_LOGITS, -np.inf, vocab_size)

    def advance(self, token_id: int) -> None:
        """Consume one generated token; ConstraintError if the grammar does not allow it here."""
        t = int(token_id)
        if not 0 <= t < self._n or not self._m.consume_token(t):
            raise ConstraintError(f"token {t} is not allowed by the grammar here"
                                  + (f" ({_short(self._m.get_error())})" if self._m.is_error() else ""))

    @property
    def is_finished(self) -> bool:
        """The grammar is complete (only end-of-sequence could follow) or has consumed end-of-sequence."""
        return self._m.is_stopped() and not self._m.is_error()

    @property
    def is_accepting(self) -> bool:
        """The text so far is a complete sentence of the grammar (it may still go on)."""
        return self._m.is_accepting()

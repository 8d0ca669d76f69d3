"""Byte-level BPE tokenizer with DeepSeek's special tokens and an R1-style chat template.

The tokenizer itself is a Hugging Face `tokenizers.Tokenizer` (Rust, fast); this module adds what a model folder
needs around it: the special tokens at fixed ids, the chat template (rendered with jinja2 exactly as transformers
renders it), and save/load of the standard files (tokenizer.json, tokenizer_config.json, special_tokens_map.json)
so that `transformers.AutoTokenizer.from_pretrained(folder)` loads our folders and we load published ones.

Choices, and why:
- Byte-level (GPT-2's 256-symbol byte alphabet): any Unicode string round-trips exactly, no unknown token.
- No normalizer: NFC/NFKC would change text (combining marks, full-width forms), breaking the round trip.
- Digits are split one per token before BPE (as DeepSeek-LLM and Llama do; V3 groups up to three). The verifiable
  tasks are digit-by-digit arithmetic, and a small model learns column sums far more easily from single digits.
- Special tokens first, so bos=0 and eos=1 match ModelConfig's defaults (and DeepSeek-V3's own ids).
- A chat's ids hold control tokens only where the template wrote them: special-token strings in what a user wrote
  (content, reasoning, names, any field) are encoded as text (`encode_chat`), so no one can forge a turn's end, a
  role or a think tag. `encode` of a bare text still turns them into their ids, as transformers does.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import ClassVar

from .chat_template import BOS as _BOS
from .chat_template import CHAT_TEMPLATE, TOOL_MARKERS, mark_strings, render_chat, strings_in, unused_chars
from .chat_template import EOS as _EOS
from .encoding_v4 import V4_TOKENS
from .encoding_v4 import render as render_v4
from .errors import UsageError


def _token_str(v) -> str | None:
    """tokenizer_config.json stores a special token as a string or as {"content": ..., ...} (AddedToken)."""
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def _special(config: dict, special_map: dict, key: str) -> str | None:
    """A special token's string as transformers reads it: tokenizer_config.json first, then special_tokens_map.json."""
    return _token_str(config.get(key)) or _token_str(special_map.get(key))


def _config_template(config: dict) -> str | None:
    """The chat template a tokenizer_config.json holds: a string, or the "default" of a list of named ones."""
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _max_length(value) -> int:
    """tokenizer_config.json's model_max_length; transformers writes a huge sentinel for "unknown"."""
    return value if isinstance(value, int) and value <= 10**9 else 131072


def _read_json(path: Path, strict: bool) -> dict:
    """A JSON object from `path` ({} when there is none; when it is broken: an error if strict, else {})."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        if strict:
            raise UsageError(f"{path} is not valid JSON: {e}; fix or delete it") from e
        return {}
    if not isinstance(data, dict):
        if strict:
            raise UsageError(f"{path} should hold a JSON object, found {type(data).__name__}; fix or delete it")
        return {}
    return data


# Above this many characters a text is encoded through the batch API, which releases the GIL while Rust works:
# `encode` holds it (a 1 MB prompt stopped every other Python thread, the server's event loop included, for 0.8 s).
# Below it the single call is cheaper. Same ids either way.
LONG_TEXT = 8192


def _encode_one(tk, text: str, offsets: bool = False):
    """One text through a tokenizers.Tokenizer -> its Encoding, without holding the GIL for long texts."""
    if len(text) < LONG_TEXT:
        return tk.encode(text, add_special_tokens=False)
    if offsets or not hasattr(tk, "encode_batch_fast"):
        return tk.encode_batch([text], add_special_tokens=False)[0]
    return tk.encode_batch_fast([text], add_special_tokens=False)[0]


FIM_TOKENS = ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")   # DeepSeek's fill-in-the-middle markers


class Tokenizer:
    """A byte-level BPE tokenizer: `Tokenizer.train(...)` or `Tokenizer.load(folder)`, then encode/decode/chat."""

    BOS = _BOS  # <｜begin▁of▁sentence｜>: the chat template's defaults (nanoseek/chat_template.py)
    EOS = _EOS  # <｜end▁of▁sentence｜>
    PAD = "<｜▁pad▁｜>"
    USER = "<｜User｜>"
    ASSISTANT = "<｜Assistant｜>"
    THINK_START = "<think>"
    THINK_END = "</think>"
    # Order = ids of a trained tokenizer: bos 0, eos 1 (ModelConfig's defaults), pad 2, ...
    SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT, THINK_START, THINK_END)

    def __init__(self, tokenizer, chat_template: str | None = CHAT_TEMPLATE, bos_token: str | None = BOS,
                 eos_token: str | None = EOS, pad_token: str | None = PAD, model_max_length: int = 131072,
                 tokenizer_config: dict | None = None, special_tokens_map: dict | None = None):
        self._tk = tokenizer  # tokenizers.Tokenizer
        self.chat_template = chat_template
        # tokenizer_config.json and special_tokens_map.json as read (empty for a trained tokenizer): `save` writes
        # them back with only the fields this object holds brought up to date, so what we do not model
        # (add_bos_token, tokenizer_class, added_tokens_decoder, legacy...) survives a load -> save round trip
        self.tokenizer_config = dict(tokenizer_config or {})
        self.special_tokens_map = dict(special_tokens_map or {})
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.model_max_length = model_max_length
        tid = self._tk.token_to_id
        self.bos_id = tid(bos_token) if bos_token else None
        self.eos_id = tid(eos_token) if eos_token else None
        self.pad_id = tid(pad_token) if pad_token else None
        self.think_start_id = tid(self.THINK_START)
        self.think_end_id = tid(self.THINK_END)

    # ---------------------------------------------------------------- training
    @classmethod
    def train(cls, files_or_iterator: Iterable[str] | str | os.PathLike, vocab_size: int,
              min_frequency: int = 2, progress: bool = True) -> Tokenizer:
        """Train byte-level BPE on text files (paths) or an iterator of strings; returns a ready tokenizer.

        `vocab_size` counts everything: 7 special tokens + 256 bytes + merges. Special-token strings met in the
        training text are cut out (so they never become merges)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        minimum = len(cls.SPECIAL_TOKENS) + 256
        if not isinstance(vocab_size, int) or vocab_size < minimum:
            raise UsageError(f"vocab size {vocab_size} is too small: a byte-level tokenizer needs at least {minimum} "
                             f"({len(cls.SPECIAL_TOKENS)} special tokens + 256 bytes); pass --vocab-size >= {minimum}")
        if isinstance(files_or_iterator, (str, os.PathLike)):
            files_or_iterator = [files_or_iterator]
        items = files_or_iterator
        if isinstance(items, (list, tuple)) and items and all(_is_path(f) for f in items):
            texts = read_files(items)
        else:
            texts = iter(items)

        tk = HFTokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, show_progress=progress,
            special_tokens=list(cls.SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        seen = {"n": 0}

        def pieces() -> Iterator[str]:
            split = re.compile("|".join(re.escape(s) for s in cls.SPECIAL_TOKENS))
            for text in texts:
                if not isinstance(text, str):
                    raise UsageError(f"tokenizer training data must be strings, got {type(text).__name__}")
                for piece in split.split(text):
                    # a whole .txt file is one document: feed it in ~1 MB slices cut at line ends (memory)
                    while len(piece) > 1 << 20:
                        cut = piece.rfind("\n", 0, 1 << 20) + 1 or 1 << 20
                        seen["n"] += 1
                        yield piece[:cut]
                        piece = piece[cut:]
                    if piece:
                        seen["n"] += 1
                        yield piece

        tk.train_from_iterator(pieces(), trainer=trainer)
        if seen["n"] == 0:
            raise UsageError("no text to train the tokenizer on: the data is empty; pass files with text in them")
        tok = cls(tk)
        tok._set_post_processor()
        ids = [tok._tk.token_to_id(s) for s in cls.SPECIAL_TOKENS]
        assert ids == list(range(len(ids))), f"special tokens must come first, got ids {ids}"
        return tok

    def _set_post_processor(self):
        """`encode(text, add_special_tokens=True)` (transformers' default) prepends bos, as DeepSeek's does."""
        from tokenizers import processors
        if self.bos_id is None:
            return
        self._tk.post_processor = processors.TemplateProcessing(
            single=f"{self.bos_token} $A", pair=f"{self.bos_token} $A {self.bos_token} $B",
            special_tokens=[(self.bos_token, self.bos_id)])

    # ---------------------------------------------------------------- files
    @classmethod
    def load(cls, folder: str | os.PathLike) -> Tokenizer:
        """Load any Hugging Face tokenizer folder (tokenizer.json [+ tokenizer_config.json, chat_template.jinja]), or
        the tokenizer inside a .gguf file.

        Published DeepSeek folders work: bos/eos/pad and the chat template come from their tokenizer_config.json
        (a `chat_template.jinja` file, which transformers >= 5 writes, takes precedence)."""
        from tokenizers import Tokenizer as HFTokenizer
        folder = Path(folder)
        if folder.suffix == ".gguf":   # a GGUF file's vocabulary, merges, special tokens and chat template
            import tempfile

            from .gguf import tokenizer_files
            with tempfile.TemporaryDirectory() as d:
                return cls.load(tokenizer_files(folder, d))
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise UsageError(f"no tokenizer in {folder}: expected {path} (train one with `nanoseek tokenizer "
                             "--data FILE --vocab-size N --out DIR`, or copy a Hugging Face tokenizer.json there)")
        try:
            tk = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust parser's own message says what is wrong
            raise UsageError(f"cannot read {path}: {e}") from e
        config = _read_json(folder / "tokenizer_config.json", strict=True)
        special_map = _read_json(folder / "special_tokens_map.json", strict=False)
        template = _config_template(config)
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        tokens = {k: _special(config, special_map, k) for k in ("bos_token", "eos_token", "pad_token")}
        return cls(tk, chat_template=template, model_max_length=_max_length(config.get("model_max_length")),
                   tokenizer_config=config, special_tokens_map=special_map, **tokens)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write tokenizer.json, tokenizer_config.json (with the chat template), special_tokens_map.json and
        chat_template.jinja: a folder that transformers.AutoTokenizer loads and encodes identically.

        A loaded tokenizer writes back the tokenizer_config.json and special_tokens_map.json it was read from, with
        only what differs from this object (special tokens, model_max_length, chat template) changed."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tk.save(str(folder / "tokenizer.json"))
        config = self._config_to_save()
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")
        smap = self._special_map_to_save(config)
        (folder / "special_tokens_map.json").write_text(json.dumps(smap, indent=2, ensure_ascii=False) + "\n",
                                                        encoding="utf-8")
        # transformers >= 5 reads the template from here first; keep it in step with tokenizer_config.json
        jinja = folder / "chat_template.jinja"
        if self.chat_template is not None:
            jinja.write_text(self.chat_template, encoding="utf-8")
        elif jinja.exists():
            jinja.unlink()
        return folder

    def _config_to_save(self) -> dict:
        """tokenizer_config.json: the one loaded (our defaults for a trained tokenizer), with each field this object
        holds written only where the file would otherwise load a different value."""
        loaded = self.tokenizer_config
        config = dict(loaded) or {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.bos_id is not None,
                                  "add_eos_token": False, "clean_up_tokenization_spaces": False,
                                  "model_max_length": self.model_max_length}
        for key in ("bos_token", "eos_token", "pad_token"):
            value = getattr(self, key)
            if _special(config, self.special_tokens_map, key) != value:
                config[key] = value
        if _max_length(config.get("model_max_length")) != self.model_max_length:
            config["model_max_length"] = self.model_max_length
        if _config_template(config) != self.chat_template:
            config["chat_template"] = self.chat_template
        # a None of ours drops the key; a null the file had (unk_token: null) stays
        return {k: v for k, v in config.items() if v is not None or (k in loaded and loaded[k] is None)}

    def _special_map_to_save(self, config: dict) -> dict:
        """special_tokens_map.json: the one loaded, its tokens brought up to date (built from `config` if none)."""
        if not self.special_tokens_map:
            return {k: config[k] for k in ("bos_token", "eos_token", "pad_token") if config.get(k) is not None}
        smap = dict(self.special_tokens_map)
        for key in ("bos_token", "eos_token", "pad_token"):
            if key in smap and _token_str(smap[key]) != getattr(self, key):
                smap[key] = getattr(self, key)
        return {k: v for k, v in smap.items() if v is not None}

    # ---------------------------------------------------------------- encode / decode
    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's vocab_size must be at least this)."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str | list[str], add_bos: bool = False) -> list[int] | list[list[int]]:
        """Text -> ids (a list of texts -> a list of id lists, encoded in parallel). Special-token strings inside
        the text become their special ids, as in transformers."""
        if isinstance(text, (list, tuple)):
            return self.encode_batch(text, add_bos=add_bos)
        ids = _encode_one(self._tk, text).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def encode_batch(self, texts: list[str], add_bos: bool = False) -> list[list[int]]:
        encs = self._tk.encode_batch_fast(list(texts), add_special_tokens=False) \
            if hasattr(self._tk, "encode_batch_fast") else self._tk.encode_batch(list(texts), add_special_tokens=False)
        if add_bos and self.bos_id is not None:
            return [[self.bos_id, *e.ids] for e in encs]
        return [e.ids for e in encs]

    def decode(self, ids, skip_special_tokens: bool = False, skip_control: bool = False) -> str:
        """ids -> text. An incomplete UTF-8 sequence at the end decodes to U+FFFD (stream with care).
        skip_control=True leaves out the control tokens (`control_ids`) and keeps the think tags: a model's answer
        as a client may see it."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [i for i in ids if i not in self.control_ids] if skip_control else list(ids)
        return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch, skip_special_tokens: bool = False, skip_control: bool = False) -> list[str]:
        drop = self.control_ids if skip_control else ()
        return self._tk.decode_batch([[i for i in x if i not in drop] for x in batch],
                                     skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    @cached_property
    def fim_ids(self) -> tuple[int, int, int] | None:
        """(begin, hole, end) ids of DeepSeek's fill-in-the-middle tokens (V3/R1 and V4 tokenizers; Coder's), or
        None when the vocabulary has them not."""
        ids = tuple(self._protected.get(t) for t in FIM_TOKENS)
        return None if None in ids else ids

    def fim_prompt(self, prefix: str, suffix: str) -> list[int]:
        """DeepSeek's fill-in-the-middle prompt, prefix-suffix-middle: <bos><｜fim▁begin｜>PREFIX<｜fim▁hole｜>SUFFIX
        <｜fim▁end｜>; the model writes the middle next."""
        if self.fim_ids is None:
            raise UsageError(f"this tokenizer has no fill-in-the-middle tokens ({', '.join(FIM_TOKENS)})")
        begin, hole, end = self.fim_ids
        pre, suf = self.encode([prefix, suffix])
        return [*([self.bos_id] if self.bos_id is not None else []), begin, *pre, hole, *suf, end]

    def id_to_token(self, i: int) -> str | None:
        return self._tk.id_to_token(i)

    @property
    def special_ids(self) -> set[int]:
        """Ids of every token added to the vocabulary (special or not in tokenizer.json's sense)."""
        return set(self._added)

    # ---------------------------------------------------------------- control tokens
    @cached_property
    def _added(self) -> dict:
        """{id: AddedToken} of the tokens added to the vocabulary: bos, eos, pad, roles, think tags, tool markers..."""
        return dict(self._tk.get_added_tokens_decoder())

    @cached_property
    def _protected(self) -> dict[str, int]:
        """{string: id} of the added tokens that a user's text must never produce: all but runs of whitespace (some
        vocabularies add those as tokens for code; they are text). Published DeepSeek tokenizers mark <｜User｜>,
        <｜Assistant｜> and <think> *non*-special, so "special" in tokenizer.json's sense would not be enough."""
        return {t.content: i for i, t in self._added.items() if t.content.strip()}

    @cached_property
    def control_ids(self) -> frozenset[int]:
        """Ids that are never a chat's text: the protected added tokens but <think> and </think> and the tool-call
        markers (a model writes those: they become reasoning_content and tool_calls). Generated text for a client is
        decoded without them."""
        written = {self.think_start_id, self.think_end_id, *(self._protected.get(m) for m in TOOL_MARKERS)}
        return frozenset(self._protected.values()) - written

    @cached_property
    def _matcher(self):
        """(tokenizer, {its id: our id}) that finds the protected tokens in a text by the library's own rules
        (leftmost longest match, the tokens' strip/word flags, the normalizer) and sees all else as one unknown
        word, so that finding them costs no BPE."""
        from tokenizers import AddedToken, models
        from tokenizers import Tokenizer as HFTokenizer
        unknown = "\ufffe"  # a noncharacter: no token's string
        m = HFTokenizer(models.WordLevel({unknown: 0}, unk_token=unknown))
        if self._tk.normalizer is not None:
            m.normalizer = self._tk.normalizer
        added = [t for t in self._added.values() if t.content in self._protected]
        m.add_tokens([AddedToken(t.content, single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip,
                                 normalized=t.normalized, special=t.special) for t in added])
        return m, {m.token_to_id(t.content): self._protected[t.content] for t in added}

    @cached_property
    def _plain(self):
        """This tokenizer without the protected tokens: encodes a user's text, special-token strings as text."""
        from tokenizers import Tokenizer as HFTokenizer
        data = json.loads(self._tk.to_str())
        data["added_tokens"] = [t for t in data.get("added_tokens") or [] if t["content"] not in self._protected]
        return HFTokenizer.from_str(json.dumps(data))

    @cached_property
    def _edges(self) -> tuple[set[str], set[str], int]:
        """(proper prefixes, proper suffixes, longest length) of the protected strings."""
        words = list(self._protected)
        prefixes = {w[:n] for w in words for n in range(1, len(w))}
        suffixes = {w[n:] for w in words for n in range(1, len(w))}
        return prefixes, suffixes, max(map(len, words), default=0)

    def _find_protected(self, text: str) -> list[tuple[int, int, int]]:
        """(start, end, id) of each protected token in `text`, as encode() would match it."""
        m, ids = self._matcher
        enc = _encode_one(m, text, offsets=True)
        return [(s, e, ids[i]) for i, (s, e) in zip(enc.ids, enc.offsets) if i in ids]

    def _user_spots(self, text: str) -> list[tuple[int, int]]:
        """Spans of a user's string to mark: each protected token in it, and a start that ends one (a proper
        suffix) or an end that starts one (a proper prefix), which the text beside it could complete."""
        spots = [(s, e) for s, e, _ in self._find_protected(text)]
        prefixes, suffixes, longest = self._edges
        first, last = (spots[0][0], spots[-1][1]) if spots else (len(text), 0)
        head = next((k for k in range(min(longest - 1, first), 0, -1) if text[:k] in suffixes), 0)
        tail = next((k for k in range(min(longest - 1, len(text) - last), 0, -1) if text[-k:] in prefixes), 0)
        if head and tail and head > len(text) - tail:  # one short string that is both: mark it whole
            return [(0, len(text))]
        return ([(0, head)] if head else []) + spots + ([(len(text) - tail, len(text))] if tail else [])

    def _encode_text(self, text: str, drop: str = "") -> list[int]:
        """A text that holds no control token: the characters of `drop` are removed, the rest encoded with the
        protected tokens' strings taken as text."""
        for c in drop:
            text = text.replace(c, "")
        ids = _encode_one(self._plain, text).ids if text else []
        forged = set(ids) & set(self._protected.values())
        if forged:
            name = self.id_to_token(min(forged))
            raise UsageError(f"this tokenizer's vocabulary spells the control token {name!r} from plain text, so a "
                             "user could forge it; remove it from tokenizer.json's model vocabulary and merges, and "
                             "keep it only among the added tokens")
        return ids

    # ---------------------------------------------------------------- chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False,
                            thinking: bool | None = None, **variables) -> str | list[int]:
        """Render messages with the chat template (as transformers does; `thinking` is a template variable, passed
        only when given: left out, the template's own default holds, e.g. on in ours, off in DeepSeek-V3.1's).
        V4's tokenizer has no template: its chats are written in DeepSeek's V4 format (`prompt_format`), where
        `thinking` and `reasoning_effort` ("high" or "max") pick non-think, think-high or think-max.
        `tools=[{"type": "function", "function": {...}}]` reaches the template as transformers passes it; assistant
        messages may carry `tool_calls` and `reasoning_content`, and role "tool" messages `tool_call_id`.

        tokenize=True returns `encode_chat`'s ids: control-token strings that came from the messages (or from
        `variables`) are text; the template's own markers are control tokens. The template already writes bos, so
        none is added again."""
        if tokenize:
            return self.encode_chat(messages, add_generation_prompt=add_generation_prompt, thinking=thinking,
                                    **variables)
        return self._render(messages, add_generation_prompt, thinking, variables)

    @property
    def prompt_format(self) -> str | None:
        """How a chat becomes text: "jinja" (the chat template, rendered as transformers does), "deepseek-v4"
        (V4's tokenizer ships no template: DeepSeek publishes a Python encoder instead, which
        nanoseek.encoding_v4 follows), or None (no chat format: apply_chat_template refuses)."""
        if self.chat_template is not None:
            return "jinja"
        return "deepseek-v4" if all(t in self._protected for t in V4_TOKENS) else None

    def _render(self, messages, add_generation_prompt: bool, thinking: bool | None, variables: dict) -> str:
        fmt = self.prompt_format
        if fmt is None:
            raise UsageError("this tokenizer has no chat template (tokenizer_config.json has no chat_template and "
                             "there is no chat_template.jinja); add one or use a model folder that has it")
        special = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                   "pad_token": self.pad_token or ""}
        if fmt == "deepseek-v4":   # (thinking None: V4's default, think-high, as DeepSeek's API defaults to)
            return render_v4(messages, add_generation_prompt, thinking=thinking, **{**special, **variables})
        if thinking is not None:  # else undefined in the template, as in transformers when a caller leaves it out
            variables = {**variables, "thinking": thinking}
        return render_chat(messages, self.chat_template, add_generation_prompt=add_generation_prompt,
                           **{**special, **variables})

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, thinking: bool | None = None,
                    **variables) -> list[int]:
        """The chat's ids, safe for any template: a control token comes only from the template, never from a
        string a user wrote (any message field, any variable but bos/eos/pad_token), which is encoded as text.

        How: where a user's string holds a control token's text (or the start or end of one, which a neighbouring
        string could complete), that spot is wrapped in two marker characters found nowhere else, and the chat is
        rendered with them. The template transforms the text as it likes (R1 splits a past answer on </think> and
        keeps the rest, others trim it); the markers travel with the characters they wrap. In the result, a control
        token's text between the two markers, or cut by one, is a user's; the others are the template's. The text
        between the template's tokens is encoded with control tokens taken as text, the markers removed. With no
        such spot in any string, this is exactly encode(apply_chat_template(...)).

        Limits, all on the side of text: a template that looks at a user's string character by character (slices,
        lengths, startswith on a marked end) sees the markers, so its text may differ from the text path's there;
        a template that joins a user's string's pieces around a control token of its own writes that token as
        text. Not seen: a template that deletes characters inside a user's string to join what was on either side
        (none we know of does)."""
        keep = {k: v for k, v in variables.items() if k in ("bos_token", "eos_token", "pad_token")}
        user = {k: v for k, v in variables.items() if k not in keep}
        spots = {s: self._user_spots(s) for s in strings_in((messages, user))}
        if not any(spots.values()):
            return self.encode(self._render(messages, add_generation_prompt, thinking, variables))
        markers = unused_chars([*spots, self.chat_template or "", *self._protected], 2)
        if len(markers) < 2:
            raise UsageError("this chat uses nearly every Unicode character: no two are left to mark its text with")
        open_, close = markers
        messages, user = mark_strings((messages, user), spots.__getitem__, open_, close)
        text = self._render(messages, add_generation_prompt, thinking, {**user, **keep})
        ids, at = [], 0
        for start, end, tid in self._find_protected(text):
            if text[start - 1:start] == open_ and text[end:end + 1] == close:
                continue  # a user's (a stray marker beside the template's own, from a cut string, is no sign)
            ids += self._encode_text(text[at:start], markers)
            ids.append(tid)
            at = end
        return ids + self._encode_text(text[at:], markers)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r})"


# ---------------------------------------------------------------- data files
def _is_path(x) -> bool:
    """A file/folder name (or hf:NAME) rather than a text to train on; a text too long to be a name is a text."""
    if isinstance(x, os.PathLike):
        return True
    if not isinstance(x, str) or len(x) >= 4096 or "\n" in x:
        return False
    if x.startswith("hf:"):
        return True
    try:
        return Path(x).exists()
    except OSError:  # e.g. "File name too long": not a path
        return False


def read_files(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    """The documents of data files or folders, read exactly as `nanoseek pretrain --data` reads them
    (nanoseek.data.corpus.read_documents: .txt/.md, .jsonl "text" or "messages" rendered with our chat template,
    .parquet, hf:NAME). Every path is checked (exists, not empty, supported) before any is read, so bad input fails
    at once."""
    from itertools import chain

    from .data.corpus import read_documents
    readers = [read_documents(p) for p in paths]
    return chain.from_iterable(readers)


# ---------------------------------------------------------------- CLI
@dataclass
class TokenizerConfig:
    data: list[str] | None = None  # .txt/.md/.jsonl/.parquet files or folders, or hf:NAME (default: embedded corpus)
    vocab_size: int = 1024          # total vocabulary, special tokens included
    out: str = ""                   # folder to write tokenizer.json etc. into
    corpus_docs: int = 20000        # documents of the embedded corpus to train on when --data is not given
    seed: int = 0                   # seed of the embedded corpus
    force: bool = False             # overwrite an existing tokenizer in --out
    REQUIRED: ClassVar[tuple] = ("out",)


CONFIG = TokenizerConfig


def main(cfg: TokenizerConfig) -> int:
    """`nanoseek tokenizer`: train on --data (or the embedded corpus) and write the tokenizer folder."""
    out = Path(cfg.out)
    if (out / "tokenizer.json").exists() and not cfg.force:
        raise UsageError(f"{out / 'tokenizer.json'} already exists; choose another --out or pass --force")
    data = [cfg.data] if isinstance(cfg.data, (str, os.PathLike)) else list(cfg.data or [])
    if data:
        source = read_files(data)
        what = ", ".join(map(str, data))
    else:
        from .data.tasks import corpus_documents
        source = corpus_documents(cfg.corpus_docs, seed=cfg.seed)
        what = f"{cfg.corpus_docs} documents of the embedded task corpus"
    tok = Tokenizer.train(source, cfg.vocab_size)
    tok.save(out)
    note = f" (asked for {cfg.vocab_size}: the data has no more frequent pairs)" if tok.vocab_size < cfg.vocab_size \
        else ""
    print(f"trained a {tok.vocab_size}-token byte-level BPE{note} on {what}; wrote {out}/tokenizer.json")
    return 0

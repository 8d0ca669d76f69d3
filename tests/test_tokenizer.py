"""The tokenizer: exact Unicode round trip, DeepSeek special tokens at fixed ids, agreement with transformers."""

import json
import random
from pathlib import Path

import pytest

from nanoseek.errors import UsageError
from nanoseek.tokenizer import Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. 12+345=357.",
    "<think>\ncol1: 7+5+0=12, write 2 carry 1\n</think>\n<answer>132</answer>",
    "深度求索 DeepSeek 是一家人工智能公司。日本語も少し。 한국어도.",
    "Emoji: 😀🚀👩‍👩‍👧 and accents: café, naïve, Ångström.",
] * 30

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 47+85?"},
    {"role": "assistant", "reasoning_content": "col1: 7+5+0=12", "content": "<answer>132</answer>"},
    {"role": "user", "content": "And 3*4? <think> is just text here"},
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, vocab_size=400, progress=False)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    tok.save(folder)
    return folder


def _random_strings(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        out.append(raw.decode("utf-8", errors="ignore"))  # random bytes, kept where they are valid UTF-8
        # random code points from every plane, surrogates excluded (they cannot be encoded in UTF-8)
        cps = [rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0x80, 0xD800), rng.randrange(0xE000, 0x110000),
                           rng.randrange(0, 0x20)]) for _ in range(rng.randrange(1, 30))]
        out.append("".join(map(chr, cps)))
    return out


TRICKY = [
    "", " ", "  leading and trailing  ", "\n\n\t\r\n", "\x00\x01\x7f control", "e\u0301 (combining acute) vs \u00e9",
    "a\u0308\u0304\u0327 stacked marks", "👩‍👩‍👧‍👦 ZWJ family, 🇫🇷 flag, 🏽 skin tone", "中文，日本語，한국어",
    "\ufeffBOM and \u200b zero-width", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math", "\U0010fffd last plane",
    "1234567890 0.5 -7", "<｜begin▁of▁sentence｜>specials<｜User｜>inside<think>text</think><｜end▁of▁sentence｜>",
]


def test_special_tokens_have_fixed_ids_matching_model_defaults(tok):
    # ModelConfig defaults: bos_token_id=0, eos_token_id=1 (as DeepSeek-V3)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert [tok.token_to_id(s) for s in Tokenizer.SPECIAL_TOKENS] == list(range(7))
    assert tok.think_start_id == tok.token_to_id("<think>") and tok.think_end_id == tok.token_to_id("</think>")
    assert 263 < tok.vocab_size <= 400


def test_round_trip_of_arbitrary_unicode(tok):
    for s in TRICKY + _random_strings(200):
        assert tok.decode(tok.encode(s)) == s, repr(s)


def test_special_token_text_becomes_one_special_id(tok):
    ids = tok.encode("a<think>b</think>c<｜end▁of▁sentence｜>")
    assert tok.think_start_id in ids and tok.think_end_id in ids and ids[-1] == tok.eos_id
    assert tok.decode(ids, skip_special_tokens=True) == "abc"
    assert tok.encode("hi", add_bos=True) == [tok.bos_id, *tok.encode("hi")]


def test_digits_are_single_tokens(tok):
    # the arithmetic tasks are worked digit by digit; multi-digit tokens would hide the columns
    ids = tok.encode("1234567890")
    assert len(ids) == 10


def test_batch_encode_equals_single_encode(tok):
    texts = TRICKY + CORPUS[:4]
    assert tok.encode(texts) == [tok.encode(t) for t in texts]
    assert tok.encode(texts, add_bos=True)[1] == tok.encode(texts[1], add_bos=True)
    assert tok.decode_batch(tok.encode(texts)) == texts


def test_save_load_round_trip(tok, saved):
    files = {p.name for p in saved.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= files
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["bos_token"] == Tokenizer.BOS
    assert "chat_template" in config and config["model_max_length"] > 0
    again = Tokenizer.load(saved)
    for s in TRICKY:
        assert again.encode(s) == tok.encode(s)
    assert again.apply_chat_template(MESSAGES) == tok.apply_chat_template(MESSAGES)
    assert (again.bos_id, again.eos_id, again.pad_id, again.vocab_size) == (0, 1, 2, tok.vocab_size)


def test_transformers_autotokenizer_encodes_identically(tok, saved):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(saved)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    for s in TRICKY + _random_strings(30, seed=1):
        ours = tok.encode(s)
        assert hf(s, add_special_tokens=False)["input_ids"] == ours, repr(s)
        # transformers' default adds bos, as DeepSeek's tokenizers do
        assert hf(s)["input_ids"] == tok.encode(s, add_bos=True), repr(s)
        assert hf.decode(ours) == tok.decode(ours)


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_like_transformers(tok, saved, thinking, add_generation_prompt):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(saved)
    msgs = MESSAGES if add_generation_prompt else MESSAGES[:3]
    ours = tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, thinking=thinking)
    theirs = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt,
                                    thinking=thinking)
    assert ours == theirs
    ids = tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, thinking=thinking, tokenize=True)
    # the same ids as transformers', but for the last user message's "<think>", which a user wrote: text (issue 9)
    enc = lambda text, **kw: hf(text, add_special_tokens=False, **kw)["input_ids"]
    user = msgs[-1]["content"] if msgs[-1]["role"] == "user" else ""
    start = theirs.rindex(user) if user else len(theirs)
    expected = enc(theirs[:start]) + enc(user, split_special_tokens=True) + enc(theirs[start + len(user):])
    assert ids == expected and ids[0] == tok.bos_id
    if user:  # where transformers' encode(render) reads the user's "<think>" as the tag
        assert ids != enc(theirs)


def test_chat_template_follows_r1_format(tok):
    text = tok.apply_chat_template(MESSAGES)
    assert text == (
        "<｜begin▁of▁sentence｜>You are terse.<｜User｜>What is 47+85?<｜Assistant｜><think>\ncol1: 7+5+0=12\n</think>"
        "\n\n<answer>132</answer><｜end▁of▁sentence｜><｜User｜>And 3*4? <think> is just text here"
        "<｜Assistant｜><think>\n")
    direct = tok.apply_chat_template(MESSAGES[1:2], thinking=False)
    assert direct.endswith("<｜Assistant｜><think>\n\n</think>\n\n")


def test_generation_prompt_is_a_prefix_of_the_rendered_answer(tok):
    # SFT masks the prompt by its length: the prompt must be a prefix of the full conversation, in text and in ids
    prompt = tok.apply_chat_template(MESSAGES[:2], add_generation_prompt=True)
    full = tok.apply_chat_template(MESSAGES[:3], add_generation_prompt=False)
    assert full.startswith(prompt)
    p_ids, f_ids = tok.encode(prompt), tok.encode(full)
    assert f_ids[:len(p_ids)] == p_ids


def test_load_reads_published_style_config_and_jinja_file(tok, tmp_path):
    # DeepSeek's published tokenizer_config.json stores tokens as AddedToken dicts; transformers >= 5 writes the
    # template to chat_template.jinja, which wins over the config's
    tok.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["bos_token"] = {"__type": "AddedToken", "content": Tokenizer.BOS, "lstrip": False}
    cfg["eos_token"] = {"__type": "AddedToken", "content": Tokenizer.EOS, "lstrip": False}
    cfg["chat_template"] = "config template"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "special_tokens_map.json").unlink()
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    t = Tokenizer.load(tmp_path)
    assert (t.bos_id, t.eos_id) == (0, 1)
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == Tokenizer.BOS + "x"


def test_bad_input_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="at least 263"):
        Tokenizer.train(CORPUS, vocab_size=100)
    with pytest.raises(UsageError, match="no tokenizer"):
        Tokenizer.load(tmp_path)
    with pytest.raises(UsageError, match="empty"):
        Tokenizer.train(iter([]), vocab_size=300)


def _cli(argv):
    """`nanoseek tokenizer ARGV` as the CLI runs it (flags from TokenizerConfig, UsageError -> one error line,
    exit 2), built from this module alone so that other stages being edited cannot break this test."""
    import argparse
    import sys

    from nanoseek import cli, tokenizer
    from nanoseek.options import add_options, make_config
    assert cli.COMMANDS["tokenizer"][0] == "nanoseek.tokenizer"
    parser = add_options(argparse.ArgumentParser(prog="nanoseek tokenizer"), tokenizer.CONFIG)
    try:
        return tokenizer.main(make_config(tokenizer.CONFIG, parser.parse_args(argv)))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def test_cli_trains_and_refuses_bad_data_without_overwriting(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text("\n".join(CORPUS), encoding="utf-8")
    out = tmp_path / "tok"
    assert _cli(["--data", str(data), "--vocab-size", "300", "--out", str(out)]) == 0
    assert Tokenizer.load(out).vocab_size <= 300
    before = (out / "tokenizer.json").read_bytes()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for argv in (["--data", str(tmp_path / "missing.txt")], ["--data", str(empty)],
                 ["--data", str(data), "--vocab-size", "10"]):
        assert _cli([*argv, "--out", str(tmp_path / "other")]) == 2
        assert not (tmp_path / "other").exists()
    assert _cli(["--data", str(data), "--out", str(out)]) == 2  # exists: no overwrite
    assert (out / "tokenizer.json").read_bytes() == before
    # no --data: the embedded task corpus, offline
    assert _cli(["--out", str(tmp_path / "default"), "--corpus-docs", "200", "--vocab-size", "300"]) == 0
    assert Tokenizer.load(tmp_path / "default").encode("col1: 7+5+0=12")
    err = capsys.readouterr().err
    assert "missing.txt" in err and "empty" in err and "at least 263" in err and "already exists" in err


def test_load_a_bare_tokenizer_json_folder(tok, tmp_path):
    # any HF tokenizer.json works alone (no config): no special-token roles, no chat template until one is given
    tok._tk.save(str(tmp_path / "tokenizer.json"))
    bare = Tokenizer.load(tmp_path)
    assert bare.bos_id is None and bare.encode("hi", add_bos=True) == tok.encode("hi")
    assert bare.decode(bare.encode(TRICKY[7])) == TRICKY[7]
    with pytest.raises(UsageError, match="no chat template"):
        bare.apply_chat_template(MESSAGES)
    bare.save(tmp_path / "again")
    assert Tokenizer.load(tmp_path / "again").encode(TRICKY[7]) == tok.encode(TRICKY[7])


def test_train_on_a_list_of_long_texts_treats_them_as_texts_not_file_names():
    # A text longer than the OS's file-name limit used to crash the "is this a path?" check.
    tok = Tokenizer.train(["x" * 400 + " hello world", "some more text here " * 30], vocab_size=300)
    assert tok.decode(tok.encode("hello world")) == "hello world"


def _longest_stall(fn) -> float:
    """The longest time another Python thread could not run while fn() ran (it ticks every millisecond)."""
    import threading
    import time

    gaps, done = [0.0], threading.Event()

    def ticker():
        last = time.perf_counter()
        while not done.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    t = threading.Thread(target=ticker)
    t.start()
    time.sleep(0.02)
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(gaps)


def test_a_long_text_is_encoded_without_holding_the_gil(tok):
    """A server encodes prompts in a worker thread: a long prompt must not stop the event loop's thread. The batch
    API releases the GIL; a single `encode` call of the library holds it (the negative control)."""
    text = "Solve for x: 6x+2=14 and then more words. " * 20000
    assert tok.encode(text) == tok._tk.encode(text, add_special_tokens=False).ids
    held = _longest_stall(lambda: tok._tk.encode(text, add_special_tokens=False))
    ours = _longest_stall(lambda: tok.encode(text))
    assert held > 0.1, f"the negative control should stall the other thread (it did for {held:.3f} s)"
    assert ours < held / 2, f"encode stalled another thread for {ours:.3f} s (the library's encode: {held:.3f} s)"


# ---------------------------------------------------------------- bugs found on published files (issue 10, item 6)
# DeepSeek-V3.1's published chat template (its tokenizer_config.json's "chat_template"), kept verbatim as test data
V31_TEMPLATE = (Path(__file__).parent / "data" / "deepseek_v3.1_chat_template.jinja").read_text(encoding="utf-8")


@pytest.mark.parametrize("thinking", [None, True, False])
def test_thinking_left_out_keeps_the_templates_own_default(tok, tmp_path, thinking):
    # 6a: DeepSeek-V3.1's published template defaults to non-thinking ("<｜Assistant｜></think>"); we used to pass
    # thinking=True whatever the caller gave, so an unset switch rendered "<｜Assistant｜><think>"
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(V31_TEMPLATE, encoding="utf-8")
    ours, hf = Tokenizer.load(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    kw = {} if thinking is None else {"thinking": thinking}
    text = ours.apply_chat_template(MESSAGES[:2], **kw)
    assert text == hf.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True, **kw)
    assert text.endswith("<｜Assistant｜><think>" if thinking else "<｜Assistant｜></think>")
    ids = ours.apply_chat_template(MESSAGES[:2], tokenize=True, **kw)
    assert ids == hf(text, add_special_tokens=False)["input_ids"]
    # our own template thinks unless told not to, through its own default
    assert tok.apply_chat_template(MESSAGES[:2], **kw).endswith("<think>\n" if thinking is not False else
                                                               "<think>\n\n</think>\n\n")


def test_save_keeps_the_tokenizer_config_it_loaded(tok, tmp_path):
    # 6d: a published V3/R1 folder says add_bos_token=false and tokenizer_class LlamaTokenizerFast (plus keys we do
    # not model); save used to write add_bos_token=true and PreTrainedTokenizerFast over them
    tok.save(tmp_path / "published")
    token = lambda s: {"__type": "AddedToken", "content": s, "lstrip": False, "normalized": True, "rstrip": False,
                       "single_word": False}
    published = {"add_bos_token": False, "add_eos_token": False, "bos_token": token(Tokenizer.BOS),
                 "clean_up_tokenization_spaces": False, "eos_token": token(Tokenizer.EOS), "legacy": True,
                 "model_max_length": 1000000000000000019884624838656, "pad_token": token(Tokenizer.EOS),
                 "sp_model_kwargs": {}, "unk_token": None, "tokenizer_class": "LlamaTokenizerFast",
                 "chat_template": V31_TEMPLATE}
    (tmp_path / "published" / "tokenizer_config.json").write_text(json.dumps(published), encoding="utf-8")
    (tmp_path / "published" / "chat_template.jinja").unlink()
    (tmp_path / "published" / "special_tokens_map.json").unlink()
    loaded = Tokenizer.load(tmp_path / "published")
    loaded.save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "tokenizer_config.json").read_text(encoding="utf-8")) == published
    again = Tokenizer.load(tmp_path / "again")
    assert (again.bos_id, again.eos_id, again.pad_id) == (0, 1, 1) and again.chat_template == V31_TEMPLATE
    assert [again.encode(s) for s in TRICKY] == [tok.encode(s) for s in TRICKY]
    # what this object holds and was changed is written; the rest stays as loaded
    again.chat_template, again.model_max_length = "{{ bos_token }}", 4096
    again.save(tmp_path / "changed")
    changed = json.loads((tmp_path / "changed" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert changed == {**published, "chat_template": "{{ bos_token }}", "model_max_length": 4096}

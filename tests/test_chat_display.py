"""What `nanoseek chat` writes to the terminal, the text filter shared with /v1/completions, and the flags and
--config files of `serve` and `chat`. No model here: a scripted engine streams chosen pieces (the real model is
exercised in test_server.py)."""

from __future__ import annotations

import argparse
import io

import pytest

from nanoseek.errors import UsageError
from nanoseek.infer.engine import StreamDelta
from nanoseek.options import add_options, make_config
from nanoseek.serve import app, chat
from nanoseek.serve.chat import AnswerView, chat_loop, printable
from nanoseek.serve.protocol import StripStrings


# ----------------------------------------------------------------------------------------------- StripStrings
def pieces_of(text: str, cuts: tuple[int, ...]) -> list[str]:
    bounds = (0, *cuts, len(text))
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("text", ["the user greets me\n</think>\n\nHello!<｜end▁of▁sentence｜><｜User｜>hi",
                                  "<｜User｜><｜User｜>x<｜Us", "a<｜b <｜Assistant｜>>"])
def test_strip_strings_gives_the_same_text_however_it_is_cut(text):
    words = ("<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>")
    whole = StripStrings(words).feed(text, final=True)
    assert not any(w in whole for w in words)
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1, 3):
            f = StripStrings(words)
            streamed = "".join(f.feed(p) for p in pieces_of(text, (i, j))) + f.feed("", final=True)
            assert streamed == whole, (i, j)


def test_strip_strings_holds_back_only_what_may_start_a_word():
    f = StripStrings(("<answer>", "</answer>"))
    assert f.feed(" <ans") == " "            # may be a tag: held back
    assert f.feed("wer>7</") == "7"
    assert f.feed("answer> <b") == " <b"     # "<b" starts no tag
    assert f.feed("<", final=True) == "<"    # the end releases what was held
    assert StripStrings(()).feed("<x") == "<x"


# ----------------------------------------------------------------------------------------------- the terminal
def test_printable_replaces_control_characters_but_tab_and_newline():
    assert printable("a\x1b[2Jb\x07\tc\nd\r\x00\x7f\x9b") == "a\ufffd[2Jb\ufffd\tc\nd\ufffd\ufffd\ufffd\ufffd"
    assert printable("café 你好 ½") == "café 你好 ½"


def test_answer_view_shows_the_answer_inside_answer_tags_however_it_streams():
    out = io.StringIO()
    view = AnswerView(out, dim="<dim>", reset="<reset>")
    for kind, s in [("reasoning", "3 plus 4"), ("reasoning", " is 7\n"), ("content", " <ans"), ("content", "wer>"),
                    ("content", "7</answer"), ("content", ">")]:
        view.write(kind, s)
    view.close()
    assert out.getvalue() == "<dim>thinking: 3 plus 4 is 7<reset>\n7"


class ScriptedEngine:
    """Engine stand-in that streams the given (reasoning, content) pieces, one per step."""

    max_seq_len = 1000

    def __init__(self, pieces):
        self.pieces = list(pieces)
        self.running = False

    def add_request(self, prompt, params):
        self.running = True
        return "r0"

    def has_unfinished(self):
        return self.running

    def abort(self, rid):
        self.running = False

    def step(self):
        reasoning, content = self.pieces.pop(0)
        done = not self.pieces
        self.running = not done
        return [StreamDelta("r0", [1], content, reasoning, finished=done, finish_reason="stop" if done else None)]


class ScriptedTokenizer:
    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, thinking=True):
        return [0, 1, 2]


def test_terminal_chat_never_writes_control_characters_from_the_model():
    engine = ScriptedEngine([("hmm \x1b]0;pwned\x07", ""), ("", "ok\x1b[2J\r\n\tdone\x9b")])
    lines = iter(["hi", "/exit"])
    out = io.StringIO()
    assert chat_loop(engine, ScriptedTokenizer(), None, read=lambda _: next(lines), out=out, color=False) == 0
    text = out.getvalue()
    assert "thinking: hmm \ufffd]0;pwned\ufffd\nok\ufffd[2J\ufffd\n\tdone\ufffd\n" in text
    assert not any(c in text for c in "\x1b\x07\r\x9b")


# ----------------------------------------------------------------------------------------------- flags and --config
def config(module, argv: list[str]):
    parser = add_options(argparse.ArgumentParser(), module.CONFIG)
    return make_config(module.CONFIG, parser.parse_args(argv))


def test_serve_flags_keep_their_names_and_read_a_config_file(tmp_path):
    cfg = config(app, ["--model", "m", "--api-key", "k", "--max-tokens-limit", "64", "--no-thinking",
                       "--served-model-name", "x", "--threads", "2"])
    assert (cfg.model, cfg.api_key, cfg.max_tokens_limit, cfg.thinking, cfg.served_model_name, cfg.threads) == \
        ("m", ["k"], 64, False, "x", 2)
    assert (cfg.host, cfg.port, cfg.max_concurrency, cfg.max_queue) == ("127.0.0.1", 8000, 16, 64)
    toml = tmp_path / "serve.toml"
    toml.write_text('model = "runs/demo/final"\nport = 9000\nmax-queue = 3\nthinking = false\n')
    cfg = config(app, ["--config", str(toml), "--port", "9001"])
    assert (cfg.model, cfg.port, cfg.max_queue, cfg.thinking) == ("runs/demo/final", 9001, 3, False)  # flags win


def test_serve_api_key_comes_from_the_environment_unless_given(monkeypatch):
    monkeypatch.setenv("NANOSEEK_API_KEY", "sk-env")
    assert app.api_keys_of(config(app, ["--model", "m"])) == ["sk-env"]
    assert app.api_keys_of(config(app, ["--model", "m", "--api-key", "sk-flag"])) == ["sk-flag"]
    monkeypatch.delenv("NANOSEEK_API_KEY")
    assert app.api_keys_of(config(app, ["--model", "m"])) == []


def test_chat_flags_keep_their_names_and_read_a_config_file(tmp_path):
    cfg = config(chat, ["--model", "m", "--temperature", "0", "--top-p", "0.5", "--max-tokens", "9", "--system", "s",
                        "--no-thinking", "--seed", "3"])
    assert (cfg.temperature, cfg.top_p, cfg.max_tokens, cfg.system, cfg.thinking, cfg.seed, cfg.threads) == \
        (0.0, 0.5, 9, "s", False, 3, 0)
    toml = tmp_path / "chat.toml"
    toml.write_text('model = "m"\ntemperature = 0.0\nthreads = 1\n')
    cfg = config(chat, ["--config", str(toml)])
    assert (cfg.model, cfg.temperature, cfg.threads) == ("m", 0.0, 1)


@pytest.mark.parametrize("module", [app, chat])
def test_unknown_config_keys_are_rejected_with_the_valid_ones(module, tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text('model = "m"\ntemprature = 0.5\n')
    with pytest.raises(UsageError) as e:
        config(module, ["--config", str(toml)])
    msg = str(e.value)
    assert "unknown key(s) temprature" in msg and "valid keys: model," in msg and "threads" in msg


@pytest.mark.parametrize("module", [app, chat])
def test_model_is_required(module):
    with pytest.raises(UsageError, match="--model is required"):
        config(module, [])

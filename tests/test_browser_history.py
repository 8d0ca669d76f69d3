"""The chat page's history in a real browser (headless Chromium + Playwright, as tests/test_browser.py): two
conversations made on the page survive a reload and a restart of the server on the same --history file, reopen
with their thinking, can be searched, renamed and deleted; another API key sees none of them; the sidebar is a
drawer at phone width. Same memorising tiny model as tests/test_server.py. Skipped where Chromium or playwright is
missing (test_browser's fixture says what is needed).
"""

from __future__ import annotations

import sqlite3

import pytest
from test_browser import ARGS, chromium_path, playwright_api  # noqa: F401  (playwright_api: the fixture)

pytestmark = pytest.mark.browser

K1, K2 = "sk-page-one", "sk-page-two"
DONE = "() => document.querySelectorAll('.msg.assistant').length === {n} && !document.querySelector('.streaming')"


def serve(model_dir, path):
    from test_server import ServerThread

    from nanoseek.serve.app import create_app, load_engine
    engine, tok = load_engine(model_dir, max_batch=2, device="cpu")
    return ServerThread(create_app(engine, tok, model_name="tiny-r1", api_key=[K1, K2], history=path))


def open_page(browser, url, key, **viewport):
    page = browser.new_page(viewport=viewport or {"width": 1280, "height": 800})
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.add_init_script("window.__blocked = []; document.addEventListener('securitypolicyviolation', "
                         "(e) => window.__blocked.push(e.violatedDirective + ' ' + e.blockedURI));")
    page.goto(url + "/")
    page.evaluate(f"localStorage.setItem('nanoseek.settings', JSON.stringify({{apiKey: '{key}', temperature: 0}}))")
    page.reload()
    page.wait_for_selector("#sidebar:not([hidden])", state="attached")   # (at phone width: a closed drawer)
    return page


def titles(page) -> list[str]:
    return page.locator("#conversations .conv-title").all_inner_texts()


def ask(page, text, n):
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    page.wait_for_function(DONE.format(n=n), timeout=30000)


def check_clean(page):
    assert not page.errors, page.errors
    assert page.evaluate("window.__blocked") == [], "the CSP blocked part of the page"


def test_conversations_survive_a_restart_and_belong_to_their_key(playwright_api, tmp_path_factory, tmp_path):  # noqa: F811
    from test_server import build_chat_model
    model_dir = build_chat_model(tmp_path_factory.getbasetemp())
    path = tmp_path / "history.db"
    with playwright_api() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=ARGS)
        try:
            with serve(model_dir, path) as srv:
                make_two_conversations(browser, srv.url)
            with serve(model_dir, path) as srv:               # the same file, a new server (and a new origin)
                reopen_rename_delete(browser, srv.url, path, tmp_path)
                another_key_sees_nothing(browser, srv.url)
                phone_drawer(browser, srv.url, tmp_path)
        finally:
            browser.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert [r[0] for r in db.execute("SELECT title FROM conversations")] == ["Greetings"]


def make_two_conversations(browser, url):
    page = open_page(browser, url, K1)
    assert page.locator("#conversations .conv").count() == 0 and page.is_visible("#conversations-empty")
    ask(page, "hello", 1)
    assert page.inner_text(".msg.assistant .answer") == "Hello! How can I help?"
    page.wait_for_function("() => document.querySelectorAll('#conversations .conv').length === 1")
    assert titles(page) == ["hello"] and page.locator(".conv.active").count() == 1
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and page.locator(".conv.active").count() == 0
    ask(page, "what is 2+3?", 1)
    page.wait_for_function("() => document.querySelectorAll('#conversations .conv').length === 2")
    page.reload()                                             # the page forgets; the server does not
    page.wait_for_function("() => document.querySelectorAll('#conversations .conv').length === 2")
    assert titles(page) == ["what is 2+3?", "hello"]          # the newest first
    check_clean(page)
    page.close()


def reopen_rename_delete(browser, url, path, shots):
    page = open_page(browser, url, K1)
    page.wait_for_function("() => document.querySelectorAll('#conversations .conv').length === 2")
    for title, reasoning, answer in [("hello", "the user greets me", "Hello! How can I help?"),
                                     ("what is 2+3?", "2 plus 3 is 5", "The answer is 5.")]:
        page.click(f"#conversations .conv-title >> text='{title}'")
        page.wait_for_function("(t) => document.querySelector('.conv.active .conv-title')?.textContent === t", arg=title)
        assert page.locator(".msg.assistant").count() == 1    # (the conversation is shown whole before it is marked)
        assert page.inner_text(".msg.user .bubble") == title
        assert page.inner_text(".msg.assistant .answer") == answer
        thinking = page.locator(".msg.assistant details.thinking")
        assert thinking.is_visible() and not thinking.evaluate("d => d.open")   # there, collapsed
        page.click(".msg.assistant summary")
        assert page.inner_text(".msg.assistant .thinking-text") == reasoning
    page.screenshot(path=str(shots / "history-desktop.png"))
    # a reopened conversation goes on where it was: the next turn is stored in it
    ask(page, "what is 3+4?", 2)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT c.title, count(*) FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                          "GROUP BY c.id ORDER BY c.updated").fetchall() == [("hello", 2), ("what is 2+3?", 4)]
    # search: by a word of the reasoning ("2 plus 3 is 5"; the unmemorised 3+4 answer in the same conversation is
    # the model's noise, which may hold any word it learnt, so the word must not also be in the other conversation)
    page.fill("#search", "PLUS")
    page.wait_for_function("() => document.querySelectorAll('#conversations .conv').length === 1")
    assert titles(page) == ["what is 2+3?"]
    page.fill("#search", "")
    page.wait_for_function("() => document.querySelectorAll('#conversations .conv').length === 2")
    # rename "hello", delete the other (the page asks first)
    page.locator(".conv", has_text="hello").locator(".conv-rename").click()
    page.fill(".conv-edit", "Greetings")
    page.press(".conv-edit", "Enter")
    page.wait_for_function("() => [...document.querySelectorAll('.conv-title')].some(b => b.textContent === "
                           "'Greetings')")
    page.once("dialog", lambda d: d.accept())
    page.locator(".conv", has_text="what is 2+3?").locator(".conv-delete").click()
    page.wait_for_function("() => document.querySelectorAll('#conversations .conv').length === 1")
    assert titles(page) == ["Greetings"]
    assert page.locator(".msg").count() == 0                  # the open conversation was the one deleted
    page.reload()
    page.wait_for_function("() => document.querySelectorAll('#conversations .conv').length === 1")
    assert titles(page) == ["Greetings"]
    check_clean(page)
    page.close()


def another_key_sees_nothing(browser, url):
    page = open_page(browser, url, K2)
    page.wait_for_selector("#conversations-empty:not([hidden])")
    assert page.locator("#conversations .conv").count() == 0
    page.fill("#search", "hello")
    page.wait_for_selector("#conversations-empty:text('Nothing matches.')")
    check_clean(page)
    page.close()


def phone_drawer(browser, url, shots):
    page = open_page(browser, url, K1, width=390, height=844)
    assert not page.is_visible("#sidebar .conv-title") and page.is_visible("#sidebar-toggle")
    page.click("#sidebar-toggle")
    page.wait_for_selector("#sidebar .conv-title", state="visible")
    page.wait_for_timeout(300)                               # (the drawer slides in)
    page.screenshot(path=str(shots / "history-phone-drawer.png"))
    page.click("#conversations .conv-title >> text='Greetings'")
    page.wait_for_function(DONE.format(n=1))
    assert page.inner_text(".msg.assistant .answer") == "Hello! How can I help?"
    page.wait_for_selector("#sidebar .conv-title", state="hidden")   # the drawer closed on the choice
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    check_clean(page)
    page.close()

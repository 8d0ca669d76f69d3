"""The chat page in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by Playwright.

Same server and memorising tiny model as tests/test_server.py: the page must stream the answer into the
conversation and show the reasoning in a collapsible "Thinking" section; the deep-think toggle, new chat and the
stop button work (a stopped answer is cancelled in the engine), and the page fits a phone's width. Skipped, saying what it needs, where Chromium or playwright is missing.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("NANOSEEK_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]


def chromium_path() -> str | None:
    return CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")


def has_playwright() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


def missing_needs(chromium: str | None, playwright: bool) -> str | None:
    """Why the browser test cannot run here, saying what it needs (None: it can)."""
    missing = ([f"Debian's chromium at {CHROMIUM} (apt-get install chromium; or set NANOSEEK_CHROMIUM)"]
               if chromium is None else []) + \
              (["the playwright package (.venv/bin/pip install playwright)"] if not playwright else [])
    if not missing:
        return None
    return f"browser test skipped: it needs {' and '.join(missing)}; .ci/run installs both"


@pytest.fixture(scope="module")
def playwright_api():
    reason = missing_needs(chromium_path(), has_playwright())
    if reason:
        # a skip's reason shows only with -rs; the warnings summary shows under `make test`'s plain -q too
        warnings.warn(reason, stacklevel=1)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright
    return sync_playwright


def test_skip_reason_says_what_the_browser_test_needs():
    both = missing_needs(None, False)
    assert f"chromium at {CHROMIUM}" in both and "apt-get install chromium" in both
    assert "pip install playwright" in both and ".ci/run installs both" in both
    assert "playwright" not in missing_needs(None, True).split("needs", 1)[1].split(";")[0]
    assert "chromium" not in missing_needs("/usr/bin/chromium", False).split("needs", 1)[1].split(";")[0]
    assert missing_needs("/usr/bin/chromium", True) is None


def test_chat_page_streams_an_answer_with_a_thinking_section(playwright_api, tmp_path_factory, tmp_path):
    import torch
    from test_server import KEY, ServerThread, build_chat_model

    from nanoseek.serve.app import create_app, load_engine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # the tiny model is much faster on one thread of a contended CPU
    try:
        model_dir = build_chat_model(tmp_path_factory.getbasetemp())
        engine, tok = load_engine(model_dir, max_batch=4, device="cpu")
        slow = SlowEngine(engine)
        app = create_app(slow, tok, model_name="tiny-r1", api_key=KEY)
        with ServerThread(app) as srv, playwright_api() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), args=ARGS)
            try:
                # 30 ms per engine step: each token arrives on its own, so the count of page updates shows
                # streaming even when a loaded machine would otherwise deliver several tokens per frame
                slow.delay = 0.03
                run_page(browser, srv.url, KEY, tmp_path)
                stop_button_aborts_the_answer(browser, srv.url, KEY, slow)
            finally:
                browser.close()
    finally:
        torch.set_num_threads(threads)


class SlowEngine:
    """The real engine with an optional pause per step, so that an answer lasts long enough to be stopped."""

    def __init__(self, engine):
        self.engine, self.delay = engine, 0.0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def step(self):
        time.sleep(self.delay)
        return self.engine.step()


def stop_button_aborts_the_answer(browser, url, key, slow):
    slow.delay = 0.1                                      # ~3 s for the whole answer
    page = browser.new_page()
    page.goto(url + "/")
    page.evaluate(f"localStorage.setItem('nanoseek.settings', JSON.stringify({{apiKey: '{key}', temperature: 0}}))")
    page.reload()
    page.fill("#prompt", "hello")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant .thinking-text:not(:empty)", timeout=30000)
    assert page.is_visible("#stop") and not page.is_visible("#send")
    page.click("#stop")
    page.wait_for_selector(".msg.assistant:not(.streaming)", timeout=10000)
    assert page.inner_text(".msg.assistant .meta") == "stopped"
    assert page.inner_text(".msg.assistant .answer") != "Hello! How can I help?"
    assert page.is_visible("#send")
    # the server cancelled the generation: no request left in the engine, its cache blocks freed
    deadline = time.time() + 10
    while slow.engine.stats()["running"] or slow.engine.stats()["blocks_used"]:
        assert time.time() < deadline, "the stopped answer still runs in the engine"
        time.sleep(0.05)
    slow.delay = 0.0


def run_page(browser, url, key, shots):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # the page runs under the server's strict CSP (scripts and styles from the server only, nothing inline): it
    # must work under it, and nothing it does may be blocked
    page.add_init_script("window.__blocked = []; document.addEventListener('securitypolicyviolation', "
                         "(e) => window.__blocked.push(e.violatedDirective + ' ' + e.blockedURI));")
    response = page.goto(url + "/")
    assert page.title() == "nanoseek chat"
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"
    # the key goes in through the settings panel and is remembered by the browser
    page.click("#settings-toggle")
    page.fill("#api-key", key)
    page.press("#api-key", "Tab")                     # "change" fires when the field loses focus
    page.eval_on_selector("#temperature", "el => { el.value = 0; el.dispatchEvent(new Event('input')); }")
    page.click("#settings-toggle")
    # (predicates are functions: the page's CSP forbids evaluating strings, which is how Playwright runs those)
    page.wait_for_function("() => document.getElementById('model-name').textContent === 'tiny-r1'")
    assert key in page.evaluate("localStorage.getItem('nanoseek.settings')")
    # the max-tokens field goes as far as the server accepts (GET v1/limits), not further
    page.wait_for_function("() => document.getElementById('max-tokens').max === '4096'")
    page.click("#settings-toggle")
    page.fill("#max-tokens", "32768")
    page.press("#max-tokens", "Tab")
    assert page.input_value("#max-tokens") == "4096"
    page.fill("#max-tokens", "512")
    page.press("#max-tokens", "Tab")
    page.click("#settings-toggle")

    # count how many times the answer's text changes while it streams in
    page.evaluate("""() => {
        window.__answerUpdates = 0;
        new MutationObserver(() => { window.__answerUpdates++; })
            .observe(document.getElementById('conversation'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#prompt", "hello")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant .answer:not(:empty)", timeout=30000)
    page.wait_for_selector(".msg.assistant:not(.streaming)", timeout=30000)
    assert page.inner_text(".msg.user .bubble") == "hello"
    assert page.inner_text(".msg.assistant .answer") == "Hello! How can I help?"
    assert page.evaluate("window.__answerUpdates") > 5, "the answer arrived in one piece, not streamed"
    thinking = page.locator(".msg.assistant details.thinking")
    assert thinking.is_visible()
    assert page.inner_text(".msg.assistant summary").startswith("Thought for")
    assert not thinking.evaluate("d => d.open")          # collapsed once the answer began
    page.click(".msg.assistant summary")                  # ... and opens on a click
    assert page.inner_text(".msg.assistant .thinking-text").strip() == "the user greets me"
    assert "tokens" in page.inner_text(".msg.assistant .meta")
    page.screenshot(path=str(shots / "desktop.png"), full_page=True)

    # deep think off: the template closes the think block, so no thinking section
    page.click("#think-toggle")
    assert page.get_attribute("#think-toggle", "aria-pressed") == "false"
    page.fill("#prompt", "hello")
    page.press("#prompt", "Enter")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant').length === 2 && "
                           "!document.querySelector('.msg.assistant.streaming')", timeout=30000)
    assert not page.locator(".msg.assistant").nth(1).locator("details.thinking").is_visible()

    # new chat empties the conversation
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and page.locator("#empty").is_visible()

    # a phone: the same page, one column, nothing wider than the screen
    phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
    phone.goto(url + "/")
    # (a max_tokens kept from a time the field allowed more is brought down to the server's limit)
    phone.evaluate(f"localStorage.setItem('nanoseek.settings', JSON.stringify({{apiKey: '{key}', temperature: 0, "
                   "maxTokens: 32768}))")
    phone.reload()
    phone.wait_for_function("() => JSON.parse(localStorage.getItem('nanoseek.settings')).maxTokens === 4096")
    phone.fill("#prompt", "what is 2+3?")
    phone.press("#prompt", "Enter")
    phone.wait_for_selector(".msg.assistant:not(.streaming) .answer:not(:empty)", timeout=30000)
    assert phone.inner_text(".msg.assistant .answer") == "The answer is 5."
    # an answer written as `<answer>7</answer>` (the demo model's form) shows as 7, never with its tags
    phone.click("#new-chat")
    phone.evaluate("""() => {
        window.__shownAnswers = [];
        new MutationObserver(() => {
            const a = document.querySelector('.msg.assistant .answer');
            if (a) window.__shownAnswers.push(a.textContent);
        }).observe(document.getElementById('conversation'), {subtree: true, childList: true, characterData: true});
    }""")
    phone.fill("#prompt", "what is 3+4?")
    phone.press("#prompt", "Enter")
    phone.wait_for_selector(".msg.assistant:not(.streaming) .answer:not(:empty)", timeout=30000)
    assert phone.inner_text(".msg.assistant .answer") == "7"
    shown = phone.evaluate("window.__shownAnswers")
    assert shown and not any("<" in a or "answer" in a for a in shown), shown
    assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    box = phone.locator("#composer").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390
    phone.screenshot(path=str(shots / "phone.png"), full_page=True)
    assert not errors, errors
    assert page.evaluate("window.__blocked") == [], "the CSP blocked part of the page"

"""The server against hostile or careless clients, over real sockets: huge prompts, hang-ups, cross-site requests,
foreign Host headers, slow clients, wrong methods; and the page's security headers and limits.

Same memorising tiny model as tests/test_server.py, behind an engine that can be slowed down (`slow_engine`) so a
stream is still running while an attack happens: it must finish with the same text as without the attack. The
server here reads requests with 1 s deadlines (production: 10 s for headers, 30 s for a body), so that a slow
client is seen to be cut off quickly.
"""

from __future__ import annotations

import html.parser
import json
import socket
import threading
import time

import httpx
import pytest
from test_server import CONVS, MODEL, ServerThread, build_chat_model

from nanoseek.cli import command_parser
from nanoseek.errors import UsageError
from nanoseek.options import make_config
from nanoseek.serve.app import ServeConfig, check_config, connection_cap, create_app, hosts_to_allow, load_engine

DEADLINE = 1.0                                    # header and body deadlines of the servers below
HUGE = ("hello what is 2+3? " * 60_000)[:1_000_000]  # a 1 MB prompt (the body stays under the 1 MiB limit)
HELLO = {"messages": [{"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": 60}
REASONING, ANSWER = CONVS[0][1], CONVS[0][2]


class SlowEngine:
    """The real engine with an adjustable pause per step, so that an answer lasts long enough to be attacked."""

    def __init__(self, engine):
        self.engine, self.delay = engine, 0.0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def step(self):
        time.sleep(self.delay)
        return self.engine.step()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_chat_model(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def srv(model_dir):
    """A keyless server on the default bind (loopback names only, no CORS), with 1 s read deadlines."""
    engine, tok = load_engine(model_dir, max_batch=4, device="cpu")
    slow = SlowEngine(engine)
    app = create_app(slow, tok, model_name=MODEL, max_concurrency=4, max_queue=8)
    with ServerThread(app, header_timeout_s=DEADLINE, body_timeout_s=DEADLINE) as s:
        s.slow, s.tok, s.app = slow, tok, app
        yield s


@pytest.fixture()
def slow_engine(srv):
    """Each engine step takes 50 ms for the length of a test: the "hello" answer streams for about a second."""
    srv.slow.delay = 0.05
    yield srv.slow
    srv.slow.delay = 0.0


def metrics(srv) -> dict[str, float]:
    out = {}
    for line in httpx.get(srv.url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_for(predicate, secs: float, what: str):
    deadline = time.time() + secs
    while not predicate():
        assert time.time() < deadline, what
        time.sleep(0.02)


def send_raw(srv, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    s.sendall(data)
    return s


def read_until_closed(s: socket.socket) -> tuple[bytes, float]:
    """Everything the server writes until it closes the connection, and how long that took (fails after 5 s)."""
    t0, out = time.perf_counter(), b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for 5 s (got {out[:100]!r})") from None
    except ConnectionResetError:
        pass
    finally:
        s.close()
    return out, time.perf_counter() - t0


def post_head(srv, path="/v1/chat/completions", length=100, content_type="application/json") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


# ----------------------------------------------------------------------------------------------- item 5
def test_health_answers_at_once_while_huge_prompts_are_refused(srv):
    """A 1 MB prompt is refused by its length before any tokenizing, and tokenizing (of what could fit) runs off the
    event loop: /health keeps answering within ~200 ms meanwhile."""
    latencies, stop = [], threading.Event()

    def poll():
        with httpx.Client(timeout=10) as c:
            while not stop.is_set():
                t = time.perf_counter()
                assert c.get(srv.url + "/health").status_code == 200
                latencies.append(time.perf_counter() - t)
                time.sleep(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.1)
    longest = max(len(srv.tok.id_to_token(i)) for i in range(srv.tok.vocab_size))   # characters one token can hold
    near = "a" * ((srv.slow.max_seq_len - 1) * longest)      # just within the cheap bound: tokenized, then refused
    try:
        for path, body in [("/v1/chat/completions", {"messages": [{"role": "user", "content": HUGE}]}),
                           ("/v1/completions", {"prompt": HUGE}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": near}]}),
                           ("/v1/completions", {"prompt": near})]:
            t = time.perf_counter()
            r = httpx.post(srv.url + path, json=body, timeout=30)
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
            assert "maximum context length" in r.json()["error"]["message"]
            assert time.perf_counter() - t < 2.0
    finally:
        stop.set()
        poller.join()
    assert len(latencies) >= 3 and max(latencies) < 0.25, f"/health stalled {max(latencies):.2f} s"


class SlowTokenizer:
    """The real tokenizer, but encoding takes a second more (as a long prompt would on a big vocabulary)."""

    def __init__(self, tok):
        self.tok = tok

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def apply_chat_template(self, *args, **kw):
        time.sleep(1.0)
        return self.tok.apply_chat_template(*args, **kw)

    def encode(self, *args, **kw):
        time.sleep(1.0)
        return self.tok.encode(*args, **kw)


def test_tokenizing_runs_off_the_event_loop(srv):
    import nanoseek as ns
    engine = ns.Engine(srv.slow.engine.model, srv.tok, max_batch=2)
    app = create_app(engine, SlowTokenizer(srv.tok), model_name=MODEL)
    with ServerThread(app) as s, httpx.Client(timeout=30) as c:
        for path, body in [("/v1/chat/completions", {**HELLO, "max_tokens": 2}),
                           ("/v1/completions", {"prompt": "hello", "max_tokens": 2})]:
            pending = threading.Thread(target=lambda p=path, b=body: c.post(s.url + p, json=b))
            pending.start()
            time.sleep(0.3)                               # ... while its prompt is being encoded
            t = time.perf_counter()
            assert httpx.get(s.url + "/health").status_code == 200
            assert time.perf_counter() - t < 0.3, f"/health waited for {path}'s tokenizing"
            pending.join()


# ----------------------------------------------------------------------------------------------- item 6
def test_a_client_that_hangs_up_cancels_its_non_streamed_generation(srv, slow_engine):
    before = metrics(srv)
    body = json.dumps({**HELLO, "max_tokens": 400, "ignore_eos": True}).encode()
    s = send_raw(srv, post_head(srv, length=len(body)) + body)
    wait_for(lambda: metrics(srv)["nanoseek_generation_tokens_total"] > before["nanoseek_generation_tokens_total"],
             10, "the generation did not start")
    s.close()                                            # the client gives up on its (non-streamed) answer
    # (the two gauges come from the worker's snapshots, which may lag each other by a step: wait for both)
    wait_for(lambda: metrics(srv)["nanoseek_requests_running"] == 0, 2,
             "the generation went on after its client hung up")
    wait_for(lambda: metrics(srv)["nanoseek_cache_blocks_used"] == 0, 2,
             "the cancelled generation kept its cache blocks")
    m = metrics(srv)
    key = 'nanoseek_request_finish_total{reason="abort"}'
    assert m[key] == before.get(key, 0) + 1
    assert m["nanoseek_generation_tokens_total"] - before["nanoseek_generation_tokens_total"] < 100


# ----------------------------------------------------------------------------------------------- item 7
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None])
def test_post_bodies_must_be_declared_json(srv, content_type):
    """A web page can POST text/plain (or a form) to any address without asking (a CORS "simple" request)."""
    before = metrics(srv)["nanoseek_prompt_tokens_total"]
    headers = {"Content-Type": content_type} if content_type else {}
    r = httpx.post(srv.url + "/v1/chat/completions", content=json.dumps(HELLO), headers=headers)
    assert r.status_code == 415, r.text
    assert r.json()["error"]["code"] == "unsupported_media_type" and "application/json" in r.json()["error"]["message"]
    assert metrics(srv)["nanoseek_prompt_tokens_total"] == before        # nothing reached the engine
    r = httpx.post(srv.url + "/v1/chat/completions", json={**HELLO, "max_tokens": 2},
                   headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://127.0.0.1:1"])
def test_a_foreign_origin_is_refused(srv, origin):
    for method, path in [("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/health")]:
        r = httpx.request(method, srv.url + path, json=HELLO if method == "POST" else None, headers={"Origin": origin})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed", (method, path, r.text)
        assert "--allowed-origins" in r.json()["error"]["message"]
        assert "access-control-allow-origin" not in r.headers
    # preflight from a foreign page: refused too, with no CORS headers
    r = httpx.options(srv.url + "/v1/chat/completions",
                      headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers


def test_the_page_own_origin_is_welcome(srv):
    r = httpx.post(srv.url + "/v1/chat/completions", json={**HELLO, "max_tokens": 2},
                   headers={"Origin": srv.url})
    assert r.status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1:1", "localhost.evil.example:{port}",
                                  ""])
def test_a_foreign_host_header_is_refused(srv, host):
    """DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 sends Host: evil.example."""
    r = httpx.get(srv.url + "/v1/models", headers={"Host": host.format(port=srv.port)})
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", r.text
    assert "--allowed-hosts" in r.json()["error"]["message"]


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LocalHost:{port}", "[::1]:{port}"])
def test_loopback_host_names_are_welcome(srv, host):
    assert httpx.get(srv.url + "/health", headers={"Host": host.format(port=srv.port)}).status_code == 200


@pytest.fixture(scope="module")
def open_srv(srv):
    """A server opened to one more host name and one web origin (a second engine on the same weights)."""
    import nanoseek as ns
    engine = ns.Engine(srv.slow.engine.model, srv.tok, max_batch=2)
    app = create_app(engine, srv.tok, model_name=MODEL, api_key="sk-k", allowed_hosts=["chat.example.com"],
                     allowed_origins=["https://app.example"])
    with ServerThread(app) as s:
        yield s


def test_allowed_origins_get_cors_headers_and_preflight(open_srv):
    url, key = open_srv.url, {"Authorization": "Bearer sk-k"}
    r = httpx.options(url + "/v1/chat/completions",
                      headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                               "Access-Control-Request-Headers": "authorization, content-type"})
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert {"authorization", "content-type"} <= {h.strip().lower() for h in
                                                 r.headers["access-control-allow-headers"].split(",")}
    r = httpx.post(url + "/v1/chat/completions", json={**HELLO, "max_tokens": 2},
                   headers={**key, "Origin": "https://app.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    assert "retry-after" in r.headers["access-control-expose-headers"].lower()
    r = httpx.post(url + "/v1/chat/completions", json=HELLO, headers={**key, "Origin": "https://other.example"})
    assert r.status_code == 403
    # the extra host name is welcome, with any port; loopback names still are
    assert httpx.get(url + "/health", headers={"Host": "chat.example.com"}).status_code == 200
    assert httpx.get(url + "/health", headers={"Host": "chat.example.com:443"}).status_code == 200
    assert httpx.get(url + "/health", headers={"Host": "evil.example"}).status_code == 403


def test_serve_options_open_hosts_and_origins():
    loopback = ServeConfig(model="m")
    assert hosts_to_allow(loopback) == [] and loopback.allowed_origins == []
    assert hosts_to_allow(ServeConfig(model="m", host="0.0.0.0")) == ["*"]      # a public bind answers any name
    assert hosts_to_allow(ServeConfig(model="m", host="0.0.0.0", allowed_hosts=["a.example"])) == ["a.example"]
    assert hosts_to_allow(ServeConfig(model="m", allowed_hosts=["*"])) == ["*"]
    parser, _ = command_parser("serve")
    args = parser.parse_args(["--model", "m", "--allowed-origins", "https://a.example", "*",
                              "--allowed-hosts", "chat.example.com", "--header-timeout-s", "2"])
    cfg = make_config(ServeConfig, args)
    assert cfg.allowed_origins == ["https://a.example", "*"] and cfg.allowed_hosts == ["chat.example.com"]
    assert cfg.header_timeout_s == 2.0


def test_serve_runs_uvicorn_with_the_guard_deadlines_and_cap(model_dir, monkeypatch):
    """`nanoseek serve` wires its options into the app (Guard) and into uvicorn (deadline protocol, keep-alive, cap)."""
    import uvicorn

    from nanoseek.serve import app as app_module
    from nanoseek.serve.transport import DeadlineProtocol
    ran = {}

    class FakeServer:
        def __init__(self, config):
            ran["config"] = config

        def run(self):
            ran["ran"] = True

    monkeypatch.setattr(uvicorn, "Server", FakeServer)
    cfg = ServeConfig(model=model_dir, host="0.0.0.0", port=8123, api_key="k", header_timeout_s=2.5,
                      body_timeout_s=7, keep_alive_s=3, allowed_origins=["https://app.example"], device="cpu")
    assert app_module.main(cfg) == 0 and ran["ran"]
    config = ran["config"]
    assert (config.host, config.port, config.limit_concurrency, config.timeout_keep_alive) == ("0.0.0.0", 8123,
                                                                                                 1024, 3)
    protocol = config.http
    assert protocol.func is DeadlineProtocol and protocol.keywords == {"header_timeout_s": 2.5, "body_timeout_s": 7}
    guard = next(m for m in config.app.user_middleware if m.cls is app_module.Guard)
    assert guard.kwargs == {"allowed_hosts": ["*"], "allowed_origins": ["https://app.example"]}


# ----------------------------------------------------------------------------------------------- item 8
def test_half_sent_headers_are_answered_408_and_closed_within_the_deadline(srv):
    s = send_raw(srv, f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nContent-Ty".encode())
    out, secs = read_until_closed(s)
    assert out.startswith(b"HTTP/1.1 408 "), out
    assert json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert DEADLINE * 0.8 < secs < DEADLINE + 1.5


def test_headers_trickled_byte_by_byte_are_cut_off_at_the_deadline(srv):
    """The deadline counts from the first byte, not from the last: trickling does not keep a connection alive."""
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    t0 = time.perf_counter()
    try:
        for b in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: aaaaaaaaaaaaaaaa":
            s.sendall(bytes([b]))
            time.sleep(0.1)
            if time.perf_counter() - t0 > DEADLINE + 1.5:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    out, _ = read_until_closed(s)
    assert out.startswith(b"HTTP/1.1 408 ") and time.perf_counter() - t0 < DEADLINE + 2.0


def test_a_silent_connection_is_closed_within_the_deadline(srv):
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    out, secs = read_until_closed(s)
    assert out == b"" and secs < DEADLINE + 1.5         # nothing asked, nothing answered: just closed


def test_a_half_sent_body_is_answered_408_and_closed_within_the_deadline(srv):
    before = metrics(srv)
    s = send_raw(srv, post_head(srv, length=200) + b'{"messages": [')
    out, secs = read_until_closed(s)
    assert out.startswith(b"HTTP/1.1 408 "), out
    assert DEADLINE * 0.8 < secs < DEADLINE + 1.5
    m = metrics(srv)
    assert not any(k.startswith("nanoseek_requests_total") and 'status="5' in k and v > before.get(k, 0)
                   for k, v in m.items()), "a slow client counted as a server error"


def test_a_request_sent_in_pieces_within_the_deadline_is_served(srv):
    body = json.dumps({**HELLO, "max_tokens": 2}).encode()
    head = post_head(srv, length=len(body))
    s = send_raw(srv, head[:20])
    for piece in (head[20:], body[:10], body[10:]):
        time.sleep(DEADLINE / 5)
        s.sendall(piece)
    s.settimeout(10)
    reply = s.recv(65536)
    s.close()
    assert reply.startswith(b"HTTP/1.1 200 "), reply


def test_a_kept_alive_connection_serves_several_requests(srv):
    with httpx.Client() as c:
        for _ in range(3):
            assert c.get(srv.url + "/health").status_code == 200
            time.sleep(DEADLINE * 0.6)                      # idle between requests: the header deadline is not running


def test_open_connections_are_capped_well_above_the_admission_limits():
    """Beyond the cap uvicorn answers 503; the cap sits far above --max-concurrency + --max-queue, so an overload
    is answered 429 by the queue long before (bench/serve.py's 256-stream phase)."""
    cfg = ServeConfig(model="m")
    assert connection_cap(cfg) >= max(1024, 4 * (cfg.max_concurrency + cfg.max_queue))
    assert connection_cap(ServeConfig(model="m", max_queue=1000)) >= 4 * 1016
    assert connection_cap(ServeConfig(model="m", max_connections=500)) == 500
    with pytest.raises(UsageError, match="max-connections"):
        check_config(ServeConfig(model="m", max_connections=80))   # = 16 + 64: an overload would not get its 429
    for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
        with pytest.raises(UsageError, match=name.replace("_", "-")):
            check_config(ServeConfig(model="m", **{name: 0}))


# ----------------------------------------------------------------------------------------------- item 9
def test_wrong_methods_get_405_with_the_right_allow(srv):
    for method in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS"):
        for path in ("/v1/chat/completions", "/v1/completions", "/chat/completions"):
            r = httpx.request(method, srv.url + path)
            assert r.status_code == 405, (method, path, r.status_code)
            assert r.headers["allow"] == "POST" and r.json()["error"]["code"] == "method_not_allowed"
    for path in ("/health", "/v1/models", "/metrics", "/", "/app.js"):
        # a POST without a JSON Content-Type to a GET-only path is a wrong method (405), not a wrong body (415)
        for method, body in (("PUT", None), ("POST", None), ("POST", b"x")):
            r = httpx.request(method, srv.url + path, content=body)
            assert r.status_code == 405, (method, path, r.status_code)
            assert {m.strip() for m in r.headers["allow"].split(",")} == {"GET", "HEAD"}
    assert httpx.get(srv.url + "/v1/nothing-here").status_code == 404


def test_head_answers_like_get_without_a_body(srv):
    for path in ("/health", "/v1/models", "/v1/limits", "/metrics", "/", "/app.js", "/style.css"):
        get, head = httpx.get(srv.url + path), httpx.head(srv.url + path)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]


# ----------------------------------------------------------------------------------------------- item 10
class InlineScripts(html.parser.HTMLParser):
    """Collects what a strict CSP would block in a page: inline <script> code and on* handler attributes."""

    def __init__(self):
        super().__init__()
        self.found, self.in_script = [], False

    def handle_starttag(self, tag, attrs):
        self.found += [f"{tag} {k}=" for k, _ in attrs if k.startswith("on")]
        if tag == "script":
            self.in_script = not dict(attrs).get("src")

    def handle_data(self, data):
        if self.in_script and data.strip():
            self.found.append(f"inline script {data.strip()[:40]!r}")

    def handle_endtag(self, tag):
        self.in_script = self.in_script and tag != "script"


def test_the_page_is_served_with_a_strict_csp_and_security_headers(srv):
    r = httpx.get(srv.url + "/")
    assert r.status_code == 200 and "nanoseek chat" in r.text
    csp = {d.strip().split(" ")[0]: d.strip().split(" ")[1:] for d in r.headers["content-security-policy"].split(";")}
    assert csp["script-src"] == ["'self'"] and csp["frame-ancestors"] == ["'none'"]
    assert csp["default-src"] == ["'none'"] and "'unsafe-inline'" not in csp.get("style-src", [])
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["referrer-policy"] == "no-referrer"
    parser = InlineScripts()
    parser.feed(r.text)
    assert parser.found == [], f"the CSP would block these: {parser.found}"
    assert httpx.get(srv.url + "/app.js").headers["content-type"].startswith("text/javascript")
    # the API's answers carry them too, errors included
    for resp in (httpx.get(srv.url + "/health"), httpx.get(srv.url + "/nothing"),
                 httpx.post(srv.url + "/v1/chat/completions", content="x", headers={"Content-Type": "text/plain"})):
        assert resp.headers["x-content-type-options"] == "nosniff" and "content-security-policy" in resp.headers


def test_limits_tell_the_page_what_the_server_accepts(srv):
    lim = httpx.get(srv.url + "/v1/limits").json()
    svc = srv.app.state.service
    assert lim["max_tokens"] == svc.limits.max_tokens == 4096
    assert lim["max_prompt_tokens"] == svc.max_prompt and lim["context_length"] == svc.ctx
    assert lim["max_messages"] == svc.limits.max_messages and lim["max_body_bytes"] == svc.limits.max_body_bytes
    over = httpx.post(srv.url + "/v1/chat/completions", json={**HELLO, "max_tokens": lim["max_tokens"] + 1})
    assert over.status_code == 422


# ----------------------------------------------------------------------------------------------- acceptance
def attack_huge_prompt(srv):
    r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": HUGE}]})
    assert r.status_code == 400


def attack_slow_headers(srv):
    socks = [send_raw(srv, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n") for _ in range(20)]
    for s in socks:
        assert read_until_closed(s)[0].startswith(b"HTTP/1.1 408 ")


def attack_slow_body(srv):
    socks = [send_raw(srv, post_head(srv, length=500) + b'{"mess') for _ in range(20)]
    for s in socks:
        assert read_until_closed(s)[0].startswith(b"HTTP/1.1 408 ")


def attack_cross_site(srv):
    r = httpx.post(srv.url + "/v1/chat/completions", content=json.dumps(HELLO),
                   headers={"Content-Type": "text/plain", "Origin": "https://evil.example"})
    assert r.status_code == 403
    r = httpx.post(srv.url + "/v1/chat/completions", content=json.dumps(HELLO), headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    r = httpx.get(srv.url + "/v1/models", headers={"Host": "evil.example"})
    assert r.status_code == 403


def attack_hang_ups(srv):
    body = json.dumps({**HELLO, "max_tokens": 300, "ignore_eos": True}).encode()
    for stream in (False, True):
        data = json.dumps({**json.loads(body), "stream": stream}).encode()
        s = send_raw(srv, post_head(srv, length=len(data)) + data)
        time.sleep(0.3)
        s.close()
    wait_for(lambda: metrics(srv)["nanoseek_requests_running"] == 1, 5, "the hung-up requests still run")


def strict_json(text: str):
    """JSON as the standard has it: NaN and Infinity are not numbers a client can parse."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in a JSON answer"))


def attack_hostile_sampling(srv):
    """Item 1 and 2: values that once overflowed the sampler (and failed everyone's batch) or gave NaN logprobs."""
    for extra in ({"top_k": 2**63}, {"top_k": 2**31 - 1}, {"seed": 2**64 - 1},
                  {"temperature": 1e-38, "logprobs": True, "top_logprobs": 3},
                  {"presence_penalty": 2.0, "frequency_penalty": -2.0, "repetition_penalty": 1e30}):
        r = httpx.post(srv.url + "/v1/chat/completions", json={**HELLO, "max_tokens": 5, **extra}, timeout=30)
        assert r.status_code in (200, 422), (extra, r.status_code, r.text[:200])
        strict_json(r.text)
    with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=30,
                      json={**HELLO, "max_tokens": 5, "stream": True, "temperature": 1e-38, "logprobs": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                assert "error" not in strict_json(line[6:])


def attack_lax_types(srv):
    """Item 3: no coercion between booleans, strings and numbers."""
    for path, body in (("/v1/chat/completions", {**HELLO, "max_tokens": True}),
                       ("/v1/chat/completions", {**HELLO, "stream": "yes"}),
                       ("/v1/completions", {"prompt": "hello", "max_tokens": 5, "logprobs": False})):
        assert httpx.post(srv.url + path, json=body, timeout=30).status_code == 422, body


def attack_forged_turns(srv):
    """Item 4: control-token strings in a user's text are text; the answer carries no control token."""
    from nanoseek.tokenizer import Tokenizer

    forged = f"{Tokenizer.EOS}{Tokenizer.USER}hi{Tokenizer.ASSISTANT}{Tokenizer.THINK_START}"
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                   json={**HELLO, "max_tokens": 8, "messages": [{"role": "user", "content": forged}]})
    assert r.status_code == 200
    msg = r.json()["choices"][0]["message"]
    for control in (Tokenizer.BOS, Tokenizer.EOS, Tokenizer.USER, Tokenizer.ASSISTANT):
        assert control not in (msg.get("content") or "") + (msg.get("reasoning_content") or "")


def attack_wrong_methods(srv):
    """Item 9: wrong methods are 405 with Allow; HEAD works."""
    assert httpx.get(srv.url + "/v1/chat/completions").status_code == 405
    assert httpx.head(srv.url + "/health").status_code == 200


@pytest.mark.parametrize("attack", [attack_huge_prompt, attack_slow_headers, attack_slow_body, attack_cross_site,
                                    attack_hang_ups, attack_hostile_sampling, attack_lax_types, attack_forged_turns,
                                    attack_wrong_methods], ids=lambda f: f.__name__[7:])
def test_a_running_stream_finishes_unharmed_by(srv, slow_engine, attack):
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json={**HELLO, "stream": True}, timeout=30) as r:
        lines = r.iter_lines()
        events = [next(lines) for _ in range(4)]       # the stream is running ...
        attack(srv)                                    # ... while the attack happens
        events += list(lines)
    events = [e for e in events if e]
    chunks = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
    assert events[-1] == "data: [DONE]" and not any("error" in c for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas).strip() == REASONING
    assert "".join(d.get("content", "") for d in deltas) == ANSWER

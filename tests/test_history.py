"""The chat page's history (serve/history.py, serve/ui.py): the SQLite store, the /ui/ endpoints, and what a killed
server leaves behind.

The store is tested on its own (schema versions and migrations, owners, search, atomic writes); the endpoints on the
memorising tiny model of tests/test_server.py (answers known in advance), over a real server; the durability claim
by SIGKILLing a real `nanoseek serve` mid-answer and opening its database.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest

from nanoseek.errors import UsageError
from nanoseek.serve.history import LOCAL, MIGRATIONS, SCHEMA_VERSION, History, make_title, migrate

K1, K2 = "sk-history-one", "sk-history-two"


# ----------------------------------------------------------------------------------------------- the store
def test_a_new_database_is_at_the_latest_version_in_wal_mode_with_full_sync(tmp_path):
    store = History(tmp_path / "sub" / "h.db")            # (the folder is made)
    c = store.conn
    assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == len(MIGRATIONS)
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert c.execute("PRAGMA synchronous").fetchone()[0] == 2          # FULL
    assert c.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert store.integrity() == "ok"


def test_an_older_database_is_migrated_in_order_and_keeps_its_rows(tmp_path):
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path, isolation_level=None)
    assert migrate(conn, upto=1) == 1 == conn.execute("PRAGMA user_version").fetchone()[0]
    conn.execute("INSERT INTO conversations VALUES ('c1', 'local', 'old chat', 1.0, 2.0)")
    conn.execute("INSERT INTO messages (conversation_id, role, content, reasoning_content, created) "
                 "VALUES ('c1', 'user', 'hi', NULL, 1.0), ('c1', 'assistant', 'hello', 'a greeting', 2.0)")
    columns = [r[1] for r in conn.execute("PRAGMA table_info(messages)")]
    assert "finish_reason" not in columns                 # version 1 has no such column: a real migration follows
    conn.close()
    store = History(path)
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conv = store.get(LOCAL, "c1")
    assert conv["title"] == "old chat" and (conv["created"], conv["updated"]) == (1.0, 2.0)
    assert [(m["role"], m["content"], m["reasoning_content"], m["finish_reason"]) for m in conv["messages"]] == \
        [("user", "hi", None, None), ("assistant", "hello", "a greeting", None)]
    store.add_turn(LOCAL, "c1", [{"role": "assistant", "content": "x", "finish_reason": "length"}])
    assert store.get(LOCAL, "c1")["messages"][-1]["finish_reason"] == "length"
    assert History(path).integrity() == "ok"              # opening again migrates nothing


def test_a_database_from_a_newer_nanoseek_is_refused(tmp_path):
    path = tmp_path / "new.db"
    History(path).conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(UsageError, match="newer than this nanoseek knows"):
        History(path)


def test_a_failed_migration_leaves_the_previous_version(tmp_path, monkeypatch):
    path = tmp_path / "h.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, upto=1)
    broken = [*MIGRATIONS[:1], "ALTER TABLE messages ADD COLUMN finish_reason TEXT; SELECT * FROM nowhere"]
    monkeypatch.setattr("nanoseek.serve.history.MIGRATIONS", broken)
    with pytest.raises(sqlite3.OperationalError):
        migrate(conn)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert "finish_reason" not in [r[1] for r in conn.execute("PRAGMA table_info(messages)")]


def test_owners_are_keyed_hashes_and_see_only_their_own(tmp_path):
    path = tmp_path / "h.db"
    store = History(path)
    one, two = store.owner_of(K1), store.owner_of(K2)
    assert store.owner_of(None) == store.owner_of("") == LOCAL
    assert len({one, two, LOCAL}) == 3 and K1 not in one
    assert History(path).owner_of(K1) == one                          # the salt is kept in the file
    assert History(tmp_path / "other.db").owner_of(K1) != one         # and differs between files
    conv = store.create(one)
    store.add_turn(one, conv["id"], [{"role": "user", "content": "secret plans"}])
    cid = conv["id"]
    assert store.get(two, cid) is None and store.list(two) == [] and store.list(two, q="secret") == []
    assert store.rename(two, cid, "mine now") is None
    assert store.add_turn(two, cid, [{"role": "user", "content": "x"}]) is None
    assert store.delete(two, cid) is False
    assert store.get(one, cid)["title"] == "secret plans" and len(store.get(one, cid)["messages"]) == 1
    raw = path.read_bytes() + (tmp_path / "h.db-wal").read_bytes()
    assert K1.encode() not in raw and K2.encode() not in raw         # no key is ever written


def test_titles_search_order_and_delete(tmp_path):
    store = History(tmp_path / "h.db")
    a, b = store.create(LOCAL), store.create(LOCAL, title="Named")
    store.add_turn(LOCAL, a["id"], [{"role": "user", "content": "\n  What   is 50%_of 8?\nmore"}])
    store.add_turn(LOCAL, a["id"], [{"role": "assistant", "content": "Four.", "reasoning_content": "Half of eight"}])
    store.add_turn(LOCAL, b["id"], [{"role": "user", "content": "hello"}])   # a given title is kept
    assert store.get(LOCAL, a["id"])["title"] == "What is 50%_of 8?"
    assert store.get(LOCAL, b["id"])["title"] == "Named"
    assert [c["id"] for c in store.list(LOCAL)] == [b["id"], a["id"]]       # last updated first
    assert [c["id"] for c in store.list(LOCAL, q="half OF")] == [a["id"]]   # reasoning, any case
    assert [c["id"] for c in store.list(LOCAL, q="named")] == [b["id"]]     # title
    assert [c["id"] for c in store.list(LOCAL, q="50%_")] == [a["id"]]      # wildcards are literal
    assert store.list(LOCAL, q="5_%") == [] and store.list(LOCAL, q="%%") == []
    assert store.rename(LOCAL, a["id"], "  Arithmetic\n ")["title"] == "Arithmetic"
    with pytest.raises(UsageError):
        store.rename(LOCAL, a["id"], "   ")
    assert store.delete(LOCAL, a["id"]) and store.get(LOCAL, a["id"]) is None
    assert store.conn.execute("SELECT count(*) FROM messages WHERE conversation_id = ?",
                              (a["id"],)).fetchone()[0] == 0                 # its messages went with it
    assert make_title("x" * 100) == "x" * 79 + "…"


def test_a_turn_is_written_whole_or_not_at_all(tmp_path):
    store = History(tmp_path / "h.db")
    cid = store.create(LOCAL)["id"]
    with pytest.raises(ValueError, match="role"):
        store.add_turn(LOCAL, cid, [{"role": "user", "content": "kept?"}, {"role": "tool", "content": "no"}])
    with pytest.raises(sqlite3.IntegrityError):     # (the schema refuses what the code would have let through)
        store.write([("INSERT INTO messages (conversation_id, role, content, created) VALUES (?, 'user', 'a', 0)",
                      (cid,)),
                     ("INSERT INTO messages (conversation_id, role, content, created) VALUES ('nope', 'user', 'b', 0)",
                      ())])
    assert store.get(LOCAL, cid)["messages"] == [] and store.get(LOCAL, cid)["title"] == ""


# ----------------------------------------------------------------------------------------------- the endpoints
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from test_server import build_chat_model
    return build_chat_model(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    from test_server import MODEL, ServerThread

    from nanoseek.serve.app import create_app, load_engine
    engine, tok = load_engine(model_dir, max_batch=4, device="cpu")
    path = tmp_path_factory.mktemp("history") / "history.db"
    app = create_app(engine, tok, model_name=MODEL, api_key=[K1, K2], history=path)
    with ServerThread(app) as srv:
        srv.path = path
        yield srv


def call(srv, method, path, key=K1, headers=(), **kw):
    headers = {"Authorization": f"Bearer {key}", **dict(headers)}
    return httpx.request(method, srv.url + path, headers=headers, timeout=60, **kw)


def page_turn(srv, content, key=K1, **fields):
    """POST /ui/chat as the page does: (conversation id, reasoning, content, finish_reason, events)."""
    body = {"content": content, "temperature": 0, "max_tokens": 60, **fields}
    events, reasoning, answer, finish = [], "", "", None
    with httpx.stream("POST", srv.url + "/ui/chat", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=60) as r:
        assert r.status_code == 200, r.read()
        cid = r.headers["x-conversation-id"]
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if line != "data: [DONE]":
                    for c in json.loads(line[6:]).get("choices") or ():
                        reasoning += c["delta"].get("reasoning_content") or ""
                        answer += c["delta"].get("content") or ""
                        finish = c.get("finish_reason") or finish
    return cid, reasoning, answer, finish, events


def test_page_turns_are_recorded_with_their_reasoning(server):
    cid, reasoning, answer, finish, events = page_turn(server, "hello")
    assert (reasoning, answer, finish) == ("the user greets me", "Hello! How can I help?", "stop")
    assert events[-1] == "[DONE]" and "usage" in json.loads(events[-2])   # the stream of /v1/chat/completions
    # (the model learnt single-turn chats only: what it says second is not known, but it is what gets stored)
    cid2, reasoning2, answer2, finish2, _ = page_turn(server, "what is 2+3?", conversation_id=cid, max_tokens=12)
    assert cid2 == cid and finish2 in ("stop", "length")
    conv = call(server, "GET", f"/ui/conversations/{cid}").json()
    assert conv["title"] == "hello"
    assert [(m["role"], m["content"], m["reasoning_content"], m["finish_reason"]) for m in conv["messages"]] == [
        ("user", "hello", None, None), ("assistant", "Hello! How can I help?", "the user greets me", "stop"),
        ("user", "what is 2+3?", None, None), ("assistant", answer2, reasoning2 or None, finish2)]
    listed = call(server, "GET", "/ui/conversations", params={"q": "GREETS"}).json()   # (in the reasoning)
    assert listed["object"] == "list" and [c["id"] for c in listed["data"]] == [cid]


def test_the_answer_is_committed_before_the_stream_says_it_finished(server):
    body = {"content": "what is 3+4?", "temperature": 0, "max_tokens": 60}
    with httpx.stream("POST", server.url + "/ui/chat", json=body, headers={"Authorization": f"Bearer {K1}"},
                      timeout=60) as r:
        cid = r.headers["x-conversation-id"]
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["finish_reason"]:
                break
        # the stream is still open, its usage and [DONE] unsent: another connection already reads the answer
        with sqlite3.connect(server.path) as db:
            rows = db.execute("SELECT role, content FROM messages WHERE conversation_id = ? ORDER BY id",
                              (cid,)).fetchall()
    assert rows == [("user", "what is 3+4?"), ("assistant", " <answer>7</answer>")]


def test_conversations_belong_to_their_key(server):
    cid = page_turn(server, "hello", key=K1)[0]
    mine = call(server, "GET", "/ui/conversations").json()["data"]
    assert cid in [c["id"] for c in mine]
    assert call(server, "GET", "/ui/conversations", key=K2).json()["data"] == []
    def requests(c):
        return [("GET", f"/ui/conversations/{c}", {}), ("PATCH", f"/ui/conversations/{c}", {"json": {"title": "x"}}),
                ("DELETE", f"/ui/conversations/{c}", {}),
                ("POST", "/ui/chat", {"json": {"content": "hi", "conversation_id": c}})]
    nobody = "0" * 32
    for (method, path, kw), (_, path0, kw0) in zip(requests(cid), requests(nobody), strict=True):
        r = call(server, method, path, key=K2, **kw)
        assert r.status_code == 404 and r.json()["error"]["code"] == "conversation_not_found", (method, r.text)
        missing = call(server, method, path0, key=K1, **kw0)     # the answer for an id that does not exist
        assert missing.status_code == 404 and missing.json()["error"] == {
            **r.json()["error"], "message": r.json()["error"]["message"].replace(cid, nobody)}
    assert call(server, "GET", f"/ui/conversations/{cid}").json()["title"] == "hello"   # untouched
    r = call(server, "GET", "/ui/conversations", key="sk-wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_rename_delete_and_create(server):
    conv = call(server, "POST", "/ui/conversations", json={}).json()
    assert conv["title"] == "" and conv["object"] == "conversation"
    r = call(server, "PATCH", f"/ui/conversations/{conv['id']}", json={"title": "Renamed"})
    assert r.status_code == 200 and r.json()["title"] == "Renamed"
    assert call(server, "PATCH", f"/ui/conversations/{conv['id']}", json={"title": ""}).status_code == 422
    assert call(server, "PATCH", f"/ui/conversations/{conv['id']}", json={"name": "x"}).status_code == 422
    r = call(server, "DELETE", f"/ui/conversations/{conv['id']}")
    assert r.json() == {"id": conv["id"], "object": "conversation.deleted", "deleted": True}
    assert call(server, "GET", f"/ui/conversations/{conv['id']}").status_code == 404
    r = call(server, "POST", "/ui/conversations", content=b"{}", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    assert call(server, "GET", "/ui/conversations", params={"limit": "0"}).status_code == 422


def test_api_calls_are_not_recorded(server):
    def counts():
        with sqlite3.connect(server.path) as db:
            return db.execute("SELECT (SELECT count(*) FROM conversations), (SELECT count(*) FROM messages)").fetchone()
    before = counts()
    r = call(server, "POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hello"}],
                                                          "max_tokens": 60, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello! How can I help?"
    r = call(server, "POST", "/chat/completions", json={"messages": [{"role": "user", "content": "hello"}],
                                                       "max_tokens": 5, "stream": True})
    assert r.status_code == 200 and r.text.rstrip().endswith("[DONE]")
    # a page turn the engine refuses stores nothing either (here: max_tokens above the server's limit)
    r = call(server, "POST", "/ui/chat", json={"content": "hello", "max_tokens": 10**6})
    assert r.status_code == 422 and "max_tokens" in r.json()["error"]["message"]
    assert counts() == before


def test_without_history_the_ui_endpoints_say_so(model_dir):
    from starlette.testclient import TestClient
    from test_server import MODEL

    from nanoseek.serve.app import create_app, load_engine
    engine, tok = load_engine(model_dir, max_batch=2, device="cpu")
    client = TestClient(create_app(engine, tok, model_name=MODEL), base_url="http://127.0.0.1")
    r = client.get("/ui/conversations")
    assert r.status_code == 404 and r.json()["error"]["code"] == "history_disabled"
    assert "--no-history" in r.json()["error"]["message"]


# ----------------------------------------------------------------------------------------------- a killed server
def endless_model(model_dir, folder) -> str:
    """The tiny chat model's tokenizer on random weights that never end an answer: every special token's logit is
    exactly 0 (its row of lm_head zeroed) while the others are random, so greedy decoding never picks <eos> (all
    ~300 ordinary logits would have to be negative at once) and an answer runs to max_tokens."""
    import torch

    import nanoseek as ns
    from nanoseek.tokenizer import Tokenizer
    tok = Tokenizer.load(model_dir)
    torch.manual_seed(0)
    model = ns.Transformer(ns.ModelConfig.preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                                 eos_token_id=tok.eos_id, max_position_embeddings=2048))
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
        model.lm_head.weight[sorted(tok.special_ids)] = 0.0
    ns.save(model.eval(), folder, tokenizer=tok)
    return str(folder)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_killed_mid_answer_leaves_every_earlier_turn_intact(model_dir, tmp_path):
    folder = endless_model(model_dir, tmp_path / "endless")
    path, port = tmp_path / "killed.db", free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NANOSEEK_API_KEY": ""}
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", "--model", folder, "--port", str(port),
                             "--history", str(path), "--api-key", K1, "--threads", "1", "--device", "cpu"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    srv = type("Srv", (), {"url": f"http://127.0.0.1:{port}"})()
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(srv.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "nanoseek serve did not start"
            time.sleep(0.2)
        done = [page_turn(srv, "first question", max_tokens=8), page_turn(srv, "second question", max_tokens=8)]
        assert all(finish == "length" and (reasoning or answer) for _, reasoning, answer, finish, _ in done)
        done.append(page_turn(srv, "a follow-up", conversation_id=done[0][0], max_tokens=8))
        # the fourth turn runs to 2000 tokens; the server dies after its first 20 pieces
        body = {"content": "the last question", "conversation_id": done[1][0], "temperature": 0, "max_tokens": 2000}
        with httpx.stream("POST", srv.url + "/ui/chat", json=body, headers={"Authorization": f"Bearer {K1}"},
                          timeout=60) as r:
            pieces = 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    assert not json.loads(line[6:])["choices"][0]["finish_reason"]
                    pieces += 1
                    if pieces == 20:
                        os.kill(proc.pid, signal.SIGKILL)
                        break
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = db.execute("SELECT conversation_id, role, content, coalesce(reasoning_content, ''), finish_reason "
                          "FROM messages ORDER BY id").fetchall()
    first, second, follow_up = done
    assert rows == [
        (first[0], "user", "first question", "", None), (first[0], "assistant", first[2], first[1], "length"),
        (second[0], "user", "second question", "", None), (second[0], "assistant", second[2], second[1], "length"),
        (first[0], "user", "a follow-up", "", None),
        (first[0], "assistant", follow_up[2], follow_up[1], "length"),
        (second[0], "user", "the last question", "", None)]   # its answer died with the server: only that is lost
    assert History(path).get(History(path).owner_of(K1), first[0])["title"] == "first question"

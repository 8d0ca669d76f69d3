"""The chat page's conversations, kept in SQLite (the standard library's sqlite3): `nanoseek serve --history PATH`.

    store = History("~/.local/share/nanoseek/history.db")
    owner = store.owner_of(api_key)              # an HMAC of the key (never the key), or "local" on a keyless server
    conv = store.create(owner)
    store.add_turn(owner, conv["id"], [{"role": "user", "content": "hi"}])
    store.add_turn(owner, conv["id"], [{"role": "assistant", "content": "Hello!", "reasoning_content": "..."}])
    store.list(owner, q="hello"); store.get(owner, id); store.rename(owner, id, "t"); store.delete(owner, id)

Every read and write names its owner: a conversation of another owner is "not found" (None / False), exactly like
one that does not exist, so the server answers 404 and ids do not leak.

Durability. The database is in WAL mode: a commit appends to the -wal file, readers never block the writer, and a
process killed at any instant (SIGKILL mid-answer) leaves the last committed state, because SQLite's recovery
ignores a WAL frame that was not committed. synchronous=FULL fsyncs the WAL at every commit, so a committed turn
also survives a power cut (NORMAL would be just as safe against a killed process but could lose the last commits to a
power cut). Its cost is one fsync per commit, and the server commits twice per turn (the question, the answer): a
few milliseconds against seconds of generation.

Schema versions. `PRAGMA user_version` holds the number of MIGRATIONS applied; opening a file applies the missing ones
in order, each in its own transaction with the version bump, so a file is always at one exact version. A file from a
newer nanoseek (a version above len(MIGRATIONS)) is refused rather than guessed at.

Threads: one connection guarded by a lock. The server calls the store from worker threads (never on the event loop:
an fsync may take milliseconds); the lock makes those calls one at a time, which at a chat page's pace costs nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from ..errors import UsageError

LOCAL = "local"                 # the one owner of a server without API keys
TITLE_CHARS = 80                # a title made from the first message is cut here
MAX_TITLE_CHARS = 200           # a title given by rename
ROLES = ("system", "user", "assistant")

# Each entry moves the schema one version up (index i: version i -> i + 1). Never edit a released entry: add one.
MIGRATIONS: list[str] = [
    # 1: conversations and their messages; the salt that turns API keys into owners
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        title TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE INDEX conversations_by_owner ON conversations (owner, updated);
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
        content TEXT NOT NULL,
        reasoning_content TEXT,
        created REAL NOT NULL
    );
    CREATE INDEX messages_by_conversation ON messages (conversation_id, id);
    """,
    # 2: why an answer ended ("stop", "length"), so a reopened conversation can say "stopped at max tokens"
    "ALTER TABLE messages ADD COLUMN finish_reason TEXT;",
]
SCHEMA_VERSION = len(MIGRATIONS)


def default_path() -> Path:
    """$XDG_DATA_HOME/nanoseek/history.db, else ~/.local/share/nanoseek/history.db (the XDG default)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "nanoseek" / "history.db"


def make_title(text: str) -> str:
    """A conversation's title from its first message: the words of its first line, at most TITLE_CHARS."""
    line = next((s for s in text.strip().splitlines() if s.strip()), "")
    line = " ".join(line.split())
    return line if len(line) <= TITLE_CHARS else line[:TITLE_CHARS - 1].rstrip() + "…"


def like_pattern(q: str) -> str:
    """A LIKE pattern matching `q` anywhere, with LIKE's own wildcards in q taken literally (ESCAPE '\\')."""
    return "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def migrate(conn: sqlite3.Connection, upto: int = SCHEMA_VERSION) -> int:
    """Apply the missing MIGRATIONS (up to version `upto`), each with its version bump in one transaction. The
    version is read inside the transaction's write lock, so two processes opening a new file migrate it once."""
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise UsageError(f"the history database is at schema version {version}, newer than this nanoseek "
                                 f"knows ({SCHEMA_VERSION}); upgrade nanoseek, or use another --history file")
            if version >= upto:
                conn.execute("COMMIT")
                return version
            for statement in MIGRATIONS[version].split(";"):   # (no ';' inside the migrations' SQL text)
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


class History:
    """The conversation store of one SQLite file (see the module's docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # autocommit mode (isolation_level=None): transactions are the explicit BEGIN ... COMMIT of `write`
            self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA foreign_keys = ON")
            mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            self.conn.execute("PRAGMA synchronous = FULL")
            migrate(self.conn)
        except (OSError, sqlite3.Error) as e:
            raise UsageError(f"cannot open the chat history database {self.path}: {e}; give another file with "
                             "--history PATH, or --no-history") from None
        if mode.lower() != "wal":
            raise UsageError(f"the chat history database {self.path} cannot use SQLite's WAL journal (got "
                             f"{mode!r}; a network file system?); give a local file with --history PATH")
        self.lock = threading.Lock()
        self.salt = self._salt()

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    # ---------------------------------------------------------------------------------------- plumbing
    def read(self, sql: str, args=()) -> list[sqlite3.Row]:
        with self.lock:
            return self.conn.execute(sql, args).fetchall()

    def write(self, steps) -> None:
        """Run [(sql, args), ...] as one transaction: all of it is committed (durably, synchronous=FULL), or none."""
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in steps:
                    self.conn.execute(sql, args)
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def _salt(self) -> bytes:
        """This database's random salt for owner_of (made once, with the file)."""
        self.write([("INSERT OR IGNORE INTO meta (key, value) VALUES ('owner_salt', ?)", (secrets.token_hex(16),))])
        return bytes.fromhex(self.read("SELECT value FROM meta WHERE key = 'owner_salt'")[0]["value"])

    def owner_of(self, api_key: str | None) -> str:
        """Who owns what a request creates: an HMAC-SHA256 of its API key under this file's salt (the file never
        holds a key, nor a plain hash a list of candidate keys could be checked against elsewhere), or LOCAL."""
        if not api_key:
            return LOCAL
        return "key:" + hmac.new(self.salt, api_key.encode(), hashlib.sha256).hexdigest()

    def integrity(self) -> str:
        """PRAGMA integrity_check's verdict: "ok" for a sound file."""
        return "; ".join(r[0] for r in self.read("PRAGMA integrity_check"))

    # ---------------------------------------------------------------------------------------- conversations
    @staticmethod
    def _conversation(row) -> dict:
        return {"id": row["id"], "object": "conversation", "title": row["title"], "created": row["created"],
                "updated": row["updated"]}

    def _find(self, owner: str, cid: str) -> dict | None:
        rows = self.read("SELECT * FROM conversations WHERE id = ? AND owner = ?", (cid, owner))
        return self._conversation(rows[0]) if rows else None

    def create(self, owner: str, title: str = "") -> dict:
        now, cid = time.time(), uuid.uuid4().hex
        self.write([("INSERT INTO conversations (id, owner, title, created, updated) VALUES (?, ?, ?, ?, ?)",
                     (cid, owner, title.strip()[:MAX_TITLE_CHARS], now, now))])
        return self._find(owner, cid)

    def list(self, owner: str, q: str | None = None, limit: int = 200) -> list[dict]:
        """The owner's conversations, the most recently updated first; with `q`, those whose title or a message
        holds q (case-insensitive for ASCII letters: SQLite's LIKE)."""
        if not q:
            rows = self.read("SELECT * FROM conversations WHERE owner = ? ORDER BY updated DESC LIMIT ?",
                             (owner, limit))
        else:
            pat = like_pattern(q)
            rows = self.read("SELECT * FROM conversations c WHERE owner = ? AND (title LIKE ? ESCAPE '\\' OR EXISTS "
                             "(SELECT 1 FROM messages m WHERE m.conversation_id = c.id AND "
                             "(m.content LIKE ? ESCAPE '\\' OR m.reasoning_content LIKE ? ESCAPE '\\'))) "
                             "ORDER BY updated DESC LIMIT ?", (owner, pat, pat, pat, limit))
        return [self._conversation(r) for r in rows]

    def get(self, owner: str, cid: str) -> dict | None:
        """The conversation with its messages (oldest first), or None."""
        conv = self._find(owner, cid)
        if conv is None:
            return None
        rows = self.read("SELECT id, role, content, reasoning_content, finish_reason, created FROM messages "
                         "WHERE conversation_id = ? ORDER BY id", (cid,))
        conv["messages"] = [dict(r) for r in rows]
        return conv

    def rename(self, owner: str, cid: str, title: str) -> dict | None:
        title = " ".join(title.split())[:MAX_TITLE_CHARS]
        if not title:
            raise UsageError("a conversation's title cannot be empty")
        self.write([("UPDATE conversations SET title = ? WHERE id = ? AND owner = ?", (title, cid, owner))])
        return self._find(owner, cid)

    def delete(self, owner: str, cid: str) -> bool:
        """Delete the conversation and its messages (ON DELETE CASCADE); False if the owner has no such one."""
        if self._find(owner, cid) is None:
            return False
        self.write([("DELETE FROM conversations WHERE id = ? AND owner = ?", (cid, owner))])
        return True

    def add_turn(self, owner: str, cid: str, messages: list[dict]) -> dict | None:
        """Append messages ({role, content, reasoning_content?, finish_reason?}) in one transaction; the first user
        message titles an untitled conversation. None when the owner has no such conversation."""
        conv = self._find(owner, cid)
        if conv is None:
            return None
        now, steps = time.time(), []
        for m in messages:
            if m["role"] not in ROLES:
                raise ValueError(f"role must be one of {ROLES}, not {m['role']!r}")
            steps.append(("INSERT INTO messages (conversation_id, role, content, reasoning_content, finish_reason, "
                          "created) VALUES (?, ?, ?, ?, ?, ?)", (cid, m["role"], m["content"],
                                                                 m.get("reasoning_content") or None,
                                                                 m.get("finish_reason"), now)))
        first_user = next((m["content"] for m in messages if m["role"] == "user"), None)
        if not conv["title"] and first_user:
            steps.append(("UPDATE conversations SET title = ? WHERE id = ? AND title = ''",
                          (make_title(first_user), cid)))
        steps.append(("UPDATE conversations SET updated = ? WHERE id = ?", (now, cid)))
        self.write(steps)
        return self._find(owner, cid)

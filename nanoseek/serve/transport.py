"""The connection side of `nanoseek serve`: deadlines for reading a request, and uvicorn's settings.

uvicorn reads a request with no time limit of its own: a client that sends half its headers, or its body a byte at
a time, holds a connection (a socket, a file descriptor, a slot under the connection cap) for as long as it likes,
and a few hundred such clients fill the server. `DeadlineProtocol` is uvicorn's h11 protocol with two deadlines,
counted from the first byte (so trickling does not extend them):
- the request line and headers must arrive within `header_timeout_s` of the connection opening, or of the first
  byte of the next request on a kept-alive connection;
- the body within `body_timeout_s` of the end of the headers.
A late request is answered 408 (a JSON error, as every other) and closed; a connection that never sent a byte is
closed without an answer. Between requests, an idle kept-alive connection closes after uvicorn's own
`timeout_keep_alive`.

`server_config` builds the uvicorn Config that `nanoseek serve` runs (and the tests, with shorter deadlines).
"""

from __future__ import annotations

import asyncio
import json
from functools import partial

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import APIError


class DeadlineProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol (h11) with header and body read deadlines."""

    def __init__(self, *args, header_timeout_s: float = 10.0, body_timeout_s: float = 30.0, **kw):
        super().__init__(*args, **kw)
        self.header_timeout_s, self.body_timeout_s = header_timeout_s, body_timeout_s
        self.deadline: asyncio.TimerHandle | None = None
        self.waiting_for: str | None = None       # "headers" | "body" | None (nothing being read against a clock)
        self.got_bytes = False                    # any byte of the request now awaited

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._expect("headers")

    def connection_lost(self, exc) -> None:
        self._expect(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.waiting_for is None and self.conn.their_state is h11.IDLE:
            self._expect("headers")               # the first bytes of the next request on a kept-alive connection
        self.got_bytes = True
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()            # (may go on to a pipelined request already received)
        self._follow()

    def _follow(self) -> None:
        """Move the clock along with h11's view of the request: headers -> body -> received."""
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self.waiting_for != "body":
                self._expect("body")
        elif state is not h11.IDLE:               # DONE, MUST_CLOSE, CLOSED, ERROR: nothing more to read now
            self._expect(None)

    def _expect(self, what: str | None) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        if what == "headers":
            self.got_bytes = False
        self.waiting_for = what
        if what is not None and not self.transport.is_closing():
            secs = self.header_timeout_s if what == "headers" else self.body_timeout_s
            self.deadline = self.loop.call_later(secs, self._late, what, secs)

    def _late(self, what: str, secs: float) -> None:
        """The deadline passed: answer 408 unless nothing was asked (or an answer already went out), and close."""
        self.deadline = None
        if self.transport.is_closing():
            return
        answered = what == "body" and self.cycle is not None and self.cycle.response_started
        if self.got_bytes and not answered:
            err = APIError(408, f"the request's {what} did not arrive within {secs:g} s of its first byte; send "
                           "the whole request at once", "request_timeout")
            body = json.dumps(err.body()).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()                    # (connection_lost tells a request still reading its body)


def server_config(app, host: str = "127.0.0.1", port: int = 8000, *, header_timeout_s: float = 10.0,
                  body_timeout_s: float = 30.0, keep_alive_s: float = 5.0, max_connections: int = 1024,
                  log_level: str = "info") -> uvicorn.Config:
    """uvicorn's Config for `app`: the deadline protocol, the keep-alive timeout and the connection cap (uvicorn's
    limit_concurrency: beyond it a request is answered 503 at once, so keep it far above what the queue admits).
    No WebSocket upgrades (the API has none: an upgrade would leave the deadlines behind)."""
    protocol = partial(DeadlineProtocol, header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s)
    return uvicorn.Config(app, host=host, port=port, http=protocol, ws="none", lifespan="on",
                          timeout_keep_alive=keep_alive_s, limit_concurrency=max_connections, log_level=log_level,
                          timeout_graceful_shutdown=5)

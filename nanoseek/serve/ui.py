"""The chat page's JSON endpoints under /ui/: its conversations, kept in the `--history` database (history.py).

    GET    /ui/conversations[?q=TEXT&limit=N]   {"object": "list", "data": [conversation, ...]}, newest first;
                                                q: conversations whose title or messages hold TEXT
    POST   /ui/conversations    {"title"?}      a new, empty conversation
    GET    /ui/conversations/ID                 the conversation with its "messages" (role, content,
                                                reasoning_content, finish_reason, created), oldest first
    PATCH  /ui/conversations/ID {"title"}       rename
    DELETE /ui/conversations/ID                 {"id", "object": "conversation.deleted", "deleted": true}
    POST   /ui/chat  {"conversation_id"?, "content", "system"?, "thinking"?, "temperature"?, "top_p"?,
                      "max_tokens"?, "seed"?}
                                                one turn of the page: the stored conversation plus this user
                                                message go to /v1/chat/completions as a stream (the same chunks,
                                                usage included); without conversation_id a new conversation is made.
                                                Its id is in the X-Conversation-Id header.

A conversation is {"id", "object": "conversation", "title", "created", "updated"} (times in Unix seconds).

Only these turns are recorded: the API (/v1/...) keeps nothing, whoever calls it. A turn is recorded in two
commits: the user's message once the engine has accepted the request (a refused request stores nothing), the answer
when it is finished, before the stream's finish chunk is sent, so a page that saw the end of an answer can reload
it. An answer cut short (stop button, hang-up, error, a killed server) is not stored; its question is.

Scope: everything belongs to the API key that made it (history.History.owner_of); another key gets 404 for it, as
for an id that does not exist, so ids do not leak. Without keys there is one owner, "local". With --no-history every
/ui/ endpoint answers 404 `history_disabled`, and the page keeps its conversation in the browser tab only.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

from ..errors import UsageError
from . import protocol as P
from .history import MAX_TITLE_CHARS, History
from .protocol import APIError

if TYPE_CHECKING:
    from .app import Service

log = logging.getLogger("nanoseek.serve")
ChatHandler = Callable[[Request], Awaitable[Response]]


# --------------------------------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class NewConversation(_Body):
    title: str = Field("", max_length=MAX_TITLE_CHARS)


class Rename(_Body):
    title: str = Field(min_length=1, max_length=MAX_TITLE_CHARS)


class PageTurn(_Body):
    """One turn of the page. The sampling fields go to /v1/chat/completions as they are (its schema checks them)."""
    conversation_id: str | None = Field(None, max_length=64)
    content: str = Field(min_length=1)
    system: str | None = None                # the page's system prompt (a setting of the page: not stored)
    thinking: bool | None = None
    temperature: float | int | None = None
    top_p: float | int | None = None
    max_tokens: int | None = None
    seed: int | None = None

    def chat_body(self, model: str, history: list[dict]) -> dict:
        """The /v1/chat/completions request of this turn after `history` (the stored messages)."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages += [{"role": m["role"], "content": m["content"]} for m in history]   # (past reasoning not sent)
        messages.append({"role": "user", "content": self.content})
        body = {"model": model, "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
        if self.thinking is not None:
            body["thinking"] = {"type": "enabled" if self.thinking else "disabled"}
        for name in ("temperature", "top_p", "max_tokens", "seed"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        return body


# --------------------------------------------------------------------------------------------- plumbing
def store_of(request: Request) -> History:
    store = request.app.state.history
    if store is None:
        raise APIError(404, "this server keeps no chat history (it was started with --no-history)",
                       "history_disabled")
    return store


def owner(request: Request) -> tuple[Service, History, str]:
    """(service, store, owner of this request): the key is checked before the store is even looked at."""
    svc = request.app.state.service
    key = svc.check_key(request)
    store = store_of(request)
    return svc, store, store.owner_of(key)


async def body_of(request: Request, schema: type[_Body]):
    """The JSON body, declared as such (415 otherwise, as for the API's POSTs), checked against `schema`."""
    ctype = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if ctype != "application/json":
        raise APIError(415, f"the request body must be JSON sent with 'Content-Type: application/json' (got "
                       f"{ctype or 'no Content-Type'})", "unsupported_media_type")
    try:
        data = json.loads(await request.body())
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", "invalid_json") from None
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise APIError(422, P.validation_message(e.errors()), "invalid_parameter") from None


def not_found(cid: str) -> APIError:
    return APIError(404, f"no conversation {cid!r} (deleted, or made with another API key)", "conversation_not_found")


# --------------------------------------------------------------------------------------------- routes
async def list_conversations(request: Request):
    svc, store, who = owner(request)
    q = request.query_params.get("q") or None
    try:
        limit = int(request.query_params.get("limit", "200"))
    except ValueError:
        limit = -1
    if not 1 <= limit <= 1000:
        raise APIError(422, "limit must be an integer from 1 to 1000", "invalid_parameter", param="limit")
    return {"object": "list", "data": await svc.off_loop(store.list, who, q, limit)}


async def create_conversation(request: Request):
    svc, store, who = owner(request)
    body = await body_of(request, NewConversation)
    return await svc.off_loop(store.create, who, body.title)


async def get_conversation(request: Request, cid: str):
    svc, store, who = owner(request)
    conv = await svc.off_loop(store.get, who, cid)
    if conv is None:
        raise not_found(cid)
    return conv


async def rename_conversation(request: Request, cid: str):
    svc, store, who = owner(request)
    body = await body_of(request, Rename)
    try:
        conv = await svc.off_loop(store.rename, who, cid, body.title)
    except UsageError as e:
        raise APIError(422, str(e), "invalid_parameter", param="title") from None
    if conv is None:
        raise not_found(cid)
    return conv


async def delete_conversation(request: Request, cid: str):
    svc, store, who = owner(request)
    if not await svc.off_loop(store.delete, who, cid):
        raise not_found(cid)
    return {"id": cid, "object": "conversation.deleted", "deleted": True}


def inner_request(request: Request, body: dict) -> Request:
    """A request to the chat endpoint carrying `body`, on the page's connection (its headers, so its key; its
    disconnect, so a page that hangs up cancels the generation)."""
    raw, sent = json.dumps(body).encode(), False      # (ASCII: a lone surrogate reaches the chat's own check)

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await request.receive()

    return Request({**request.scope, "path": "/v1/chat/completions"}, receive)


def page_chat(chat: ChatHandler):
    """POST /ui/chat, answered by `chat` (the /v1/chat/completions handler) with the turn recorded."""
    async def page_turn(request: Request):
        svc, store, who = owner(request)
        turn = await body_of(request, PageTurn)
        cid = turn.conversation_id
        past = []
        if cid is not None:
            conv = await svc.off_loop(store.get, who, cid)
            if conv is None:
                raise not_found(cid)
            past = conv["messages"]
        response = await chat(inner_request(request, turn.chat_body(svc.model_name, past)))
        try:   # accepted by the engine: the question is kept from here on
            if cid is None:
                cid = (await svc.off_loop(store.create, who))["id"]
            if await svc.off_loop(store.add_turn, who, cid, [{"role": "user", "content": turn.content}]) is None:
                raise not_found(cid)                           # (deleted meanwhile)
        except BaseException:
            response.on_close()                                # cancels the generation
            raise
        response.body_iterator = recorded(response.body_iterator, svc, store, who, cid)
        response.headers["X-Conversation-Id"] = cid
        return response
    return page_turn


async def recorded(events: AsyncIterator[str], svc: Service, store: History, who: str,
                   cid: str) -> AsyncIterator[str]:
    """The chat stream, passed on as it is, with its answer stored when it ends: the commit happens before the
    chunk that carries finish_reason is sent (and so before usage and [DONE])."""
    reasoning, content, saved = [], [], False
    async for event in events:
        if not saved and event.startswith("data: {"):
            finish = None
            for choice in json.loads(event[6:]).get("choices") or ():
                delta = choice.get("delta") or {}
                reasoning.append(delta.get("reasoning_content") or "")
                content.append(delta.get("content") or "")
                finish = choice.get("finish_reason") or finish
            if finish:
                saved = True
                answer = {"role": "assistant", "content": "".join(content),
                          "reasoning_content": "".join(reasoning), "finish_reason": finish}
                try:
                    await svc.off_loop(store.add_turn, who, cid, [answer])
                except (sqlite3.Error, OSError) as e:
                    log.exception("could not store the answer of conversation %s", cid)
                    yield P.sse(APIError(500, f"the answer could not be saved in the chat history: {e}",
                                         "history_write_failed").body())
                    return
        yield event


def add_ui_routes(app: FastAPI, history: str | os.PathLike | History | None, chat: ChatHandler) -> None:
    """The /ui/ endpoints over `history` (a database file or an open History; None: they answer 404
    history_disabled); `chat` (the /v1/chat/completions handler) answers the page's turns."""
    app.state.history = history if history is None or isinstance(history, History) else History(history)
    get = ["GET", "HEAD"]
    app.add_api_route("/ui/conversations", list_conversations, methods=get, include_in_schema=False)
    app.add_api_route("/ui/conversations", create_conversation, methods=["POST"], include_in_schema=False)
    app.add_api_route("/ui/conversations/{cid}", get_conversation, methods=get, include_in_schema=False)
    app.add_api_route("/ui/conversations/{cid}", rename_conversation, methods=["PATCH"], include_in_schema=False)
    app.add_api_route("/ui/conversations/{cid}", delete_conversation, methods=["DELETE"], include_in_schema=False)
    app.add_api_route("/ui/chat", page_chat(chat), methods=["POST"], include_in_schema=False)

"""Old home of the server, kept so that `from nanoseek.serve.api import create_app, Limits, load_engine` keeps
working. The wire format now lives in protocol.py, the app and the `serve` command in app.py."""

from .app import CONFIG, ServeConfig, create_app, load_engine, main
from .protocol import MODEL_ALIASES as ALIASES
from .protocol import APIError, ChatRequest, CompletionRequest, Limits

__all__ = ["ALIASES", "APIError", "CONFIG", "ChatRequest", "CompletionRequest", "Limits", "ServeConfig",
           "create_app", "load_engine", "main"]

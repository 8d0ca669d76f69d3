"""Serving: the wire format (protocol.py), the DeepSeek/OpenAI-compatible app and `serve` command (app.py), its
engine thread (worker.py), the terminal chat (chat.py) and the web chat page (web/). api.py is the old import path."""

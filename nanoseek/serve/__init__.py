"""Serving: the DeepSeek/OpenAI-compatible API server (api.py), its engine thread (worker.py), the terminal chat
(chat.py) and the web chat page (web/)."""

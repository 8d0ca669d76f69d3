"""Data: pretraining corpora (`corpus.py`), SFT conversations packed into rows (`chat.py`), the verifiable tasks
used by SFT, GRPO and eval (`tasks.py`), the held-out split policy (`split.py`) and the one JSONL reader
(`jsonl.py`)."""

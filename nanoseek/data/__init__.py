"""Data: pretraining corpora (`corpus.py`) and the verifiable tasks used by SFT, GRPO and eval (`tasks.py`)."""

"""Training stages: pretrain (this package's loop.py holds the pieces every stage shares), sft, grpo, distill."""

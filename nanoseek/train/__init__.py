"""Training: runtime.py (device, processes, DDP/FSDP2), run.py (the run folder: resume, metrics, checkpoints),
optim.py (AdamW groups, schedules, the V3 bias-update hook), and the recipes pretrain, sft, grpo, distill."""

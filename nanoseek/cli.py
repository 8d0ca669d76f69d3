"""The `nanoseek` command (also `python -m nanoseek`): one subcommand per stage.

Each stage lives in its own module, which defines `add_arguments(parser)` and `main(args) -> int`; this file only
dispatches. Bad input (UsageError, CheckpointError, FileNotFoundError) prints one `error: ...` line and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UsageError

# subcommand -> (module, one-line help)
COMMANDS = {
    "speedrun": ("nanoseek.speedrun", "tokenizer -> pretrain -> SFT -> GRPO -> eval -> report, in one command"),
    "tokenizer": ("nanoseek.tokenizer", "train a byte-level BPE tokenizer"),
    "pretrain": ("nanoseek.train.pretrain", "pretrain a DeepSeek-style MoE model (MTP, aux-loss-free balancing)"),
    "sft": ("nanoseek.train.sft", "supervised fine-tuning on chat data or a task's worked solutions"),
    "grpo": ("nanoseek.train.grpo", "GRPO reinforcement learning with rule-checked rewards"),
    "distill": ("nanoseek.train.distill", "teacher traces -> rejection sampling -> student SFT"),
    "eval": ("nanoseek.eval", "pass@1 / pass@k / maj@k on a task"),
    "serve": ("nanoseek.serve.api", "DeepSeek/OpenAI-compatible API server with a web chat page"),
    "chat": ("nanoseek.serve.chat", "chat with a model in the terminal"),
    "info": ("nanoseek.info", "parameters and KV-cache size of a preset or model folder"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="nanoseek", description="The DeepSeek-V2/V3 system in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (modname, help_) in COMMANDS.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("nanoseek"):
                continue  # a stage not built yet
            raise
        p = sub.add_parser(name, help=help_, description=help_)
        mod.add_arguments(p)
        modules[name] = mod
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    from .checkpoint import CheckpointError
    try:
        return int(modules[args.command].main(args) or 0)
    except (UsageError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

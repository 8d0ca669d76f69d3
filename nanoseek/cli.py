"""The `nanoseek` command (also `python -m nanoseek`): one subcommand per stage.

Each command's module defines its configuration as a dataclass, `CONFIG`, and `main(cfg) -> int`. This file builds
the command's flags from that dataclass (nanoseek/options.py: names, types, defaults and help from the field
comments; `--config FILE.toml` for every command), makes the config (defaults < TOML < flags) and dispatches. Only
the chosen command's module is imported, so `nanoseek --help` does not import torch. Bad input (UsageError,
CheckpointError, FileNotFoundError) prints one `error: ...` line and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
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
    "serve": ("nanoseek.serve.app", "DeepSeek/OpenAI-compatible API server with a web chat page"),
    "chat": ("nanoseek.serve.chat", "chat with a model in the terminal"),
    "info": ("nanoseek.info", "parameters and KV-cache size of a preset or model folder"),
    "export-gguf": ("nanoseek.export_gguf", "write a model as a GGUF file for llama.cpp / ollama (f32, f16, q8_0)"),
}


def top_parser() -> argparse.ArgumentParser:
    """`nanoseek --help`: the command list, built without importing any command module."""
    parser = argparse.ArgumentParser(prog="nanoseek", description="The DeepSeek-V2/V3 system in plain PyTorch.",
                                     epilog="`nanoseek COMMAND --help` lists a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def command_parser(name: str):
    """The parser of one command, from its module's CONFIG dataclass -> (parser, module)."""
    from .options import add_options

    modname, help_ = COMMANDS[name]
    mod = importlib.import_module(modname)
    parser = argparse.ArgumentParser(prog=f"nanoseek {name}", description=help_)
    add_options(parser, mod.CONFIG)
    return parser, mod


def run_command(name: str, argv: list[str]) -> int:
    from .options import make_config

    parser, mod = command_parser(name)
    args = parser.parse_args(argv)
    return int(mod.main(make_config(mod.CONFIG, args)) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # torch's CPU allocator backs tensors of 2 MB and more with transparent huge pages when this is set (read at
    # its first allocation, so before torch is imported): streaming the weights through the TLB then costs less,
    # ~10% on one-row decoding (docs/benchmarks.md "Dense decode"). The user's own setting wins.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if not argv or argv[0] not in COMMANDS:
        top_parser().parse_args(argv)      # --help, or "invalid choice" with the list of commands (exit 2)
        top_parser().print_help()
        return 2
    try:
        return run_command(argv[0], argv[1:])
    except (UsageError, FileNotFoundError) as e:      # CheckpointError is a UsageError
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

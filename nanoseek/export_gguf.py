"""`nanoseek export-gguf MODEL OUT.gguf [--type f16|bf16|q8_0|f32]`: one GGUF file that llama.cpp and ollama run.

MODEL is a model folder (ours or a Hugging Face one, with its tokenizer) or a .gguf file (to re-store it in another
type). The writing is nanoseek/gguf.py's `export_gguf`; this module only loads and reports, and is separate because
loading goes through checkpoint.py, which itself hands .gguf paths to gguf.py (one module doing both would be an
import cycle).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .checkpoint import load_model_and_tokenizer
from .errors import UsageError
from .gguf import ARCHS, export_gguf


@dataclass
class ExportGGUFConfig:
    model: str = ""          # model folder (with its tokenizer) or .gguf file to export
    out: str = ""            # the .gguf file to write
    type: str = "f16"        # storage of the weight matrices: f16, bf16, q8_0 or f32 (norms and biases stay f32)
    force: bool = False      # overwrite OUT if it exists
    REQUIRED: ClassVar[tuple] = ("model", "out")
    POSITIONAL: ClassVar[tuple] = ("model", "out")


CONFIG = ExportGGUFConfig


def main(cfg: ExportGGUFConfig) -> int:
    out = Path(cfg.out)
    if out.suffix != ".gguf":
        raise UsageError(f"{out}: the output file should end in .gguf (llama.cpp and ollama look for that)")
    if out.exists() and not cfg.force:
        raise UsageError(f"{out} already exists; choose another name or pass --force")
    if not out.parent.is_dir():
        raise UsageError(f"{out.parent} is not a folder: create it first, or write {out.name} elsewhere")
    model, tokenizer = load_model_and_tokenizer(cfg.model, purpose="export-gguf")
    with warnings.catch_warnings(record=True) as notes:   # what llama.cpp will do differently: said plainly
        warnings.simplefilter("always")
        export_gguf(model, tokenizer, out, cfg.type, progress=True)
    for note in notes:
        print(f"note: {note.message}")
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({size:,.1f} MiB): llama.cpp architecture {ARCHS[model.cfg.model_type]}, "
          f"{model.cfg.num_hidden_layers} layers, matrices in {cfg.type}, tokenizer and chat template included.\n"
          f"run it with llama.cpp: llama-cli -m {out}   (or ollama: a Modelfile with `FROM ./{out.name}`)")
    return 0

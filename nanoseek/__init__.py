"""nanoseek: the DeepSeek-V2/V3 system in plain PyTorch.

    import nanoseek as ns
    model = ns.Transformer(ns.ModelConfig.preset("tiny"))
    model = ns.load("path/to/hf/folder");  ns.save(model, "out", tokenizer=tok)
"""

from .checkpoint import load, save
from .config import PRESETS, ModelConfig
from .model import LatentCache, Transformer

__version__ = "0.1.0"
__all__ = ["ModelConfig", "PRESETS", "Transformer", "LatentCache", "load", "save"]


def __getattr__(name):
    # Later stages import lazily so `import nanoseek` stays light (no tokenizers/fastapi import for the model).
    if name == "Tokenizer":
        from .tokenizer import Tokenizer
        return Tokenizer
    if name in ("Engine", "SamplingParams", "Completion"):
        from .infer import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'nanoseek' has no attribute {name!r}")

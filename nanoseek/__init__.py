"""nanoseek: the DeepSeek-V2/V3 system in plain PyTorch.

    import nanoseek as ns
    model = ns.Transformer(ns.ModelConfig.preset("tiny"))
    model = ns.load("path/to/hf/folder");  ns.save(model, "out", tokenizer=tok)

The public names are imported on first use (PEP 562 module __getattr__), so `import nanoseek` and `nanoseek --help`
do not import torch.
"""

from importlib import import_module as _import_module

__version__ = "0.1.0"

# public name -> the module that defines it (its home; what `ns.NAME` returns)
_HOMES = {
    "ModelConfig": "nanoseek.config",
    "PRESETS": "nanoseek.config",
    "Transformer": "nanoseek.model.transformer",
    "LatentCache": "nanoseek.infer.cache",
    "KVCache": "nanoseek.infer.cache",
    "load": "nanoseek.checkpoint",
    "save": "nanoseek.checkpoint",
    "Tokenizer": "nanoseek.tokenizer",
    "Engine": "nanoseek.infer.engine",
    "SamplingParams": "nanoseek.infer.sampling",
    "Completion": "nanoseek.infer.engine",
}

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'nanoseek' has no attribute {name!r}")
    value = getattr(_import_module(_HOMES[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

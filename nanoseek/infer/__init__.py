"""Inference: the paged latent KV cache (cache.py), the sampler (sampling.py) and the Engine (engine.py)."""

from .engine import Completion, Engine, SamplingParams, StreamDelta

__all__ = ["Engine", "SamplingParams", "Completion", "StreamDelta"]

"""Inference: paged caches behind one interface (cache.py: MLA latent, GQA K/V), the sampler (sampling.py) and the
Engine (engine.py)."""

from .engine import Completion, Engine, SamplingParams, StreamDelta

__all__ = ["Engine", "SamplingParams", "Completion", "StreamDelta"]

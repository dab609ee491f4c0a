"""gemma_jax: Gemma 1/2/3 decoders in JAX + Flax NNX, with importers, a sampler and an SFT trainer."""

from gemma_jax.config import AttentionType, ModelConfig, PRESETS, get_preset

__all__ = ['AttentionType', 'ModelConfig', 'PRESETS', 'get_preset']

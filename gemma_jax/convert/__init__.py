"""Importers and exporters: Hugging Face safetensors, GGUF and official Gemma Orbax checkpoints."""

from gemma_jax.convert.hf import (config_from_hf, hf_config_from_config, hf_tensors_from_model,
                                  load_hf, model_from_hf_tensors)
from gemma_jax.convert.gguf import load_gguf
from gemma_jax.convert.export import save_hf
from gemma_jax.convert.official import load_official

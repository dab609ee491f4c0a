"""Small random-weight transformers models (float32) for parity tests, saved with save_pretrained."""

from __future__ import annotations

import torch
import transformers

NORM_STD = 0.5

FAMILIES = {
    # Gemma 1, multi-query attention (K = 1).
    'gemma1-mqa': lambda: transformers.GemmaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16),
    # Gemma 1, multi-head attention (N == K): our side fuses q, k, v into qkv_einsum.
    'gemma1-mha': lambda: transformers.GemmaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16),
    # Gemma 2: soft-caps small enough to bind, window 4 shorter than the sequence.
    'gemma2': lambda: transformers.Gemma2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=4, attn_logit_softcapping=1.5, final_logit_softcapping=3.0),
    # Gemma 3: QK-norm, 5 local : 1 global (7 layers), two RoPE bases, linear scaling on global.
    'gemma3': lambda: transformers.Gemma3TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=7,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=4, rope_parameters={
            'full_attention': {'rope_type': 'linear', 'factor': 8.0, 'rope_theta': 1_000_000.0},
            'sliding_attention': {'rope_type': 'default', 'rope_theta': 10_000.0}}),
}


def make_hf_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
  """A random float32 causal LM; norm scales randomised too (transformers zero-inits them)."""
  config = FAMILIES[family]()
  config.initializer_range = 0.1
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.normal_(0.0, NORM_STD)
  return model.eval()


def hf_logits(model, tokens) -> torch.Tensor:
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()

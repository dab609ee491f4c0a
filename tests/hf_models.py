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
    # Gemma 4 with per-layer inputs (odd width 6), KV sharing (the last 3 of 7 layers, one local
    # and two global), double-wide MLPs there, k = v and its own head dim (24) and kv heads on
    # global layers, partial RoPE (a quarter of 24: 3 pairs rotated), window 4.
    'gemma4-ple': lambda: transformers.Gemma4TextConfig(
        vocab_size=256, hidden_size=48, intermediate_size=80, num_hidden_layers=7,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, global_head_dim=24,
        num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=4,
        layer_types=GEMMA4_LAYER_TYPES, num_kv_shared_layers=3, use_double_wide_mlp=True,
        hidden_size_per_layer_input=6, vocab_size_per_layer_input=256),
    # Gemma 4 dense: separate v projections, a binding final soft-cap, no per-layer inputs.
    'gemma4-dense': lambda: transformers.Gemma4TextConfig(
        vocab_size=256, hidden_size=48, intermediate_size=80, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, global_head_dim=20,
        sliding_window=4, layer_types=['sliding_attention', 'full_attention'] * 2,
        final_logit_softcapping=3.0, hidden_size_per_layer_input=0),
    # Gemma 4 mixture of experts: 5 experts, top 2, beside a dense MLP (k = v on global layers).
    'gemma4-moe': lambda: transformers.Gemma4TextConfig(
        vocab_size=256, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, global_head_dim=24,
        num_global_key_value_heads=2, attention_k_eq_v=True, sliding_window=4,
        layer_types=['sliding_attention', 'sliding_attention', 'full_attention'],
        enable_moe_block=True, num_experts=5, top_k_experts=2, moe_intermediate_size=24,
        final_logit_softcapping=30.0, hidden_size_per_layer_input=0),
}

GEMMA4_LAYER_TYPES = ['sliding_attention', 'full_attention', 'sliding_attention',
                      'full_attention', 'sliding_attention', 'full_attention', 'full_attention']


def make_hf_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
  """A random float32 causal LM; norm scales randomised too (transformers initialises them to
  constants), and for Gemma 4 the router scales and layer scalars as well."""
  config = FAMILIES[family]()
  config.initializer_range = 0.1
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  gemma4 = family.startswith('gemma4')
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name or name.endswith(('router.scale', 'per_expert_scale')):
        # Gemma 4 multiplies by its norm weights (Gemma 1-3 by 1 + weight): centre them on 1.
        p.normal_(1.0 if gemma4 else 0.0, NORM_STD)
    for name, b in model.named_buffers():
      if name.endswith('layer_scalar'):
        b.uniform_(0.5, 1.5)
  return model.eval()


def hf_logits(model, tokens) -> torch.Tensor:
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def save_reference_and_policy(mktemp, family: str = 'gemma3', noise: float = 0.02):
  """(vocab size, {'reference': dir, 'policy': dir}): a random HF model saved with
  `save_pretrained` as the reference, and again with N(0, noise) added to every weight as the
  policy (`mktemp(name)` makes a directory, e.g. tmp_path_factory.mktemp): the two models of a
  preference or RL loss test."""
  import copy  # pylint: disable=g-import-not-at-top
  ref = make_hf_model(family)
  policy = copy.deepcopy(ref)
  torch.manual_seed(1)
  with torch.no_grad():
    for p in policy.parameters():
      p.add_(noise * torch.randn_like(p))
  dirs = {}
  for name, model in (('reference', ref), ('policy', policy)):
    dirs[name] = str(mktemp(name))
    model.save_pretrained(dirs[name])
  return ref.config.vocab_size, dirs

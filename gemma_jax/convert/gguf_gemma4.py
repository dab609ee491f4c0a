"""The ModelConfig of a llama.cpp GGUF file of architecture `gemma4`.

Read from llama.cpp's converter (`conversion/gemma.py`, class Gemma4Model) and `src/models/
gemma4.cpp`: per-layer metadata arrays (sliding pattern, kv heads, feed-forward widths: doubled on
KV-shared layers when their MLPs are double-wide), separate head dims for sliding layers (`*_swa`),
the rotated fraction of global layers in the `rope_freqs` factors, k = v where global layers lack
`attn_v`. The tensors themselves are read by gemma_jax.convert.gguf.
"""

from __future__ import annotations

import numpy as np

from gemma_jax import config as config_lib
from gemma_jax.config import ModelConfig
from gemma_jax.convert.config_checks import MAX_LAYERS, integer
from gemma_jax.convert.gguf import (GLOBAL, LOCAL, _ROPE_FREQS, _dequantize, _tensor_info,
                                    _uniform, _value)


def gemma4_config(reader, path: str, V: int, eps: float) -> ModelConfig:
  """ModelConfig of a gemma4 file: its metadata, per-layer arrays and what its tensors show (the
  rotated fraction in rope_freqs, k = v where global layers lack attn_v, the per-layer table's
  rows). Raises ValueError naming the key for what Gemma 4 cannot be."""

  def get(key, default=None):
    value = _value(reader, f'gemma4.{key}', default)
    if value is None:
      raise ValueError(f'{path}: GGUF metadata has no gemma4.{key}; cannot build the model config.')
    return value

  def per_layer(key, default=None):  # a scalar or one value per layer -> one value per layer
    value = get(key, default)
    if isinstance(value, list) and len(value) != L:
      raise ValueError(f'{path}: gemma4.{key} has {len(value)} entries for {L} layers.')
    return value if isinstance(value, list) else [value] * L

  def one(key, values):
    if len(set(values)) > 1:
      raise ValueError(f'{path}: gemma4.{key} takes values {sorted(set(values))} where Gemma 4 '
                       'has one.')
    return values[0] if values else None

  L = integer(path, 'gemma4.block_count', get('block_count'), 1, MAX_LAYERS)
  D = integer(path, 'gemma4.embedding_length', get('embedding_length'), 1)
  N = _uniform(path, 'gemma4.attention.head_count', get('attention.head_count'))
  pattern = get('attention.sliding_window_pattern')
  if not isinstance(pattern, list) or len(pattern) != L:
    raise ValueError(f'{path}: gemma4.attention.sliding_window_pattern must have one flag per '
                     f'layer ({L}; True: sliding), got {pattern!r}.')
  types = tuple(LOCAL if sliding else GLOBAL for sliding in pattern)
  shared = get('attention.shared_kv_layers', 0)
  first_shared = L - shared
  H_g = get('attention.key_length')
  H_l = get('attention.key_length_swa', H_g)
  if (get('attention.value_length', H_g), get('attention.value_length_swa', H_l)) != (H_g, H_l):
    raise ValueError(f'{path}: gemma4.attention.value_length(_swa) differs from key_length(_swa).')
  kv = per_layer('attention.head_count_kv', N)
  K_g = one('attention.head_count_kv (full-attention layers)',
            [k for k, t in zip(kv, types) if t == GLOBAL])
  K = one('attention.head_count_kv (sliding layers)', [k for k, t in zip(kv, types) if t == LOCAL])
  ff = per_layer('feed_forward_length')
  F = one('feed_forward_length (layers with their own keys)', ff[:first_shared])
  F_shared = one('feed_forward_length (KV-shared layers)', ff[first_shared:]) or F
  if F_shared not in (F, 2 * F):
    raise ValueError(f'{path}: gemma4.feed_forward_length is {F_shared} on KV-shared layers and '
                     f'{F} elsewhere; Gemma 4 doubles it or keeps it.')
  if get('rope.dimension_count_swa', H_l) != H_l or get('rope.dimension_count', H_g) != H_g:
    raise ValueError(f'{path}: gemma4.rope.dimension_count(_swa) is not the head dim; Gemma 4 '
                     'rotates part of a head through rope_freqs only.')
  fraction, names = 1.0, {t.name for t in reader.tensors}
  if GLOBAL in types:
    fraction = _rotated_fraction(reader, path, H_g)
  own_kv = [i for i in range(first_shared) if types[i] == GLOBAL]
  no_v = [f'blk.{i}.attn_v.weight' not in names for i in own_kv]
  if len(set(no_v)) > 1:
    raise ValueError(f'{path}: some full-attention layers have attn_v and some do not.')
  I = get('embedding_length_per_layer_input', 0)
  table = _tensor_info(reader, 'per_layer_token_embd.weight')
  V_pl = int(table.shape[1]) if I and table is not None else None
  E = get('expert_count') if any(n.endswith('.ffn_gate_inp.weight') for n in names) else 0
  has_local = LOCAL in types
  softcap = _value(reader, 'gemma4.final_logit_softcapping')
  fields = dict(
      name=f'gguf-gemma4-{_value(reader, "general.name", "model")}', num_layers=L, embed_dim=D,
      hidden_dim=F, num_heads=N, head_dim=H_l, num_kv_heads=K or K_g, vocab_size=V,
      attention_types=types,
      sliding_window=get('attention.sliding_window') if has_local else None,
      query_pre_attn_scalar=1.0, final_logit_soft_cap=float(softcap) if softcap else None,
      use_post_attn_norm=True, use_post_ffw_norm=True, use_qk_norm=True,
      rope_base_global=float(get('rope.freq_base', 1_000_000.0)),
      rope_base_local=float(get('rope.freq_base_swa', 10_000.0)), rms_norm_eps=eps,
      max_seq_len=get('context_length', 131_072), family=4,
      global_head_dim=H_g if H_g != H_l else None,
      num_global_kv_heads=K_g if K and K_g != K else None,
      attention_k_eq_v=bool(no_v and no_v[0]), rope_fraction_global=fraction,
      num_kv_shared_layers=shared, double_wide_mlp=F_shared == 2 * F != F,
      per_layer_input_dim=I, per_layer_vocab_size=V_pl if V_pl != V else None,
      num_experts=E, num_experts_per_token=get('expert_used_count') if E else 0,
      expert_hidden_dim=get('expert_feed_forward_length') if E else 0)
  try:
    config = ModelConfig(**fields)
  except (ValueError, TypeError) as e:
    raise ValueError(f'{path}: the GGUF metadata does not make a valid config: {e}') from None
  preset = next((p for p in config_lib.PRESETS.values()
                 if p.replace(name=config.name) == config), None)
  return preset or config


def _rotated_fraction(reader, path: str, H: int) -> float:
  """Gemma 4 global layers' rotated fraction of H, from llama.cpp's `rope_freqs` factors (1 for
  each rotated pair, then 1e30 for each pair left unrotated)."""
  t = _tensor_info(reader, _ROPE_FREQS)
  if t is None:
    raise ValueError(f'{path}: no {_ROPE_FREQS}; gemma4 files carry the full-attention layers\' '
                     'RoPE frequency factors there.')
  factors = _dequantize(t, path).reshape(-1)
  rotated = int(np.argmin(factors == 1.0)) if (factors != 1.0).any() else factors.size
  if factors.size != H // 2 or not (factors[rotated:] >= 1e29).all():
    raise ValueError(f'{path}: {_ROPE_FREQS} must hold {H // 2} factors, 1 (rotated) then 1e30 '
                     f'(not rotated); got {factors.size} starting {factors[:4].tolist()}.')
  fraction = 2 * rotated / H
  if int(fraction * H // 2) != rotated:  # the rule of layers.apply_rope
    raise ValueError(f'{path}: {rotated} rotated pairs of {H // 2} is not a fraction gemma_jax '
                     'can express exactly.')
  return fraction

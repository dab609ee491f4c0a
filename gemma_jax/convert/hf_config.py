"""transformers' config.json <-> ModelConfig, for Gemma 1, 2, 3 and 4 text models (both ways).

Gemma 4 (`Gemma4TextConfig`, transformers 5.24): global layers' head dim and kv-head count live in
`per_layer_config` (keyed by layer index) as transformers writes it; RoPE is per layer type, the
global one 'proportional' with a `partial_rotary_factor`. A multimodal `Gemma4Config` (model_type
'gemma4') nests the text model's config under `text_config`.
"""

from __future__ import annotations

from typing import Any, Mapping

from gemma_jax.config import PATTERN_PERIOD, AttentionType, ModelConfig, layer_pattern
from gemma_jax.convert.config_checks import MAX_LAYERS, check_config, integer, number

ARCHITECTURES = {'GemmaForCausalLM': 1, 'Gemma2ForCausalLM': 2, 'Gemma3ForCausalLM': 3,
                 'Gemma4ForCausalLM': 4}
# Multimodal classes whose language model is read (their other towers are skipped).
MULTIMODAL_ARCHITECTURES = {'Gemma4ForConditionalGeneration': 4}
MODEL_TYPES = {'gemma': 1, 'gemma2': 2, 'gemma3_text': 3, 'gemma4_text': 4}
_LAYER_TYPES = {'full_attention': AttentionType.GLOBAL, 'sliding_attention': AttentionType.LOCAL}


def _rope(params: Mapping[str, Any] | None, source: str, key: str) -> tuple[float, float, float]:
  """(base, linear scale, rotated fraction) from one `rope_parameters` entry."""
  if not params or not isinstance(params, Mapping):
    raise ValueError(f'{source}: missing rope parameters for {key!r} (got {params!r:.60}).')
  kind = params.get('rope_type', params.get('type', 'default'))
  if 'rope_theta' not in params:
    raise ValueError(f'{source}: rope parameters {key!r} have no rope_theta.')
  base = number(source, f'{key}.rope_theta', params['rope_theta'], positive=True)
  factor = number(source, f'{key}.factor', params.get('factor', 1.0), positive=True)
  if kind == 'default':
    return base, 1.0, 1.0
  if kind == 'linear':
    if 'factor' not in params:
      raise ValueError(f'{source}: linear rope parameters {key!r} have no factor.')
    return base, factor, 1.0
  if kind == 'proportional':
    return base, factor, number(source, f'{key}.partial_rotary_factor',
                                params.get('partial_rotary_factor', 1.0), positive=True)
  raise ValueError(f'{source}: rope_type {kind!r} in {key!r} is not supported (default, linear, '
                   'proportional).')


def text_config(hf: Mapping[str, Any]) -> Mapping[str, Any]:
  """The language model's config of a multimodal Gemma 4 config (`text_config`); else `hf`."""
  if hf.get('model_type') == 'gemma4' and isinstance(hf.get('text_config'), Mapping):
    return hf['text_config']
  return hf


def config_from_hf(hf: Mapping[str, Any], source: str = 'config.json') -> ModelConfig:
  """A ModelConfig from a transformers config dict (Gemma 1-4 text, or a multimodal Gemma 4's
  text part). Raises ValueError naming `source` and the key for what it cannot express, or for a
  value of the wrong type or out of range (gemma_jax.convert.config_checks)."""
  try:
    config = _config_from_hf(hf, source)
  except (TypeError, AttributeError, KeyError) as e:  # a value of an unexpected JSON type
    raise ValueError(f'{source}: malformed config ({type(e).__name__}: {e}).') from None
  check_config(config, source)
  return config


def _config_from_hf(hf: Mapping[str, Any], source: str) -> ModelConfig:
  name = hf.get('_name_or_path')
  hf = text_config(hf)
  model_type = hf.get('model_type')
  if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
    archs = hf.get('architectures')
    raise ValueError(f'{source}: model_type {model_type!r} (architectures {archs}) is not '
                     f'supported; expected one of {sorted(MODEL_TYPES)} '
                     f'({", ".join(ARCHITECTURES)}).')
  family = MODEL_TYPES[model_type]

  def need(key):
    if key not in hf:
      raise ValueError(f'{source}: missing key {key!r} for model_type {model_type!r}.')
    return hf[key]

  def size(key, default=None):  # a count or dimension; a null or missing one takes `default`
    value = hf.get(key) if default is not None else need(key)
    return integer(source, key, default if value is None else value, 1)

  if hf.get('attention_bias'):
    raise ValueError(f'{source}: attention_bias=true is not supported by Gemma.')
  act = hf.get('hidden_activation') or hf.get('hidden_act') or 'gelu_pytorch_tanh'
  if act not in ('gelu_pytorch_tanh', 'gelu', 'gelu_tanh'):
    raise ValueError(f'{source}: hidden activation {act!r} is not supported (gelu_pytorch_tanh).')
  num_layers = integer(source, 'num_hidden_layers', need('num_hidden_layers'), 1, MAX_LAYERS)
  layer_types = hf.get('layer_types')
  if layer_types is None:  # older files: the generation's pattern (Gemma 3: its period)
    period = PATTERN_PERIOD[min(family, 3)]
    if family == 3:
      period = integer(source, 'sliding_window_pattern', hf.get('sliding_window_pattern', period),
                       1)
    attention_types = layer_pattern(num_layers, period)
  else:
    if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
      raise ValueError(f'{source}: layer_types must be a list of strings, got {layer_types!r:.60}.')
    unknown = sorted(set(layer_types) - set(_LAYER_TYPES))
    if unknown:
      raise ValueError(f'{source}: unknown layer_types {unknown}.')
    if len(layer_types) != num_layers:
      raise ValueError(f'{source}: layer_types has {len(layer_types)} entries, '
                       f'num_hidden_layers is {num_layers}.')
    attention_types = tuple(_LAYER_TYPES[t] for t in layer_types)

  # transformers >= 5 keeps RoPE in `rope_parameters` (per layer type for Gemma 3 and 4); older
  # files carry rope_theta / rope_local_base_freq / rope_scaling.
  rope = hf.get('rope_parameters')
  if rope is None:
    rope = {'rope_theta': hf.get('rope_theta', 10_000.0), **(hf.get('rope_scaling') or {})}
    if family >= 3:
      rope = {'full_attention': rope,
              'sliding_attention': {'rope_theta': hf.get('rope_local_base_freq', 10_000.0)}}
  if not isinstance(rope, Mapping):
    raise ValueError(f'{source}: rope_parameters must be an object, got {rope!r:.60}.')
  if family >= 3:
    base_g, scale_g, fraction_g = _rope(rope.get('full_attention'), source, 'full_attention')
    base_l, scale_l, fraction_l = _rope(rope.get('sliding_attention'), source,
                                        'sliding_attention')
  else:
    base_g, scale_g, fraction_g = _rope(rope, source, 'rope_parameters')
    base_l, scale_l, fraction_l = base_g, scale_g, fraction_g
  if fraction_l != 1.0 or (family < 4 and fraction_g != 1.0):
    raise ValueError(f'{source}: partial RoPE is supported on Gemma 4 global layers only.')

  has_local = AttentionType.LOCAL in attention_types
  fields: dict[str, Any] = dict(
      name=name or f'hf-{model_type}',
      num_layers=num_layers,
      embed_dim=size('hidden_size'),
      hidden_dim=size('intermediate_size'),
      num_heads=size('num_attention_heads'),
      head_dim=size('head_dim', size('hidden_size') // size('num_attention_heads')),
      num_kv_heads=size('num_key_value_heads', size('num_attention_heads')),
      vocab_size=size('vocab_size'),
      attention_types=attention_types,
      sliding_window=size('sliding_window') if has_local else None,
      query_pre_attn_scalar=hf.get('query_pre_attn_scalar') if family in (2, 3) else None,
      attn_logits_soft_cap=hf.get('attn_logit_softcapping') if family == 2 else None,
      final_logit_soft_cap=hf.get('final_logit_softcapping') if family > 1 else None,
      use_post_attn_norm=family > 1,
      use_post_ffw_norm=family > 1,
      use_qk_norm=family >= 3,
      rope_base_global=base_g, rope_base_local=base_l,
      rope_scale_global=scale_g, rope_scale_local=scale_l,
      rms_norm_eps=number(source, 'rms_norm_eps', hf.get('rms_norm_eps', 1e-6), positive=True),
      max_seq_len=size('max_position_embeddings', 8192),
      family=family,
  )
  if family == 4:
    fields.update(_gemma4_fields(hf, attention_types, fraction_g, source))
  try:
    return ModelConfig(**fields)
  except ValueError as e:
    raise ValueError(f'{source}: {e}') from None


def _gemma4_fields(hf, attention_types, fraction_g, source) -> dict[str, Any]:
  """ModelConfig fields of the Gemma 4 keys."""
  # 'vision' (the 26B and 31B models) makes image tokens attend both ways; text stays causal, so
  # a text model reads it as None. 'all' would make every token bidirectional.
  bidirectional = hf.get('use_bidirectional_attention')
  if bidirectional not in (None, 'vision'):
    raise ValueError(f'{source}: use_bidirectional_attention={bidirectional!r} is not supported '
                     "(text attends causally; None and 'vision' are read).")
  # transformers writes global layers' head dim and kv heads per layer; all must agree.
  per_layer = {int(k): v for k, v in (hf.get('per_layer_config') or {}).items()}
  global_dims = set()
  for i, kind in enumerate(attention_types):
    override = per_layer.get(i, {})
    if kind == AttentionType.LOCAL and override:
      raise ValueError(f'{source}: per_layer_config.{i} overrides a sliding layer; only '
                       'full-attention layers may differ.')
    if kind == AttentionType.GLOBAL:
      global_dims.add((override.get('head_dim'), override.get('num_key_value_heads')))
  if len(global_dims) > 1:
    raise ValueError(f'{source}: per_layer_config gives full-attention layers different head '
                     f'dims / kv heads {sorted(global_dims, key=str)}.')
  global_h, global_k = global_dims.pop() if global_dims else (None, None)
  if not per_layer:  # a hand-written config: transformers' keyword defaults
    global_h = hf.get('global_head_dim', 512)
    global_k = hf.get('num_global_key_value_heads') if hf.get('attention_k_eq_v') else None
  moe = bool(hf.get('enable_moe_block'))
  for key in ('num_experts', 'top_k_experts', 'moe_intermediate_size'):
    if moe and not hf.get(key):
      raise ValueError(f'{source}: enable_moe_block is true but {key!r} is missing.')
  if moe and int(hf['top_k_experts']) > int(hf['num_experts']):
    raise ValueError(f'{source}: top_k_experts={hf["top_k_experts"]} is larger than '
                     f'num_experts={hf["num_experts"]}.')
  per_layer_vocab = (hf.get('vocab_size_per_layer_input')
                     if hf.get('hidden_size_per_layer_input') else None)
  if per_layer_vocab == hf.get('vocab_size'):
    per_layer_vocab = None  # the default: as many rows as the main table
  return dict(
      query_pre_attn_scalar=1.0,  # Gemma 4 attention scaling is 1.0 (q and k are RMS-normed)
      global_head_dim=int(global_h) if global_h else None,
      num_global_kv_heads=int(global_k) if global_k else None,
      attention_k_eq_v=bool(hf.get('attention_k_eq_v', False)),
      rope_fraction_global=fraction_g,
      num_kv_shared_layers=int(hf.get('num_kv_shared_layers') or 0),
      double_wide_mlp=bool(hf.get('use_double_wide_mlp', False)),
      per_layer_input_dim=int(hf.get('hidden_size_per_layer_input') or 0),
      per_layer_vocab_size=int(per_layer_vocab) if per_layer_vocab else None,
      num_experts=int(hf['num_experts']) if moe else 0,
      num_experts_per_token=int(hf['top_k_experts']) if moe else 0,
      expert_hidden_dim=int(hf['moe_intermediate_size']) if moe else 0,
  )


def hf_config_from_config(config: ModelConfig, vocab_size: int | None = None) -> dict[str, Any]:
  """The config.json transformers needs to rebuild `config` (inverse of `config_from_hf`)."""
  c = config
  model_type = {v: k for k, v in MODEL_TYPES.items()}[c.family]
  arch = {v: k for k, v in ARCHITECTURES.items()}[c.family]
  layer_types = ['full_attention' if t == AttentionType.GLOBAL else 'sliding_attention'
                 for t in c.attention_types]

  def rope(base, scale, fraction=1.0):
    if fraction != 1.0:
      extra = {} if scale == 1.0 else {'factor': scale}
      return {'rope_type': 'proportional', 'rope_theta': base, 'partial_rotary_factor': fraction,
              **extra}
    if scale == 1.0:
      return {'rope_type': 'default', 'rope_theta': base}
    return {'rope_type': 'linear', 'rope_theta': base, 'factor': scale}

  hf: dict[str, Any] = {
      'architectures': [arch], 'model_type': model_type,
      'vocab_size': vocab_size or c.vocab_size, 'hidden_size': c.embed_dim,
      'intermediate_size': c.hidden_dim, 'num_hidden_layers': c.num_layers,
      'num_attention_heads': c.num_heads, 'num_key_value_heads': c.num_kv_heads,
      'head_dim': c.head_dim, 'rms_norm_eps': c.rms_norm_eps,
      'max_position_embeddings': c.max_seq_len, 'hidden_activation': 'gelu_pytorch_tanh',
      'hidden_act': 'gelu_pytorch_tanh', 'tie_word_embeddings': True, 'attention_bias': False,
      'pad_token_id': 0, 'eos_token_id': 1, 'bos_token_id': 2, 'torch_dtype': 'float32',
  }
  if c.family == 1:
    hf['rope_parameters'] = rope(c.rope_base_global, c.rope_scale_global)
  else:
    hf.update(sliding_window=c.sliding_window, layer_types=layer_types,
              final_logit_softcapping=c.final_logit_soft_cap)
  if c.family in (2, 3):
    hf['query_pre_attn_scalar'] = c.query_pre_attn_scalar or c.head_dim
  if c.family == 2:
    hf['attn_logit_softcapping'] = c.attn_logits_soft_cap
    hf['rope_parameters'] = rope(c.rope_base_global, c.rope_scale_global)
  if c.family >= 3:
    hf['rope_parameters'] = {
        'full_attention': rope(c.rope_base_global, c.rope_scale_global, c.rope_fraction_global),
        'sliding_attention': rope(c.rope_base_local, c.rope_scale_local)}
  if c.family == 3:
    hf['attn_logit_softcapping'] = None
  if c.family == 4:
    hf.update(_gemma4_keys(c))
  return hf


def _gemma4_keys(c: ModelConfig) -> dict[str, Any]:
  G = AttentionType.GLOBAL
  per_layer = {str(i): {'head_dim': c.layer_head_dim(G), 'num_key_value_heads': c.layer_kv_heads(G)}
               for i, t in enumerate(c.attention_types) if t == G}
  return {
      'per_layer_config': per_layer, 'attention_k_eq_v': c.attention_k_eq_v,
      'num_kv_shared_layers': c.num_kv_shared_layers, 'use_double_wide_mlp': c.double_wide_mlp,
      'hidden_size_per_layer_input': c.per_layer_input_dim,
      'vocab_size_per_layer_input': c.per_layer_vocab_size or c.vocab_size,
      'enable_moe_block': bool(c.num_experts), 'num_experts': c.num_experts or None,
      'top_k_experts': c.num_experts_per_token or None,
      'moe_intermediate_size': c.expert_hidden_dim or None,
      'use_bidirectional_attention': None,
  }

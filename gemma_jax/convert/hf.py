"""Hugging Face transformers <-> gemma_jax: config.json and safetensors names, both directions.

One table (`_layout`) lists every tensor with its HF name, our dotted name and the reshape between
them, so the importer and the exporter cannot drift apart.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np

from gemma_jax.config import PATTERN_PERIOD, AttentionType, ModelConfig, layer_pattern
from gemma_jax.transformer import Transformer, flat_params, model_from_params

ARCHITECTURES = {'GemmaForCausalLM': 1, 'Gemma2ForCausalLM': 2, 'Gemma3ForCausalLM': 3}
MODEL_TYPES = {'gemma': 1, 'gemma2': 2, 'gemma3_text': 3}
_LAYER_TYPES = {'full_attention': AttentionType.GLOBAL, 'sliding_attention': AttentionType.LOCAL}


def _rope(params: Mapping[str, Any] | None, source: str, key: str) -> tuple[float, float]:
  """(base, linear scale) from one `rope_parameters` entry."""
  if not params:
    raise ValueError(f'{source}: missing rope parameters for {key!r}.')
  kind = params.get('rope_type', params.get('type', 'default'))
  if kind == 'default':
    return float(params['rope_theta']), 1.0
  if kind == 'linear':
    return float(params['rope_theta']), float(params['factor'])
  raise ValueError(f'{source}: rope_type {kind!r} in {key!r} is not supported (default, linear).')


def config_from_hf(hf: Mapping[str, Any], source: str = 'config.json') -> ModelConfig:
  """A ModelConfig from a transformers config dict (Gemma, Gemma 2 or Gemma 3 text)."""
  model_type = hf.get('model_type')
  if model_type not in MODEL_TYPES:
    archs = hf.get('architectures')
    raise ValueError(f'{source}: model_type {model_type!r} (architectures {archs}) is not '
                     f'supported; expected one of {sorted(MODEL_TYPES)} '
                     f'({", ".join(ARCHITECTURES)}).')
  family = MODEL_TYPES[model_type]

  def need(key):
    if key not in hf:
      raise ValueError(f'{source}: missing key {key!r} for model_type {model_type!r}.')
    return hf[key]

  if hf.get('attention_bias'):
    raise ValueError(f'{source}: attention_bias=true is not supported by Gemma.')
  act = hf.get('hidden_activation') or hf.get('hidden_act') or 'gelu_pytorch_tanh'
  if act not in ('gelu_pytorch_tanh', 'gelu', 'gelu_tanh'):
    raise ValueError(f'{source}: hidden activation {act!r} is not supported (gelu_pytorch_tanh).')
  num_layers = int(need('num_hidden_layers'))
  layer_types = hf.get('layer_types')
  if layer_types is None:  # older files: the generation's pattern (Gemma 3: its period)
    period = PATTERN_PERIOD[family]
    if family == 3:
      period = int(hf.get('sliding_window_pattern', period))
    attention_types = layer_pattern(num_layers, period)
  else:
    unknown = sorted(set(layer_types) - set(_LAYER_TYPES))
    if unknown:
      raise ValueError(f'{source}: unknown layer_types {unknown}.')
    attention_types = tuple(_LAYER_TYPES[t] for t in layer_types)

  # transformers >= 5 keeps RoPE in `rope_parameters` (per layer type for Gemma 3); older files
  # carry rope_theta / rope_local_base_freq / rope_scaling.
  rope = hf.get('rope_parameters')
  if rope is None:
    rope = {'rope_theta': hf.get('rope_theta', 10_000.0), **(hf.get('rope_scaling') or {})}
    if family == 3:
      rope = {'full_attention': rope,
              'sliding_attention': {'rope_theta': hf.get('rope_local_base_freq', 10_000.0)}}
  if family == 3:
    base_g, scale_g = _rope(rope.get('full_attention'), source, 'full_attention')
    base_l, scale_l = _rope(rope.get('sliding_attention'), source, 'sliding_attention')
  else:
    base_g, scale_g = _rope(rope, source, 'rope_parameters')
    base_l, scale_l = base_g, scale_g

  has_local = AttentionType.LOCAL in attention_types
  return ModelConfig(
      name=hf.get('_name_or_path') or f'hf-{model_type}',
      num_layers=num_layers,
      embed_dim=int(need('hidden_size')),
      hidden_dim=int(need('intermediate_size')),
      num_heads=int(need('num_attention_heads')),
      head_dim=int(hf.get('head_dim') or need('hidden_size') // need('num_attention_heads')),
      num_kv_heads=int(hf.get('num_key_value_heads') or need('num_attention_heads')),
      vocab_size=int(need('vocab_size')),
      attention_types=attention_types,
      sliding_window=int(need('sliding_window')) if has_local else None,
      query_pre_attn_scalar=hf.get('query_pre_attn_scalar') if family > 1 else None,
      attn_logits_soft_cap=hf.get('attn_logit_softcapping') if family == 2 else None,
      final_logit_soft_cap=hf.get('final_logit_softcapping') if family > 1 else None,
      use_post_attn_norm=family > 1,
      use_post_ffw_norm=family > 1,
      use_qk_norm=family == 3,
      rope_base_global=base_g, rope_base_local=base_l,
      rope_scale_global=scale_g, rope_scale_local=scale_l,
      rms_norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
      max_seq_len=int(hf.get('max_position_embeddings', 8192)),
      family=family,
  )


def hf_config_from_config(config: ModelConfig, vocab_size: int | None = None) -> dict[str, Any]:
  """The config.json transformers needs to rebuild `config` (inverse of `config_from_hf`)."""
  c = config
  model_type = {v: k for k, v in MODEL_TYPES.items()}[c.family]
  arch = {v: k for k, v in ARCHITECTURES.items()}[c.family]
  layer_types = ['full_attention' if t == AttentionType.GLOBAL else 'sliding_attention'
                 for t in c.attention_types]

  def rope(base, scale):
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
    hf.update(query_pre_attn_scalar=c.query_pre_attn_scalar or c.head_dim,
              sliding_window=c.sliding_window, layer_types=layer_types,
              final_logit_softcapping=c.final_logit_soft_cap)
  if c.family == 2:
    hf['attn_logit_softcapping'] = c.attn_logits_soft_cap
    hf['rope_parameters'] = rope(c.rope_base_global, c.rope_scale_global)
  if c.family == 3:
    hf['attn_logit_softcapping'] = None
    hf['rope_parameters'] = {'full_attention': rope(c.rope_base_global, c.rope_scale_global),
                             'sliding_attention': rope(c.rope_base_local, c.rope_scale_local)}
  return hf


# (hf name, our name, hf -> ours, ours -> hf); a None hf name means "several HF tensors": handled
# by the fused/stacked entries below.
_Entry = tuple[str, str, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def _ident(x):
  return x


def _layout(config: ModelConfig) -> list[_Entry]:
  """Every single-tensor correspondence between HF names and ours."""
  c = config
  N, D, H = c.num_heads, c.embed_dim, c.head_dim
  entries: list[_Entry] = [
      ('model.embed_tokens.weight', 'embedder.input_embedding', _ident, _ident),
      ('model.norm.weight', 'final_norm.scale', _ident, _ident),
  ]
  norms = {'input_layernorm': 'pre_attention_norm'}
  if c.family == 1:
    norms['post_attention_layernorm'] = 'pre_ffw_norm'
  else:
    norms.update(post_attention_layernorm='post_attention_norm',
                 pre_feedforward_layernorm='pre_ffw_norm',
                 post_feedforward_layernorm='post_ffw_norm')
  for i in range(c.num_layers):
    hf, us = f'model.layers.{i}.', f'layers.{i}.'
    for h, u in norms.items():
      entries.append((hf + h + '.weight', us + u + '.scale', _ident, _ident))
    if c.use_qk_norm:
      entries.append((hf + 'self_attn.q_norm.weight', us + 'attn._query_norm.scale', _ident, _ident))
      entries.append((hf + 'self_attn.k_norm.weight', us + 'attn._key_norm.scale', _ident, _ident))
    entries.append((hf + 'self_attn.o_proj.weight', us + 'attn.attn_vec_einsum.w',
                    lambda w: w.reshape(D, N, H).transpose(1, 2, 0),  # [D, N*H] -> (N, H, D)
                    lambda w: w.transpose(2, 0, 1).reshape(D, N * H)))
    entries.append((hf + 'mlp.down_proj.weight', us + 'mlp.linear', lambda w: w.T, lambda w: w.T))
  return entries


def _heads_to_ours(w: np.ndarray, n: int, d: int, h: int) -> np.ndarray:
  return w.reshape(n, h, d).transpose(0, 2, 1)  # [n*H, D] -> (n, D, H)


def _heads_to_hf(w: np.ndarray) -> np.ndarray:
  n, d, h = w.shape
  return w.transpose(0, 2, 1).reshape(n * h, d)


def model_from_hf_tensors(config: ModelConfig, tensors: Mapping[str, np.ndarray], *,
                          dtype=jnp.float32, param_dtype=None, source: str = 'tensors',
                          remat: str = 'none', shardings=None) -> Transformer:
  """A Transformer from HF-named tensors (Linear weights [out, in], zero-centred norm weights).

  Raises ValueError naming `source` and the key for a missing, unexpected or mis-shaped tensor.
  """
  c = config
  N, K, D, H = c.num_heads, c.num_kv_heads, c.embed_dim, c.head_dim
  used: set[str] = set()

  def get(name, shape):
    if name not in tensors:
      raise ValueError(f'{source}: missing tensor {name!r} (expected shape {shape}).')
    w = np.asarray(tensors[name])
    if tuple(w.shape) != tuple(shape):
      raise ValueError(f'{source}: tensor {name!r} has shape {tuple(w.shape)}, expected {shape}.')
    used.add(name)
    return w

  params: dict[str, np.ndarray] = {}
  shapes = _hf_shapes(config)
  for hf_name, ours, to_ours, _ in _layout(config):
    params[ours] = to_ours(get(hf_name, shapes[hf_name]))
  for i in range(c.num_layers):
    hf, us = f'model.layers.{i}.self_attn.', f'layers.{i}.attn.'
    q = _heads_to_ours(get(hf + 'q_proj.weight', (N * H, D)), N, D, H)
    k = _heads_to_ours(get(hf + 'k_proj.weight', (K * H, D)), K, D, H)
    v = _heads_to_ours(get(hf + 'v_proj.weight', (K * H, D)), K, D, H)
    if c.fused_qkv:
      params[us + 'qkv_einsum.w'] = np.stack([q, k, v])
    else:
      params[us + 'q_einsum.w'] = q
      params[us + 'kv_einsum.w'] = np.stack([k, v])
    mlp = f'model.layers.{i}.mlp.'
    params[f'layers.{i}.mlp.gating_einsum'] = np.stack(
        [get(mlp + 'gate_proj.weight', (c.hidden_dim, D)).T,
         get(mlp + 'up_proj.weight', (c.hidden_dim, D)).T])
  lm_head = tensors.get('lm_head.weight')
  if lm_head is not None:
    if not np.array_equal(np.asarray(lm_head), np.asarray(tensors['model.embed_tokens.weight'])):
      raise ValueError(f'{source}: lm_head.weight differs from model.embed_tokens.weight; Gemma '
                       'ties them and untied heads are not supported.')
    used.add('lm_head.weight')
  extra = sorted(set(tensors) - used)
  if extra:
    raise ValueError(f'{source}: unexpected tensors {extra[:5]} for a {c.family=} model.')
  return model_from_params(config, params, dtype=dtype, param_dtype=param_dtype, remat=remat,
                           source=source, shardings=shardings)


def _hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  c = config
  N, D, H = c.num_heads, c.embed_dim, c.head_dim
  shapes = {'model.embed_tokens.weight': (c.vocab_size, D), 'model.norm.weight': (D,)}
  for i in range(c.num_layers):
    hf = f'model.layers.{i}.'
    for norm in ('input_layernorm', 'post_attention_layernorm', 'pre_feedforward_layernorm',
                 'post_feedforward_layernorm'):
      shapes[hf + norm + '.weight'] = (D,)
    shapes[hf + 'self_attn.q_norm.weight'] = (H,)
    shapes[hf + 'self_attn.k_norm.weight'] = (H,)
    shapes[hf + 'self_attn.o_proj.weight'] = (D, N * H)
    shapes[hf + 'mlp.down_proj.weight'] = (D, c.hidden_dim)
  return shapes


def hf_tensors_from_model(model: Transformer) -> dict[str, np.ndarray]:
  """The model's parameters under HF names and layouts (inverse of `model_from_hf_tensors`)."""
  c = model.config
  ours = {k: np.asarray(v) for k, v in flat_params(model).items()}
  out = {hf_name: np.ascontiguousarray(to_hf(ours[name]))
         for hf_name, name, _, to_hf in _layout(c)}
  for i in range(c.num_layers):
    hf, us = f'model.layers.{i}.', f'layers.{i}.'
    if c.fused_qkv:
      q, k, v = ours[us + 'attn.qkv_einsum.w']
    else:
      q = ours[us + 'attn.q_einsum.w']
      k, v = ours[us + 'attn.kv_einsum.w']
    for name, w in (('q_proj', q), ('k_proj', k), ('v_proj', v)):
      out[hf + f'self_attn.{name}.weight'] = np.ascontiguousarray(_heads_to_hf(w))
    gate, up = ours[us + 'mlp.gating_einsum']
    out[hf + 'mlp.gate_proj.weight'] = np.ascontiguousarray(gate.T)
    out[hf + 'mlp.up_proj.weight'] = np.ascontiguousarray(up.T)
  return out


def load_hf(path: str | os.PathLike, dtype=jnp.float32, param_dtype=None,
            remat: str = 'none', shardings=None) -> Transformer:
  """Loads a directory written by transformers' `save_pretrained` (config.json + safetensors).

  `shardings`: optional placement of each weight (see `transformer.model_from_params`).
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  config_path = os.path.join(path, 'config.json')
  if not os.path.isfile(config_path):
    raise ValueError(f'{path}: no config.json; expected a directory written by save_pretrained.')
  with open(config_path) as f:
    try:
      hf_config = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{config_path}: not valid JSON ({e}).') from None
  archs = hf_config.get('architectures') or []
  if archs and not set(archs) & set(ARCHITECTURES):
    raise ValueError(f'{config_path}: architectures {archs} are not supported; expected one of '
                     f'{sorted(ARCHITECTURES)}.')
  config = config_from_hf(hf_config, source=config_path)
  files = sorted(f for f in os.listdir(path) if f.endswith('.safetensors'))
  if not files:
    raise ValueError(f'{path}: no *.safetensors files (pickle checkpoints are not read).')
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    for key, value in load_file(os.path.join(path, name)).items():
      tensors[key] = value
  return model_from_hf_tensors(config, tensors, dtype=dtype, param_dtype=param_dtype,
                               source=path, remat=remat, shardings=shardings)

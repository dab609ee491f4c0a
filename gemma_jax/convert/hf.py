"""Hugging Face transformers <-> gemma_jax: config.json and safetensors names, both directions.

One table (`_layout`) lists every parameter with its HF tensors and the reshapes between them, so
the importer and the exporter cannot drift apart. The config half lives in
gemma_jax.convert.hf_config.
"""

from __future__ import annotations

import json
import os
import logging
from typing import Callable, Mapping, NamedTuple

import jax.numpy as jnp
import numpy as np

from gemma_jax.config import ModelConfig
from gemma_jax.convert.hf_config import (ARCHITECTURES, MULTIMODAL_ARCHITECTURES, config_from_hf,
                                         hf_config_from_config)
from gemma_jax.transformer import Transformer, flat_params, model_from_params

log = logging.getLogger('gemma_jax.convert')

__all__ = ['ARCHITECTURES', 'config_from_hf', 'hf_config_from_config', 'hf_tensors_from_model',
           'load_hf', 'model_from_hf_tensors']

class _Entry(NamedTuple):
  """One of our parameters and the HF tensors it is made of (several for stacked weights)."""

  ours: str
  hf: tuple[str, ...]  # HF tensor names
  shapes: tuple[tuple[int, ...], ...]  # their shapes
  to_ours: Callable[..., np.ndarray]  # HF tensors -> ours
  to_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]  # ours -> HF tensors


def _same(name, hf, shape) -> _Entry:
  return _Entry(name, (hf,), (shape,), lambda w: w, lambda w: (w,))


def _transposed(name, hf, shape) -> _Entry:  # Linear [out, in] <-> ours [in, out]
  return _Entry(name, (hf,), (shape,), lambda w: w.T, lambda w: (w.T,))


def _heads(name, hf_names, n, d, h) -> _Entry:
  """Linear q/k/v weights [n*H, D] <-> ours (n, D, H), stacked when there are several."""
  one = lambda w: w.reshape(n, h, d).transpose(0, 2, 1)
  back = lambda w: w.transpose(0, 2, 1).reshape(n * h, d)
  if len(hf_names) == 1:
    return _Entry(name, hf_names, ((n * h, d),), one, lambda w: (back(w),))
  return _Entry(name, tuple(hf_names), ((n * h, d),) * len(hf_names),
                lambda *ws: np.stack([one(w) for w in ws]), lambda w: tuple(back(x) for x in w))


def _layout(config: ModelConfig) -> list[_Entry]:
  """Every parameter of a `config` model with its HF tensors: the one table both directions use.
  Norm weights map as they are (HF stores Gemma 1-3's zero-centred, Gemma 4's as multipliers,
  as we do)."""
  c = config
  N, D, L, I = c.num_heads, c.embed_dim, c.num_layers, c.per_layer_input_dim
  entries = [_same('embedder.input_embedding', 'model.embed_tokens.weight', (c.vocab_size, D)),
             _same('final_norm.scale', 'model.norm.weight', (D,))]
  if I:
    entries += [
        _same('embedder.per_layer_input_embedding', 'model.embed_tokens_per_layer.weight',
              (c.per_layer_vocab_size or c.vocab_size, L * I)),
        _Entry('embedder.per_layer_model_projection.w',
               ('model.per_layer_model_projection.weight',), ((L * I, D),),
               lambda w: w.T.reshape(D, L, I), lambda w: (w.reshape(D, L * I).T,)),
        _same('embedder.per_layer_projection_norm.scale', 'model.per_layer_projection_norm.weight',
              (I,))]
  norms = {'input_layernorm': 'pre_attention_norm'}
  if c.family == 1:
    norms['post_attention_layernorm'] = 'pre_ffw_norm'
  else:
    norms.update(post_attention_layernorm='post_attention_norm',
                 pre_feedforward_layernorm='pre_ffw_norm',
                 post_feedforward_layernorm='post_ffw_norm')
  if c.num_experts:
    norms.update(pre_feedforward_layernorm_2='pre_ffw_norm_2',
                 post_feedforward_layernorm_1='post_ffw_norm_1',
                 post_feedforward_layernorm_2='post_ffw_norm_2')
  for i, kind in enumerate(c.attention_types):
    hf, us = f'model.layers.{i}.', f'layers.{i}.'
    K, H, F = c.layer_kv_heads(kind), c.layer_head_dim(kind), c.layer_hidden_dim(i)
    shared = c.kv_source(i) is not None
    entries += [_same(us + u + '.scale', hf + h + '.weight', (D,)) for h, u in norms.items()]
    a = hf + 'self_attn.'
    if c.use_qk_norm:
      entries.append(_same(us + 'attn._query_norm.scale', a + 'q_norm.weight', (H,)))
      if not shared:
        entries.append(_same(us + 'attn._key_norm.scale', a + 'k_norm.weight', (H,)))
    if c.fused_qkv:
      entries.append(_heads(us + 'attn.qkv_einsum.w',
                            [a + 'q_proj.weight', a + 'k_proj.weight', a + 'v_proj.weight'],
                            N, D, H))
    else:
      entries.append(_heads(us + 'attn.q_einsum.w', [a + 'q_proj.weight'], N, D, H))
      if c.k_eq_v(kind) and not shared:
        entries.append(_heads(us + 'attn.k_einsum.w', [a + 'k_proj.weight'], K, D, H))
      elif not shared:
        entries.append(_heads(us + 'attn.kv_einsum.w', [a + 'k_proj.weight', a + 'v_proj.weight'],
                              K, D, H))
    entries.append(_Entry(us + 'attn.attn_vec_einsum.w', (a + 'o_proj.weight',), ((D, N * H),),
                          lambda w, N=N, H=H: w.reshape(D, N, H).transpose(1, 2, 0),
                          lambda w, N=N, H=H: (w.transpose(2, 0, 1).reshape(D, N * H),)))
    m = hf + 'mlp.'
    entries.append(_Entry(us + 'mlp.gating_einsum', (m + 'gate_proj.weight', m + 'up_proj.weight'),
                          ((F, D), (F, D)), lambda g, u: np.stack([g.T, u.T]),
                          lambda w: (w[0].T, w[1].T)))
    entries.append(_transposed(us + 'mlp.linear', m + 'down_proj.weight', (D, F)))
    if c.family >= 4:
      entries.append(_same(us + 'layer_scalar', hf + 'layer_scalar', (1,)))
    if I:
      entries += [
          _transposed(us + 'per_layer_input_gate.w', hf + 'per_layer_input_gate.weight', (I, D)),
          _transposed(us + 'per_layer_projection.w', hf + 'per_layer_projection.weight', (D, I)),
          _same(us + 'post_per_layer_input_norm.scale', hf + 'post_per_layer_input_norm.weight',
                (D,))]
    if c.num_experts:
      E, Fe = c.num_experts, c.expert_hidden_dim
      entries += [
          _transposed(us + 'moe.router.w', hf + 'router.proj.weight', (E, D)),
          _same(us + 'moe.router_scale', hf + 'router.scale', (D,)),
          _same(us + 'moe.per_expert_scale', hf + 'router.per_expert_scale', (E,)),
          # [E, 2F, D] (gate rows, then up rows) <-> (E, D, 2, F)
          _Entry(us + 'moe.gating_einsum', (hf + 'experts.gate_up_proj',), ((E, 2 * Fe, D),),
                 lambda w, E=E, Fe=Fe: w.reshape(E, 2, Fe, D).transpose(0, 3, 1, 2),
                 lambda w, E=E, Fe=Fe: (w.transpose(0, 2, 3, 1).reshape(E, 2 * Fe, D),)),
          _Entry(us + 'moe.linear', (hf + 'experts.down_proj',), ((E, D, Fe),),
                 lambda w: w.transpose(0, 2, 1), lambda w: (w.transpose(0, 2, 1),))]
  return entries


def _ignored(config: ModelConfig, name: str) -> bool:
  """HF tensors that a load may carry and the model does not use: the k/v weights of KV-shared
  layers (transformers ignores them too) and the output head when it equals the embedding."""
  parts = name.split('.')
  if len(parts) == 6 and parts[:2] == ['model', 'layers'] and parts[3] == 'self_attn':
    if parts[4] in ('k_proj', 'v_proj', 'k_norm', 'v_norm') and parts[2].isdigit():
      layer = int(parts[2])
      return layer < config.num_layers and config.kv_source(layer) is not None
  return False


def check_layer_count(config: ModelConfig, names, source: str) -> None:
  """A config read from a file may claim more layers than its tensors hold (up to
  config_checks.MAX_LAYERS): refuse it before a model of that many layers is traced."""
  layers = {n.split('.')[2] for n in names if n.startswith('model.layers.')}
  if config.num_layers > len(layers):
    raise ValueError(f'{source}: the config has {config.num_layers} layers but the tensors are '
                     f'of only {len(layers)} (model.layers.N).')


def model_from_hf_tensors(config: ModelConfig, tensors: Mapping[str, np.ndarray], *,
                          dtype=jnp.float32, param_dtype=None, source: str = 'tensors',
                          remat: str = 'none', shardings=None) -> Transformer:
  """A Transformer from HF-named tensors (Linear weights [out, in], norm weights as stored).

  Raises ValueError naming `source` and the key for a missing, unexpected or mis-shaped tensor.
  """
  used: set[str] = set()
  check_layer_count(config, tensors, source)

  def get(name, shape):
    if name not in tensors:
      raise ValueError(f'{source}: missing tensor {name!r} (expected shape {shape}).')
    w = np.asarray(tensors[name])
    if tuple(w.shape) != tuple(shape):
      raise ValueError(f'{source}: tensor {name!r} has shape {tuple(w.shape)}, expected {shape}.')
    used.add(name)
    return w

  params = {e.ours: e.to_ours(*(get(n, s) for n, s in zip(e.hf, e.shapes)))
            for e in _layout(config)}
  lm_head = tensors.get('lm_head.weight')
  if lm_head is not None:
    if not np.array_equal(np.asarray(lm_head), np.asarray(tensors['model.embed_tokens.weight'])):
      raise ValueError(f'{source}: lm_head.weight differs from model.embed_tokens.weight; Gemma '
                       'ties them and untied heads are not supported.')
    used.add('lm_head.weight')
  extra = sorted(n for n in set(tensors) - used if not _ignored(config, n))
  if extra:
    raise ValueError(f'{source}: unexpected tensors {extra[:5]} for a family-{config.family} '
                     f'model {config.name!r}.')
  return model_from_params(config, params, dtype=dtype, param_dtype=param_dtype, remat=remat,
                           source=source, shardings=shardings)


def hf_tensors_from_model(model: Transformer) -> dict[str, np.ndarray]:
  """The model's parameters under HF names and layouts (inverse of `model_from_hf_tensors`)."""
  ours = {k: np.asarray(v) for k, v in flat_params(model).items()}
  out = {}
  for e in _layout(model.config):
    for name, w in zip(e.hf, e.to_hf(ours[e.ours])):
      out[name] = np.ascontiguousarray(w)
  return out


# Prefix of the language model's tensors in a multimodal Gemma 4 checkpoint, and the towers a
# text model skips.
_LANGUAGE_MODEL = 'model.language_model.'
_TOWERS = ('model.vision_tower.', 'model.embed_vision.', 'model.audio_tower.',
           'model.embed_audio.')


def _language_model(tensors: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
  """A multimodal Gemma 4 checkpoint's language model under text-model names; its vision and
  audio towers are skipped (with a log line saying so)."""
  text, skipped = {}, 0
  for key, value in tensors.items():
    if key.startswith(_LANGUAGE_MODEL):
      text['model.' + key[len(_LANGUAGE_MODEL):]] = value
    elif key.startswith(_TOWERS):
      skipped += 1
    else:
      text[key] = value  # lm_head.weight; anything else is reported as unexpected
  if skipped:
    log.info('%s: reading the language model; skipping %d vision/audio tensors.', source, skipped)
  return text


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
  with open(config_path, 'rb') as f:
    try:
      hf_config = json.loads(f.read().decode('utf-8'))
    except (ValueError, RecursionError) as e:  # JSON and UTF-8 errors are ValueErrors
      raise ValueError(f'{config_path}: not valid JSON ({e}).') from None
  if not isinstance(hf_config, dict):
    raise ValueError(f'{config_path}: expected a JSON object, got {type(hf_config).__name__}.')
  archs = hf_config.get('architectures') or []
  known = {**ARCHITECTURES, **MULTIMODAL_ARCHITECTURES}
  if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
    raise ValueError(f'{config_path}: architectures must be a list of strings, got {archs!r:.60}.')
  if archs and not set(archs) & set(known):
    raise ValueError(f'{config_path}: architectures {archs} are not supported; expected one of '
                     f'{sorted(known)}.')
  config = config_from_hf(hf_config, source=config_path)
  files = sorted(f for f in os.listdir(path) if f.endswith('.safetensors'))
  if not files:
    raise ValueError(f'{path}: no *.safetensors files (pickle checkpoints are not read).')
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    try:  # safetensors checks the header, dtypes, shapes and offsets against the file's size
      loaded = load_file(os.path.join(path, name))
    except Exception as e:  # SafetensorError (not a ValueError) and the OS's errors
      raise ValueError(f'{os.path.join(path, name)}: not a valid safetensors file '
                       f'({type(e).__name__}: {e}).') from None
    tensors.update(loaded)
  if any(k.startswith(_LANGUAGE_MODEL) for k in tensors):
    tensors = _language_model(tensors, path)
  return model_from_hf_tensors(config, tensors, dtype=dtype, param_dtype=param_dtype,
                               source=path, remat=remat, shardings=shardings)

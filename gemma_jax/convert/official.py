"""Official Gemma checkpoints (Orbax, as released on Kaggle) -> gemma_jax Transformer.

Released checkpoints are a "flat" tree, one entry per module path with the weights one level down:
```
{'transformer/embedder': {'input_embedding': (V, D)},
 'transformer/layer_0/attn/q_einsum': {'w': (N, D, H)},        # or qkv_einsum (3, N, D, H)
 'transformer/layer_0/attn/kv_einsum': {'w': (2, K, D, H)},
 'transformer/layer_0/attn/attn_vec_einsum': {'w': (N, H, D)},
 'transformer/layer_0/attn/_query_norm': {'scale': (H,)},      # Gemma 3; also _key_norm
 'transformer/layer_0/mlp/gating_einsum': {'w': (2, D, F)},    # (2, F, D): Gemma 2 9B/27B, 3
 'transformer/layer_0/mlp/linear': {'w': (F, D)},
 'transformer/layer_0/pre_attention_norm': {'scale': (D,)},    # + post_attention_norm,
 'transformer/final_norm': {'scale': (D,)}}                    #   pre_ffw_norm, post_ffw_norm
```
`gemma.gm` also writes the same names nested (`{'transformer': {'layer_0': {'attn': ...}}}` or
without the 'transformer' level, `mlp/gating_einsum` without its 'w'); both are read. Our parameter
names are the official ones, so import is a rename plus two fixes: Gemma 1/2 embeddings are padded
to 256128 rows (rows past the preset's vocab_size are dropped), and the transposed gating weight is
turned back to (2, D, F). Scales are zero-centred on both sides. Vision-encoder weights of the
multimodal Gemma 3 checkpoints are skipped.

Gemma 4 (`gemma.gm.nn.gemma4`, read from its _modules.py / _moe.py): `skip_scale` is our
`layer_scalar`, the q/k norms are `query_norm`/`key_norm`, the per-layer table
`embedder/per_layer_embeddings` is (V, L, I) (ours (V, L*I)), the dense gating is always (2, F, D).
MoE layers call the experts `mlp` (`router_logits/w` (D, E), `router_scale`, `per_expert_scale`,
`gating_einsum/w` (E, 2, F, D), `linear/w` (E, F, D)) and the dense MLP beside them `mlp2`, with
norms pre_ffw2 -> mlp2 -> post_ffw2 and pre_ffw -> experts -> post_ffw1, then post_ffw. KV-shared
layers still hold k/v weights and a key norm, which the model never uses: they are dropped. Vision
and audio encoders and their embedder projections are skipped.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax.checkpoint import flatten
from gemma_jax.config import ModelConfig, get_preset
from gemma_jax.transformer import Transformer, model_from_params

log = logging.getLogger('gemma_jax.convert')

_MULTIMODAL = ('SigLiPFromPatches_0/', 'vision_encoder/', 'embedder/mm_', 'audio_encoder/',
               'embedder/audio_')
_LAYER = re.compile(r'layer_(\d+)/')
_LAYER_NAME = re.compile(r'layers\.(\d+)\.(.+)')
# Gemma 4 layer parameters whose names differ from ours (past 'layers.N.'); MoE layers add more.
_GEMMA4_NAMES = {'skip_scale': 'layer_scalar', 'attn.query_norm.scale': 'attn._query_norm.scale',
                 'attn.key_norm.scale': 'attn._key_norm.scale'}
_GEMMA4_MOE_NAMES = {
    **_GEMMA4_NAMES,
    'mlp2.gating_einsum': 'mlp.gating_einsum', 'mlp2.linear': 'mlp.linear',
    'pre_ffw2_norm.scale': 'pre_ffw_norm.scale', 'post_ffw2_norm.scale': 'post_ffw_norm_1.scale',
    'pre_ffw_norm.scale': 'pre_ffw_norm_2.scale', 'post_ffw1_norm.scale': 'post_ffw_norm_2.scale',
    'mlp.router_logits.w': 'moe.router.w', 'mlp.router_scale': 'moe.router_scale',
    'mlp.per_expert_scale': 'moe.per_expert_scale', 'mlp.gating_einsum': 'moe.gating_einsum',
    'mlp.linear': 'moe.linear'}
_UNUSED_KV = ('attn.kv_einsum.w', 'attn.k_einsum.w', 'attn._key_norm.scale')


def our_name(official: str) -> str | None:
  """'transformer/layer_3/mlp/gating_einsum/w' -> 'layers.3.mlp.gating_einsum'; None to skip."""
  name = official.removeprefix('transformer/')
  if name.startswith(_MULTIMODAL):
    return None
  name = _LAYER.sub(lambda m: f'layers/{m.group(1)}/', name)
  if re.search(r'/mlp2?/(gating_einsum|linear)/w$', name):
    name = name[:-2]
  return name.replace('/', '.')


def read_official(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All arrays of an official Orbax checkpoint, as numpy, keyed by official '/' paths."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise ValueError(f'{path}: not a directory; expected an Orbax checkpoint directory (the '
                     'folder holding _METADATA or checkpoint files).')
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    meta = checkpointer.metadata(path)
  except Exception as e:  # Orbax and TensorStore raise many kinds on damaged files
    raise ValueError(f'{path}: not an Orbax checkpoint ({type(e).__name__}: '
                     f'{" ".join(str(e).split())[:300]}).') from e
  tree = getattr(meta, 'item_metadata', meta)
  tree = getattr(tree, 'tree', tree)
  if not isinstance(tree, Mapping) or not tree:
    raise ValueError(f'{path}: not an Orbax checkpoint (no parameter tree metadata found); pass '
                     'the folder that holds the checkpoint\'s _METADATA file.')
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  log.info('%s: reading %d arrays', path, len(flatten(tree, sep='/')))
  try:
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  except Exception as e:  # Orbax and TensorStore raise many kinds on damaged files
    raise ValueError(f'{path}: unreadable Orbax checkpoint ({type(e).__name__}: '
                     f'{" ".join(str(e).split())[:300]}).') from e
  return {k: np.asarray(v) for k, v in flatten(restored, sep='/').items()}


def params_from_official(arrays: Mapping[str, np.ndarray], config: ModelConfig,
                         source: str = 'checkpoint') -> dict[str, np.ndarray]:
  """Renames official arrays to our dotted names and fixes embedding padding and gating layout."""
  params = {}
  for key, value in arrays.items():
    name = our_name(key)
    if name is None:
      continue
    if name in params:
      raise ValueError(f'{source}: two arrays map to {name!r} (one is {key!r}).')
    params[name] = value
  skipped = len(arrays) - len(params)
  if skipped:
    log.info('%s: skipped %d multimodal arrays', source, skipped)

  V, D, F = config.vocab_size, config.embed_dim, config.hidden_dim
  emb = params.get('embedder.input_embedding')
  if emb is not None and emb.ndim == 2 and emb.shape[0] != V:
    if emb.shape[0] < V:
      raise ValueError(f'{source}: embedder/input_embedding has {emb.shape[0]} rows but model '
                       f'{config.name!r} has vocab_size {V}.')
    log.info('%s: dropping %d padding rows of the embedding (%d -> %d)', source,
             emb.shape[0] - V, emb.shape[0], V)
    params['embedder.input_embedding'] = emb[:V]
  if config.family == 4:
    return _gemma4_params(params, config, source)
  for name, value in params.items():
    if name.endswith('mlp.gating_einsum') and value.shape == (2, F, D) and F != D:
      params[name] = np.swapaxes(value, 1, 2)  # Gemma 2 9B/27B and Gemma 3 store (2, F, D).
  return params


def _gemma4_params(params: dict[str, np.ndarray], config: ModelConfig,
                   source: str) -> dict[str, np.ndarray]:
  """Gemma 4's renames and layouts (see the module docstring), on names `our_name` gave."""
  renames = _GEMMA4_MOE_NAMES if config.num_experts else _GEMMA4_NAMES
  out, dropped = {}, 0
  for name, value in params.items():
    m = _LAYER_NAME.fullmatch(name)
    if m is None:
      out[name] = value
      continue
    layer, rest = int(m.group(1)), renames.get(m.group(2), m.group(2))
    if (rest in _UNUSED_KV and layer < config.num_layers
        and config.kv_source(layer) is not None):
      dropped += 1
      continue
    if rest == 'mlp.gating_einsum':
      value = np.swapaxes(value, 1, 2)  # (2, F, D) -> (2, D, F)
    elif rest == 'moe.gating_einsum':
      value = np.transpose(value, (0, 3, 1, 2))  # (E, 2, F, D) -> (E, D, 2, F)
    if f'layers.{layer}.{rest}' in out:
      raise ValueError(f'{source}: two arrays map to layers.{layer}.{rest} (one is {name!r}).')
    out[f'layers.{layer}.{rest}'] = value
  if dropped:
    log.info('%s: dropped %d key/value arrays of KV-shared layers (unused)', source, dropped)
  table = out.pop('embedder.per_layer_embeddings', None)
  if table is not None:  # (V, L, I) -> (V, L*I)
    out['embedder.per_layer_input_embedding'] = table.reshape(table.shape[0], -1)
  return out


def load_official(path: str | os.PathLike, preset: str | ModelConfig, dtype=jnp.float32, *,
                  param_dtype=None, shardings=None) -> Transformer:
  """Loads an official Gemma Orbax checkpoint (Kaggle layout) as a Transformer.

  preset: a preset name (e.g. 'gemma2-2b', see gemma_jax.config.PRESETS) or a ModelConfig that
  describes the checkpoint. Weights are read to the host, cast to param_dtype (default: dtype, the
  compute dtype) and placed on `shardings` when given (see `transformer.model_from_params`).
  Raises ValueError naming the directory for a missing/unreadable checkpoint or a checkpoint whose
  arrays do not fit the preset.
  """
  config = get_preset(preset) if isinstance(preset, str) else preset
  source = os.fspath(path)
  arrays = read_official(path)
  try:
    return model_from_params(config, params_from_official(arrays, config, source), dtype=dtype,
                             param_dtype=param_dtype or dtype, source=source, shardings=shardings)
  except ValueError as e:
    raise ValueError(f'{e} Does the preset {config.name!r} match this checkpoint?') from e

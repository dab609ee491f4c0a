"""The Gemma decoder: Embedder, FeedForward, Block and Transformer (Flax NNX).

Gemma 4 additions (read from transformers' models/gemma4/modeling_gemma4.py, 5.24): per-layer
input embeddings in the Embedder and each Block, the MoE block beside the MLP (gemma_jax.moe),
KV-shared layers (gemma_jax.attention) and a learned scalar at the end of every block.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_jax import quant
from gemma_jax.attention import Attention, init_layer_cache
from gemma_jax.config import ModelConfig
from gemma_jax.layers import (Einsum, RMSNorm, einsum, einsum_param, fan_in_normal, param,
                              param_name, soft_cap, weight, weight_rows, with_lora)
from gemma_jax.moe import MoE
from gemma_jax.sharding import constrain

Cache = dict[str, Any]  # {'end_index': int32 scalar, 'layers': [layer cache, ...]}

# Logical axes of the residual stream and the logits, constrained at block boundaries so that the
# partitioner keeps activations batch-sharded (and replicated over 'tensor') under any mesh.
ACT_BTD = ('batch', 'length', 'embed')
ACT_BTV = ('batch', 'length', 'vocab')

# Remat policies accepted by Transformer(remat=...): what a block keeps for the backward pass.
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Embedder(nnx.Module):
  """Token embedding, scaled by sqrt(D) on the way in and tied to the output head.

  Gemma 4 with per-layer inputs (I = config.per_layer_input_dim > 0) also holds the packed
  per-layer table `per_layer_input_embedding` [V, L*I] and the projection of the main embedding
  into it (`per_layer_inputs`).
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
    self.input_embedding = param(rngs, fan_in_normal((1,)), (config.vocab_size, config.embed_dim),
                                 param_dtype, ('vocab', 'embed'))
    self.dtype = dtype
    c = config
    if c.per_layer_input_dim:
      L, I, D = c.num_layers, c.per_layer_input_dim, c.embed_dim
      V = c.per_layer_vocab_size or c.vocab_size
      self.per_layer_input_embedding = param(rngs, fan_in_normal((1,)), (V, L * I), param_dtype,
                                             ('vocab', 'embed'))
      self.per_layer_model_projection = Einsum('BTD,DLI->BTLI', (D, L, I),
                                               ('embed', None, None), rngs=rngs, dtype=dtype,
                                               param_dtype=param_dtype)
      self.per_layer_projection_norm = RMSNorm(I, None, eps=c.rms_norm_eps,
                                               param_dtype=param_dtype, plus_one=False)

  @property
  def tables(self) -> tuple[str, ...]:
    """The embedding tables [V, X] (gemma_jax.quant quantizes them along X)."""
    return tuple(t for t in ('input_embedding', 'per_layer_input_embedding') if hasattr(self, t))

  def encode(self, tokens_BT: jax.Array) -> jax.Array:
    return self._lookup('input_embedding', tokens_BT, self.input_embedding.shape[-1])

  def _lookup(self, table: str, tokens_BT: jax.Array, width: int) -> jax.Array:
    """Rows of table `table` times sqrt(width), in the compute dtype."""
    # Gather the fsdp-sharded D of the table before the lookup: otherwise the partitioner
    # replicates the looked-up rows and re-splits them (a full rematerialisation on data x fsdp).
    x_BTX = weight_rows(self, table, tokens_BT, self.dtype,
                        lambda t: constrain(t, ('vocab', None)))
    # The scale is cast to the compute dtype first, as the reference implementations do.
    return x_BTX * jnp.sqrt(width).astype(self.dtype)

  def per_layer_inputs(self, tokens_BT: jax.Array, x_BTD: jax.Array) -> jax.Array:
    """Gemma 4's per-layer inputs [B,T,L,I]: (the RMS-normed projection of the scaled embedding
    x, times D^-0.5) plus (the token's row of the per-layer table, times sqrt(I)), times 2^-0.5."""
    L, I = self.per_layer_model_projection.w.shape[1:]
    proj_BTLI = self.per_layer_model_projection(x_BTD) * jnp.asarray(
        x_BTD.shape[-1]**-0.5, self.dtype)
    proj_BTLI = self.per_layer_projection_norm(proj_BTLI)
    table_BTLI = self._lookup('per_layer_input_embedding', tokens_BT,
                              I).reshape(*tokens_BT.shape, L, I)
    return (proj_BTLI + table_BTLI) * jnp.asarray(2.0**-0.5, self.dtype)

  def decode(self, x_BTD: jax.Array) -> jax.Array:
    return jnp.einsum('BTD,VD->BTV', x_BTD, weight(self, 'input_embedding', self.dtype))


class FeedForward(nnx.Module):
  """GeGLU: gelu_tanh(x W_gate) * (x W_up), then W_down. gating_einsum is (2, D, F)."""

  GATING = 'BTD,CDF->CBTF'  # C: gate and up
  LINEAR = 'BTF,FD->BTD'

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype, param_dtype,
               hidden_dim: int | None = None):
    D, F = config.embed_dim, hidden_dim or config.hidden_dim
    self.gating_einsum = einsum_param(rngs, self.GATING, (2, D, F), param_dtype,
                                      (None, 'embed', 'mlp'))
    self.linear = einsum_param(rngs, self.LINEAR, (F, D), param_dtype, ('mlp', 'embed'))
    self.dtype = dtype

  @property
  def einsums(self) -> dict[str, str]:
    """Each weight's equation (what gemma_jax.lora adapts)."""
    return {'gating_einsum': self.GATING, 'linear': self.LINEAR}

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    x_BTD = x_BTD.astype(self.dtype)
    gate_up_CBTF = einsum(self.GATING, x_BTD, weight(self, 'gating_einsum', self.dtype))
    gate_BTF, up_BTF = with_lora(self, 'gating_einsum', gate_up_CBTF, x_BTD, self.GATING)
    act_BTF = jax.nn.gelu(gate_BTF, approximate=True) * up_BTF
    y_BTD = einsum(self.LINEAR, act_BTF, weight(self, 'linear', self.dtype))
    return with_lora(self, 'linear', y_BTD, act_BTF, self.LINEAR)


class Block(nnx.Module):
  """Pre-norm residual block: attention then feed-forward, each optionally post-normed.

  Gemma 4 adds, in this order after the feed-forward: the MoE block beside the MLP (each with its
  own post-norm, summed, then the shared post-norm), the gated per-layer input, `layer_scalar`.
  """

  def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs, dtype, param_dtype,
               attention: str = 'auto'):
    c = config
    kw = dict(eps=c.rms_norm_eps, param_dtype=param_dtype, plus_one=c.norm_plus_one)
    self.pre_attention_norm = RMSNorm(c.embed_dim, 'embed', **kw)
    self.attn = Attention(c, c.attention_types[layer], rngs=rngs, dtype=dtype,
                          param_dtype=param_dtype, impl=attention,
                          kv_shared=c.kv_source(layer) is not None)
    if c.use_post_attn_norm:
      self.post_attention_norm = RMSNorm(c.embed_dim, 'embed', **kw)
    self.pre_ffw_norm = RMSNorm(c.embed_dim, 'embed', **kw)
    self.mlp = FeedForward(c, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                           hidden_dim=c.layer_hidden_dim(layer))
    if c.use_post_ffw_norm:
      self.post_ffw_norm = RMSNorm(c.embed_dim, 'embed', **kw)
    if c.num_experts:
      self.moe = MoE(c, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
      self.pre_ffw_norm_2 = RMSNorm(c.embed_dim, 'embed', **kw)
      self.post_ffw_norm_1 = RMSNorm(c.embed_dim, 'embed', **kw)
      self.post_ffw_norm_2 = RMSNorm(c.embed_dim, 'embed', **kw)
    if c.per_layer_input_dim:
      I, D = c.per_layer_input_dim, c.embed_dim
      ekw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
      self.per_layer_input_gate = Einsum('BTD,DI->BTI', (D, I), ('embed', None), **ekw)
      self.per_layer_projection = Einsum('BTI,ID->BTD', (I, D), (None, 'embed'), **ekw)
      self.post_per_layer_input_norm = RMSNorm(D, 'embed', **kw)
    if c.family >= 4:
      self.layer_scalar = nnx.Param(jnp.ones((1,), param_dtype), logical_axes=(None,))

  def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache=None, end_index=None,
               per_layer_input_BTI=None, shared_kv=None):
    """Returns (x_BTD, new cache, what the attention attended over: see attention.SharedKV)."""
    a_BTD, new_cache, kv = self.attn(self.pre_attention_norm(x_BTD), positions_BT,
                                     segment_ids_BT, cache, end_index, shared_kv)
    if hasattr(self, 'post_attention_norm'):
      a_BTD = self.post_attention_norm(a_BTD)
    x_BTD = x_BTD + a_BTD
    f_BTD = self.mlp(self.pre_ffw_norm(x_BTD))
    if hasattr(self, 'moe'):
      e_BTD = self.moe(x_BTD, self.pre_ffw_norm_2(x_BTD))
      f_BTD = self.post_ffw_norm_1(f_BTD) + self.post_ffw_norm_2(e_BTD)
    if hasattr(self, 'post_ffw_norm'):
      f_BTD = self.post_ffw_norm(f_BTD)
    x_BTD = x_BTD + f_BTD
    if hasattr(self, 'per_layer_input_gate'):
      g_BTI = jax.nn.gelu(self.per_layer_input_gate(x_BTD), approximate=True)
      p_BTD = self.per_layer_projection(g_BTI * per_layer_input_BTI.astype(g_BTI.dtype))
      x_BTD = x_BTD + self.post_per_layer_input_norm(p_BTD)
    if hasattr(self, 'layer_scalar'):
      x_BTD = x_BTD * self.layer_scalar[...].astype(x_BTD.dtype)
    return x_BTD, new_cache, kv


class Transformer(nnx.Module):
  """A Gemma 1/2/3/4 decoder.

  `dtype` is the compute dtype; `param_dtype` the storage dtype of parameters. Norms, softmax,
  soft-caps and the returned logits are float32. `remat` is one of REMAT_POLICIES: what each block
  saves for the backward pass ('none' saves everything). `attention`: the kernel of uncached
  forwards, one of attention.ATTENTION_IMPLS ('auto': cuDNN flash attention where it applies).
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, remat: str = 'none', attention: str = 'auto'):
    if remat not in REMAT_POLICIES:
      raise ValueError(f'Unknown remat policy {remat!r}; choose one of {list(REMAT_POLICIES)}.')
    self.config = config
    self.dtype = dtype
    self.remat = remat
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.embedder = Embedder(config, **kw)
    self.layers = nnx.List([Block(config, i, attention=attention, **kw)
                            for i in range(config.num_layers)])
    self.final_norm = RMSNorm(config.embed_dim, 'embed', eps=config.rms_norm_eps,
                              param_dtype=param_dtype, plus_one=config.norm_plus_one)

  def __call__(self, tokens_BT: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, cache: Cache | None = None, *,
               return_hidden: bool = False) -> tuple[jax.Array, Cache | None]:
    """tokens [B,T] -> (logits [B,T,V] float32, updated cache or None).

    positions default to arange(T) (required with a cache: the true position of each token);
    segment_ids default to all ones; 0 marks padding, distinct ids separate packed examples.
    `return_hidden` returns the final-normed hidden states [B,T,D] (compute dtype) in place of the
    logits: `self.logits(hidden)` gives the logits, and gemma_jax.loss fuses the output head into
    the loss so the [B,T,V] logits never exist whole.
    """
    B, T = tokens_BT.shape
    if positions is None:
      if cache is not None:
        raise ValueError('Transformer: pass explicit `positions` when decoding with a cache.')
      positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids is None:
      segment_ids = jnp.ones((B, T), jnp.int32)
    end_index = None if cache is None else cache['end_index']

    block_fn = Block.__call__
    if REMAT_POLICIES[self.remat] is not None:
      block_fn = nnx.remat(block_fn, policy=REMAT_POLICIES[self.remat])

    c = self.config
    x_BTD = constrain(self.embedder.encode(tokens_BT), ACT_BTD)
    per_layer_BTLI = None
    if c.per_layer_input_dim:
      per_layer_BTLI = self.embedder.per_layer_inputs(tokens_BT, x_BTD)
    new_layer_caches, attended = [], {}
    for i, block in enumerate(self.layers):
      layer_cache = None if cache is None else cache['layers'][i]
      source = c.kv_source(i)
      x_BTD, layer_cache, attended[i] = block_fn(
          block, x_BTD, positions, segment_ids, layer_cache, end_index,
          None if per_layer_BTLI is None else per_layer_BTLI[:, :, i],
          None if source is None else attended[source])
      x_BTD = constrain(x_BTD, ACT_BTD)  # a no-op without a mesh (see gemma_jax.sharding)
      new_layer_caches.append(layer_cache)
    x_BTD = self.final_norm(x_BTD)
    new_cache = None
    if cache is not None:
      new_cache = {'end_index': cache['end_index'] + T, 'layers': new_layer_caches}
    return (x_BTD if return_hidden else self.logits(x_BTD)), new_cache

  def logits(self, x_BTD: jax.Array) -> jax.Array:
    """Final-normed hidden states [B,T,D] -> float32 logits [B,T,V] (tied head, soft-cap)."""
    logits_BTV = soft_cap(self.embedder.decode(x_BTD).astype(jnp.float32),
                          self.config.final_logit_soft_cap)
    return constrain(logits_BTV, ACT_BTV)

  def init_cache(self, batch_size: int, cache_length: int, dtype=None) -> Cache:
    """An empty KV cache for `batch_size` rows of up to `cache_length` tokens (dtype: a float
    dtype, default the compute dtype, or int8: quantized keys and values with per-token, per-head
    scales; see gemma_jax.attention). KV-shared layers (Gemma 4) have none: their entry is None."""
    dtype = self.dtype if dtype is None else dtype
    c = self.config
    return {
        'end_index': jnp.zeros((), jnp.int32),
        'layers': [None if c.kv_source(i) is not None
                   else init_layer_cache(c, t, batch_size, cache_length, dtype)
                   for i, t in enumerate(c.attention_types)],
    }


def count_params(model_or_state) -> int:
  """Number of parameter elements (works on abstract `nnx.eval_shape` models too). A quantized
  weight counts as the float weight it stands for; its scales do not count."""
  state = nnx.state(model_or_state, nnx.Param)
  variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return sum(int(np.prod(v.shape)) for v in variables if not isinstance(v, quant.QuantScale))


def flat_params(model: Transformer) -> dict[str, jax.Array]:
  """Parameters by dotted name, e.g. {'layers.0.attn.q_einsum.w': array, ...}."""
  return {param_name(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def shardings_by_name(shardings: Any, names: list[str]) -> dict[str, jax.sharding.Sharding] | None:
  """`shardings` (None, one Sharding for all, a dict by dotted name, or an nnx.State shaped like
  `nnx.state(model, nnx.Param)` with Sharding leaves) as {dotted name: Sharding}, or None."""
  if shardings is None:
    return None
  if isinstance(shardings, jax.sharding.Sharding):
    return {n: shardings for n in names}
  if isinstance(shardings, nnx.State):
    shardings = {param_name(p): (v.get_value() if isinstance(v, nnx.Variable) else v)
                 for p, v in nnx.to_flat_state(shardings)}
  missing = [n for n in names if n not in shardings]
  if missing:
    raise ValueError(f'shardings has no entry for parameters {missing[:5]}.')
  return {n: shardings[n] for n in names}


def check_param_shapes(config: ModelConfig, shapes: Mapping[str, tuple[int, ...]],
                       source: str = 'params') -> dict[str, Any]:
  """Raises ValueError naming `source` and the key unless `shapes` (by dotted name) are exactly
  the parameters of a `config` model: none missing, none unexpected, every shape equal. Weights
  saved quantized (with a `_qscale`) are checked against their quantized layout; returns their
  {name: gemma_jax.quant.QuantSpec} (empty for a float model)."""
  quantized = {}
  if any(n.endswith(quant.SCALE_SUFFIX) for n in shapes):
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    quantized = quant.specs_from_shapes(abstract, shapes)
  _check_shapes(config, _abstract_params(config, quantized)[2], shapes, source)
  return quantized


def _check_shapes(config, abstract: Mapping[str, nnx.Param], shapes, source) -> None:
  expected = {name: tuple(var.get_value().shape) for name, var in abstract.items()}
  unexpected = sorted(set(shapes) - set(expected))
  if unexpected:
    raise ValueError(f'{source}: unexpected parameters {unexpected[:5]} for model {config.name!r}.')
  for name, shape in expected.items():
    if name not in shapes:
      raise ValueError(f'{source}: missing parameter {name!r} (expected shape {shape}).')
    if tuple(shapes[name]) != shape:
      raise ValueError(f'{source}: parameter {name!r} has shape {tuple(shapes[name])}, '
                       f'expected {shape} for model {config.name!r}.')


def _abstract_params(config: ModelConfig, quantized: Mapping[str, Any] | None = None, **kwargs):
  """(graphdef, flat state, {dotted name: abstract Param}) of a `config` model, no allocation;
  `quantized` ({weight name: gemma_jax.quant.QuantSpec}) holds those weights quantized."""

  def make():
    model = Transformer(config, rngs=nnx.Rngs(0), **kwargs)
    return quant.quantize(model, quantized) if quantized else model

  abstract = nnx.eval_shape(make)
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  return graphdef, flat, {param_name(p): v for p, v in flat if isinstance(v, nnx.Param)}


def model_from_params(config: ModelConfig, params: Mapping[str, Any], *, dtype=jnp.float32,
                      param_dtype=None, remat: str = 'none', attention: str = 'auto',
                      source: str = 'params', shardings: Any = None,
                      quantized: Mapping[str, Any] | None = None) -> Transformer:
  """Builds a Transformer from arrays keyed by dotted name (see `flat_params`), without random
  init: the one way every importer and checkpoint reader makes a model.

  Every expected name must be present with exactly the expected shape, and nothing else may be
  (`check_param_shapes`: errors name `source`, a file or directory, and the offending key).
  Arrays are stored in `param_dtype` (default `dtype`). `shardings` (see `shardings_by_name`,
  e.g. from `sharding.param_shardings`) places each array straight onto its devices, so a model
  never materialises whole on one device; without it arrays go to the default device.
  `quantized` ({weight name: gemma_jax.quant.QuantSpec}, e.g. `quant.specs_from_shapes`): those
  weights come as their low-bit values and `_qscale` scales, kept in their own dtypes.
  """
  param_dtype = param_dtype or dtype
  graphdef, flat, expected = _abstract_params(config, quantized, dtype=dtype,
                                              param_dtype=param_dtype, remat=remat,
                                              attention=attention)
  _check_shapes(config, expected, {k: np.shape(v) for k, v in params.items()}, source)
  placement = shardings_by_name(shardings, list(expected))
  for name, var in expected.items():
    value = params[name]
    kept = isinstance(var, (quant.QuantizedWeight, quant.QuantScale))
    value_dtype = var.get_value().dtype if kept else param_dtype
    if kept and np.dtype(value.dtype) != np.dtype(value_dtype):
      raise ValueError(f'{source}: quantized parameter {name!r} has dtype {value.dtype}, '
                       f'expected {np.dtype(value_dtype)}.')
    if placement is None:
      var.set_value(jnp.asarray(value, value_dtype))
    else:  # numpy stays on the host until placed; a placed jax.Array is not moved again
      value = value if isinstance(value, jax.Array) else np.asarray(value)
      var.set_value(jax.device_put(value.astype(value_dtype), placement[name]))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))

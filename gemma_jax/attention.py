"""Multi-query / grouped-query / multi-head attention with RoPE, QK-norm, soft-capping, sliding
windows, segment masks and a KV cache.

Masking is by position, so one rule serves training, packed rows and cached decoding: query at
position p sees key at position k iff k <= p, both belong to the same segment (never padding), and,
on LOCAL layers, p - k < sliding_window.

Cache layout for one layer (see `init_layer_cache`): `k, v: [B, S, K, H]` and `pos: [B, S]` (the
position stored in each slot, -1 when the slot is empty or held padding). GLOBAL layers have S =
cache_length and write the T new tokens at slots end_index..end_index+T-1. LOCAL layers keep a ring
buffer of their window only (S = window): they attend over the ring plus the new chunk, then keep the
newest S entries. All rows share slot indices, so rows of different lengths must be left-padded
(segment id 0 on the padding): every row's newest tokens then sit in the newest slots.

An int8 cache (about half the bytes of bfloat16) also holds float32 `k_scale, v_scale: [B, S, K]`:
each token's key (value) in each kv head is stored as round(x / scale), scale = max|x| / 127 over
H, so a stored element is off by at most max|x| / 254. New tokens are quantized as they are written
and the layer attends over the dequantized keys and values in the compute dtype (the new chunk's
too, so a token reads the same whether it was fed alone or in a chunk); KV-shared layers get those
dequantized keys and values.

Gemma 4's KV-shared layers own no k/v weights and no cache: they attend over the keys, values and
key positions their source layer (`ModelConfig.kv_source`) attended over in the same forward,
which each layer returns for that purpose (`SharedKV`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_jax.config import AttentionType, ModelConfig
from gemma_jax.layers import Einsum, RMSNorm, apply_rope, soft_cap

# What a layer attended over, handed to the KV-shared layers that reuse it: keys [B,S,K,H],
# values [B,S,K,H], key positions [B,S] (-1: hidden) and, in uncached forwards, the same-segment
# mask [B,T,S] (None with a cache).
SharedKV = tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]

# Kernels for uncached forwards (training, scoring), chosen per model (`Transformer(attention=)`,
# config.model.attention): 'auto' takes cuDNN flash attention on GPU where it applies (no logit
# soft-cap, 16-bit compute) and XLA elsewhere. The environment variable, read when a forward is
# traced, overrides the model's choice (e.g. GEMMA_JAX_ATTENTION=xla to rule cuDNN out).
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn')
ATTENTION_ENV = 'GEMMA_JAX_ATTENTION'

# Large finite negative value for masked logits: fully masked rows (padding queries) stay finite.
_MASK_VALUE = -2.3819763e38


def layer_cache_length(config: ModelConfig, attn_type: AttentionType, cache_length: int) -> int:
  """Slots a layer keeps: the whole cache for GLOBAL layers, at most the window for LOCAL ones."""
  if attn_type == AttentionType.LOCAL:
    return min(config.sliding_window, cache_length)
  return cache_length


def cache_dtype(dtype, what: str = 'cache dtype') -> jnp.dtype:
  """`dtype` as the storage dtype of a KV cache: a floating dtype, or int8 (quantized keys and
  values with scales). Raises ValueError naming `what` (e.g. a flag or argument) otherwise."""
  try:
    d = jnp.dtype(dtype)
  except TypeError:
    d = None
  if d is None or not (d == jnp.int8 or jnp.issubdtype(d, jnp.floating)):
    raise ValueError(f'{what}: {dtype!r} is not a KV cache dtype; use int8, bfloat16, float16 or '
                     'float32.')
  return d


def init_layer_cache(config: ModelConfig, attn_type: AttentionType, batch_size: int,
                     cache_length: int, dtype) -> dict[str, jax.Array]:
  """An empty cache for one layer: zero k/v and pos = -1 (no slot filled); with dtype int8, also
  zero float32 scales `k_scale, v_scale: [B, S, K]`."""
  dtype = cache_dtype(dtype)
  s = layer_cache_length(config, attn_type, cache_length)
  shape = (batch_size, s, config.layer_kv_heads(attn_type), config.layer_head_dim(attn_type))
  cache = {
      'k': jnp.zeros(shape, dtype),
      'v': jnp.zeros(shape, dtype),
      'pos': jnp.full((batch_size, s), -1, jnp.int32),
  }
  if dtype == jnp.int8:
    cache['k_scale'] = jnp.zeros(shape[:3], jnp.float32)
    cache['v_scale'] = jnp.zeros(shape[:3], jnp.float32)
  return cache


def quantize_kv(x_BTKH: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(int8 [B,T,K,H], float32 scales [B,T,K]): symmetric, per token and head, scale = max|x| / 127
  over H, so that |x - q * scale| <= scale / 2 elementwise (an all-zero vector gets scale 0)."""
  x_BTKH = x_BTKH.astype(jnp.float32)
  scale_BTK = jnp.max(jnp.abs(x_BTKH), axis=-1) / 127
  q_BTKH = jnp.round(x_BTKH / jnp.where(scale_BTK == 0, 1, scale_BTK)[..., None])
  return jnp.clip(q_BTKH, -127, 127).astype(jnp.int8), scale_BTK


def dequantize_kv(q_BSKH: jax.Array, scale_BSK: jax.Array, dtype) -> jax.Array:
  """The inverse of `quantize_kv`, up to its rounding: q * scale in float32, then cast to dtype."""
  return (q_BSKH.astype(jnp.float32) * scale_BSK[..., None]).astype(dtype)


class Attention(nnx.Module):
  """One attention layer; `attn_type` selects global or sliding-window (local) attention.

  `kv_shared`: a Gemma 4 layer that reuses another layer's keys and values (no k/v weights).
  """

  def __init__(self, config: ModelConfig, attn_type: AttentionType, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32, impl: str = 'auto',
               kv_shared: bool = False):
    if impl not in ATTENTION_IMPLS:
      raise ValueError(f'Unknown attention kernel {impl!r}; choose one of {ATTENTION_IMPLS}.')
    c = config
    self.config = config
    self.attn_type = attn_type
    self.dtype = dtype
    self.impl = impl
    self.kv_shared = kv_shared
    N, D = c.num_heads, c.embed_dim
    K, H = c.layer_kv_heads(attn_type), c.layer_head_dim(attn_type)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    if c.fused_qkv:
      self.qkv_einsum = Einsum('BTD,CNDH->CBTNH', (3, N, D, H),
                               (None, 'heads', 'embed', 'head_dim'), **kw)
    else:
      self.q_einsum = Einsum('BTD,NDH->BTNH', (N, D, H), ('heads', 'embed', 'head_dim'), **kw)
      # A KV-shared layer reuses its source layer's keys and values: no k/v weights.
      if not kv_shared and c.k_eq_v(attn_type):
        self.k_einsum = Einsum('BTD,KDH->BTKH', (K, D, H), ('kv_heads', 'embed', 'head_dim'), **kw)
      elif not kv_shared:
        self.kv_einsum = Einsum('BTD,CKDH->CBTKH', (2, K, D, H),
                                (None, 'kv_heads', 'embed', 'head_dim'), **kw)
    self.attn_vec_einsum = Einsum('BTNH,NHD->BTD', (N, H, D), ('heads', 'head_dim', 'embed'), **kw)
    norm = dict(eps=c.rms_norm_eps, param_dtype=param_dtype, plus_one=c.norm_plus_one)
    if c.use_qk_norm:
      self._query_norm = RMSNorm(H, 'head_dim', **norm)
      if not kv_shared:
        self._key_norm = RMSNorm(H, 'head_dim', **norm)
    if c.family >= 4 and not kv_shared:
      self._value_norm = RMSNorm(H, 'head_dim', with_scale=False, **norm)
    local = attn_type == AttentionType.LOCAL
    self.rope_base = c.rope_base_local if local else c.rope_base_global
    self.rope_scale = c.rope_scale_local if local else c.rope_scale_global
    self.rope_fraction = 1.0 if local else c.rope_fraction_global
    self.window = c.sliding_window if local else None

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array,
               cache: dict[str, jax.Array] | None = None, end_index: jax.Array | None = None,
               shared_kv: SharedKV | None = None,
               ) -> tuple[jax.Array, dict[str, jax.Array] | None, SharedKV]:
    """Returns (out_BTD, new_cache, what it attended over). segment_ids: 0 marks padding; packed
    examples differ. A KV-shared layer takes its source layer's `shared_kv` and has no cache."""
    c = self.config
    rope = dict(base=self.rope_base, scale=self.rope_scale, fraction=self.rope_fraction)
    if c.fused_qkv:
      q_BTNH, k_BTKH, v_BTKH = self.qkv_einsum(x_BTD)
    else:
      q_BTNH = self.q_einsum(x_BTD)
      if hasattr(self, 'k_einsum'):
        k_BTKH = self.k_einsum(x_BTD)
        v_BTKH = k_BTKH  # the projection, before the key norm and RoPE
      elif hasattr(self, 'kv_einsum'):
        k_BTKH, v_BTKH = self.kv_einsum(x_BTD)
    if c.use_qk_norm:
      q_BTNH = self._query_norm(q_BTNH)
    q_BTNH = apply_rope(q_BTNH, positions_BT, **rope)
    q_BTNH = q_BTNH * jnp.asarray(c.query_scale, q_BTNH.dtype)

    if self.kv_shared:
      if shared_kv is None:
        raise ValueError('Attention: a KV-shared layer needs its source layer\'s keys (shared_kv).')
      k_BSKH, v_BSKH, kpos_BS, same_segment_BTS = shared_kv
      new_cache = None
    else:
      if c.use_qk_norm:
        k_BTKH = self._key_norm(k_BTKH)
      if hasattr(self, '_value_norm'):
        v_BTKH = self._value_norm(v_BTKH)
      k_BTKH = apply_rope(k_BTKH, positions_BT, **rope)
      k_BSKH, v_BSKH, kpos_BS, same_segment_BTS, new_cache = self._keys(
          k_BTKH, v_BTKH, positions_BT, segment_ids_BT, cache, end_index)

    qpos_BT1 = positions_BT[:, :, None]
    kpos_B1S = kpos_BS[:, None, :]
    mask_BTS = (kpos_B1S >= 0) & (kpos_B1S <= qpos_BT1)
    if self.window is not None:
      mask_BTS &= qpos_BT1 - kpos_B1S < self.window
    if same_segment_BTS is not None:
      mask_BTS &= same_segment_BTS

    kv = (k_BSKH, v_BSKH, kpos_BS, same_segment_BTS)
    k_BSKH, v_BSKH = k_BSKH.astype(self.dtype), v_BSKH.astype(self.dtype)
    if cache is None and self.kernel() == 'cudnn':
      # Causality and the window by index; equal to the position rule for packed rows, whose
      # positions count up from 0 within each segment. Padding (segment 0) attends only to padding.
      enc_BTNH = jax.nn.dot_product_attention(
          q_BTNH, k_BSKH, v_BSKH, mask=same_segment_BTS[:, None], scale=1.0, is_causal=True,
          local_window_size=None if self.window is None else (self.window - 1, 0),
          implementation='cudnn')
    else:
      enc_BTNH = self._attend(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
    return self.attn_vec_einsum(enc_BTNH), new_cache, kv

  def _keys(self, k_BTKH, v_BTKH, positions_BT, segment_ids_BT, cache, end_index):
    """(keys, values, key positions, same-segment mask or None, new cache) of this layer's
    attention: the new tokens alone without a cache, else the cache with them written in."""
    # Key positions of the new tokens; -1 hides padding from every query, now and later.
    kpos_BT = jnp.where(segment_ids_BT != 0, positions_BT, -1)
    if cache is None:
      same_segment_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
      return k_BTKH, v_BTKH, kpos_BT, same_segment_BTS, None
    new = {'pos': kpos_BT}
    if 'k_scale' in cache:
      (new['k'], new['k_scale']), (new['v'], new['v_scale']) = map(quantize_kv, (k_BTKH, v_BTKH))
    else:
      new['k'], new['v'] = k_BTKH.astype(cache['k'].dtype), v_BTKH.astype(cache['v'].dtype)
    if self.window is not None:
      keys, new_cache = _ring_attend_and_update(cache, new, end_index)
    else:
      keys = new_cache = {name: _write(cache[name], new[name], end_index) for name in cache}
    if 'k_scale' in keys:
      k_BSKH = dequantize_kv(keys['k'], keys['k_scale'], self.dtype)
      v_BSKH = dequantize_kv(keys['v'], keys['v_scale'], self.dtype)
    else:
      k_BSKH, v_BSKH = keys['k'], keys['v']
    return k_BSKH, v_BSKH, keys['pos'], None, new_cache

  def kernel(self) -> str:
    """'cudnn' or 'xla': the kernel of an uncached forward, by $GEMMA_JAX_ATTENTION if set, else
    by the model's `impl`. Raises ValueError when cuDNN is asked for where it cannot run."""
    impl = os.environ.get(ATTENTION_ENV) or self.impl
    if impl not in ATTENTION_IMPLS:
      raise ValueError(f'{ATTENTION_ENV}={impl!r}; expected one of {ATTENTION_IMPLS}.')
    if impl == 'xla':
      return 'xla'
    eligible = (jax.default_backend() == 'gpu' and self.config.attn_logits_soft_cap is None
                and jnp.dtype(self.dtype) in (jnp.bfloat16, jnp.float16))
    if impl == 'cudnn' and not eligible:
      raise ValueError('Attention kernel cudnn needs a GPU, 16-bit compute and no logit soft-cap.')
    return 'cudnn' if eligible else 'xla'

  def _attend(self, q_BTNH, k_BSKH, v_BSKH, mask_BTS):
    """Softmax attention with grouped heads; logits, soft-cap and softmax in float32."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    logits_BKGTS = jnp.einsum('BTKGH,BSKH->BKGTS', q_BTKGH, k_BSKH,
                              preferred_element_type=jnp.float32)
    logits_BKGTS = soft_cap(logits_BKGTS, self.config.attn_logits_soft_cap)
    logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, _MASK_VALUE)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
    enc_BTKGH = jnp.einsum('BKGTS,BSKH->BTKGH', probs_BKGTS, v_BSKH)
    return enc_BTKGH.reshape(B, T, N, H)


def _write(buf_BS_: jax.Array, new_BT_: jax.Array, end_index: jax.Array) -> jax.Array:
  """Writes `new` into `buf` along axis 1 starting at slot end_index."""
  start = (0, end_index) + (0,) * (buf_BS_.ndim - 2)
  return jax.lax.dynamic_update_slice(buf_BS_, new_BT_.astype(buf_BS_.dtype), start)


def _ring_attend_and_update(cache, new, end_index):
  """(what a LOCAL layer attends over: its ring buffer followed by the new chunk, the updated
  ring), both in the cache's layout; `new` holds the chunk's entries already in the cache's dtype.

  Attending over ring + chunk (rather than the updated ring) lets a chunk longer than the window
  see all of itself. The newest min(T, S) tokens then overwrite the oldest slots.
  """
  S, T = cache['pos'].shape[1], new['pos'].shape[1]
  keys = {name: jnp.concatenate([cache[name], new[name]], axis=1) for name in cache}
  m = min(T, S)
  slots = (end_index + T - m + jnp.arange(m)) % S
  new_cache = {name: cache[name].at[:, slots].set(new[name][:, T - m:]) for name in cache}
  return keys, new_cache

"""Small building blocks shared by the modules: RMSNorm, Einsum, RoPE, soft-capping, parameter names.

One dimension alphabet serves every module, in einsum strings and array-name suffixes (`x_BTD`):
  B batch            T query length      S key / cache length   D embed (model width)
  N query heads      K key/value heads   G query heads per kv head (N / K)
  H head dim         F feed-forward hidden                       V vocabulary
  L layers           C stacked projections of one weight (k/v, q/k/v, gate/up)
  M rows of a flattened batch (B x T)    J flattened leading axes of a weight (C x N)
  U tokens per chunk of the head-fused loss, n chunks            P batch shards, b rows per shard
  O the sampler's generated tokens       k top-k candidates      r LoRA rank
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# Logical axis names (see gemma_jax/sharding.py for how they map onto a device mesh).
# Parameters: vocab, embed, heads, kv_heads, head_dim, mlp. A None entry is never sharded.
LogicalAxes = tuple[str | None, ...]

# Up to this many rows (B*T: decoding), projections batch their dot over the weight's leading axes
# so that the weight is read in its stored layout (see `Einsum.project`).
FEW_ROWS = 64


def param(rngs: nnx.Rngs, init, shape: Sequence[int], dtype, axes: LogicalAxes) -> nnx.Param:
  """An `nnx.Param` initialised by `init` that records its logical axes as metadata."""
  if len(axes) != len(shape):
    raise ValueError(f'logical axes {axes} do not match shape {tuple(shape)}')
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), logical_axes=tuple(axes))


def param_name(path: Sequence[Any]) -> str:
  """The dotted name of a parameter, e.g. 'layers.0.attn.q_einsum.w', from an `nnx` state path
  (('layers', 0, 'attn', 'q_einsum', 'w')) or a jax key path (optax states: DictKey, GetAttrKey,
  SequenceKey entries; the Variable's own 'value' entry is dropped). The one naming of parameters:
  checkpoints, LoRA targets and the weight-decay mask all match these names."""
  parts = []
  for k in path:
    for attr in ('key', 'idx', 'name'):
      if hasattr(k, attr):
        k = getattr(k, attr)
        break
    parts.append(str(k))
  if parts and parts[-1] == 'value':
    parts.pop()
  return '.'.join(parts)


def fan_in_normal(fan_in_axes: Sequence[int]):
  """Normal init with variance 1/fan_in, where fan_in is the product of the contracted axes."""

  def init(key, shape, dtype):
    fan_in = 1
    for a in fan_in_axes:
      fan_in *= shape[a]
    return (jax.random.normal(key, shape, jnp.float32) * fan_in**-0.5).astype(dtype)

  return init


def with_lora(module: nnx.Module, name: str, y: jax.Array, x: jax.Array, eq_in: str,
              eq_out: str) -> jax.Array:
  """`y` plus the low-rank update `scale * (x A) B` of weight `name` when gemma_jax.lora gave
  `module` factors for it (`{name}_lora_a`, `{name}_lora_b`); else `y` unchanged.

  eq_in contracts x with A [stack..., in..., r]; eq_out the result with B [stack..., r, out...]
  into y's layout. Computed in y's dtype, next to the frozen weight's matmul (never merged into
  it, so a bf16 weight does not round the update away).
  """
  a = getattr(module, f'{name}_lora_a', None)
  if a is None:
    return y
  b = getattr(module, f'{name}_lora_b')
  xa = jnp.einsum(eq_in, x.astype(y.dtype), a[...].astype(y.dtype))
  update = jnp.einsum(eq_out, xa, b[...].astype(y.dtype))
  return y + update * jnp.asarray(getattr(module, f'{name}_lora_scale'), y.dtype)


class Einsum(nnx.Module):
  """A projection weight `w`: `project` for q/kv/qkv ([..., N, D, H]), `merge_heads` for the
  attention output ([N, H, D])."""

  def __init__(self, shape: Sequence[int], axes: LogicalAxes, fan_in_axes: Sequence[int], *,
               rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32):
    self.w = param(rngs, fan_in_normal(fan_in_axes), shape, param_dtype, axes)
    self.dtype = dtype

  def project(self, x_BTD: jax.Array) -> jax.Array:
    """einsum('BTD,...NDH->...BTNH') for a weight [..., N, D, H] (q, kv and fused qkv).

    With few rows (B*T <= FEW_ROWS, i.e. decoding) the weight's leading axes become batch axes of
    the dot, so it is read in its stored layout: contracting its middle axis D otherwise makes XLA
    transpose (copy) the whole weight on every call, which doubles the bytes a decode step moves.
    With many rows that transpose is negligible next to the matmul, and broadcasting x per head
    would cost activation memory, so the plain einsum stays.
    """
    x = x_BTD.astype(self.dtype)
    w = self.w[...].astype(self.dtype)
    B, T, D = x.shape
    if B * T > FEW_ROWS:
      y = jnp.einsum('BTD,...NDH->...BTNH', x, w)
    else:
      lead, H = w.shape[:-2], w.shape[-1]
      J = math.prod(lead)
      x_JMD = jnp.broadcast_to(x.reshape(1, B * T, D), (J, B * T, D))
      out_JMH = jnp.einsum('JMD,JDH->JMH', x_JMD, w.reshape(J, D, H))
      y = jnp.moveaxis(out_JMH.reshape(*lead, B, T, H), len(lead) - 1, -2)
    return with_lora(self, 'w', y, x, 'BTD,...Dr->...BTr', '...BTr,...rNH->...BTNH')

  def merge_heads(self, x_BTNH: jax.Array) -> jax.Array:
    """einsum('BTNH,NHD->BTD') for a weight [N, H, D], as one [B*T, N*H] x [N*H, D] matmul (a
    layout XLA reads without copying the weight)."""
    B, T, N, H = x_BTNH.shape
    x_BTNH = x_BTNH.astype(self.dtype)
    w_ND = self.w[...].astype(self.dtype).reshape(N * H, -1)
    y_BTD = (x_BTNH.reshape(B * T, N * H) @ w_ND).reshape(B, T, -1)
    return with_lora(self, 'w', y_BTD, x_BTNH, 'BTNH,NHr->BTr', 'BTr,rD->BTD')


class RMSNorm(nnx.Module):
  """x * rsqrt(mean(x^2) + eps) * (1 + scale), computed in float32 and cast back to x's dtype."""

  def __init__(self, dim: int, axis_name: str, *, eps: float = 1e-6, param_dtype=jnp.float32):
    self.scale = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=(axis_name,))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, *, base: float,
               scale: float = 1.0) -> jax.Array:
  """Rotary embedding on the last axis, rotating its first half against its second half.

  `scale` is linear RoPE scaling (positions divided by it), as Gemma 3 4B+ global layers use.
  Angles are computed in float32.
  """
  head_dim = x_BTNH.shape[-1]
  fraction = 2 * jnp.arange(head_dim // 2, dtype=jnp.float32) / head_dim
  inv_freq = 1.0 / (base**fraction) / scale
  angles_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq
  sin, cos = jnp.sin(angles_BTh)[:, :, None, :], jnp.cos(angles_BTh)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
  """cap * tanh(x / cap): bounds logits smoothly to (-cap, cap). Identity when cap is None."""
  if cap is None:
    return x
  return jnp.tanh(x / cap) * cap

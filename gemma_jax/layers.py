"""Building blocks shared by the modules: RMSNorm, Einsum, RoPE, soft-capping, parameter names.

One dimension alphabet serves every module, in einsum strings and array-name suffixes (`x_BTD`):
  B batch            T query length      S key / cache length   D embed (model width)
  N query heads      K key/value heads   G query heads per kv head (N / K)
  H head dim         F feed-forward hidden                       V vocabulary
  L layers           C stacked projections of one weight (k/v, q/k/v, gate/up)
  M rows of a flattened batch (B x T)    J flattened leading axes of a weight (C x N)
  U tokens per chunk of the head-fused loss, n chunks            P batch shards, b rows per shard
  O the sampler's generated tokens       k top-k candidates (also: experts per token)
  r LoRA rank        I per-layer input width (Gemma 4)          E experts
  R routed rows: a flattened batch's (token, expert) pairs, sorted by expert (M x k)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# Logical axis names (see gemma_jax/sharding.py for how they map onto a device mesh).
# Parameters: vocab, embed, heads, kv_heads, head_dim, mlp. A None entry is never sharded.
LogicalAxes = tuple[str | None, ...]

# Up to this many rows (B*T: decoding), projections batch their dot over the weight's leading axes
# so that the weight is read in its stored layout (see `einsum`).
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


class EinsumLayout(NamedTuple):
  """A projection equation taken apart ('BTD,CKDH->CBTKH'): the letters of the input, the weight
  and the output; which weight axes lead the output as a stack of separate projections (C), which
  it contracts with the input (its fan-in), which select one of a group of weights per row (E of
  the MoE experts' 'MD,EDCF->MCF': in neither the input nor the output, applied ragged), and the
  rest (what it produces)."""

  x: str
  w: str
  out: str
  stack: tuple[int, ...]  # weight axes that are separate projections (k/v, q/k/v, gate/up)
  contracted: tuple[int, ...]  # weight axes summed against the input
  produced: tuple[int, ...]  # the other weight axes
  group: tuple[int, ...] = ()  # weight axes choosing a weight per row (experts)


def einsum_layout(einsum_str: str) -> EinsumLayout:
  """Parses a projection equation `x,w->out` (one letter per axis, no ellipsis)."""
  inputs, out = einsum_str.replace(' ', '').split('->')
  x, w = inputs.split(',')
  stack = []
  for i, c in enumerate(w):
    if i < len(out) and out[i] == c and c not in x:
      stack.append(i)
    else:
      break
  contracted = tuple(i for i, c in enumerate(w) if c in x and c not in out)
  group = tuple(i for i, c in enumerate(w) if c not in x and c not in out)
  produced = tuple(i for i in range(len(w))
                   if i not in stack and i not in contracted and i not in group)
  return EinsumLayout(x, w, out, tuple(stack), contracted, produced, group)


def lora_einsums(einsum_str: str) -> tuple[str, str]:
  """(x A, (x A) B): the equations of a LoRA pair for projection `einsum_str`, with A laid out
  [stack, contracted, r] and B [stack, r, produced] ('BTD,CKDH->CBTKH' gives 'BTD,CDr->CBTr' and
  'CBTr,CrKH->CBTKH'). r is the rank."""
  lay = einsum_layout(einsum_str)
  stack = ''.join(lay.w[i] for i in lay.stack)
  a = stack + ''.join(lay.w[i] for i in lay.contracted) + 'r'
  b = stack + 'r' + ''.join(lay.w[i] for i in lay.produced)
  kept = set(stack) | {c for c in lay.x if c in lay.out}
  xa = ''.join(c for c in lay.out if c in kept) + 'r'
  return f'{lay.x},{a}->{xa}', f'{xa},{b}->{lay.out}'


def einsum(einsum_str: str, x: jax.Array, w: jax.Array) -> jax.Array:
  """`jnp.einsum(einsum_str, x, w)` for a projection, computed so the weight is read in its stored
  layout: contracting its middle axis (D of [..., N, D, H]) otherwise makes XLA transpose (copy)
  the whole weight on every call, which doubles the bytes a decode step moves.

  - x's trailing axes against w's leading ones ('BTNH,NHD->BTD', 'BTF,FD->BTD'): one
    [M, K] x [K, N] matmul.
  - a weight [..., D, H] with few rows (M = B*T <= FEW_ROWS: decoding): one dot batched over the
    weight's leading axes J. With many rows the transpose is negligible next to the matmul, and
    broadcasting x over J would cost activation memory, so the plain einsum runs, once per
    stacked projection (gate and up, k and v: each result comes out in its own layout, where one
    einsum over the stack would make a transposed copy of the [C, B, T, ...] activations).
  """
  lay = einsum_layout(einsum_str)
  k = len(lay.contracted)
  summed = ''.join(lay.w[i] for i in lay.contracted)
  if lay.x.endswith(summed) and lay.w.startswith(summed) and lay.out == lay.x[:-k] + lay.w[k:]:
    lead_x, lead_w = x.shape[:-k], w.shape[:k]
    y = x.reshape(-1, math.prod(lead_w)) @ w.reshape(math.prod(lead_w), -1)
    return y.reshape(*lead_x, *w.shape[k:])
  rows = math.prod(x.shape[:-1])
  if k == 1 and lay.x[-1] == lay.w[-2] == summed and rows <= FEW_ROWS:
    lead, D, H = w.shape[:-2], w.shape[-2], w.shape[-1]
    J = math.prod(lead)
    x_JMD = jnp.broadcast_to(x.reshape(1, rows, D), (J, rows, D))
    out_JMH = jnp.einsum('JMD,JDH->JMH', x_JMD, w.reshape(J, D, H))
    letters = lay.w[:-2] + lay.x[:-1] + lay.w[-1]
    y = out_JMH.reshape(*lead, *x.shape[:-1], H)
    return jnp.transpose(y, [letters.index(c) for c in lay.out])
  if lay.stack == (0,):
    one = f'{lay.x},{lay.w[1:]}->{lay.out[1:]}'
    return jnp.stack([jnp.einsum(one, x, w[i]) for i in range(w.shape[0])])
  return jnp.einsum(einsum_str, x, w)


def einsum_param(rngs: nnx.Rngs, einsum_str: str, shape: Sequence[int], dtype,
                 axes: LogicalAxes) -> nnx.Param:
  """The weight of projection `einsum_str`: normal init with variance 1 / fan-in, the fan-in being
  the axes the equation contracts."""
  return param(rngs, fan_in_normal(einsum_layout(einsum_str).contracted), shape, dtype, axes)


def weight(module: nnx.Module, name: str, dtype) -> jax.Array:
  """Weight `name` of `module` in `dtype`: the one way layers read a weight. A weight that
  gemma_jax.quant holds in low bits (a `QuantizedWeight` with its `{name}_qscale`) is dequantized
  here, inside the jitted computation, where XLA fuses the dequantization into the matmul that
  reads it."""
  var = getattr(module, name)
  scale = getattr(module, f'{name}_qscale', None)
  if scale is None:
    return var[...].astype(dtype)
  return var.dequantize(scale[...], dtype)


def weight_rows(module: nnx.Module, name: str, rows: jax.Array, dtype,
                constrain_fn=lambda x: x) -> jax.Array:
  """Rows `rows` (integer array of any shape) of table `name` [V, X] of `module`, in `dtype`
  ([*rows.shape, X]): a quantized table's rows are gathered before they are dequantized, so a
  lookup reads only those rows. `constrain_fn` lays out each gathered table (sharding)."""
  var = getattr(module, name)
  table = constrain_fn(var[...])
  scale = getattr(module, f'{name}_qscale', None)
  if scale is None:
    return table[rows].astype(dtype)
  return var.dequantize_rows(table[rows], constrain_fn(scale[...])[rows], dtype)


def with_lora(module: nnx.Module, name: str, y: jax.Array, x: jax.Array,
              einsum_str: str) -> jax.Array:
  """`y` plus the low-rank update `scale * (x A) B` of weight `name` (applied by `einsum_str`)
  when gemma_jax.lora gave `module` factors for it (`{name}_lora_a`, `{name}_lora_b`); else `y`
  unchanged. The factors' equations follow from the weight's (`lora_einsums`). Computed in y's
  dtype, next to the frozen weight's matmul (never merged into it, so a bf16 weight does not
  round the update away).
  """
  a = getattr(module, f'{name}_lora_a', None)
  if a is None:
    return y
  b = getattr(module, f'{name}_lora_b')
  eq_in, eq_out = lora_einsums(einsum_str)
  xa = jnp.einsum(eq_in, x.astype(y.dtype), a[...].astype(y.dtype))
  update = jnp.einsum(eq_out, xa, b[...].astype(y.dtype))
  return y + update * jnp.asarray(getattr(module, f'{name}_lora_scale'), y.dtype)


class Einsum(nnx.Module):
  """A projection: its equation and its weight `w`, e.g.
  `Einsum('BTD,NDH->BTNH', (N, D, H), ('heads', 'embed', 'head_dim'))`.

  The equation is the one statement of the projection: the weight's fan-in, the layout and
  equations of its LoRA factors (gemma_jax.lora) and the kernel (`einsum`) all follow from it.
  `einsums` maps each weight attribute to its equation, which is how gemma_jax.lora finds the
  weights it can adapt.
  """

  def __init__(self, einsum_str: str, shape: Sequence[int], axes: LogicalAxes, *,
               rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32):
    lay = einsum_layout(einsum_str)
    if len(lay.w) != len(shape):
      raise ValueError(f'Einsum {einsum_str!r}: the weight has {len(shape)} axes, the equation '
                       f'{len(lay.w)}.')
    self.einsum_str = einsum_str
    self.w = einsum_param(rngs, einsum_str, shape, param_dtype, axes)
    self.dtype = dtype

  @property
  def einsums(self) -> dict[str, str]:
    """{'w': the equation}: the weight gemma_jax.lora may adapt."""
    return {'w': self.einsum_str}

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    y = einsum(self.einsum_str, x, weight(self, 'w', self.dtype))
    return with_lora(self, 'w', y, x, self.einsum_str)


class RMSNorm(nnx.Module):
  """x * rsqrt(mean(x^2) + eps) * (1 + scale), computed in float32 and cast back to x's dtype.

  `plus_one=False` multiplies by `scale` itself, initialised to ones (Gemma 4);
  `with_scale=False` has no parameter at all (Gemma 4's value and router norms).
  """

  def __init__(self, dim: int, axis_name: str, *, eps: float = 1e-6, param_dtype=jnp.float32,
               plus_one: bool = True, with_scale: bool = True):
    if with_scale:
      init = jnp.zeros if plus_one else jnp.ones
      self.scale = nnx.Param(init((dim,), param_dtype), logical_axes=(axis_name,))
    self.eps = eps
    self.offset = 1.0 if plus_one else 0.0

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    if hasattr(self, 'scale'):
      normed = normed * (self.offset + self.scale[...].astype(jnp.float32))
    return normed.astype(x.dtype)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, *, base: float,
               scale: float = 1.0, fraction: float = 1.0) -> jax.Array:
  """Rotary embedding on the last axis, rotating its first half against its second half.

  `scale` is linear RoPE scaling (positions divided by it), as Gemma 3 4B+ global layers use.
  `fraction` < 1 rotates only the first `int(fraction * H / 2)` frequency pairs, whose
  frequencies keep their full-H exponents, and leaves the rest unrotated (transformers'
  'proportional' RoPE of Gemma 4 global layers). Angles are computed in float32.
  """
  head_dim = x_BTNH.shape[-1]
  pairs = jnp.arange(head_dim // 2)
  fraction_h = 2 * pairs.astype(jnp.float32) / head_dim
  inv_freq = 1.0 / (base**fraction_h) / scale
  if fraction != 1.0:
    inv_freq = jnp.where(pairs < int(fraction * head_dim // 2), inv_freq, 0.0)
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

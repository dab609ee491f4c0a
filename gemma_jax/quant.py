"""Weight-only quantization: int8 and int4 weights held in device memory, dequantized where read.

`quantize(model, 'int8' | 'int4', group_size=...)` replaces, in place, every projection weight
(each module's `einsums`: attention, MLP, MoE experts and routers, Gemma 4's per-layer
projections) and the embedding tables (`Embedder.tables`; the input table is also the tied output
head, 63% of Gemma 3 270M) by low-bit values and float32 scales; norms and scalars stay float.
The model keeps its call signature: the layers read every weight through `layers.weight`, which
dequantizes inside the jitted computation, so XLA fuses the dequantization into the matmul (or the
embedding gather) that reads the weight and device memory holds only the low-bit values.

Format of a quantized weight `w` of a module (w ~ q * scale, symmetric, zero maps to zero):
- `w` becomes a `QuantizedWeight`: int8 values; for int4, two values per byte (low nibble the
  even index, high nibble the odd one) along the *group axis*, which therefore has half the length.
  `QuantizedWeight.shape` is still the float weight's shape (what LoRA and the layers see); the
  stored array is `w.get_value()`.
- `w_qscale` is a `QuantScale` of the same rank, float32. The group axis is the weight's last
  contracted axis (D of q_einsum [N, D, H], H of the output projection [N, H, D], F of the MLP's
  down projection [F, D], D of the embedding table [V, D]). Group size 0 is one scale per output
  channel: the scale has size 1 on every contracted axis. Group size g > 0: the scale has dim / g
  entries on the group axis, one per g consecutive inputs, and the full size elsewhere.
- Default: groups of 32 for both modes, chosen by the top-1 agreement measured on the real Gemma
  3 270M (README, Quantization): one scale per output channel leaves int8 at 94% agreement, since
  some input channels are tens of times larger than others; groups of 32 isolate them (98.6%).
Both are `nnx.Param` subclasses with the float weight's logical axes: checkpoints (`save_params`),
shardings (gemma_jax.sharding) and LoRA's frozen base (`nnx.split(model, nnx.LoRAParam,
nnx.Param, ...)`) take them as they take any parameter, and `nnx.split(model, QuantizedWeight,
...)` tells them apart. Nothing trains them: a quantized base is frozen (QLoRA).

Why our own and not qwix (evaluated, 0.1.8): qwix's PTQ stores int4 as `jnp.int4`, which JAX
reports and (on CPU) keeps at one byte per value, so int4 would save no more than int8 here; it
quantizes by intercepting `jax.numpy.einsum` / `lax.dot_general` while the model is traced, so
the embedding gather (most of a small Gemma) is left in float and weights our `layers.einsum`
reshapes before the dot are not matched; and GGUF's Q8_0 / Q4_0 blocks must map onto a layout we
control to load them without a float round trip (gemma_jax.convert.gguf). The format above is a
few hundred lines of array code with one read path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

MODES = ('int8', 'int4')
BITS = {'int8': 8, 'int4': 4}
DEFAULT_GROUP_SIZE = {'int8': 32, 'int4': 32}  # 0: one scale per output channel (README)
SCALE_SUFFIX = '_qscale'  # `w` is read with its scale `w_qscale`


class QuantizedWeight(nnx.Param):
  """Low-bit values of a weight (int8; int4 packed two per byte along the group axis).

  Metadata: `bits` (8 or 4), `axis` (the group axis, negative: counted from the end, so it also
  holds for rows gathered from an embedding table), `float_shape` (the dequantized shape,
  returned by `.shape`) and the float weight's `logical_axes`.
  """

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.get_metadata('float_shape'))

  def dequantize(self, scale: jax.Array, dtype) -> jax.Array:
    """The float weight, in `dtype`, from these values and their `scale` array."""
    return self.dequantize_rows(self[...], scale, dtype)

  def dequantize_rows(self, values: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """Like `dequantize`, for rows gathered from these values and their scales (a table lookup:
    the group axis is the last one, so it holds for the gathered rows too)."""
    return dequantize_array(values, scale, bits=self.get_metadata('bits'),
                            axis=self.get_metadata('axis'), dtype=dtype)


class QuantScale(nnx.Param):
  """The float32 scales of a `QuantizedWeight` (same rank; see the module docstring)."""


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How one weight is quantized: `bits` 8 or 4, `group_size` 0 (per output channel) or g."""

  bits: int
  group_size: int


def spec(mode: str, group_size: int | None = None) -> QuantSpec:
  """The QuantSpec of a mode name ('int8', 'int4') and a group size (None: the mode's default).

  Raises ValueError naming the value for an unknown mode or a negative / odd int4 group size.
  """
  if mode not in MODES:
    raise ValueError(f'Unknown quantization mode {mode!r}; choose one of {list(MODES)}.')
  g = DEFAULT_GROUP_SIZE[mode] if group_size is None else int(group_size)
  if g < 0:
    raise ValueError(f'quantization group size must be >= 0 (0: per output channel), got {g}.')
  if BITS[mode] == 4 and g % 2:
    raise ValueError(f'int4 group size must be even (two values share a byte), got {g}.')
  return QuantSpec(BITS[mode], g)


# ---------------------------------------------------------------------------------------------
# Arrays.


def _pos(axis: int, ndim: int) -> int:
  return axis % ndim


def pack_int4(q: jax.Array, axis: int) -> jax.Array:
  """int8 values in [-8, 7] -> int8 bytes holding two of them along `axis` (even index low)."""
  a = _pos(axis, q.ndim)
  lo = jax.lax.slice_in_dim(q, 0, None, 2, a)
  hi = jax.lax.slice_in_dim(q, 1, None, 2, a)
  return (lo & 0x0F) | (hi << 4)


def unpack_int4(p: jax.Array, axis: int) -> jax.Array:
  """Inverse of `pack_int4`: int8 values in [-8, 7], twice as long along `axis`."""
  a = _pos(axis, p.ndim)
  lo = jnp.left_shift(p, 4) >> 4  # arithmetic shifts of int8 sign-extend the nibble
  hi = p >> 4
  both = jnp.stack([lo, hi], axis=a + 1)
  return both.reshape(*p.shape[:a], 2 * p.shape[a], *p.shape[a + 1:])


def dequantize_array(q: jax.Array, scale: jax.Array, *, bits: int, axis: int, dtype) -> jax.Array:
  """q * scale in `dtype` (computed in float32), q unpacked first when `bits` is 4."""
  if bits == 4:
    q = unpack_int4(q, axis)
  a = _pos(axis, q.ndim)
  w = q.astype(jnp.float32)
  groups = scale.shape[a]
  if groups in (1, q.shape[a]):
    w = w * scale.astype(jnp.float32)
  else:
    shape = q.shape
    w = w.reshape(*shape[:a], groups, shape[a] // groups, *shape[a + 1:])
    w = (w * jnp.expand_dims(scale.astype(jnp.float32), a + 1)).reshape(shape)
  return w.astype(dtype)


@functools.partial(jax.jit, static_argnames=('bits', 'axis', 'contracted', 'group_size'))
def quantize_array(w: jax.Array, *, bits: int, axis: int, contracted: tuple[int, ...],
                   group_size: int) -> tuple[jax.Array, jax.Array]:
  """(values, float32 scales) of weight `w` (see the module docstring for the layout).

  `axis` is the group axis (one of `contracted`, the axes the weight sums over); its length must
  be a multiple of `group_size` (the caller checks and names the tensor).
  """
  qmax = 2.0**(bits - 1) - 1
  w32 = w.astype(jnp.float32)
  a = _pos(axis, w.ndim)
  if group_size == 0:
    amax = jnp.max(jnp.abs(w32), axis=tuple(_pos(c, w.ndim) for c in contracted), keepdims=True)
    scale = jnp.where(amax > 0, amax / qmax, 1.0)
    q = jnp.clip(jnp.round(w32 / scale), -qmax, qmax).astype(jnp.int8)
  else:
    shape = w.shape
    grouped = w32.reshape(*shape[:a], shape[a] // group_size, group_size, *shape[a + 1:])
    amax = jnp.max(jnp.abs(grouped), axis=a + 1, keepdims=True)
    scale_g = jnp.where(amax > 0, amax / qmax, 1.0)
    q = jnp.clip(jnp.round(grouped / scale_g), -qmax, qmax).astype(jnp.int8).reshape(shape)
    scale = jnp.squeeze(scale_g, a + 1)
  if bits == 4:
    q = pack_int4(q, axis)
  return q, scale


# ---------------------------------------------------------------------------------------------
# Models.


@dataclasses.dataclass(frozen=True)
class Target:
  """A weight `quantize` may replace: where it lives, its name and the axes it sums over."""

  module: Any
  attr: str
  name: str  # dotted parameter name, e.g. 'layers.0.attn.q_einsum.w'
  contracted: tuple[int, ...]  # the axes the weight sums over, negative

  @property
  def axis(self) -> int:
    return self.contracted[-1]


def targets(model: nnx.Module) -> Iterator[Target]:
  """Every weight `quantize` may replace (quantized or not): the modules' `einsums` and `tables` (gemma_jax.layers
  and gemma_jax.transformer declare them)."""
  from gemma_jax.layers import einsum_layout  # pylint: disable=g-import-not-at-top (cycle)
  from gemma_jax.layers import param_name  # pylint: disable=g-import-not-at-top
  for path, module in nnx.iter_modules(model):
    weights = {attr: einsum_layout(eq).contracted
               for attr, eq in getattr(module, 'einsums', {}).items()}
    weights.update({attr: (1,) for attr in getattr(module, 'tables', ())})
    for attr, contracted in weights.items():
      if not hasattr(module, attr):
        continue
      ndim = len(getattr(module, attr).shape)
      yield Target(module, attr, param_name(tuple(path) + (attr,)),
                    tuple(c - ndim for c in contracted))


def is_quantized(model: nnx.Module) -> bool:
  """Whether any weight of `model` is held quantized."""
  return any(isinstance(getattr(t.module, t.attr), QuantizedWeight) for t in targets(model))


def check(t: Target, s: QuantSpec) -> None:
  """Raises ValueError naming the weight unless `s` fits its group axis."""
  shape = getattr(t.module, t.attr).shape
  dim = shape[t.axis]
  if s.group_size and dim % s.group_size:
    raise ValueError(f'quantization group size {s.group_size} does not divide axis '
                     f'{t.axis % len(shape)} '
                     f'(length {dim}) of {t.name}; choose a group size that divides it '
                     '(or 0: per output channel).')
  if s.bits == 4 and dim % 2:
    raise ValueError(f'int4 needs an even length on the group axis of {t.name} (length {dim}).')


def _replace(t: Target, s: QuantSpec) -> None:
  var = getattr(t.module, t.attr)
  float_shape = tuple(var.shape)
  axes = var.get_metadata().get('logical_axes')
  q, scale = quantize_array(var[...], bits=s.bits, axis=t.axis, contracted=t.contracted,
                            group_size=s.group_size)
  setattr(t.module, t.attr, QuantizedWeight(q, logical_axes=axes, bits=s.bits, axis=t.axis,
                                            float_shape=float_shape))
  setattr(t.module, t.attr + SCALE_SUFFIX, QuantScale(scale, logical_axes=axes))


def quantize(model: nnx.Module, mode: str | Mapping[str, QuantSpec], group_size: int | None = None,
             *, skip: str | None = None) -> nnx.Module:
  """Quantizes `model`'s projection weights and embedding tables in place; returns the model.

  mode: 'int8' or 'int4' (default: groups of 32 along the contraction axis), with `group_size`
  overriding the default (0: one scale per output channel); or a
  mapping {dotted weight name: QuantSpec} for exactly those weights (how checkpoint and GGUF
  readers rebuild a saved layout). `skip`: a regex of dotted names to keep in float. Weights
  already quantized and LoRA factors are left alone. Every weight is checked before any is
  replaced, so an error (naming the tensor) leaves the model as it was.
  """
  floats = [t for t in targets(model)
            if not isinstance(getattr(t.module, t.attr), QuantizedWeight)
            and not (skip and re.search(skip, t.name))]
  if isinstance(mode, Mapping):
    unknown = sorted(set(mode) - {t.name for t in floats})
    if unknown:
      raise ValueError(f'quantize: no float weight named {unknown[:3]} to quantize.')
    plan = [(t, mode[t.name]) for t in floats if t.name in mode]
  else:
    s = spec(mode, group_size)
    plan = [(t, s) for t in floats]
  for t, s in plan:
    check(t, s)
  for t, s in plan:
    _replace(t, s)
  return model


def specs_from_shapes(model: nnx.Module, shapes: Mapping[str, tuple[int, ...]]
                      ) -> dict[str, QuantSpec]:
  """{weight name: QuantSpec} of the weights a saved tree (`shapes` by dotted name) holds
  quantized, read from the shapes of each weight and its `_qscale` against the float `model`:
  halved along the group axis means int4; the scale's size there gives the group size."""
  specs = {}
  for t in targets(model):
    scale_shape = shapes.get(t.name + SCALE_SUFFIX)
    if scale_shape is None or t.name not in shapes:
      continue
    float_shape = getattr(t.module, t.attr).shape
    dim = float_shape[t.axis]
    bits = 4 if shapes[t.name][t.axis] * 2 == dim and dim > 1 else 8
    per_channel = all(scale_shape[c] == 1 for c in t.contracted)
    group = 0 if per_channel else dim // max(scale_shape[t.axis], 1)
    specs[t.name] = QuantSpec(bits, group)
  return specs


def dequantize(model: nnx.Module, dtype=jnp.float32) -> nnx.Module:
  """Replaces every quantized weight of `model` by its float value (`dtype`), in place."""
  for t in list(targets(model)):
    var = getattr(t.module, t.attr)
    if isinstance(var, QuantizedWeight):
      w = var.dequantize(getattr(t.module, t.attr + SCALE_SUFFIX)[...], dtype)
      setattr(t.module, t.attr, nnx.Param(w, logical_axes=var.get_metadata().get('logical_axes')))
      delattr(t.module, t.attr + SCALE_SUFFIX)
  return model


def describe(model: nnx.Module) -> str:
  """One line: how many weights are quantized, to what, and the model's parameter bytes."""
  kinds: dict[str, int] = {}
  for t in targets(model):
    var = getattr(t.module, t.attr)
    if isinstance(var, QuantizedWeight):
      scale = getattr(t.module, t.attr + SCALE_SUFFIX)
      per_channel = all(scale.shape[c] == 1 for c in t.contracted)
      group = 'per channel' if per_channel else f'groups of {var.shape[t.axis] // scale.shape[t.axis]}'
      key = f'int{var.get_metadata("bits")} {group}'
      kinds[key] = kinds.get(key, 0) + 1
  total = param_bytes(model)
  what = ', '.join(f'{n} {k}' for k, n in sorted(kinds.items())) or 'none'
  return f'quantized weights: {what}; parameters {total / 2**20:,.1f} MiB'


def param_bytes(model_or_state) -> int:
  """Bytes of every parameter array (as stored: int4 values two per byte, scales included)."""
  state = nnx.state(model_or_state, nnx.Param)
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))


def agreement(ref_logits: jax.Array, logits: jax.Array) -> dict[str, float]:
  """How closely a quantized model's logits [..., V] follow the float model's `ref_logits` over
  the same positions: 'top1' the fraction of positions whose argmax agrees, 'kl' the mean
  KL(float || quantized) in nats, 'positions' how many were compared."""
  ref = jax.nn.log_softmax(jnp.asarray(ref_logits, jnp.float32), axis=-1)
  got = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  kl = jnp.sum(jnp.exp(ref) * (ref - got), axis=-1)
  top1 = jnp.argmax(ref, axis=-1) == jnp.argmax(got, axis=-1)
  return {'top1': float(jnp.mean(top1)), 'kl': float(jnp.mean(kl)), 'positions': int(top1.size)}

"""GGUF tensors -> gemma_jax.quant's int8 / int4 weights, Q8_0 and Q4_0 blocks kept as they are.

`load_gguf(path, quantize=...)` lands here. Every projection weight and embedding table (the
weights `quant.quantize` replaces) is made from its GGUF tensors one at a time, so neither the
host nor the device holds the float model:
- Q8_0 / Q4_0 (blocks of 32 values along GGUF's innermost axis, one f16 scale each): the
  integers and scales are read from the blocks and moved by the same reshapes and transposes that
  the Hugging Face layout table (gemma_jax.convert.hf) applies to the float weight. So are the
  values' block numbers, once per kind of weight and shape: where every group of 32 along our
  group axis then holds one block, that block's scale is the group's, and dequantizing gives
  what gguf.quants.dequantize gives, bit for bit. Where not (blocks split across heads narrower
  than 32, a stacked weight with other tensor types), the weight is requantized and a log line
  says why. Which types are exact under which mode: gemma_jax.convert.gguf's docstring.
- Anything else: dequantised by gguf (gemma_jax.convert.gguf.hf_tensor), cast to `param_dtype` as
  the float load stores it, and quantized by `quant.quantize_array` with the requested spec:
  what `quant.quantize` does to the float-loaded model.
Norms and scalars are read as the float load reads them.
"""

from __future__ import annotations

import collections
import logging
import os
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_jax import quant
from gemma_jax.config import ModelConfig
from gemma_jax.convert.gguf import gguf_sources, hf_tensor
from gemma_jax.convert.hf import _ignored, _layout, check_layer_count
from gemma_jax.transformer import Transformer, model_from_params

log = logging.getLogger('gemma_jax.convert')

BLOCK = 32  # values per Q8_0 / Q4_0 block


def exact_types(mode: str) -> tuple:
  """The GGUF types loaded exactly under `mode`: Q8_0 and Q4_0 (widened) under 'int8', Q4_0
  under 'int4' (a Q8_0 tensor is requantized to the four bits asked for)."""
  import gguf  # Deferred: only the GGUF paths need the package.
  q8, q4 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0
  return (q8, q4) if quant.spec(mode).bits == 8 else (q4,)


def hf_shape(source) -> tuple[int, ...]:
  """The HF shape of a `gguf_sources` entry (GGUF's dims reversed; split experts fused)."""
  shapes = [tuple(int(d) for d in reversed(t.shape)) for t in source[0]]
  if len(shapes) == 1:
    return shapes[0]
  return (shapes[0][0], sum(s[1] for s in shapes), *shapes[0][2:])


def blocks(t) -> tuple[np.ndarray, np.ndarray]:
  """(int8 values in HF orientation, float32 scales [..., n // 32]) of a Q8_0 or Q4_0 GGUF tensor:
  w = scale * value exactly as gguf.quants dequantizes it. Q4_0's byte j holds value j of its
  block in the low nibble and value j + 16 in the high one, stored plus 8."""
  import gguf  # Deferred: only the GGUF paths need the package.
  shape = tuple(int(d) for d in reversed(t.shape))
  bits = 8 if t.tensor_type == gguf.GGMLQuantizationType.Q8_0 else 4
  raw = np.asarray(t.data).view(np.uint8).reshape(-1, 2 + BLOCK * bits // 8)
  d = raw[:, :2].copy().view(np.float16).astype(np.float32)
  if bits == 8:
    q = raw[:, 2:].view(np.int8)
  else:
    nibbles = raw[:, 2:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.int8) - np.int8(8)
  return q.reshape(shape), d.reshape(*shape[:-1], shape[-1] // BLOCK)


def _source_blocks(source) -> tuple[np.ndarray, np.ndarray]:
  parts = [blocks(t) for t in source[0]]
  if len(parts) == 1:
    return parts[0]
  return tuple(np.concatenate(p, axis=1) for p in zip(*parts))  # split experts: gate, up


def block_index(entry, scale_shapes: list[tuple[int, ...]], axis: int) -> np.ndarray | str:
  """Where weight `entry` (an hf._layout entry) puts the blocks of its sources (whose scales have
  `scale_shapes`): for each group of 32 along our `axis`, the number of the one block it holds
  (counted through the sources in order), or the reason why a group holds more than one block.

  Found by moving every value's block number as `entry.to_ours` moves the values; it depends on
  the shapes only, so the caller reuses it for every layer of a kind.
  """
  total = sum(int(np.prod(s)) for s in scale_shapes)
  ids, start = [], 0
  for shape in scale_shapes:
    n = int(np.prod(shape))
    ids.append(np.repeat(np.arange(start, start + n, dtype=np.min_scalar_type(total))
                         .reshape(shape), BLOCK, axis=-1))
    start += n
  ids = np.asarray(entry.to_ours(*ids))
  a = axis % ids.ndim
  why = (f'its blocks of {BLOCK} do not fall on groups of {BLOCK} along axis {axis} of '
         f'{ids.shape} (e.g. heads narrower than {BLOCK})')
  if ids.shape[a] % BLOCK:
    return why
  grouped = ids.reshape(*ids.shape[:a], ids.shape[a] // BLOCK, BLOCK, *ids.shape[a + 1:])
  first = np.take(grouped, [0], axis=a + 1)
  return np.squeeze(first, a + 1) if (grouped == first).all() else why


def exact(entry, sources: list, axis: int, bits: int,
          cache: dict | None = None) -> tuple[np.ndarray, np.ndarray] | str:
  """(values, float32 scales) of weight `entry` (an hf._layout entry) with `bits` per value in
  groups of 32 along `axis`, from its Q8_0 / Q4_0 `sources` without a float round trip (Q4_0's
  values widen exactly to int8), or the reason why its layout does not allow that. `cache`
  keeps `block_index` per kind of weight and shape."""
  values, scales = zip(*(_source_blocks(s) for s in sources))
  q = np.asarray(entry.to_ours(*values))
  if q.dtype != np.int8 or q.size != sum(v.size for v in values):
    return 'its layout transform is not a pure rearrangement'
  if len(values) == 1 and q is values[0] and axis % q.ndim == q.ndim - 1:
    scale = scales[0]  # kept as stored (a table): blocks already run along our last axis
  else:
    key = (re.sub(r'^layers\.\d+\.', '', entry.ours), tuple(s.shape for s in scales), q.shape,
           axis)
    cache = {} if cache is None else cache
    if key not in cache:
      cache[key] = block_index(entry, [s.shape for s in scales], axis)
    index = cache[key]
    if isinstance(index, str):
      return index
    scale = np.concatenate([s.reshape(-1) for s in scales])[index]
  if bits == 4:
    q = np.asarray(quant.pack_int4(q, axis))
  return q, scale


def load_quantized(reader, path: str, config: ModelConfig, mode: str, group_size: int | None, *,
                   dtype, param_dtype, shardings=None) -> Transformer:
  """The Transformer of an open GGUF file with its weights quantized (see the module docstring).

  Raises ValueError naming `path` and the tensor for a missing, unexpected or mis-shaped tensor,
  a type gguf cannot dequantise, or a group size that does not divide a requantized weight
  (checked before any tensor is read, where the types tell which weights are requantized).
  """
  requested = quant.spec(mode, group_size)
  exact_ok = exact_types(mode)
  sources = gguf_sources(reader, path, config)
  check_layer_count(config, sources, path)
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  targets = {t.name: t for t in quant.targets(abstract)}
  plan = [(entry, [_source(sources, n, s, path) for n, s in zip(entry.hf, entry.shapes)])
          for entry in _layout(config)]
  extra = sorted(set(sources) - {n for e, _ in plan for n in e.hf}
                 - {n for n in sources if _ignored(config, n)})
  if extra:
    raise ValueError(f'{path}: unexpected tensors {extra[:5]} for a family-{config.family} '
                     f'model {config.name!r}.')
  for entry, srcs in plan:
    if entry.ours in targets and not all(t.tensor_type in exact_ok for s in srcs for t in s[0]):
      quant.check(targets[entry.ours], requested)
  params, specs, cache = {}, {}, {}
  kept, requantized = collections.Counter(), collections.Counter()
  for i, (entry, srcs) in enumerate(plan):
    if (i + 1) % 50 == 0:
      log.info('%s: %d/%d weights', os.path.basename(path), i + 1, len(plan))
    target = targets.get(entry.ours)
    if target is None:  # norms, scalars: as the float load reads them
      params[entry.ours] = entry.to_ours(*(hf_tensor(s, path) for s in srcs))
      continue
    types = '+'.join(sorted({t.tensor_type.name for s in srcs for t in s[0]}))
    is_exact = [t.tensor_type in exact_ok for s in srcs for t in s[0]]
    got, why = None, None
    if all(is_exact):
      got = exact(entry, srcs, target.axis, requested.bits, cache)
      why = got if isinstance(got, str) else None
    elif any(is_exact):
      why = 'only part of the stack is exact'
    if why:
      log.info('%s: %s (%s): %s; requantized to %s.', os.path.basename(path), entry.ours, types,
               why, _describe(requested))
    if isinstance(got, tuple):
      q, scale = got
      specs[entry.ours] = quant.QuantSpec(requested.bits, BLOCK)
      kept[types] += 1
    else:
      quant.check(target, requested)
      w = jnp.asarray(entry.to_ours(*(hf_tensor(s, path) for s in srcs)), param_dtype)
      q, scale = quant.quantize_array(w, bits=requested.bits, axis=target.axis,
                                      contracted=target.contracted,
                                      group_size=requested.group_size)
      specs[entry.ours] = requested
      requantized[types] += 1
    params[entry.ours], params[entry.ours + quant.SCALE_SUFFIX] = q, scale
  log.info('%s: weights by GGUF type: kept exactly as int%d in groups of %d: %s; requantized to '
           '%s: %s', os.path.basename(path), requested.bits, BLOCK, dict(kept) or 'none',
           _describe(requested), dict(requantized) or 'none')
  return model_from_params(config, params, dtype=dtype, param_dtype=param_dtype, source=path,
                           shardings=shardings, quantized=specs)


def _source(sources, name: str, shape, path: str):
  if name not in sources:
    raise ValueError(f'{path}: missing tensor {name!r} (expected shape {shape}).')
  if hf_shape(sources[name]) != tuple(shape):
    raise ValueError(f'{path}: tensor {name!r} has shape {hf_shape(sources[name])}, expected '
                     f'{shape}.')
  return sources[name]


def _describe(s: quant.QuantSpec) -> str:
  return f'int{s.bits} ' + (f'groups of {s.group_size}' if s.group_size else 'per channel')

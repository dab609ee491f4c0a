"""LoRA: low-rank adapters on the projection weights, trained while the base weights stay frozen.

`add_lora(model, rank, alpha)` gives each targeted weight W two factors (`nnx.LoRAParam`, float32):
A [stack..., in..., r] and B [stack..., r, out...], where `in` are the axes W contracts with its
input, `out` the others, and `stack` a leading axis of separate projections (k/v, q/k/v,
gate/up), each with its own pair as in PEFT; a MoE weight's expert axis likewise gives every
expert its own pair, applied to the rows routed to it. All of it follows from the weight's equation
(`layers.einsum_layout`): the weights a module declares in its `einsums` ({attribute: equation},
e.g. 'BTD,CKDH->CBTKH') are the targetable ones. The layers add `(alpha / r) * (x A) B` to their
output (gemma_jax.layers.with_lora). B starts at zero, so a fresh adapter changes nothing.
`merge_lora(model)` folds the factors into the weights: W + (alpha / r) * A B, a plain model.

Split a model with adapters as `nnx.split(model, nnx.LoRAParam, nnx.Param, ...)`: the first state
is what the trainer optimises, the second the frozen base.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_jax.layers import einsum_layout, fan_in_normal, weight
from gemma_jax.quant import SCALE_SUFFIX, QuantizedWeight
from gemma_jax.transformer import Transformer, param_name

DEFAULT_TARGETS = '.*'  # every attention and MLP projection (never the embedding / output head)


def _weights(model: Transformer):
  """(owner module, attribute, dotted name, equation) of every targetable weight."""
  for path, module in nnx.iter_modules(model):
    for attr, einsum_str in getattr(module, 'einsums', {}).items():
      yield module, attr, param_name(tuple(path) + (attr,)), einsum_str


def add_lora(model: Transformer, rank: int, alpha: float, *, targets: str = DEFAULT_TARGETS,
             rngs: nnx.Rngs | None = None) -> list[str]:
  """Gives every projection weight whose dotted name matches the regex `targets` a rank-`rank`
  adapter (A ~ N(0, 1/fan_in), B = 0, scale alpha / rank); returns the adapted weights' names.

  Raises ValueError for a rank < 1 or a pattern that matches no projection weight.
  """
  if rank < 1:
    raise ValueError(f'LoRA rank must be >= 1, got {rank}.')
  rngs = rngs or nnx.Rngs(0)
  regex = re.compile(targets)
  found = [w for w in _weights(model)
           if regex.search(w[2]) and not hasattr(w[0], f'{w[1]}_lora_a')]
  if not found:
    raise ValueError(f'LoRA targets {targets!r} match no projection weight; names look like '
                     "'layers.0.attn.q_einsum.w' or 'layers.0.mlp.linear'.")
  for module, attr, _, einsum_str in found:
    var = getattr(module, attr)
    axes = var.get_metadata()['logical_axes']
    lay = einsum_layout(einsum_str)
    stack = list(lay.group) + list(lay.stack)
    ins, outs = list(lay.contracted), list(lay.produced)
    shape = var.shape
    a_shape = [shape[i] for i in stack + ins] + [rank]
    b_shape = [shape[i] for i in stack] + [rank] + [shape[i] for i in outs]
    a_axes = tuple(axes[i] for i in stack + ins) + (None,)
    b_axes = tuple(axes[i] for i in stack) + (None,) + tuple(axes[i] for i in outs)
    fan_in = list(range(len(stack), len(stack) + len(ins)))
    a = fan_in_normal(fan_in)(rngs.params(), tuple(a_shape), jnp.float32)
    setattr(module, f'{attr}_lora_a', nnx.LoRAParam(a, logical_axes=a_axes))
    setattr(module, f'{attr}_lora_b', nnx.LoRAParam(jnp.zeros(b_shape, jnp.float32),
                                                    logical_axes=b_axes))
    setattr(module, f'{attr}_lora_scale', float(alpha) / rank)
  return [name for _, _, name, _ in found]


def lora_delta(einsum_str: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """A B laid out like the weight of projection `einsum_str` (float32)."""
  lay = einsum_layout(einsum_str)
  stack = list(lay.group) + list(lay.stack)
  ins, outs = list(lay.contracted), list(lay.produced)
  r = len(lay.w)  # an axis label no weight axis uses
  return jnp.einsum(a, stack + ins + [r], b, stack + [r] + outs, list(range(len(lay.w))),
                    preferred_element_type=jnp.float32)


def merge_lora(model: Transformer) -> list[str]:
  """Folds every adapter into its weight, W += scale * A B (in W's dtype), and removes the
  factors, in place; returns the merged weights' names. The model is then a plain Transformer.
  A quantized base weight (QLoRA) becomes a float32 one: dequantized W plus the update
  (`gemma_jax.quant.quantize` requantizes the merged model when wanted)."""
  merged = []
  for module, attr, name, einsum_str in list(_weights(model)):
    if not hasattr(module, f'{attr}_lora_a'):
      continue
    var = getattr(module, attr)
    a, b = getattr(module, f'{attr}_lora_a'), getattr(module, f'{attr}_lora_b')
    delta = lora_delta(einsum_str, a[...], b[...]) * getattr(module, f'{attr}_lora_scale')
    if isinstance(var, QuantizedWeight):
      w = weight(module, attr, jnp.float32) + delta
      setattr(module, attr, nnx.Param(w, logical_axes=var.get_metadata().get('logical_axes')))
      delattr(module, attr + SCALE_SUFFIX)
    else:
      var.set_value((var[...].astype(jnp.float32) + delta).astype(var.dtype))
    for suffix in ('_lora_a', '_lora_b', '_lora_scale'):
      delattr(module, attr + suffix)
    merged.append(name)
  return merged

"""LoRA: low-rank adapters on the projection weights, trained while the base weights stay frozen.

`add_lora(model, rank, alpha)` gives each targeted weight W two factors (`nnx.LoRAParam`, float32):
A [stack..., in..., r] and B [stack..., r, out...], where `in` are the axes W contracts with its
input, `out` the others, and `stack` a leading axis of separate projections (k/v, q/k/v,
gate/up), each with its own pair as in PEFT. The layers add `(alpha / r) * (x A) B` to their
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

from gemma_jax.layers import fan_in_normal
from gemma_jax.transformer import Transformer, param_name

# Targetable weights: (module attribute path suffix) -> logical axes contracted with the input.
TARGETS = {
    ('q_einsum', 'w'): ('embed',),
    ('kv_einsum', 'w'): ('embed',),
    ('qkv_einsum', 'w'): ('embed',),
    ('attn_vec_einsum', 'w'): ('heads', 'head_dim'),
    ('mlp', 'gating_einsum'): ('embed',),
    ('mlp', 'linear'): ('mlp',),
}
DEFAULT_TARGETS = '.*'  # every attention and MLP projection (never the embedding / output head)


def _weights(model: Transformer):
  """(owner module, attribute, dotted name, input logical axes) of every targetable weight."""
  for path, module in model.iter_modules():
    for (owner, attr), in_axes in TARGETS.items():
      full = tuple(path) + (attr,)
      if full[-2:] == (owner, attr) and isinstance(getattr(module, attr, None), nnx.Param):
        yield module, attr, param_name(full), in_axes


def _factor_layout(axes: tuple, in_axes: tuple):
  """(stack, in, out) axis indices of a weight with logical `axes`."""
  stack = []
  for i, a in enumerate(axes):
    if a is not None:
      break
    stack.append(i)
  ins = [i for i, a in enumerate(axes) if a in in_axes]
  outs = [i for i in range(len(axes)) if i not in stack and i not in ins]
  return stack, ins, outs


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
  for module, attr, _, in_axes in found:
    var = getattr(module, attr)
    axes = var.get_metadata()['logical_axes']
    stack, ins, outs = _factor_layout(axes, in_axes)
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


def lora_delta(weight: nnx.Param, a: jax.Array, b: jax.Array, in_axes: tuple) -> jax.Array:
  """A B laid out like `weight` (float32)."""
  axes = weight.get_metadata()['logical_axes']
  stack, ins, outs = _factor_layout(axes, in_axes)
  r = len(axes)  # an axis label no weight axis uses
  return jnp.einsum(a, stack + ins + [r], b, stack + [r] + outs, list(range(len(axes))),
                    preferred_element_type=jnp.float32)


def merge_lora(model: Transformer) -> list[str]:
  """Folds every adapter into its weight, W += scale * A B (in W's dtype), and removes the
  factors, in place; returns the merged weights' names. The model is then a plain Transformer."""
  merged = []
  for module, attr, name, in_axes in list(_weights(model)):
    if not hasattr(module, f'{attr}_lora_a'):
      continue
    var = getattr(module, attr)
    a, b = getattr(module, f'{attr}_lora_a'), getattr(module, f'{attr}_lora_b')
    delta = lora_delta(var, a[...], b[...], in_axes) * getattr(module, f'{attr}_lora_scale')
    var.set_value((var[...].astype(jnp.float32) + delta).astype(var.dtype))
    for suffix in ('_lora_a', '_lora_b', '_lora_scale'):
      delattr(module, attr + suffix)
    merged.append(name)
  return merged

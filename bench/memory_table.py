"""Per-device memory of params + AdamW state under FSDP, and whole-model weight bytes of float and
quantized models, from abstract shapes only (no allocation).

    python bench/memory_table.py     # Gemma 1 2B, 7B; Gemma 4 E2B, E4B, 26B-A4B, 31B; fsdp 1, 8, 64
                                     # then weights: gemma3-270m, gemma1-7b, gemma3-27b, gemma4-31b
    python bench/memory_table.py --presets gemma2-9b --meshes 1,8,1 1,1,8 2,4,1 --quant_presets
    python bench/memory_table.py --presets --quant_presets gemma4-26b-a4b --group_size 64

Meshes are `jax.sharding.AbstractMesh`es, so any size works on a laptop. Shardings come from the
default rules of gemma_jax.sharding (MoE expert weights: E over fsdp, each device storing
E / fsdp experts); 'ideal' is the unsharded total divided by the device count. 'experts' is the
part of the total that belongs to MoE expert weights (params + AdamW moments). Activations,
gradients and the compiled program's temporaries are not counted.

The weights table gives `gemma_jax.quant.param_bytes` of the whole model (one device, nothing
sharded) stored as float32, bf16, int8 (groups of 32) and int4 (groups of --group_size,
default 32; two values per byte), and bytes per parameter. The quantized models are bf16 models
passed through `quant.quantize` under `nnx.eval_shape`: projection weights and embedding tables
in low bits with float32 scales, norms left in bf16. Where the int4 group size does not divide a
weight's group axis, quantize's error (naming the tensor) is printed under the table and the
int4 cell holds the largest halving of the group size that works.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AbstractMesh  # noqa: E402

from gemma_jax import quant  # noqa: E402
from gemma_jax import sharding as sh  # noqa: E402
from gemma_jax.config import get_preset  # noqa: E402
from gemma_jax.transformer import Transformer  # noqa: E402

GB = 1e9


def abstract_train_state(preset: str, param_dtype=jnp.float32):
  """{'params', 'opt_state'} as ShapeDtypeStructs inside nnx Variables (logical axes kept)."""
  model = nnx.eval_shape(lambda: Transformer(get_preset(preset), rngs=nnx.Rngs(0),
                                             param_dtype=param_dtype))
  params = nnx.state(model, nnx.Param)
  return {'params': params, 'opt_state': jax.eval_shape(optax.adamw(1e-4).init, params)}


def _expert_variables(state) -> list[nnx.Variable]:
  """The Variables (params and optimiser moments) whose logical axes include 'expert'."""
  leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return [v for v in leaves if isinstance(v, nnx.Variable)
          and 'expert' in (v.get_metadata().get('logical_axes') or ())]


def rows(presets, meshes):
  """One row per (preset, mesh): sizes in bytes per device."""
  for preset in presets:
    state = abstract_train_state(preset)
    experts = _expert_variables(state)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state['params']))
    single = AbstractMesh((1, 1, 1), sh.MESH_AXES)
    total = sh.per_device_bytes(state, single)
    for shape in meshes:
      mesh = AbstractMesh(shape, sh.MESH_AXES)
      params = sh.per_device_bytes(state['params'], mesh)
      opt = sh.per_device_bytes(state['opt_state'], mesh)
      yield dict(preset=preset, n_params=n_params, mesh=shape, devices=math.prod(shape),
                 params=params, opt=opt, total=params + opt,
                 experts=sh.per_device_bytes(experts, mesh),
                 ratio=(params + opt) / (total / math.prod(shape)))


def abstract_model(preset: str, param_dtype=jnp.float32, mode: str | None = None,
                   group_size: int | None = None):
  """The preset's Transformer as ShapeDtypeStructs, quantized to `mode` when given."""

  def make():
    model = Transformer(get_preset(preset), rngs=nnx.Rngs(0), param_dtype=param_dtype)
    return quant.quantize(model, mode, group_size) if mode else model

  return nnx.eval_shape(make)


def int4_bytes(preset: str, group_size: int | None):
  """(bytes, group size used, error or None): int4 at `group_size` (None: quant's default), or
  when that does not divide some weight, at the first halving of it that does."""
  g = quant.DEFAULT_GROUP_SIZE['int4'] if group_size is None else group_size
  error = None
  while True:
    try:
      return quant.param_bytes(abstract_model(preset, jnp.bfloat16, 'int4', g)), g, error
    except ValueError as e:
      error = error or str(e)
      if g <= 2:
        raise
      g //= 2


def weight_rows(presets, group_size=None):
  """One row per preset: parameter count and bytes as float32, bf16, int8 and int4."""
  for preset in presets:
    f32 = quant.param_bytes(abstract_model(preset))
    n_params = f32 // 4
    int4, group, error = int4_bytes(preset, group_size)
    yield dict(preset=preset, n_params=n_params, float32=f32,
               bf16=quant.param_bytes(abstract_model(preset, jnp.bfloat16)),
               int8=quant.param_bytes(abstract_model(preset, jnp.bfloat16, 'int8')),
               int4=int4, group=group, error=error)


def print_memory_table(presets, meshes):
  """The per-device memory table (module docstring), a row per (preset, mesh)."""
  print('| preset | params | mesh (data,fsdp,tensor) | devices | params GB/dev | AdamW GB/dev '
        '| total GB/dev | of which experts | / ideal |')
  print('|---|---|---|---|---|---|---|---|---|')
  for r in rows(presets, meshes):
    print(f"| {r['preset']} | {r['n_params'] / 1e9:.2f}B | {r['mesh']} | {r['devices']} "
          f"| {r['params'] / GB:.3f} | {r['opt'] / GB:.3f} | {r['total'] / GB:.3f} "
          f"| {r['experts'] / GB:.3f} | {r['ratio']:.4f} |")



def print_weight_table(presets, group_size=None):
  """The weights table (module docstring), a row per preset; int4 errors under it."""
  g = quant.DEFAULT_GROUP_SIZE['int4'] if group_size is None else group_size
  kinds = ('float32', 'bf16', 'int8', 'int4')
  print(f'| preset | params | float32 GB | bf16 GB | int8 GB | int4 (groups of {g}) GB '
        '| bytes / param: float32, bf16, int8, int4 |')
  print('|---|---|---|---|---|---|---|')
  errors = []
  for r in weight_rows(presets, group_size):
    cells = [f'{r[k] / GB:.3f}' for k in kinds]
    if r['error']:
      cells[-1] += f' (groups of {r["group"]})'
      errors.append(f'{r["preset"]}: int4 groups of {g}: {r["error"]} Groups of {r["group"]} work.')
    per_param = ', '.join(f'{r[k] / r["n_params"]:.3f}' for k in kinds)
    print(f"| {r['preset']} | {r['n_params'] / 1e9:.2f}B | " + ' | '.join(cells)
          + f' | {per_param} |')
  for e in errors:
    print(f'\n{e}')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--presets', nargs='*', default=[
      'gemma1-2b', 'gemma1-7b', 'gemma4-e2b', 'gemma4-e4b', 'gemma4-26b-a4b', 'gemma4-31b'])
  parser.add_argument('--meshes', nargs='+', default=['1,1,1', '1,8,1', '1,64,1'],
                      help='data,fsdp,tensor sizes')
  parser.add_argument('--quant_presets', nargs='*', default=[
      'gemma3-270m', 'gemma1-7b', 'gemma3-27b', 'gemma4-31b'],
                      help='presets of the weights table (float32, bf16, int8, int4 bytes)')
  parser.add_argument('--group_size', type=int, help='int4 group size (default: quant\'s, 32)')
  args = parser.parse_args(argv)
  meshes = [tuple(int(s) for s in m.split(',')) for m in args.meshes]
  if args.presets:
    print_memory_table(args.presets, meshes)
  if args.presets and args.quant_presets:
    print()
  if args.quant_presets:
    print_weight_table(args.quant_presets, args.group_size)


if __name__ == '__main__':
  main()

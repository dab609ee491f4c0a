"""Per-device memory of params + AdamW state under FSDP, from abstract shapes only (no allocation).

    python bench/memory_table.py     # Gemma 1 2B, 7B; Gemma 4 E2B, E4B, 26B-A4B, 31B; fsdp 1, 8, 64
    python bench/memory_table.py --presets gemma2-9b --meshes 1,8,1 1,1,8 2,4,1

Meshes are `jax.sharding.AbstractMesh`es, so any size works on a laptop. Shardings come from the
default rules of gemma_jax.sharding (MoE expert weights: E over fsdp, each device storing
E / fsdp experts); 'ideal' is the unsharded total divided by the device count. 'experts' is the
part of the total that belongs to MoE expert weights (params + AdamW moments). Activations,
gradients and the compiled program's temporaries are not counted.
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


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--presets', nargs='+', default=[
      'gemma1-2b', 'gemma1-7b', 'gemma4-e2b', 'gemma4-e4b', 'gemma4-26b-a4b', 'gemma4-31b'])
  parser.add_argument('--meshes', nargs='+', default=['1,1,1', '1,8,1', '1,64,1'],
                      help='data,fsdp,tensor sizes')
  args = parser.parse_args(argv)
  meshes = [tuple(int(s) for s in m.split(',')) for m in args.meshes]
  print('| preset | params | mesh (data,fsdp,tensor) | devices | params GB/dev | AdamW GB/dev '
        '| total GB/dev | of which experts | / ideal |')
  print('|---|---|---|---|---|---|---|---|---|')
  for r in rows(args.presets, meshes):
    print(f"| {r['preset']} | {r['n_params'] / 1e9:.2f}B | {r['mesh']} | {r['devices']} "
          f"| {r['params'] / GB:.3f} | {r['opt'] / GB:.3f} | {r['total'] / GB:.3f} "
          f"| {r['experts'] / GB:.3f} | {r['ratio']:.4f} |")


if __name__ == '__main__':
  main()

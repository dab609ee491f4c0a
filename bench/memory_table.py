"""Per-device memory of params + AdamW state under FSDP, from abstract shapes only (no allocation).

    python bench/memory_table.py                       # gemma1-2b, gemma1-7b at fsdp 1, 8, 64
    python bench/memory_table.py --presets gemma2-9b --meshes 1,8,1 1,1,8 2,4,1

Meshes are `jax.sharding.AbstractMesh`es, so any size works on a laptop. Shardings come from the
default rules of gemma_jax.sharding; 'ideal' is the unsharded total divided by the device count.
Activations, gradients and the compiled program's temporaries are not counted.
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


def rows(presets, meshes):
  """One row per (preset, mesh): sizes in bytes per device."""
  for preset in presets:
    state = abstract_train_state(preset)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state['params']))
    single = AbstractMesh((1, 1, 1), sh.MESH_AXES)
    total = sh.per_device_bytes(state, single)
    for shape in meshes:
      mesh = AbstractMesh(shape, sh.MESH_AXES)
      params = sh.per_device_bytes(state['params'], mesh)
      opt = sh.per_device_bytes(state['opt_state'], mesh)
      yield dict(preset=preset, n_params=n_params, mesh=shape, devices=math.prod(shape),
                 params=params, opt=opt, total=params + opt,
                 ratio=(params + opt) / (total / math.prod(shape)))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--presets', nargs='+', default=['gemma1-2b', 'gemma1-7b'])
  parser.add_argument('--meshes', nargs='+', default=['1,1,1', '1,8,1', '1,64,1'],
                      help='data,fsdp,tensor sizes')
  args = parser.parse_args(argv)
  meshes = [tuple(int(s) for s in m.split(',')) for m in args.meshes]
  print('| preset | params | mesh (data,fsdp,tensor) | devices | params GB/dev | AdamW GB/dev '
        '| total GB/dev | / ideal |')
  print('|---|---|---|---|---|---|---|---|')
  for r in rows(args.presets, meshes):
    print(f"| {r['preset']} | {r['n_params'] / 1e9:.2f}B | {r['mesh']} | {r['devices']} "
          f"| {r['params'] / GB:.3f} | {r['opt'] / GB:.3f} | {r['total'] / GB:.3f} "
          f"| {r['ratio']:.4f} |")


if __name__ == '__main__':
  main()

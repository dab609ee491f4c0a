"""GPU check: cuDNN flash attention path == XLA path (logits and grads), and their speed.

Run on a GPU machine:  python bench/attention_check.py
Prints a table; exits non-zero if the two paths disagree beyond bf16 tolerance.
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_jax.config import AttentionType, get_preset
from gemma_jax.transformer import Transformer


def run(impl, model, tokens, positions, segments):
  for block in model.layers:  # the kernel is part of the model (and so of its graphdef)
    block.attn.impl = impl
  graphdef, state = nnx.split(model)

  def loss(st):
    logits, _ = nnx.merge(graphdef, st)(tokens, positions, segments)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

  fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (value, logits), grads = fn(state)
  jax.block_until_ready(grads)
  t0 = time.perf_counter()
  for _ in range(5):
    out = fn(state)
  jax.block_until_ready(out)
  return logits, grads, (time.perf_counter() - t0) / 5


def main():
  print(f'devices: {jax.devices()}')
  ok = True
  rows = []
  two_layers = dict(num_layers=2, attention_types=(AttentionType.LOCAL, AttentionType.GLOBAL))
  cases = [('tiny-gemma1', 2, 64, {}), ('tiny-gemma3', 2, 64, {}),
           # Real attention shapes, 2 layers (one local, one global) to keep compiles short.
           ('gemma1-2b', 4, 2048, dict(num_layers=2, attention_types=(AttentionType.GLOBAL,) * 2)),
           ('gemma3-1b', 4, 2048, two_layers)]
  for name, B, T, changes in cases:
    config = get_preset(name).replace(**changes)
    model = Transformer(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(4, 500, (B, T)), jnp.int32)
    cut = T // 3  # row 0 packs two examples; row 1 ends in padding
    segments = np.ones((B, T), np.int32)
    segments[0, cut:] = 2
    segments[1, T - 5:] = 0
    positions = np.tile(np.arange(T), (B, 1))
    positions[0, cut:] -= cut
    positions, segments = jnp.asarray(positions), jnp.asarray(segments)
    lx, gx, tx = run('xla', model, tokens, positions, segments)
    lc, gc, tc = run('cudnn', model, tokens, positions, segments)
    valid = np.asarray(segments != 0)
    err = float(jnp.max(jnp.abs(lx - lc)[valid]) / jnp.max(jnp.abs(lx)[valid]))
    gerr = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-12))
               for a, b in zip(jax.tree.leaves(gx), jax.tree.leaves(gc)))
    ok &= err < 3e-2 and gerr < 5e-2
    rows.append((name, B, T, err, gerr, tx * 1e3, tc * 1e3))
  print(f'{"model (L<=2)":<12} {"B":>2} {"T":>5} {"logit rel err":>13} {"grad rel err":>12} '
        f'{"xla ms":>8} {"cudnn ms":>8}')
  for r in rows:
    print(f'{r[0]:<12} {r[1]:>2} {r[2]:>5} {r[3]:>13.2e} {r[4]:>12.2e} {r[5]:>8.2f} {r[6]:>8.2f}')
  print('cudnn path', 'AGREES' if ok else 'DISAGREES', 'with xla')
  sys.exit(0 if ok else 1)


if __name__ == '__main__':
  main()

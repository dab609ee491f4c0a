"""Quality of weight-only quantization on the real Gemma 3 270M: teacher-forced next-token top-1
agreement with the float model and mean KL(float || quantized) over held-out text
(data/heldout_text.txt), for int8 and int4 at several group sizes. This measurement chose the
int4 default group size (gemma_jax.quant.DEFAULT_GROUP_SIZE).

  python bench/quant_quality.py [--gguf PATH] [--variants int8:0,int8:32,int4:32,int4:128]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax.numpy as jnp
from flax import nnx

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELDOUT = os.path.join(_REPO, 'data', 'heldout_text.txt')


def heldout_tokens(tokenizer, path: str = HELDOUT) -> jnp.ndarray:
  """[1, T]: BOS and the held-out text (paragraphs joined as in the file)."""
  with open(path) as f:
    return jnp.asarray([tokenizer.encode(f.read(), add_bos=True)], jnp.int32)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--gguf', help='the Gemma 3 270M .gguf (default: the bundled package)')
  p.add_argument('--variants', default='int8:0,int8:128,int8:32,int4:0,int4:128,int4:64,int4:32',
                 help='MODE:GROUP_SIZE list (group size 0: per output channel)')
  args = p.parse_args(argv)
  from gemma_jax import quant
  from gemma_jax.convert import load_gguf
  if args.gguf is None:
    from gemma_jax.initial_weights import gguf_package_path
    args.gguf = gguf_package_path()
  model, tokenizer = load_gguf(args.gguf)
  tokens = heldout_tokens(tokenizer)
  ref, _ = model(tokens)
  float_bytes = quant.param_bytes(model)
  print(f'Gemma 3 270M, {tokens.shape[1]} held-out tokens ({HELDOUT}); float32 parameters '
        f'{float_bytes / 2**20:.1f} MiB', file=sys.stderr)
  variants = [(v.split(':')[0], int(v.split(':')[1])) for v in args.variants.split(',')]
  print('| weights | group | top-1 agreement | mean KL (nats) | bytes vs float32 |')
  print('|---|---|---|---|---|')
  for mode, group in variants:
    start = time.time()
    q = quant.quantize(nnx.merge(*nnx.split(model)), mode, group)
    got, _ = q(tokens)
    a = quant.agreement(ref[0, :-1], got[0, :-1])
    g = quant.spec(mode, group).group_size
    print(f'| {mode} | {g or "per channel"} | {100 * a["top1"]:.1f}% of {a["positions"]} | '
          f'{a["kl"]:.4f} | {quant.param_bytes(q) / float_bytes:.3f} |', flush=True)
    print(f'  ({time.time() - start:.1f}s)', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())

r"""Decode throughput of one model with float, int8 and int4 weights (gemma_jax.quant), in one run.

  python bench/quant_bench.py                  # CPU: the real Gemma 3 270M (GGUF), float32 vs
                                               # int8 vs int4, batch 1 and 8
  python bench/quant_bench.py --preset gemma1-7b   # GPU (default when JAX sees one): random bf16
                                               # weights, prompt 128, 256 new tokens, batch 1, 16
  python bench/quant_bench.py --preset tiny-gemma1 --dtype bfloat16 --batch 1,16 \
      --new_tokens 8 --modes float,int8:16,int4:16    # the GPU run's code on CPU in seconds (H 16)
  python bench/quant_bench.py --modes float,int4:64,int4:32     # int4 group sizes side by side

Each mode is the float model quantized in place by `gemma_jax.quant.quantize` (a copy of it:
the float model stays for the next mode): `float` (the model's own dtype: float32 on CPU, bf16
on GPU), `int8` and `int4` (at quant's default: groups of 32), or `MODE:G` for group size G (0:
per output channel). A mode whose group size does not divide a weight prints quantize's error
in its rows and the others still run.

tokens/s is timed as in bench/sample_bench.py (whose helpers this reuses): batch x new tokens /
wall time of one whole greedy Sampler call (prefill included), median of --repeats calls after a
warm-up call. Per mode the table gives the ratio against float at the same batch, whether the
greedy tokens equal float's (quantization changes logits a little, so near-ties may flip),
the parameter bytes (`quant.param_bytes`: low-bit values, scales, norms) and bytes per parameter,
and the fraction of the weight-bytes roofline: a decode step that reads every weight once
(the tied embedding as the output head; Gemma 4's per-layer input table is only looked up and
is left out; not given for MoE presets, whose steps read only the routed experts) takes
weight bytes / bandwidth, so the roofline is batch x bandwidth / weight bytes tokens/s. KV-cache
reads are not counted (they grow with the batch and the position). The bandwidth is
sample_bench's copy bandwidth (bytes read + written by a jitted elementwise pass) over
--bandwidth_mib MiB (0: no roofline column, the CPU default: on a CPU that pass measures less
than the matmuls stream, and a shared machine makes it vary by several times).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sample_bench import (START, _default_gguf, agreement, copy_bandwidth, log,  # noqa: E402
                          ours, random_config, spread_post_norms)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from gemma_jax import quant  # noqa: E402

LOOKUP_TABLES = ('per_layer_input_embedding',)  # read a row per token, not whole, per step


def parse_mode(text):
  """'float' -> ('float', None); 'int8' / 'int4' -> (mode, None: quant's default group size);
  'int4:64' -> ('int4', 64). Raises SystemExit naming --modes otherwise."""
  name, _, group = text.partition(':')
  if name == 'float' and not group:
    return name, None
  if name not in quant.MODES or (group and not group.isdigit()):
    raise SystemExit(f'--modes: {text!r} is not float, int8, int4 or MODE:GROUP_SIZE '
                     f'(e.g. int4:64).')
  return name, int(group) if group else None


def mode_label(mode, group, float_name):
  """The table's name of a mode: the float dtype, or e.g. 'int4 (groups of 32)'."""
  if mode == 'float':
    return float_name
  g = quant.DEFAULT_GROUP_SIZE[mode] if group is None else group
  return f'{mode} ({f"groups of {g}" if g else "per channel"})'


def weight_bytes_per_step(model):
  """Bytes a decode step reads if it reads each weight once: the parameter bytes less the
  looked-up tables (module docstring)."""
  total = quant.param_bytes(model)
  embedder = getattr(model, 'embedder', None)
  for name in LOOKUP_TABLES:
    for attr in (name, name + quant.SCALE_SUFFIX):
      var = getattr(embedder, attr, None)
      if var is not None:
        value = var.get_value()
        total -= value.size * value.dtype.itemsize
  return total


def load(args):
  """(model, float name, prompts, description): the real Gemma 3 270M on CPU without --preset,
  else random weights of --preset in --dtype with a distinct random prompt per row."""
  dtype = jnp.dtype(args.dtype)
  float_name = 'bf16' if dtype == jnp.bfloat16 else str(dtype)
  if not args.preset:
    from gemma_jax.convert.gguf import load_gguf
    path = args.gguf or _default_gguf()
    log(f'loading {path}')
    model, tokenizer = load_gguf(path, dtype=dtype)
    text = 'The history of the printing press begins in the fifteenth century, when ' * 8
    prompt = tokenizer.encode(text)[:args.prompt_len]
    what = f'Gemma 3 270M from {os.path.basename(path)}, dequantised to {float_name}'
    return model, float_name, prompt, what
  from gemma_jax.transformer import Transformer
  mc = random_config(args.preset, args.layers)
  mc = mc.replace(max_seq_len=max(mc.max_seq_len, args.prompt_len + args.new_tokens))
  model = Transformer(mc, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)
  spread_post_norms(model)
  prompts = np.random.default_rng(0).integers(3, mc.vocab_size,
                                              (max(args.batch), args.prompt_len)).tolist()
  for p in prompts:
    p[0] = 2  # BOS
  what = f'{mc.name} ({mc.num_layers} layers), random {float_name} weights'
  return model, float_name, prompts, what


def measure(args, model, prompts, float_name):
  """{(label, batch): seconds or error text}, {(label, batch): greedy tokens}, {label: (param
  bytes, step bytes)}, labels in order, {label: quantize's error}."""
  seconds, tokens, sizes, labels, errors = {}, {}, {}, [], {}
  cache_length = args.prompt_len + args.new_tokens
  for text in args.modes:
    mode, group = parse_mode(text)
    label = mode_label(mode, group, float_name)
    labels.append(label)
    try:
      variant = model if mode == 'float' else quant.quantize(nnx.clone(model), mode, group)
    except ValueError as e:  # e.g. a group size that does not divide a weight: named in e
      log(f'{label}: {e}')
      errors[label] = str(e)
      for b in args.batch:
        seconds[(label, b)] = 'quantize failed (below)'
      continue
    sizes[label] = (quant.param_bytes(variant), weight_bytes_per_step(variant))
    log(f'{label}: {quant.describe(variant)}')
    for b in args.batch:
      if time.perf_counter() - START > args.budget_s:
        seconds[(label, b)] = 'skipped (time budget)'
        continue
      keep = tokens.setdefault((label, b), [])
      try:
        seconds[(label, b)] = ours(variant, prompts, b, args.new_tokens, cache_length,
                                   args.repeats, keep)
        log(f'{label} batch {b}: {b * args.new_tokens / seconds[(label, b)]:.1f} tokens/s')
      except Exception as e:  # one mode failing must not lose the others' numbers
        log(f'{label} batch {b} failed: {type(e).__name__}: {e}')
        seconds[(label, b)] = f'failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}'
    del variant
  return seconds, tokens, sizes, labels, errors


def print_table(args, seconds, tokens, sizes, labels, errors, n_params, bandwidth, moe):
  """The markdown table (module docstring) and, when measured, the issue's int8 batch-1 goal."""
  base = labels[0] if parse_mode(args.modes[0])[0] == 'float' else None
  roofline = bandwidth and not moe
  head = ['weights', 'batch', 'tokens/s', 'ms / step', f'vs {base}' if base else None,
          f'greedy tokens as {base}' if base else None, 'param MB', 'bytes / param',
          '% of weight-bytes roofline' if roofline else None]
  head = [h for h in head if h]
  print('| ' + ' | '.join(head) + ' |')
  print('|' + '---|' * len(head))
  for label in labels:
    for b in args.batch:
      s = seconds[(label, b)]
      total, step = sizes.get(label, (None, None))
      cells = [label, str(b)]
      if isinstance(s, str):
        cells += [s, '']
      else:
        cells += [f'{b * args.new_tokens / s:,.1f}', f'{1000 * s / args.new_tokens:.2f}']
      if base:
        ref = seconds.get((base, b))
        both = not isinstance(s, str) and not isinstance(ref, (str, type(None)))
        cells += [f'{ref / s:.2f}x' if both else '',
                  agreement(tokens[(label, b)], tokens[(base, b)]) if both and label != base
                  else '']
      cells += [f'{total / 1e6:,.2f}' if total else '',
                f'{total / n_params:.3f}' if total else '']
      if roofline:
        ok = step and not isinstance(s, str)
        cells += [f'{100 * (b * args.new_tokens / s) / (b * bandwidth / step):.1f}%'
                  if ok else '']
      print('| ' + ' | '.join(cells) + ' |')
  for label, e in errors.items():
    print(f'\n{label}: {e}')
  int8 = next((lb for lb in labels if lb.startswith('int8')), None)
  b1 = min(args.batch)
  if base and int8 and not any(isinstance(seconds[(k, b1)], str) for k in (base, int8)):
    ratio = seconds[(base, b1)] / seconds[(int8, b1)]
    print(f'\n{int8} at batch {b1}: {ratio:.2f}x {base} (issue 12 goal: >= 1.6x at batch 1)')


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--gpu', action='store_true', help='GPU defaults (default when JAX has a GPU)')
  p.add_argument('--cpu', action='store_true', help='CPU defaults even when a GPU is present')
  p.add_argument('--preset', help='random weights of this preset (default on GPU: gemma1-7b; on '
                 'CPU: the real Gemma 3 270M); also sample_bench.py\'s bench-gemma4-moe')
  p.add_argument('--layers', type=int, default=0, help="only this many of the preset's layers")
  p.add_argument('--gguf', help='CPU: the Gemma 3 270M GGUF (default: artifacts/, assembled once)')
  p.add_argument('--modes', default='float,int8,int4',
                 help='comma-separated: float, int8, int4, or MODE:GROUP_SIZE (e.g. int4:64)')
  p.add_argument('--dtype', help='float weights and compute dtype (default bfloat16 on GPU, '
                 'float32 on CPU)')
  p.add_argument('--batch', help='comma-separated batch sizes (default 1,16 on GPU, 1,8 on CPU)')
  p.add_argument('--prompt_len', type=int, help='prompt tokens (default 128 on GPU, 32 on CPU)')
  p.add_argument('--new_tokens', type=int, help='tokens generated per row (256 GPU, 64 CPU)')
  p.add_argument('--repeats', type=int, default=3, help='timed calls per row (median)')
  p.add_argument('--budget_s', type=float, help='skip rows started after this many seconds '
                 '(default 300 on GPU, 1500 on CPU)')
  p.add_argument('--bandwidth_mib', type=int, help='MiB copied to measure the memory bandwidth '
                 'of the roofline column (default 2048 on GPU, 0 on CPU: no roofline)')
  args = p.parse_args(argv)
  gpu = args.gpu or (not args.cpu and jax.devices()[0].platform == 'gpu')
  defaults = (dict(preset='gemma1-7b', dtype='bfloat16', batch='1,16', prompt_len=128,
                   new_tokens=256, budget_s=300, bandwidth_mib=2048) if gpu else
              dict(preset=None, dtype='float32', batch='1,8', prompt_len=32, new_tokens=64,
                   budget_s=1500, bandwidth_mib=0))
  for k, v in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  args.batch = [int(b) for b in str(args.batch).split(',')]
  args.modes = args.modes.split(',')
  for m in args.modes:
    parse_mode(m)  # flag errors before any model is built
  model, float_name, prompts, what = load(args)
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  bandwidth = copy_bandwidth(args.bandwidth_mib << 20) if args.bandwidth_mib else None
  if bandwidth:
    log(f'copy bandwidth: {bandwidth / 1e9:.1f} GB/s')
  results = measure(args, model, prompts, float_name)
  where = jax.devices()[0].device_kind if gpu else f'CPU ({os.cpu_count()} cores)'
  bw = f'; copy bandwidth {bandwidth / 1e9:,.1f} GB/s' if bandwidth else ''
  print(f'\n{where}: {what} ({n_params / 1e6:,.1f} M params), prompt {args.prompt_len}, '
        f'{args.new_tokens} new tokens, greedy; jax {jax.__version__}; median of {args.repeats} '
        f'calls after a warm-up{bw}\n')
  print_table(args, *results, n_params, bandwidth,
              bool(model.config.num_experts))


if __name__ == '__main__':
  main()

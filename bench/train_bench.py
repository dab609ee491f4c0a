r"""Training-step throughput and MFU: our jitted train step next to transformers + torch.

  python bench/train_bench.py                         # GPU: gemma1-2b, seq 2048, bf16, batch 8
  python bench/train_bench.py --preset=tiny-gemma1 --seq=64 --batch=2 --steps=3   # CPU smoke test
  python bench/train_bench.py --batch=8,16 --loss_chunk=512 --sides=ours   # head-fused loss
  python bench/train_bench.py --preset=gemma4-26b-a4b --layers=6 --batch=4  # 26B-A4B-shaped layers
  python bench/train_bench.py --check_flops   # the FLOP count against the Gemma 1-3 formula and HF

Both sides train the same architecture from random weights on random tokens (every token a
target), one AdamW step per iteration (weight decay 0.01, clipping at 1.0), and report the median
of --steps timed steps after --warmup untimed ones. Each (side, batch size) runs in its own
subprocess, so an out-of-memory failure of one is reported in the table and the others still run.

FLOPs per token = 6 x (active matmul parameters) + sum over layers of 6 x N x H_layer x T (causal
attention, forward and backward; every layer counted over the whole causal context, sliding
window or not). Matmul parameters are read from the model itself (abstract, `nnx.eval_shape`):
every weight of 2 or more dimensions (the tied embedding counted once, as the output head) except
Gemma 4's per-layer input table (a lookup); MoE expert weights count top_k / num_experts of their
size (the experts a token is routed to). MFU = tokens/s x FLOPs per token / --peak_tflops
(989: an H100/H200's dense bf16 peak). Ours: --param_dtype bfloat16 (default, "pure bf16" like
the transformers side, whose parameters and AdamW moments are bf16) or float32 (master weights
with bf16 compute, what configs/*_sft.py train with). transformers: eager model with its
default (SDPA) attention (and, for MoE, its default experts implementation),
`torch.optim.AdamW(fused=True)` on GPU. --layers N keeps a preset's shapes but only N layers
(its local/global period kept; Gemma 4's last layer global), on both sides.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# Matmul weights that are looked up, not multiplied: Gemma 4's per-layer input table.
LOOKUP_WEIGHTS = ('embedder.per_layer_input_embedding',)
# MoE expert weights: each token uses top_k of the num_experts slices.
EXPERT_WEIGHTS = ('moe.gating_einsum', 'moe.linear')


def bench_model_config(preset: str, layers: int = 0):
  """The preset's ModelConfig, or with `layers` > 0 the same shapes with only that many layers:
  the preset's local/global period kept (Gemma 4: `gemma4_pattern`, the last layer global) and
  Gemma 4's KV-shared layers scaled to the same fraction of the layers."""
  from gemma_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  mc = config_lib.get_preset(preset)
  if not layers or layers == mc.num_layers:
    return mc
  if mc.family < 4:
    types = config_lib.layer_pattern(layers, config_lib.PATTERN_PERIOD[mc.family])
  else:
    types = config_lib.gemma4_pattern(layers, gemma4_period(mc))
  shared = mc.num_kv_shared_layers * layers // mc.num_layers
  try:
    return mc.replace(num_layers=layers, attention_types=types, num_kv_shared_layers=shared)
  except ValueError as e:
    raise SystemExit(f'--layers={layers} with --preset={preset}: {e}') from None


def gemma4_period(mc) -> int:
  """The local/global period of a Gemma 4 config (built by `gemma4_pattern`): the position of its
  first global layer, or all its layers when only the forced last one is global."""
  from gemma_jax.config import AttentionType  # pylint: disable=g-import-not-at-top
  return mc.attention_types.index(AttentionType.GLOBAL) + 1


def matmul_params(mc) -> float:
  """Active parameters that enter a matmul per token (see the module docstring), read from the
  abstract model: a fraction where experts are involved."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from gemma_jax.transformer import Transformer, flat_params  # pylint: disable=g-import-not-at-top
  model = nnx.eval_shape(lambda: Transformer(mc, rngs=nnx.Rngs(0)))
  total = 0.0
  for name, w in flat_params(model).items():
    if len(w.shape) < 2 or name in LOOKUP_WEIGHTS:
      continue
    size = float(math.prod(w.shape))
    if name.endswith(EXPERT_WEIGHTS):
      size *= mc.num_experts_per_token / mc.num_experts
    total += size
  return total


def attention_flops_per_token(mc, seq: int) -> float:
  """Causal attention, forward and backward: 6 x N x H x T per layer, each layer with its own H
  (Gemma 4's global layers: `global_head_dim`)."""
  return sum(6.0 * mc.num_heads * mc.layer_head_dim(t) * seq for t in mc.attention_types)


def flops_per_token(mc, seq: int) -> float:
  return 6.0 * matmul_params(mc) + attention_flops_per_token(mc, seq)


def _hf_matmul_params(mc) -> float:
  """The same count from transformers' model of `mc` (meta device: nothing allocated), by its
  own names: an independent reading of the architecture for `--check_flops`."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from gemma_jax.convert.hf import hf_config_from_config  # pylint: disable=g-import-not-at-top
  with torch.device('meta'):
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**hf_config_from_config(mc)))
  total = 0.0
  for name, p in model.named_parameters():  # the tied head appears once
    if p.ndim < 2 or name.endswith('embed_tokens_per_layer.weight'):
      continue
    scale = (mc.num_experts_per_token / mc.num_experts
             if name.endswith(('experts.gate_up_proj', 'experts.down_proj')) else 1.0)
    total += p.numel() * scale
  return total


def check_flops() -> None:
  """Asserts the model-derived count: equal to the Gemma 1-3 closed form (the formula this bench
  used before Gemma 4) for every Gemma 1-3 preset, and to transformers' parameters for Gemma 4."""
  from gemma_jax.config import PRESETS  # pylint: disable=g-import-not-at-top
  for name, mc in PRESETS.items():
    if mc.family < 4:
      D, F, N, K, H, L = (mc.embed_dim, mc.hidden_dim, mc.num_heads, mc.num_kv_heads,
                          mc.head_dim, mc.num_layers)
      closed = mc.vocab_size * D + L * (D * N * H * 2 + 2 * D * K * H + 3 * D * F)
      assert matmul_params(mc) == closed, (name, matmul_params(mc), closed)
      assert attention_flops_per_token(mc, 2048) == 6.0 * L * N * H * 2048, name
      print(f'{name}: {closed / 1e9:.4f} B matmul params, the Gemma 1-3 formula')
  for name, layers in (('tiny-gemma4', 0), ('tiny-gemma4-moe', 0), ('gemma4-e2b', 0),
                       ('gemma4-26b-a4b', 0), ('gemma4-26b-a4b', 6), ('gemma4-31b', 0)):
    mc = bench_model_config(name, layers)
    ours, hf = matmul_params(mc), _hf_matmul_params(mc)
    assert abs(ours - hf) <= 1e-9 * hf, (name, mc.num_layers, ours, hf)
    print(f'{name} ({mc.num_layers} layers): {ours / 1e9:.4f} B active matmul params, as '
          f'transformers; {flops_per_token(mc, 2048) / 1e9:.3f} GFLOP/token at T=2048')
  print('check_flops: OK')


def _batch(vocab: int, batch: int, seq: int, seed: int = 0):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab, (batch, seq + 1)).astype(np.int32)
  return {'tokens': ids[:, :-1], 'targets': ids[:, 1:], 'loss_mask': np.ones((batch, seq),
                                                                             np.float32),
          'positions': np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
          'segment_ids': np.ones((batch, seq), np.int32)}


def run_ours(args) -> dict:
  """Times gemma_jax's train step: the trainer's own train state (train_state.create_train_state)
  and step (trainer.make_train_step, jitted with shardings, donated)."""
  import jax  # pylint: disable=g-import-not-at-top
  from gemma_jax import distributed, sharding, train_state, trainer  # pylint: disable=g-import-not-at-top

  config = bench_config(args)
  mc = bench_model_config(args.preset, args.layers)
  mesh = sharding.make_mesh({'fsdp': -1})
  plan = train_state.plan_train_state(mc, config, mesh)
  state = train_state.create_train_state(plan, mc, config)
  step = trainer.jit_train_step(
      trainer.make_train_step(plan.graphdef, plan.rest, plan.tx, plan.schedule, mesh=mesh,
                              loss_chunk=args.loss_chunk),
      mesh, plan.abstract)
  batch = distributed.put_batch(_batch(mc.vocab_size, args.batch, args.seq), mesh)
  times = []
  for i in range(args.warmup + args.steps):
    t = time.perf_counter()
    state, metrics = step(state, batch)
    loss = float(metrics['loss'])  # waits for the step
    if i >= args.warmup:
      times.append(time.perf_counter() - t)
  stats = jax.devices()[0].memory_stats() or {}
  return {'step_s': statistics.median(times), 'loss': loss,
          'peak_gb': stats.get('peak_bytes_in_use', 0) / 1e9}


def bench_config(args):
  """The job config of a timed run: random init, AdamW (b2 0.95, weight decay 0.01 on every
  weight, constant learning rate), clipping at 1.0, the run's dtypes, remat and loss_chunk."""
  from gemma_jax import train_config  # pylint: disable=g-import-not-at-top
  return train_config.plain_config(**{
      'model.preset': args.preset, 'model.dtype': args.dtype, 'model.param_dtype': args.param_dtype,
      'model.remat': args.remat, 'loss_chunk': args.loss_chunk, 'learning_rate': 1e-5,
      'optimizer.b2': 0.95, 'optimizer.weight_decay': 0.01,
      'optimizer.weight_decay_exclude': '', 'optimizer.decay': 'constant',
      'optimizer.min_lr_ratio': 1.0})


def run_transformers(args) -> dict:
  """Times a transformers model of the same shapes: forward, loss, backward, AdamW step."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from gemma_jax.convert.hf import hf_config_from_config  # pylint: disable=g-import-not-at-top

  mc = bench_model_config(args.preset, args.layers)
  cuda = torch.cuda.is_available()
  device = 'cuda' if cuda else 'cpu'
  dtype = {'bfloat16': torch.bfloat16, 'float32': torch.float32}[args.param_dtype]
  hf_config = transformers.AutoConfig.for_model(**hf_config_from_config(mc))
  torch.manual_seed(0)
  with torch.device(device):
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8,
                          weight_decay=0.01, fused=cuda)
  b = _batch(mc.vocab_size, args.batch, args.seq)
  ids = torch.as_tensor(b['tokens'], dtype=torch.long, device=device)
  targets = torch.as_tensor(b['targets'], dtype=torch.long, device=device)
  times = []
  for i in range(args.warmup + args.steps):
    if cuda:
      torch.cuda.synchronize()
    t = time.perf_counter()
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    value = loss.item()  # waits for the step
    if i >= args.warmup:
      times.append(time.perf_counter() - t)
  peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0
  return {'step_s': statistics.median(times), 'loss': value, 'peak_gb': peak,
          'experts': getattr(model.config, '_experts_implementation', None)}


def _child(args) -> None:
  try:
    result = (run_ours if args.side == 'ours' else run_transformers)(args)
  except Exception as e:  # pylint: disable=broad-except
    text = f'{type(e).__name__}: {e}'
    oom = any(s in text for s in ('RESOURCE_EXHAUSTED', 'OutOfMemory', 'out of memory'))
    result = {'error': 'OOM' if oom else text.splitlines()[0][:200]}
  print('RESULT ' + json.dumps(result), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', default='gemma1-2b')
  parser.add_argument('--layers', type=int, default=0,
                      help="only this many of the preset's layers (0 = all), both sides")
  parser.add_argument('--seq', type=int, default=2048)
  parser.add_argument('--batch', default='8', help='comma-separated batch sizes, e.g. 4,8')
  parser.add_argument('--dtype', default='bfloat16', help='our compute dtype')
  parser.add_argument('--param_dtype', default='bfloat16', help='parameter dtype, both sides')
  parser.add_argument('--remat', default='none', help="ours: 'none' | 'dots' | 'full'")
  parser.add_argument('--loss_chunk', type=int, default=0,
                      help='ours: tokens per chunk of the head-fused loss (0 = whole logits)')
  parser.add_argument('--sides', default='ours,transformers')
  parser.add_argument('--steps', type=int, default=6)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--peak_tflops', type=float, default=989.0)
  parser.add_argument('--timeout', type=int, default=900, help='seconds per (side, batch) run')
  parser.add_argument('--json', default='', help='also write the rows to this file')
  parser.add_argument('--check_flops', action='store_true',
                      help='check the FLOP count (Gemma 1-3 formula, transformers) and exit')
  parser.add_argument('--side', default='', help=argparse.SUPPRESS)  # internal: one child run
  args = parser.parse_args()
  if args.check_flops:
    check_flops()
    return
  if args.side:
    args.batch = int(args.batch)
    _child(args)
    return

  mc = bench_model_config(args.preset, args.layers)
  fpt = flops_per_token(mc, args.seq)
  rows = []
  for batch in [int(b) for b in args.batch.split(',')]:
    for side in args.sides.split(','):
      cmd = [sys.executable, os.path.abspath(__file__), f'--side={side}', f'--batch={batch}'] + [
          f'--{k}={v}' for k, v in vars(args).items()
          if k in ('preset', 'layers', 'seq', 'dtype', 'param_dtype', 'remat', 'loss_chunk',
                   'steps', 'warmup')]
      env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=os.environ.get(
          'XLA_PYTHON_CLIENT_MEM_FRACTION', '0.95'))
      try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
        lines = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
        result = (json.loads(lines[-1][7:]) if lines else
                  {'error': f'exit {out.returncode}: {(out.stderr.strip().splitlines() or [""])[-1][:200]}'})
      except subprocess.TimeoutExpired:
        result = {'error': f'timeout after {args.timeout}s'}
      row = {'side': side, 'batch': batch, **result}
      if 'step_s' in result:
        row['tokens_per_s'] = batch * args.seq / result['step_s']
        row['tflops'] = row['tokens_per_s'] * fpt / 1e12
        row['mfu'] = row['tflops'] / args.peak_tflops
      rows.append(row)
      print(json.dumps(row), flush=True)

  import platform  # pylint: disable=g-import-not-at-top
  layers = f' ({mc.num_layers} layers)' if args.layers else ''
  experts = [r['experts'] for r in rows if r.get('experts')] if mc.num_experts else []
  experts = f'; transformers experts {experts[0]!r}' if experts else ''
  print(f'\n{args.preset}{layers}, seq {args.seq}, params {args.param_dtype}, our compute '
        f'{args.dtype}, our remat {args.remat}, our loss_chunk {args.loss_chunk}; '
        f'{fpt / 1e9:.3g} GFLOP/token ({matmul_params(mc) / 1e9:.3g} B active matmul params)'
        f'{experts}; MFU of {args.peak_tflops:g} TFLOP/s; median of {args.steps} steps after '
        f'{args.warmup}; host {platform.node()}')
  print('| side | batch | step (s) | tokens/s | TFLOP/s | MFU | peak mem (GB) | loss |')
  print('|---|---|---|---|---|---|---|---|')
  for r in rows:
    if 'error' in r:
      print(f'| {r["side"]} | {r["batch"]} | {r["error"]} | | | | | |')
    else:
      print(f'| {r["side"]} | {r["batch"]} | {r["step_s"]:.3f} | {r["tokens_per_s"]:,.0f} | '
            f'{r["tflops"]:.1f} | {100 * r["mfu"]:.1f}% | {r["peak_gb"]:.1f} | {r["loss"]:.3f} |')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()

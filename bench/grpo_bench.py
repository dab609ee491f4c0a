r"""GRPO step time, split into rollout (sampling G completions per prompt with our Sampler, scoring
them) and update (the jitted train step), measured by running the trainer itself.

  python bench/grpo_bench.py                      # CPU: the real Gemma 3 270M, its GRPO config
  python bench/grpo_bench.py --preset gemma3-1b --dtype bfloat16 --steps 6   # GPU: 1B shapes
  python bench/grpo_bench.py --preset tiny-gemma3 --steps 3    # smoke test (about a minute)

The job is configs/gemma3_270m_grpo.py (LoRA, its prompts, rewards, G and completion budget) for
--steps steps with evaluation off. With --preset the weights are random in that preset's shapes
and the tokenizer is the bundled GGUF's (written out as a SentencePiece model; a random model's
completions run to the full budget, so this times the longest rollouts). Per step the trainer
logs `rollout_seconds` (sampling, rewards, the batch's layout) and `step_time_s` (wall time
between two logged steps: rollout + update, as the rollout of step n+1 waits for the weights of
step n); update = step - rollout. The table shows every step; the summary is the median over
steps 2.. (step 1 compiles).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=4)
  parser.add_argument('--preset', default='', help="random weights of this preset ('' = the "
                      'real 270M from the bundled GGUF)')
  parser.add_argument('--dtype', default='float32', help='compute dtype')
  parser.add_argument('--batch', type=int, default=0, help='prompts per step (0 = the config)')
  parser.add_argument('--workdir', default='')
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  from configs import gemma3_270m_grpo  # pylint: disable=g-import-not-at-top
  from gemma_jax import trainer  # pylint: disable=g-import-not-at-top

  c = gemma3_270m_grpo.get_config()
  c.steps, c.eval_every, c.log_every = args.steps, 0, 1
  c.checkpoint_every = args.steps * c.grpo.num_iterations
  c.steps *= c.grpo.num_iterations
  c.model.dtype = args.dtype
  if args.batch:
    c.batch_size = args.batch
  workdir = args.workdir or tempfile.mkdtemp(prefix='grpo_bench_')
  if args.preset:
    from gemma_jax.initial_weights import gguf_package_path  # pylint: disable=g-import-not-at-top
    from gemma_jax.convert.gguf import open_gguf  # pylint: disable=g-import-not-at-top
    from gemma_jax.convert.gguf_tokenizer import tokenizer_from_gguf  # pylint: disable=g-import-not-at-top
    tokenizer_path = os.path.join(workdir, 'tokenizer.model')
    os.makedirs(workdir, exist_ok=True)
    tokenizer = tokenizer_from_gguf(open_gguf(gguf_package_path()))
    tokenizer.save(tokenizer_path)
    c.model.preset, c.model.init, c.model.init_path = args.preset, 'none', ''
    c.model.tokenizer = tokenizer_path
    from gemma_jax.config import get_preset  # pylint: disable=g-import-not-at-top
    if get_preset(args.preset).vocab_size < tokenizer.vocab_size:  # a tiny preset: widen it
      c.model.vocab_size = tokenizer.vocab_size
  print(f'GRPO bench: {args.preset or "Gemma 3 270M (GGUF)"}, {c.batch_size} prompts x '
        f'{c.grpo.num_generations} completions of <= {c.grpo.max_completion_length} tokens, '
        f'LoRA rank {c.lora.rank}, {args.dtype}, {jax.devices()[0].platform} '
        f'({jax.device_count()} device(s)); workdir {workdir}', flush=True)
  trainer.train(c, os.path.join(workdir, 'run'))

  with open(os.path.join(workdir, 'run', 'metrics.jsonl')) as f:
    steps = [r for r in map(json.loads, f) if 'rollout_seconds' in r]
  print('\n| step | rollout s | update s | step s | rollout share | completion tokens | '
        'reward |')
  print('|---:|---:|---:|---:|---:|---:|---:|')
  rows = []
  for r in steps:
    total = r.get('step_time_s')
    update = None if total is None else total - r['rollout_seconds']
    rows.append((r['rollout_seconds'], update, total))
    fmt = lambda x: '-' if x is None else f'{x:.2f}'
    share = '-' if total is None else f'{100 * r["rollout_seconds"] / total:.0f}%'
    print(f'| {r["step"]} | {fmt(r["rollout_seconds"])} | {fmt(update)} | {fmt(total)} | '
          f'{share} | {r["completion_tokens"]:.0f} | {r["reward"]:.3f} |')
  timed = [x for x in rows[1:] if x[2] is not None]
  if timed:
    med = [statistics.median(x[i] for x in timed) for i in range(3)]
    print(f'\nmedian over steps 2..{len(rows)}: rollout {med[0]:.2f} s + update {med[1]:.2f} s '
          f'= {med[2]:.2f} s per step ({100 * med[0] / med[2]:.0f}% sampling)')


if __name__ == '__main__':
  main()

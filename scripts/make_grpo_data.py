"""Generates the shipped GRPO prompts: few-shot sums with a verifiable numeric answer.

    python scripts/make_grpo_data.py           # writes data/grpo_{train,eval}.jsonl

Each record is a raw (no chat template) few-shot prompt and its answer:

    {"prompt": "1 + 15 = 16\\n15 + 2 = 17\\n4 + 7 = 11\\n8 + 11 =", "answer": "19"}

meant for `grpo.raw_prompt=True` (the text is encoded as is, BOS first) with completions ending at
the first newline (`grpo.stop_strings=('\\n',)`), so a completion is e.g. " 19"; the numeric and
format rewards check it. The bundled Gemma 3 270M is a base model: in chat form it never ends its
turn and does not add, but it continues such a list of sums with a number and a newline.

The problems are a + b with 1 <= a, b <= 20 (1- and 2-digit operands, 400 problems): the base
model gets about a third of its sampled answers right (temperature 1), so most groups of samples
differ in reward and there is room to learn (bench/grpo_task_probe.py --raw measures it; one-digit
sums are mostly right already, two-digit ones almost never). `--num_eval` problems are held out;
every other problem is one training record. Each prompt's `--shots` worked examples are other
training problems, drawn per record, so no held-out problem (or its answer) appears in any
training prompt. The output is a pure function of the arguments, so the shipped files can be
regenerated exactly.
"""

from __future__ import annotations

import argparse
import os
import random

from make_sft_data import write_jsonl

MAX_OPERAND = 20  # problems: a + b with 1 <= a, b <= MAX_OPERAND


def equation(a: int, b: int) -> str:
  """The left-hand side of `a + b`, as the prompt ends: 'a + b ='."""
  return f'{a} + {b} ='


def problem(a: int, b: int, shots: list[tuple[int, int]]) -> dict[str, str]:
  """The record for `a + b` after the worked examples `shots` (one per line)."""
  lines = [f'{equation(x, y)} {x + y}' for x, y in shots]
  return {'prompt': '\n'.join(lines + [equation(a, b)]), 'answer': str(a + b)}


def make_records(num_eval: int = 48, shots: int = 3,
                 seed: int = 0) -> tuple[list[dict], list[dict]]:
  """Returns (train records, eval records): every problem once, `num_eval` of them held out,
  each prompt led by `shots` worked examples drawn from the other training problems."""
  pairs = [(a, b) for a in range(1, MAX_OPERAND + 1) for b in range(1, MAX_OPERAND + 1)]
  if not 0 < num_eval < len(pairs) - shots:
    raise ValueError(f'--num_eval={num_eval} must be between 1 and {len(pairs) - shots - 1}.')
  if shots < 0:
    raise ValueError(f'--shots={shots} must be >= 0.')
  rng = random.Random(seed)
  rng.shuffle(pairs)
  held_out, train = pairs[:num_eval], pairs[num_eval:]

  def records(queries):
    out = []
    for query in queries:
      examples = rng.sample([p for p in train if p != query], shots)
      out.append(problem(*query, examples))
    return out

  return records(train), records(held_out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out_dir', default=os.path.join(os.path.dirname(__file__), '..', 'data'))
  parser.add_argument('--num_eval', type=int, default=48)
  parser.add_argument('--shots', type=int, default=3, help='worked examples per prompt')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  try:
    train, held_out = make_records(args.num_eval, args.shots, args.seed)
  except ValueError as e:
    raise SystemExit(f'scripts/make_grpo_data.py: {e}') from None
  os.makedirs(args.out_dir, exist_ok=True)
  for name, records in (('grpo_train.jsonl', train), ('grpo_eval.jsonl', held_out)):
    path = os.path.normpath(os.path.join(args.out_dir, name))
    write_jsonl(records, path)
    print(f'wrote {len(records)} records, {os.path.getsize(path)} bytes to {path}')


if __name__ == '__main__':
  main()

"""Generates the quickstart SFT dataset: reverse a short sequence of letters.

    python scripts/make_sft_data.py            # writes data/quickstart_{train,eval}.jsonl

The task ("Reverse the letters: q a z" -> "z a q") has one right answer that `score` checks
exactly, needs no world knowledge, and a tiny decoder learns it in minutes on a CPU (it is
attention copying in reverse order). Letters are separated by spaces so that every tokenizer
sees one letter per token. Training records are chat `messages`; about a fifth start with a
system message and about a sixth hold two exchanges, to exercise the chat formatting. Evaluation
records are single user/model exchanges whose letter sequences never occur in training. The
output is a pure function of the arguments, so the shipped files can be regenerated exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import random

PROMPT = 'Reverse the letters: '
SYSTEM_MESSAGES = (
    'Answer with the letters only.',
    'You are a careful assistant. Keep the letters separated by spaces.',
)
LETTERS = 'abcdefghijklmnopqrstuvwxyz'


def reverse_letters(letters: str) -> str:
  """The reference answer: 'q a z' -> 'z a q'."""
  return ' '.join(reversed(letters.split()))


def score(prediction: str, reference: str) -> bool:
  """True when the prediction equals the reference, ignoring surrounding and repeated spaces."""
  return ' '.join(prediction.split()) == ' '.join(reference.split())


def _sequences(rng: random.Random, count: int, min_len: int, max_len: int,
               exclude: set[str]) -> list[str]:
  """`count` distinct letter sequences, none in `exclude`."""
  out, seen = [], set(exclude)
  while len(out) < count:
    seq = ' '.join(rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len)))
    if seq not in seen:
      seen.add(seq)
      out.append(seq)
  return out


def _exchange(seq: str) -> list[dict[str, str]]:
  return [{'role': 'user', 'content': PROMPT + seq},
          {'role': 'model', 'content': reverse_letters(seq)}]


def make_records(num_train: int = 3000, num_eval: int = 200, min_len: int = 3, max_len: int = 6,
                 seed: int = 0) -> tuple[list[dict], list[dict]]:
  """Returns (train records, eval records) in the chat `messages` format."""
  rng = random.Random(seed)
  eval_seqs = _sequences(rng, num_eval, min_len, max_len, set())
  eval_records = [{'messages': _exchange(s)} for s in eval_seqs]
  train_records = []
  pool = _sequences(rng, num_train * 2, min_len, max_len, set(eval_seqs))
  while len(train_records) < num_train:
    messages = _exchange(pool.pop())
    if rng.random() < 1 / 6:
      messages += _exchange(pool.pop())
    if rng.random() < 1 / 5:
      messages.insert(0, {'role': 'system', 'content': rng.choice(SYSTEM_MESSAGES)})
    train_records.append({'messages': messages})
  return train_records, eval_records


def write_jsonl(records: list[dict], path: str) -> None:
  """Writes one compact JSON object per line."""
  with open(path, 'w', encoding='utf-8') as f:
    for record in records:
      f.write(json.dumps(record, separators=(',', ':')) + '\n')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out_dir', default=os.path.join(os.path.dirname(__file__), '..', 'data'))
  parser.add_argument('--num_train', type=int, default=3000)
  parser.add_argument('--num_eval', type=int, default=200)
  parser.add_argument('--min_len', type=int, default=3)
  parser.add_argument('--max_len', type=int, default=6)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  train, held_out = make_records(args.num_train, args.num_eval, args.min_len, args.max_len,
                                 args.seed)
  os.makedirs(args.out_dir, exist_ok=True)
  for name, records in (('quickstart_train.jsonl', train), ('quickstart_eval.jsonl', held_out)):
    path = os.path.normpath(os.path.join(args.out_dir, name))
    write_jsonl(records, path)
    print(f'wrote {len(records)} records, {os.path.getsize(path)} bytes to {path}')


if __name__ == '__main__':
  main()

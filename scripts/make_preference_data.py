"""Generates the shipped preference set: letter reversal, a right and a wrong answer per prompt.

    python scripts/make_preference_data.py     # writes data/preference_{train,eval}.jsonl

The task is the quickstart SFT task (scripts/make_sft_data.py: "Reverse the letters: j a x" ->
"x a j"). `chosen` is the correct reversal; `rejected` is a plausible mistake, one of MISTAKES in
turn: the letters not reversed, one adjacent pair of the answer swapped, a letter of the answer
dropped, or a letter of the answer doubled (never equal to the right answer, so palindromes get
another mistake). Training records are mostly {"prompt", "chosen", "rejected"}; about a sixth are
{"messages", "chosen", "rejected"} with a system message, to exercise the chat formatting.
Held-out records are all {"prompt", "chosen", "rejected"} and their letter sequences never occur
in training. Sequences are 3-5 letters, so a pair fits in 64 tokens of the Gemma 3 vocabulary. The
output is a pure function of the arguments, so the shipped files can be regenerated exactly.
"""

from __future__ import annotations

import argparse
import os
import random

from make_sft_data import PROMPT, SYSTEM_MESSAGES, _sequences, reverse_letters, write_jsonl

MISTAKES = ('unreversed', 'swapped', 'dropped', 'doubled')


def mistake(letters: str, kind: str, rng: random.Random) -> str:
  """A wrong answer of `kind` (see MISTAKES) to reversing `letters`; may equal the right one."""
  answer = reverse_letters(letters).split()
  if kind == 'unreversed':
    return letters
  i = rng.randrange(len(answer) - (kind == 'swapped'))
  if kind == 'swapped':
    answer[i], answer[i + 1] = answer[i + 1], answer[i]
  elif kind == 'dropped':
    del answer[i]
  elif kind == 'doubled':
    answer.insert(i, answer[i])
  else:
    raise ValueError(f'Unknown mistake {kind!r}; known: {MISTAKES}.')
  return ' '.join(answer)


def make_pair(letters: str, index: int, rng: random.Random) -> tuple[str, str]:
  """(chosen, rejected) for `letters`; the mistake kinds take turns with `index`."""
  chosen = reverse_letters(letters)
  for k in range(len(MISTAKES)):
    rejected = mistake(letters, MISTAKES[(index + k) % len(MISTAKES)], rng)
    if rejected != chosen:
      return chosen, rejected
  raise AssertionError(f'No wrong answer for {letters!r}.')  # 'dropped' always differs.


def make_records(num_train: int = 400, num_eval: int = 50, min_len: int = 3, max_len: int = 5,
                 seed: int = 0) -> tuple[list[dict], list[dict]]:
  """Returns (train records, eval records) of preference pairs."""
  rng = random.Random(seed)
  eval_seqs = _sequences(rng, num_eval, min_len, max_len, set())
  train_seqs = _sequences(rng, num_train, min_len, max_len, set(eval_seqs))
  eval_records = []
  for i, letters in enumerate(eval_seqs):
    chosen, rejected = make_pair(letters, i, rng)
    eval_records.append({'prompt': PROMPT + letters, 'chosen': chosen, 'rejected': rejected})
  train_records = []
  for i, letters in enumerate(train_seqs):
    chosen, rejected = make_pair(letters, i, rng)
    if rng.random() < 1 / 6:
      messages = [{'role': 'system', 'content': rng.choice(SYSTEM_MESSAGES)},
                  {'role': 'user', 'content': PROMPT + letters}]
      train_records.append({'messages': messages, 'chosen': chosen, 'rejected': rejected})
    else:
      train_records.append({'prompt': PROMPT + letters, 'chosen': chosen, 'rejected': rejected})
  return train_records, eval_records


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out_dir', default=os.path.join(os.path.dirname(__file__), '..', 'data'))
  parser.add_argument('--num_train', type=int, default=400)
  parser.add_argument('--num_eval', type=int, default=50)
  parser.add_argument('--min_len', type=int, default=3)
  parser.add_argument('--max_len', type=int, default=5)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  train, held_out = make_records(args.num_train, args.num_eval, args.min_len, args.max_len,
                                 args.seed)
  os.makedirs(args.out_dir, exist_ok=True)
  for name, records in (('preference_train.jsonl', train), ('preference_eval.jsonl', held_out)):
    path = os.path.normpath(os.path.join(args.out_dir, name))
    write_jsonl(records, path)
    print(f'wrote {len(records)} records, {os.path.getsize(path)} bytes to {path}')


if __name__ == '__main__':
  main()

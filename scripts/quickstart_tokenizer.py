"""Trains the quickstart's small SentencePiece tokenizer on the quickstart training data.

    python scripts/quickstart_tokenizer.py     # writes data/quickstart_tokenizer.model

The quickstart trains a tiny Gemma-architecture model from scratch on 2 CPU cores in minutes;
with Gemma's 262k-piece vocabulary the output layer alone would cost ~70x the rest of the
model, so it uses this 128-piece BPE vocabulary with Gemma's special pieces at Gemma's ids
(<pad> 0, <eos> 1, <bos> 2, <unk> 3; <start_of_turn>, <end_of_turn> as control pieces) and,
like Gemma's, no dummy-prefix space and whitespace kept as written. The
real-weights config (configs/gemma3_270m_sft.py) uses the real Gemma 3 tokenizer instead.
Training is deterministic: rerunning rewrites the shipped file byte for byte.
"""

from __future__ import annotations

import argparse
import io
import json
import os

import sentencepiece as spm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB_SIZE = 128


def corpus(path: str) -> list[str]:
  """Every turn's text and the turn headers, one sentence per turn."""
  lines = ['user\n', 'model\n']
  with open(path, encoding='utf-8') as f:
    for line in f:
      record = json.loads(line)
      turns = record.get('messages') or [{'content': record['prompt']},
                                         {'content': record['response']}]
      lines += [t['content'] for t in turns]
  return lines


def train_tokenizer(data_path: str, vocab_size: int = VOCAB_SIZE) -> bytes:
  """The serialized SentencePiece model trained on `data_path` (a chat JSONL file)."""
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus(data_path)), model_writer=out, vocab_size=vocab_size,
      model_type='bpe', character_coverage=1.0, hard_vocab_limit=False, num_threads=1,
      normalization_rule_name='identity', split_digits=True, minloglevel=2,
      add_dummy_prefix=False, remove_extra_whitespaces=False, user_defined_symbols=['\n'],
      pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece='<pad>', eos_piece='<eos>',
      bos_piece='<bos>', unk_piece='<unk>',
      control_symbols=['<start_of_turn>', '<end_of_turn>'])
  return out.getvalue()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data', default=os.path.join(ROOT, 'data', 'quickstart_train.jsonl'))
  parser.add_argument('--out', default=os.path.join(ROOT, 'data', 'quickstart_tokenizer.model'))
  parser.add_argument('--vocab_size', type=int, default=VOCAB_SIZE)
  args = parser.parse_args()
  model = train_tokenizer(args.data, args.vocab_size)
  with open(args.out, 'wb') as f:
    f.write(model)
  print(f'wrote {len(model)} bytes to {args.out}')


if __name__ == '__main__':
  main()

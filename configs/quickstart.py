"""The quickstart: a small Gemma-3-architecture model learns to reverse letters, on 2 CPU cores.

  python train.py --config=configs/quickstart.py --workdir=/tmp/quickstart

Trains from scratch (random init) on data/quickstart_train.jsonl with the 128-piece quickstart
tokenizer (scripts/quickstart_tokenizer.py), scores greedy answers on held-out prompts by exact
match before and after training, and exports WORKDIR/final for sample.py. For the real Gemma 3
270M weights on the same task see configs/gemma3_270m_sft.py.
"""

import os

from gemma_jax.train_config import base_config

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data')


def get_config():
  c = base_config()
  c.steps = 200
  c.batch_size = 32
  c.seq_len = 64
  c.learning_rate = 3e-3
  c.log_every = 25
  c.eval_every = 100
  c.eval_batches = 4
  c.checkpoint_every = 100
  c.keep_checkpoints = 2

  c.model.preset = 'tiny-gemma3'
  c.model.vocab_size = 128  # the quickstart tokenizer's vocabulary
  c.model.tokenizer = os.path.join(DATA, 'quickstart_tokenizer.model')  # random init: no weights

  c.data.path = os.path.join(DATA, 'quickstart_train.jsonl')
  c.data.eval_path = os.path.join(DATA, 'quickstart_eval.jsonl')

  c.optimizer.weight_decay = 0.01
  c.optimizer.warmup_steps = 20

  c.exact_match.examples = 200
  c.exact_match.max_new_tokens = 16
  return c

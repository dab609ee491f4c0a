"""Preference tuning on real weights: DPO with LoRA on Gemma 3 270M (the bundled GGUF).

  python train.py --config=configs/gemma3_270m_dpo.py --workdir=/tmp/g3_270m_dpo

The pairs (data/preference_{train,eval}.jsonl, made by scripts/make_preference_data.py) are the
quickstart's letter-reversal prompts with the correct answer as `chosen` and a plausible wrong one
as `rejected`. The reference model is the base with the adapters switched off. Held-out reward
accuracy, margin and loss are printed before -> after training. Preference pairs alone do not teach
the base model the answer format (greedy exact match stays 0%: add --config.exact_match.examples=50
to see it); start from an SFT export (--config.model.init=native --config.model.init_path=
WORKDIR/final) for that. Full fine-tuning instead: --config.lora.rank=0 (adds a frozen reference
copy of the 268M parameters; use a smaller learning rate such as 5e-6).
"""

import os

from gemma_jax.train_config import base_config

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data')


def get_config():
  c = base_config()
  c.objective = 'dpo'  # dpo.loss 'sigmoid' (DPO), dpo.beta 0.1: the defaults

  c.steps = 40
  c.batch_size = 4  # pairs per step (8 rows)
  c.seq_len = 48
  c.learning_rate = 5e-4
  c.log_every = 5
  c.eval_every = 20
  c.eval_batches = 13  # all 50 held-out pairs
  c.checkpoint_every = 20
  c.keep_checkpoints = 2

  c.model.preset = 'gemma3-270m'
  c.model.init = 'gguf'
  c.model.init_path = 'package'  # the tokenizer comes from the GGUF file too

  c.lora.rank = 16
  c.lora.alpha = 32.0

  c.data.path = os.path.join(DATA, 'preference_train.jsonl')
  c.data.eval_path = os.path.join(DATA, 'preference_eval.jsonl')

  c.optimizer.warmup_steps = 4
  return c

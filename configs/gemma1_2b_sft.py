"""Gemma 1 2B full fine-tuning on GPUs/TPUs (FSDP over all devices, bfloat16 compute).

  python train.py --config=configs/gemma1_2b_sft.py --workdir=/ckpt/g2b \\
      --config.model.init=official --config.model.init_path=/data/gemma-2b   # or init=hf

Initial weights: 'official' (a Kaggle/gm Orbax checkpoint directory; give the tokenizer with
--config.model.tokenizer=/data/tokenizer.model), 'hf' (a save_pretrained directory) or 'native'.
Without init_path it starts from random weights only if you set --config.model.init=none and
--config.model.tokenizer. Data: the shipped letter-reversal set packed into 2048-token rows; point
data.path/eval_path at your own JSONL, or use data.source=tfds with data.name/data.data_dir.
Memory: float32 master weights + AdamW = 16 bytes/parameter (2.5B: ~40 GB) sharded over the
mesh. Measured on one H200 without remat (bench/train_bench.py): batch 8 x 2048 peaks at 117 GB;
remat='dots' (here) keeps less; on one 80 GB card lower batch_size, use more devices, or set
--config.loss_chunk=512 (the head-fused loss: the float32 [B, T, V] logits, 16.8 GB at 8 x 2048,
are never made whole; gemma_jax/loss.py).
"""

import os

from gemma_jax.train_config import base_config

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data')


def get_config():
  c = base_config()
  c.seq_len = 2048
  c.learning_rate = 2e-5
  c.eval_batches = 8

  c.model.preset = 'gemma1-2b'
  c.model.init = 'official'  # required: --config.model.init_path=...
  c.model.dtype = 'bfloat16'
  c.model.remat = 'dots'

  c.data.path = os.path.join(DATA, 'quickstart_train.jsonl')
  c.data.eval_path = os.path.join(DATA, 'quickstart_eval.jsonl')

  c.optimizer.b2 = 0.95
  c.optimizer.weight_decay = 0.01
  c.optimizer.warmup_steps = 50

  c.exact_match.examples = 100
  c.exact_match.max_new_tokens = 16
  return c

"""RL with verifiable rewards on real weights: GRPO with LoRA on Gemma 3 270M (the bundled GGUF).

  python train.py --config=configs/gemma3_270m_grpo.py --workdir=/tmp/g3_270m_grpo

The task (data/grpo_{train,eval}.jsonl, made by scripts/make_grpo_data.py): few-shot addition
prompts in plain text ("12 + 34 = 46\\n...\\n17 + 5 =": the bundled model is a base model, so no
chat template, grpo.raw_prompt) answered by a number; a completion ends at its first newline.
Reward: `numeric` (1 when the completion's number is the sum) plus 0.2 x `format` (1 when the
completion is a bare number). Each step samples 8 completions of each of 4 prompts with the
Sampler from the current weights (temperature 1), scores them, and takes one policy-gradient step
(DAPO aggregation, no KL). The held-out reward (48 prompts, 8 samples each, and greedy) is printed
before -> after: measured 0.505 -> 0.779 in 30 steps, 15 min on 2 CPU cores (README). Full
fine-tuning instead: --config.lora.rank=0 (with a smaller learning rate, e.g. 5e-6); a KL penalty
to the initial weights: --config.grpo.beta=0.04.
"""

import os

from gemma_jax.train_config import base_config

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data')


def get_config():
  c = base_config()
  c.objective = 'grpo'

  c.steps = 30
  c.batch_size = 4  # prompts per step, each sampled grpo.num_generations times: 32 rows
  c.seq_len = 48  # prompt (at most 42 tokens) + completion
  c.learning_rate = 5e-5  # 1e-4 lost held-out reward; at 3e-4 all groups scored alike by step 5
  c.log_every = 1
  c.eval_every = 30
  c.eval_batches = 12  # all 48 held-out prompts
  c.checkpoint_every = 10
  c.keep_checkpoints = 2

  c.model.preset = 'gemma3-270m'
  c.model.init = 'gguf'
  c.model.init_path = 'package'  # the tokenizer comes from the GGUF file too

  c.lora.rank = 16
  c.lora.alpha = 32.0

  c.data.path = os.path.join(DATA, 'grpo_train.jsonl')
  c.data.eval_path = os.path.join(DATA, 'grpo_eval.jsonl')

  # grpo.num_generations: the default 8 completions per prompt
  c.grpo.max_completion_length = 6
  c.grpo.raw_prompt = True
  c.grpo.stop_strings = ('\n',)
  c.grpo.rewards = ('numeric', 'format')
  c.grpo.reward_weights = (1.0, 0.2)
  c.grpo.format_pattern = r'-?\d+'

  c.optimizer.warmup_steps = 2
  return c

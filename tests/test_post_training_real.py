"""The real-model post-training configs, shortened to a few steps on the real Gemma 3 270M (the
bundled GGUF): each moves its objective the right way. (The full runs and their figures: README,
"Post-training".)

- configs/gemma3_270m_dpo.py, 4 steps of 2 pairs (two passes over 4 of its pairs): their reward
  margin, exactly 0 at step 0 (policy = reference), is positive after and the loss below ln 2.
- configs/gemma3_270m_grpo.py, 1 step of 2 prompts x 4 completions: the completions it trained on
  are the Sampler's on the real weights with the step's seed, and the step raised their
  advantage-weighted log-probability sum_i A_i log pi(y_i | x_i) (what the policy gradient
  ascends).
"""

import importlib
import os

import jax
import numpy as np
from flax import nnx

from gemma_jax import checkpoint, prompt_data, rollouts, trainer
from gemma_jax.objectives import grpo
from gemma_jax.sampler import Sampler
from gemma_jax.sampling import SamplingParams
from test_trainer import ROOT, override


def _config(name, **overrides):
  return override(importlib.import_module(f'configs.{name}').get_config(), overrides)


def test_dpo_config_shortened_raises_the_reward_margin(tmp_path):
  pairs = tmp_path / 'pairs.jsonl'
  with open(os.path.join(ROOT, 'data', 'preference_train.jsonl')) as f:
    pairs.write_text(''.join(next(f) for _ in range(4)))
  c = _config('gemma3_270m_dpo', steps=4, batch_size=2, eval_every=4, eval_batches=2,
              checkpoint_every=4, log_every=1, learning_rate=1e-4,
              **{'optimizer.warmup_steps': 0, 'data.path': str(pairs),
                 'data.eval_path': str(pairs)})
  workdir = str(tmp_path / 'dpo')
  result = trainer.train(c, workdir)
  from test_dpo import _records
  before = next(r for r in _records(workdir) if r['step'] == 0 and 'eval_loss' in r)
  assert before['eval_reward_margin'] == 0.0
  assert result['eval']['reward_margin'] > 0.05, result['eval']
  assert result['eval']['loss'] < before['eval_loss']


def test_grpo_config_shortened_takes_a_step_up_the_policy_gradient(tmp_path, real):
  c = _config('gemma3_270m_grpo', steps=1, batch_size=2, eval_every=0, checkpoint_every=1,
              log_every=1, learning_rate=1e-3, **{'grpo.num_generations': 4,
                                                  'optimizer.warmup_steps': 0})
  workdir = str(tmp_path / 'grpo')
  result = trainer.train(c, workdir)
  model, tokenizer = real[0], real[1]
  objective = grpo.from_config(c)
  prompts = next(iter(prompt_data.job_prompt_dataset(c, tokenizer, split='train')))
  ids = [list(p.ids) for p in prompts for _ in range(4)]
  completions = Sampler(model, tokenizer, cache_length=c.seq_len + 1).sample(
      ids, objective.max_completion_length, sampling=SamplingParams(1.0),
      seed=rollouts.rollout_seed(c.seed, 1), stop_tokens=['\n'])
  total, _ = rollouts.score_completions(rollouts.reward_functions(objective),
                                        objective.reward_weights, prompts, completions, 4)
  assert result['train']['reward'] == np.mean(total)  # the trainer scored these completions
  advantages = grpo.group_advantages(total, 4)
  assert np.abs(advantages).sum() > 0, total  # some group has something to learn
  batch = rollouts.train_rows(prompts, completions, 4, c.seq_len)

  graphdef, _ = nnx.split(model)
  logps = jax.jit(lambda state, b: objective.token_logps(nnx.merge(graphdef, state), b))

  def surrogate(m):
    logp = np.asarray(logps(nnx.state(m), batch))
    return float(np.sum(advantages[:, None] * logp * batch['loss_mask']))

  trained = checkpoint.load_params(os.path.join(workdir, 'final'))
  assert surrogate(trained) > surrogate(model) + 1e-3

"""The DPO objective in the trainer: ln 2 at the first step, learning the preference, the same step
with micro-batches, exact resume, and its config checks. (Parity with TRL: tests/test_dpo_trl.py.)"""

import json
import os
import signal

import numpy as np
import pytest

from gemma_jax import distributed, train_config, trainer
from test_trainer import ROOT, TOKENIZER, V, _lines, override

PREF_TRAIN = os.path.join(ROOT, 'data', 'preference_train.jsonl')
LN2 = float(np.float32(np.log(2.0)))


def dpo_config(tmp_path, **overrides):
  """A tiny DPO job: tiny-gemma1 on 16 shipped preference pairs, evaluated on the same pairs
  (a random tiny model learns them; it cannot generalise from so few)."""
  train_path = tmp_path / 'pairs.jsonl'
  train_path.write_text(''.join(_lines(PREF_TRAIN, 16)))
  c = train_config.base_config()
  c.objective = 'dpo'
  c.steps, c.batch_size, c.seq_len, c.learning_rate = 12, 4, 32, 1e-2
  c.log_every, c.eval_every, c.eval_batches, c.checkpoint_every = 1, 12, 4, 4
  c.model.preset, c.model.vocab_size, c.model.tokenizer = 'tiny-gemma1', V, TOKENIZER
  c.data.path, c.data.eval_path = str(train_path), str(train_path)
  c.optimizer.warmup_steps = 2
  return override(c, overrides)


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _train_values(workdir):
  return [{k: v for k, v in r.items() if k not in ('step_time_s', 'tokens_per_s')}
          for r in _records(workdir) if 'loss' in r]


@pytest.mark.parametrize('lora', [0, 4], ids=['full', 'lora'])
def test_dpo_starts_at_ln2_and_learns_the_preference(tmp_path, lora):
  """Step 1 (policy = reference: the adapters are zero, or the reference is a copy) has loss
  exactly ln 2 and zero rewards; after 12 steps (3 epochs) the pairs are learnt."""
  workdir = str(tmp_path / 'run')
  result = trainer.train(dpo_config(tmp_path, **{'lora.rank': lora}), workdir)
  records = _records(workdir)
  first = next(r for r in records if r.get('step') == 1 and 'loss' in r)
  assert first['loss'] == LN2
  assert first['reward_margin'] == 0.0 and first['reward_accuracy'] == 0.0
  assert first['pairs'] == 4.0
  before = next(r for r in records if r['step'] == 0 and 'eval_loss' in r)
  assert before['eval_loss'] == pytest.approx(LN2, abs=1e-6)  # the mean over the pairs
  assert before['eval_reward_accuracy'] == 0.0
  after = result['eval']
  assert after['loss'] < 0.6 * LN2 and after['reward_accuracy'] >= 0.9, after
  assert after['reward_margin'] > 0 and after['chosen_rewards'] > after['rejected_rewards']


def test_micro_batches_give_the_same_step(tmp_path):
  """grad_accum_steps=2 never splits a pair: its steps equal the unsplit ones."""
  runs = {}
  for k in (1, 2):
    workdir = str(tmp_path / f'k{k}')
    trainer.train(dpo_config(tmp_path, steps=3, eval_every=0, **{
        'lora.rank': 4, 'optimizer.grad_accum_steps': k}), workdir)
    runs[k] = _train_values(workdir)
  for a, b in zip(runs[1], runs[2], strict=True):
    for key in ('loss', 'grad_norm', 'reward_margin', 'chosen_logps'):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_preempted_dpo_job_resumes_exactly(tmp_path, monkeypatch):
  """Stopped after step 5 (as on SIGTERM), then rerun: the same metrics as an uninterrupted run,
  and the reference (a frozen copy of the initial params) comes back exactly."""
  c = dpo_config(tmp_path, steps=8, eval_every=0, checkpoint_every=100)
  straight = str(tmp_path / 'straight')
  trainer.train(c, straight)
  workdir = str(tmp_path / 'preempted')
  real = distributed.put_batch
  calls = []

  def put_batch(*args, **kwargs):  # SIGTERM arrives while step 5 is fed
    calls.append(1)
    if len(calls) == 5:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)

  monkeypatch.setattr(distributed, 'put_batch', put_batch)
  with pytest.raises(trainer.Preempted, match='SIGTERM after step 5'):
    trainer.train(c, workdir)
  monkeypatch.undo()
  trainer.train(c, workdir)
  assert _train_values(workdir) == _train_values(straight)


@pytest.mark.parametrize('override, message', [
    ({'dpo.loss': 'kto'}, "config.dpo.loss='kto'"),
    ({'dpo.beta': 0.0}, 'config.dpo.beta=0.0 must be > 0'),
    ({'dpo.label_smoothing': 0.5}, 'label_smoothing=0.5 must be in'),
    ({'loss_chunk': 8}, 'objective \'dpo\''),
    ({'objective': 'ppo'}, "config.objective='ppo'"),
])
def test_bad_dpo_config_is_refused_before_any_work(tmp_path, override, message):
  with pytest.raises(train_config.ConfigError, match=message.replace('(', r'\(')):
    trainer.train(dpo_config(tmp_path, **override), str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


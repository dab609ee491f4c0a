"""The GRPO objective in the trainer: group advantages, reward functions and their errors, prompt
data, the rollouts being the Sampler's, learning a reward, exact resume across a batch reused for
two steps, and the config checks. (Parity with TRL's loss: tests/test_grpo_trl.py; on a mesh:
tests/_sharded_cases.py.)"""

import json
import os
import signal

import numpy as np
import pytest

from gemma_jax import (data, distributed, prompt_data, rewards, rollouts, train_config,
                       trainer)
from gemma_jax.objectives import grpo
from gemma_jax.sampler import Sampler
from gemma_jax.sampling import SamplingParams
from gemma_jax.tokenizer import Tokenizer
from gemma_jax.train_checkpoints import TrainCheckpoints
from test_dpo import _records
from test_trainer import TOKENIZER, V, override

CALLS = []  # calls of `flaky`


def letter_a(prompts, completions, **fields):
  """A reward a random tiny model can learn: the fraction of 'a' in the completion."""
  return [c.count('a') / max(len(c), 1) for c in completions]


def flaky(prompts, completions, **fields):
  """Fails at its fourth call (the check before training is the first)."""
  CALLS.append(1)
  if len(CALLS) == 4:
    return {}['missing']
  return [0.0] * len(completions)


def no_number(prompts, completions, **fields):
  """Returns text, not numbers."""
  return ['high'] * len(completions)


def _prompts_file(tmp_path, n=16):
  path = tmp_path / 'prompts.jsonl'
  path.write_text(''.join(json.dumps({'prompt': 'abc'[i % 3] * (1 + i % 4), 'answer': 'a'}) + '\n'
                          for i in range(n)))
  return str(path)


def grpo_config(tmp_path, **overrides):
  """A tiny GRPO job: tiny-gemma1 with LoRA, 2 prompts x 4 completions of 8 tokens per step,
  rewarded for writing 'a'."""
  c = train_config.base_config()
  c.objective = 'grpo'
  c.steps, c.batch_size, c.seq_len, c.learning_rate = 12, 2, 24, 3e-2
  c.log_every, c.eval_every, c.eval_batches, c.checkpoint_every = 1, 0, 2, 100
  c.model.preset, c.model.vocab_size, c.model.tokenizer = 'tiny-gemma1', V, TOKENIZER
  c.data.path = c.data.eval_path = _prompts_file(tmp_path)
  c.grpo.num_generations, c.grpo.max_completion_length = 4, 8
  c.grpo.rewards, c.grpo.beta = ('test_grpo:letter_a',), 0.04
  c.lora.rank = 4
  return override(c, overrides)


def _train_values(workdir):
  timing = ('step_time_s', 'tokens_per_s', 'rollout_seconds')
  return [{k: v for k, v in r.items() if k not in timing}
          for r in _records(workdir) if 'loss' in r]


def test_group_advantages_follow_trl_and_a_constant_group_gives_zero():
  r = [1.0, 0.0, 0.0, 1.0, 0.1, 0.1, 0.1, 0.1]
  adv = grpo.group_advantages(r, 4)
  std = np.std([1, 0, 0, 1], ddof=1)  # TRL's nanstd is unbiased
  np.testing.assert_allclose(adv[:4], (np.array(r[:4]) - 0.5) / (std + 1e-4), rtol=1e-6)
  assert (adv[4:] == 0).all() and np.isfinite(adv).all()
  np.testing.assert_allclose(grpo.group_advantages(r, 4, 'none')[:4], [0.5, -0.5, -0.5, 0.5])
  batch_std = np.std(r, ddof=1)
  np.testing.assert_allclose(grpo.group_advantages(r, 4, 'batch')[:4],
                             (np.array(r[:4]) - 0.5) / (batch_std + 1e-4), rtol=1e-6)


def test_built_in_rewards():
  fields = {'answer': ['1234', '13', '7', 'yes']}
  completions = ['The answer is 1,234.', '12, then 13', 'no number', ' yes ']
  assert rewards.numeric([''] * 4, completions, **fields) == [1.0, 1.0, 0.0, 0.0]
  assert rewards.exact_match([''] * 4, completions, **fields) == [0.0, 0.0, 0.0, 1.0]
  fmt = rewards.resolve('format', r'\d+')
  assert fmt([''] * 4, ['12', ' 7 ', 'x7', '7x']) == [1.0, 1.0, 0.0, 0.0]
  total, per_fn = rewards.score({'numeric': rewards.numeric, 'exact_match': rewards.exact_match},
                                (1.0, 0.5), [''] * 4, completions, fields)
  assert total == [1.0, 1.0, 0.0, 0.5] and per_fn['exact_match'] == [0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize('fn, message', [
    (lambda p, c, **f: 1 / 0, r"'bad' raised ZeroDivisionError: division by zero \(at .*test_grpo"),
    (lambda p, c, **f: [1.0], "'bad' returned 1 values for 2 completions"),
    (lambda p, c, **f: ['x', 1.0], r"'bad' returned 'x' \(a str\) for completion 0"),
    (lambda p, c, **f: [float('nan'), 1.0], "'bad' returned nan for completion 0"),
    (lambda p, c, **f: None, "'bad' returned NoneType"),
])
def test_a_bad_reward_function_is_named(fn, message):
  with pytest.raises(rewards.RewardError, match=message):
    rewards.score({'bad': fn}, (1.0,), ['p', 'q'], ['a', 'b'], {})


def test_prompt_records_are_checked_with_their_line(tmp_path):
  tok = Tokenizer(TOKENIZER)
  good = {'prompt': 'ab', 'answer': 'a'}
  cases = [({'answer': 'a'}, "neither 'messages' nor 'prompt'"),
           ({'messages': [{'role': 'user', 'content': 'ab'}, {'role': 'model', 'content': 'x'}]},
            'must end with a user turn'),
           ({'messages': []}, "'messages' is empty"),
           ({'messages': [{'role': 'system', 'content': 'x'}]}, 'must end with a user turn'),
           ({'prompt': ' '}, 'the prompt is empty'),
           ({'prompt': 'ab' * 40}, 'prompt has .* tokens; at most 16 fit')]
  for record, message in cases:
    path = tmp_path / 'p.jsonl'
    path.write_text(json.dumps(good) + '\n' + json.dumps(record) + '\n')
    with pytest.raises(ValueError, match=f'{path}:2: .*{message}'):
      prompt_data.make_prompt_dataset({'path': str(path)}, tok, batch_size=1, seed=0,
                                      max_prompt_tokens=16)
  path.write_text(json.dumps({'messages': [{'role': 'user', 'content': 'ab'}], 'answer': 7}) + '\n')
  [p] = next(iter(prompt_data.make_prompt_dataset({'path': str(path)}, tok, batch_size=1, seed=0,
                                                  max_prompt_tokens=16)))
  assert p.text == 'ab' and p.fields == {'answer': 7} and p.where == f'{path}:1'
  assert list(p.ids) == tok.encode_chat([{'role': 'user', 'content': 'ab'}],
                                        add_generation_prompt=True)[0]


def test_grpo_job_samples_with_the_sampler_and_learns_the_reward(tmp_path):
  """12 steps on a random tiny model with LoRA and a KL penalty: at step 1 (policy = reference,
  ratio 1) the KL and the clipped fraction are exactly 0; the completions the trainer scored at
  step 1 are `Sampler.sample`'s on the initial weights with the step's seed (the batch CRC
  matches); the reward rises, in training and on the held-out prompts (greedy)."""
  c = grpo_config(tmp_path, eval_every=12)
  workdir = str(tmp_path / 'run')
  result = trainer.train(c, workdir)
  records = [r for r in _records(workdir) if 'loss' in r]
  first = records[0]
  assert first['step'] == 1 and first['kl'] == 0.0 and first['clip_fraction'] == 0.0
  assert first['completion_tokens'] == 8 * first['completion_length']

  tok = Tokenizer(TOKENIZER)
  model = train_config.make_model(train_config.model_config(c), c)  # adapters start at zero
  prompts = next(iter(prompt_data.job_prompt_dataset(c, tok, split='train')))
  ids = [list(p.ids) for p in prompts for _ in range(4)]
  sampled = Sampler(model, tok, cache_length=c.seq_len + 1).sample(
      ids, 8, sampling=SamplingParams(1.0), seed=rollouts.rollout_seed(c.seed, 1))
  rows = rollouts.train_rows(prompts, sampled, 4, c.seq_len)
  assert first['batch_crc32'] == data.batch_fingerprint(rows)
  assert first['reward'] == pytest.approx(np.mean(letter_a(None, [s.text for s in sampled])))

  early = np.mean([r['reward'] for r in records[:3]])
  late = np.mean([r['reward'] for r in records[-3:]])
  assert late > early + 0.1, (early, late)
  before = next(r for r in _records(workdir) if r['step'] == 0 and 'eval_reward' in r)
  assert result['eval']['reward'] > before['eval_reward'], (before, result['eval'])
  assert result['eval']['reward_letter_a'] == result['eval']['reward']


def test_grpo_over_a_quantized_base(tmp_path):
  """QLoRA meets GRPO: int8 base weights, LoRA adapters and a KL to the base. The rollouts sample
  from the quantized model; at step 1 (adapters zero) the KL is exactly 0, then it grows."""
  c = grpo_config(tmp_path, steps=2, **{'model.quantize': 'int8', 'model.quant_group_size': 0})
  workdir = str(tmp_path / 'run')
  trainer.train(c, workdir)
  records = _train_values(workdir)
  assert records[0]['kl'] == 0.0 and records[1]['kl'] > 0.0
  assert all(np.isfinite(r['loss']) for r in records)


def test_preempted_grpo_job_resumes_exactly(tmp_path, monkeypatch):
  """num_iterations=2: one batch of rollouts serves two steps. A SIGTERM while step 3 is fed stops
  the job after step 4 (the batch's last step); the rerun gives the metrics of an uninterrupted
  run, rollouts included (their seed is a function of the step)."""
  c = grpo_config(tmp_path, steps=6, checkpoint_every=100, **{'grpo.num_iterations': 2,
                                                              'lora.rank': 0, 'grpo.beta': 0.0})
  straight = str(tmp_path / 'straight')
  trainer.train(c, straight)
  values = _train_values(straight)
  assert values[0]['reward'] == values[1]['reward'] and values[1]['clip_fraction'] > 0
  workdir = str(tmp_path / 'preempted')
  real = distributed.put_batch
  calls = []

  def put_batch(batch, *args, **kwargs):
    if 'old_logps' in batch:  # a train step's batch (not the old log-probs' forward)
      calls.append(1)
      if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(batch, *args, **kwargs)

  monkeypatch.setattr(distributed, 'put_batch', put_batch)
  with pytest.raises(trainer.Preempted, match='SIGTERM after step 4'):
    trainer.train(c, workdir)
  monkeypatch.undo()
  trainer.train(c, workdir)
  assert _train_values(workdir) == values


def test_a_reward_function_failing_mid_run_stops_the_job_and_keeps_the_checkpoint(tmp_path):
  CALLS.clear()
  c = grpo_config(tmp_path, steps=4, checkpoint_every=2, **{'grpo.rewards': ('test_grpo:flaky',)})
  workdir = str(tmp_path / 'run')
  with pytest.raises(rewards.RewardError,
                     match=r"'test_grpo:flaky' raised KeyError: 'missing' \(at .*test_grpo.py"):
    trainer.train(c, workdir)
  assert TrainCheckpoints(workdir, 3).steps() == [2]


def test_a_reward_function_returning_text_is_refused_before_any_step(tmp_path):
  c = grpo_config(tmp_path, **{'grpo.rewards': ('test_grpo:no_number',)})
  workdir = tmp_path / 'run'
  with pytest.raises(rewards.RewardError, match=r"'test_grpo:no_number' returned 'high' \(a str\)"):
    trainer.train(c, str(workdir))
  assert not (workdir / 'checkpoints').exists() or not os.listdir(workdir / 'checkpoints')
  assert not (workdir / 'metrics.jsonl').exists()


@pytest.mark.parametrize('overrides, message', [
    ({'grpo.num_generations': 1}, 'num_generations=1 must be >= 2'),
    ({'grpo.max_completion_length': 24}, 'max_completion_length=24 must be >= 1 and leave room'),
    ({'grpo.rewards': ('nope',)}, "unknown reward 'nope'"),
    ({'grpo.rewards': ('no_such_module:f',)}, "cannot import 'no_such_module'"),
    ({'grpo.rewards': ('format',)}, 'needs config.grpo.format_pattern'),
    ({'grpo.reward_weights': (1.0, 2.0)}, 'needs one weight per reward'),
    ({'grpo.num_iterations': 5}, 'config.steps=12 must be a multiple of'),
    ({'grpo.temperature': 0.0}, 'temperature=0.0 must be > 0'),
    ({'grpo.loss_type': 'ppo'}, "config.grpo.loss_type='ppo'"),
    ({'exact_match.examples': 4}, "reports the held-out reward"),
    ({'seq_len': 8192}, 'more than the model'),
])
def test_bad_grpo_config_is_refused_before_any_work(tmp_path, overrides, message):
  with pytest.raises(train_config.ConfigError, match=message.replace('(', r'\(')):
    trainer.train(grpo_config(tmp_path, **overrides), str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def test_a_prompt_too_long_for_the_budget_is_refused_before_any_step(tmp_path):
  c = grpo_config(tmp_path, seq_len=12)
  with pytest.raises(train_config.ConfigError, match=r'prompts.jsonl:\d+: prompt has \d+ tokens'):
    trainer.train(c, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'metrics.jsonl')


def test_raw_prompts_and_stop_strings(tmp_path):
  """grpo.raw_prompt encodes the prompt text after BOS (no chat turns); grpo.stop_strings end a
  completion at the token that completes one, which stays in the completion (and its loss)."""
  c = grpo_config(tmp_path, **{'grpo.raw_prompt': True, 'grpo.stop_strings': ('a',)})
  tok = Tokenizer(TOKENIZER)
  prompts = next(iter(prompt_data.job_prompt_dataset(c, tok, split='train')))
  assert [list(p.ids) for p in prompts] == [tok.encode(p.text, add_bos=True) for p in prompts]
  objective = grpo.from_config(c)
  model = train_config.make_model(train_config.model_config(c), c)
  completions = rollouts.sample_completions(model, tok, prompts, objective, seed=3,
                                            cache_length=c.seq_len + 1)
  stopped = [x for x in completions if x.finish_reason == 'stop']
  assert stopped and all('a' not in x.text for x in completions)
  by_string = [x for x in stopped if x.tokens[-1] not in (tok.eos_id, tok.end_of_turn_id)]
  assert by_string and all('a' in tok.decode(x.tokens[-1:]) for x in by_string)
  rows = rollouts.train_rows(prompts, completions, 4, c.seq_len)
  assert (rows['loss_mask'].sum(1) == [len(x.tokens) for x in completions]).all()


def test_shipped_grpo_data_is_what_the_script_makes_and_is_correct():
  """data/grpo_{train,eval}.jsonl are scripts/make_grpo_data.py's output; every answer and worked
  example is a true sum, and no held-out problem appears in a training prompt."""
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, os.path.join(root, 'scripts'))
  import make_grpo_data  # pylint: disable=g-import-not-at-top (a script, not a package)
  train, held_out = make_grpo_data.make_records()
  for name, records in (('grpo_train', train), ('grpo_eval', held_out)):
    with open(os.path.join(root, 'data', f'{name}.jsonl')) as f:
      assert [json.loads(line) for line in f] == records
  problems = lambda text: [line.split(' =')[0] for line in text.split('\n')]
  for r in train + held_out:
    *shots, query = r['prompt'].split('\n')
    for line in shots:
      lhs, rhs = line.split(' = ')
      assert sum(map(int, lhs.split(' + '))) == int(rhs), line
    assert sum(map(int, query.removesuffix(' =').split(' + '))) == int(r['answer'])
  held = {problems(r['prompt'])[-1] for r in held_out}
  seen = {p for r in train for p in problems(r['prompt'])}
  assert not held & seen and len(held) == len(held_out)

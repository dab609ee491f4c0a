"""train.py as users run it: overrides, unknown keys, resuming after SIGKILL and after SIGTERM."""

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from gemma_jax import checkpoint, preemption, trainer
from test_trainer import TOKENIZER, _lines, override

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, 'configs', 'quickstart.py')


def _overrides(tmp_path):
  train = tmp_path / 'train.jsonl'
  with open(os.path.join(ROOT, 'data', 'quickstart_train.jsonl')) as f:
    train.write_text(''.join(next(f) for _ in range(48)))
  return {'steps': 8, 'batch_size': 4, 'seq_len': 32, 'model.preset': 'tiny-gemma1',
          'checkpoint_every': 2, 'keep_checkpoints': 3, 'log_every': 1, 'eval_every': 0,
          'exact_match.examples': 0, 'data.path': str(train), 'optimizer.warmup_steps': 2}


def _flags(config, workdir, overrides):
  return ([f'--config={config}', f'--workdir={workdir}']
          + [f'--config.{k}={v}' for k, v in overrides.items()])


def _run(args, **kw):
  return subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True,
                        timeout=600, **kw)


def _load_config(path, overrides):
  spec = importlib.util.spec_from_file_location('config_under_test', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return override(module.get_config(), overrides)


def _train_records(workdir):
  """Per-step training metrics, without the wall-clock ones."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in r.items()
             if k not in ('step_time_s', 'tokens_per_s', 'rollout_seconds')}
            for r in map(json.loads, f) if 'loss' in r]


def test_unknown_override_fails_before_any_work(tmp_path):
  workdir = tmp_path / 'run'
  for bad in ('--config.optimizer.warmup=3', '--config.stepz=3', '--config.steps=many'):
    result = _run(['train.py', f'--config={QUICKSTART}', f'--workdir={workdir}', bad])
    assert result.returncode != 0
    assert bad.split('=')[0].removeprefix('--config.') in result.stderr, result.stderr[-2000:]
    assert not workdir.exists()
  # A config the trainer cannot run: a clear message and exit status 1, no traceback.
  result = _run(['train.py', f'--config={QUICKSTART}', f'--workdir={workdir}',
                 '--config.model.vocab_size=64'])
  assert result.returncode == 1
  assert 'has 128 pieces but the model' in result.stderr and 'Traceback' not in result.stderr


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """(overrides, workdir) of 8 uninterrupted steps on one device, in this process."""
  tmp_path = tmp_path_factory.mktemp('straight')
  overrides = _overrides(tmp_path)
  workdir = str(tmp_path / 'run')
  trainer.train(_load_config(QUICKSTART, overrides), workdir)
  return overrides, workdir


def _final_params(workdir):
  return jax.tree.leaves(nnx.state(checkpoint.load_params(os.path.join(workdir, 'final')),
                                   nnx.Param))


def _sigkill_while_saving_then_rerun(tmp_path, config, overrides, straight, env=None):
  """Runs train.py with `overrides` (8 steps, checkpoints every 2), SIGKILLed while it saves step
  6, then the same command again; checks the rerun resumed at step 4 and that its metrics and
  final params equal the uninterrupted run in `straight` bit for bit."""
  workdir = str(tmp_path / 'killed')
  args = _flags(config, workdir, overrides)
  killer = (
      'import os, runpy, signal, sys\n'
      'from gemma_jax.train_checkpoints import TrainCheckpoints\n'
      'save = TrainCheckpoints.save\n'
      'def save_then_die(self, step, *a, **k):\n'
      '  save(self, step, *a, **k)\n'
      '  if step == 6:\n'
      '    os.kill(os.getpid(), signal.SIGKILL)\n'
      'TrainCheckpoints.save = save_then_die\n'
      f'sys.argv = ["train.py"] + {args!r}\n'
      'runpy.run_path("train.py", run_name="__main__")\n')
  # The killed and the resumed process run the same programs: share their compilations.
  env = dict(os.environ, **(env or {}), JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  result = _run(['-c', killer], env=env)
  assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
  # The save of step 6 was cut short: Orbax never renamed its temporary directory, so the
  # newest checkpoint is step 4.
  entries = os.listdir(os.path.join(workdir, 'checkpoints'))
  assert sorted(d for d in entries if d.isdigit()) == ['2', '4']
  assert any(d.startswith('6.') for d in entries), entries

  result = _run(['train.py'] + args, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Resuming from the checkpoint at step 4' in result.stdout

  assert [r['step'] for r in _train_records(workdir)] == list(range(1, 9))
  assert _train_records(workdir) == _train_records(straight)
  for x, y in zip(_final_params(straight), _final_params(workdir), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_after_sigkill_is_bit_identical(tmp_path, straight):
  """8 steps in one go vs. killed (SIGKILL) while saving step 6, then the same command again:
  the same losses at every step (so the same batches) and bit-identical final params."""
  overrides, straight = straight
  _sigkill_while_saving_then_rerun(tmp_path, QUICKSTART, overrides, straight)


def _tiny(tmp_path):
  """Overrides that turn a real-model config into a tiny random model with the quickstart
  tokenizer, 8 steps, checkpoints every 2."""
  return {'steps': 8, 'model.preset': 'tiny-gemma1', 'model.init': 'none', 'model.init_path': '',
          'model.vocab_size': 128, 'model.tokenizer': TOKENIZER, 'checkpoint_every': 2,
          'keep_checkpoints': 3, 'log_every': 1, 'eval_every': 0, 'learning_rate': 1e-2,
          'optimizer.warmup_steps': 2}


@pytest.mark.parametrize('objective', ['dpo', 'grpo'])
def test_post_training_resumes_after_sigkill_bit_identically(tmp_path, objective):
  """The same SIGKILL-while-saving test for the DPO job (full fine-tuning: its frozen reference
  copy is re-read on resume) and the GRPO job (LoRA; the rollouts of the resumed steps are
  sampled again, from the restored weights with the step's seed)."""
  if objective == 'dpo':
    train = tmp_path / 'pairs.jsonl'
    train.write_text(''.join(_lines(os.path.join(ROOT, 'data', 'preference_train.jsonl'), 16)))
    overrides = dict(_tiny(tmp_path), **{'batch_size': 4, 'seq_len': 32, 'lora.rank': 0,
                                          'data.path': str(train)})
  else:
    prompts = tmp_path / 'prompts.jsonl'
    prompts.write_text(''.join(json.dumps({'prompt': f'{i} + 1 =', 'answer': str(i + 1)}) + '\n'
                               for i in range(16)))
    overrides = dict(_tiny(tmp_path), **{'batch_size': 2, 'seq_len': 24,
                                          'data.path': str(prompts),
                                          'grpo.num_generations': 4,
                                          'grpo.max_completion_length': 6,
                                          'grpo.format_pattern': '.*a.*'})
  config = os.path.join(ROOT, 'configs', f'gemma3_270m_{objective}.py')
  straight = str(tmp_path / 'straight')
  trainer.train(_load_config(config, overrides), straight)
  _sigkill_while_saving_then_rerun(tmp_path, config, overrides, straight)


def test_sharded_training_equals_one_device(tmp_path, straight):
  """`train.py --config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2` on 8 simulated
  CPU devices, with 2 micro-batches per step: the same losses and final params as one device, up
  to float summation order."""
  overrides, straight = straight
  workdir = str(tmp_path / 'sharded')
  overrides = dict(overrides, **{'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2,
                                 'optimizer.grad_accum_steps': 2})
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  result = _run(['train.py'] + _flags(QUICKSTART, workdir, overrides), env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  got, want = _train_records(workdir), _train_records(straight)
  assert [r['step'] for r in got] == [r['step'] for r in want]
  for g, w in zip(got, want):
    for key in ('loss', 'grad_norm', 'target_tokens'):
      np.testing.assert_allclose(g[key], w[key], rtol=1e-5, err_msg=f'step {g["step"]} {key}')
  for x, y in zip(_final_params(straight), _final_params(workdir), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_sigterm_saves_the_step_it_reached_and_resumes_exactly(tmp_path, straight):
  """SIGTERM at a random moment of a run (slowed to ~0.25 s a step): train.py finishes the step,
  saves a checkpoint at it (checkpoint_every is larger than the run, so no other checkpoint
  exists), exits with status preemption.EXIT_CODE, and the rerun continues with exactly the
  metrics and final params of an uninterrupted run."""
  overrides, straight = straight
  workdir = str(tmp_path / 'preempted')
  args = _flags(QUICKSTART, workdir, dict(overrides, checkpoint_every=100))
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', HOOK_STEP_SLEEP='0.25')
  proc = subprocess.Popen([sys.executable, 'tests/train_hooked.py'] + args, cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  delay = random.Random().uniform(0.0, 1.2)
  for line in proc.stdout:
    if line.startswith('First step compiled'):
      time.sleep(delay)
      proc.send_signal(signal.SIGTERM)
      break
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == preemption.EXIT_CODE, (delay, err[-3000:])
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  assert len(saved) == 1 and 1 <= saved[0] < 8, (delay, saved)
  stop = saved[0]
  assert f'Stopped by SIGTERM after step {stop}' in err and 'Traceback' not in err, err[-3000:]
  assert [r['step'] for r in _train_records(workdir)][-1] == stop  # logged before it stopped

  result = _run(['train.py'] + args, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Resuming from the checkpoint at step {stop}' in result.stdout
  assert _train_records(workdir) == _train_records(straight)
  for x, y in zip(_final_params(straight), _final_params(workdir), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

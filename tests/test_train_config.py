"""gemma_jax.train_config: the schema (one set of defaults in two forms) and its checks."""

import os

import pytest

from gemma_jax import train_config
from gemma_jax.train_config import ConfigError, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  c = train_config.base_config()
  c.steps, c.batch_size = 8, 4
  c.data.path = os.path.join(ROOT, 'data', 'quickstart_train.jsonl')
  for key, value in overrides.items():
    group, _, name = key.rpartition('.')
    (c[group] if group else c)[name] = value
  return c


def _plain(ns):
  return {k: _plain(v) if hasattr(v, '__dict__') else v for k, v in vars(ns).items()}


def test_plain_config_is_the_same_schema_as_base_config():
  """The benches' ml_collections-free config has exactly the trainer's keys and defaults."""
  assert _plain(train_config.plain_config()) == train_config.base_config().to_dict()
  c = train_config.plain_config(**{'model.dtype': 'bfloat16', 'steps': 3})
  assert (c.model.dtype, c.steps, c.model.param_dtype) == ('bfloat16', 3, 'float32')
  with pytest.raises(KeyError, match='model.dtipe'):
    train_config.plain_config(**{'model.dtipe': 'bfloat16'})


def test_warmup_longer_than_the_run_is_shortened_with_a_warning(capsys):
  """A shipped config shortened for a smoke run needs no second override; a negative warmup is
  still wrong in itself."""
  validate_config(_config(**{'optimizer.warmup_steps': 20}))
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'warmup_steps=20 exceeds steps=8' in err
  validate_config(_config(**{'optimizer.warmup_steps': 8}))
  assert capsys.readouterr().err == ''
  with pytest.raises(ConfigError, match=r'warmup_steps=-1 must be >= 0'):
    validate_config(_config(**{'optimizer.warmup_steps': -1}))


@pytest.mark.parametrize('key, value, match', [
    ('model.attention', 'flash', r"config\.model\.attention='flash'"),
    ('model.remat', 'some', r"config\.model\.remat='some'"),
    ('optimizer.weight_decay_exclude', 'layers/0', r"weight_decay_exclude='layers/0'.*dotted"),
    ('lora.rank', -1, r'config\.lora\.rank=-1'),
])
def test_bad_values_name_their_key(key, value, match):
  with pytest.raises(ConfigError, match=match):
    validate_config(_config(**{key: value}))


def test_model_kwargs_follow_the_config():
  import jax.numpy as jnp
  kw = train_config.model_kwargs(_config(**{'model.dtype': 'bfloat16', 'model.remat': 'full',
                                            'model.attention': 'xla'}))
  assert kw == dict(dtype=jnp.bfloat16, param_dtype=jnp.float32, remat='full', attention='xla')
  model = train_config.abstract_model(train_config.model_config(_config()), _config(
      **{'model.attention': 'xla'}))
  assert {block.attn.impl for block in model.layers} == {'xla'}

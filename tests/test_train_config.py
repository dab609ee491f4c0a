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
    ('learning_rate', float('nan'), r'config\.learning_rate=nan must be a finite number > 0'),
    ('learning_rate', 0.0, r'config\.learning_rate=0.0 must be'),
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


def test_unknown_and_bad_config_keys():
  c = _config()
  c.unlock()
  c.optimizer.warmup = 3
  with pytest.raises(ConfigError, match=r"optimizer\.warmup"):
    validate_config(c)
  c = _config(**{'optimizer.grad_accum_steps': 3})
  with pytest.raises(ConfigError, match='not a multiple'):
    validate_config(c)
  c = _config(loss_chunk=-1)
  with pytest.raises(ConfigError, match=r'config\.loss_chunk=-1'):
    validate_config(c)


@pytest.mark.parametrize('name', ['quickstart', 'gemma3_270m_sft', 'gemma3_270m_lora',
                                  'gemma3_270m_dpo', 'gemma3_270m_grpo', 'gemma1_2b_sft',
                                  'gemma1_7b_sft'])
def test_shipped_configs_are_valid(name):
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # this machine's devices
  if c.model.init != 'none' and not c.model.init_path:  # 2B/7B ask for the user's checkpoint
    with pytest.raises(ConfigError, match='init_path'):
      validate_config(c)
    c.model.init_path = '/path/to/checkpoint'
  validate_config(c)
  model = train_config.abstract_model(train_config.model_config(c), c)
  assert model.config.name == c.model.preset


CONFIGS = ['quickstart', 'gemma3_270m_sft', 'gemma3_270m_lora', 'gemma3_270m_dpo',
           'gemma3_270m_grpo', 'gemma1_2b_sft', 'gemma1_7b_sft']


def _literal_settings(name):
  """{dotted key: value} of every `c.a.b = literal` in a config file's get_config, and the
  config module it starts from ('' = base_config)."""
  import ast
  with open(os.path.join(ROOT, 'configs', f'{name}.py')) as f:
    tree = ast.parse(f.read())
  base = next((a.name for n in tree.body if isinstance(n, ast.ImportFrom)
               and n.module == 'configs' for a in n.names), '')
  settings = {}
  for node in ast.walk(tree):
    if not isinstance(node, ast.Assign):
      continue
    targets, values = node.targets[0], node.value
    pairs = (zip(targets.elts, values.elts) if isinstance(targets, ast.Tuple)
             else [(targets, values)])
    for target, value in pairs:
      key = ast.unparse(target)
      if key.startswith('c.'):
        try:
          settings[key[2:]] = ast.literal_eval(value)
        except ValueError:
          pass  # computed (paths): not a default
  return settings, base


@pytest.mark.parametrize('name', CONFIGS)
def test_shipped_configs_set_only_what_differs_from_their_base(name):
  """A config repeats no value of the config it starts from (base_config or a sibling); only
  the model preset, a job's identity, is always stated."""
  import importlib
  settings, base = _literal_settings(name)
  start = (importlib.import_module(f'configs.{base}').get_config() if base
           else train_config.base_config())
  assert settings, name
  for key, value in settings.items():
    if key == 'model.preset':
      continue
    group, _, leaf = key.rpartition('.')
    before = (start[group] if group else start)[leaf]
    assert value != before, f'configs/{name}.py sets {key} = {value!r}, which is already so'

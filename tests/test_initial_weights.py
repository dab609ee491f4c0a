"""gemma_jax.initial_weights: a job's model config, tokenizer and starting weights, checked
before any weight is read and placed straight onto the train state's shardings."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from gemma_jax import initial_weights, sharding, train_config, train_state
from gemma_jax.convert import load_hf
from gemma_jax.transformer import flat_params
from hf_models import make_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, 'data', 'quickstart_tokenizer.model')  # 128 pieces


def _config(**overrides):
  c = train_config.base_config()
  c.model.preset, c.model.tokenizer, c.model.vocab_size = 'tiny-gemma1', TOKENIZER, 128
  for key, value in overrides.items():
    group, _, name = key.rpartition('.')
    (c[group] if group else c)[name] = value
  return c


def test_seq_len_past_max_seq_len_is_refused(tmp_path):
  c = _config(seq_len=9000)  # tiny-gemma1 keeps the default max_seq_len 8192
  with pytest.raises(train_config.ConfigError, match=r'seq_len=9000 exceeds the max_seq_len'):
    initial_weights.model_and_tokenizer(c, str(tmp_path), resume=False)


def test_hf_weights_go_straight_onto_the_state_shardings(tmp_path):
  """model.init='hf': converted on the host and placed on the train state's shardings, in the
  config's master-weight dtype; equal to load_hf's weights; config and tokenizer read first."""
  make_hf_model('gemma1-mqa').save_pretrained(tmp_path / 'hf')
  c = _config(**{'model.init': 'hf', 'model.init_path': str(tmp_path / 'hf'),
                 'model.vocab_size': 0, 'model.param_dtype': 'bfloat16',
                 'model.tokenizer': TOKENIZER})
  mc, tok = initial_weights.model_and_tokenizer(c, str(tmp_path / 'run'), resume=False)
  assert mc.vocab_size == 256 and tok.vocab_size == 128
  plan = train_state.plan_train_state(mc, c, sharding.make_mesh({'fsdp': -1}))
  params = initial_weights.initial_params(mc, c, plan.shardings['params'])
  want = flat_params(load_hf(tmp_path / 'hf', dtype=jax.numpy.bfloat16))
  flat = {'.'.join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(params)}
  assert set(flat) == set(want)
  shardings = {'.'.join(map(str, p)): s.get_value()
               for p, s in nnx.to_flat_state(plan.shardings['params'])}
  for name, value in flat.items():
    assert value.dtype == jax.numpy.bfloat16 and value.sharding == shardings[name], name
    np.testing.assert_array_equal(np.asarray(value), np.asarray(want[name]))

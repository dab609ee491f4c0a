"""Native checkpoints: save_params / load_params round trips, dtypes, shardings and bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma_jax import checkpoint
from gemma_jax.config import get_preset
from gemma_jax.transformer import Transformer, flat_params

TOKENS = jnp.array([[2, 17, 300, 5, 9, 511, 42, 7]], jnp.int32)


@pytest.fixture(scope='module')
def model():
  return Transformer(get_preset('tiny-gemma3'), rngs=nnx.Rngs(3))


@pytest.fixture(scope='module')
def saved(model, tmp_path_factory):
  directory = tmp_path_factory.mktemp('ckpt') / 'run'
  checkpoint.save_params(model, directory)
  return directory


def test_round_trip_is_exact(model, saved):
  restored = checkpoint.load_params(saved)
  assert restored.config == model.config
  want, got = flat_params(model), flat_params(restored)
  assert want.keys() == got.keys()
  for name in want:
    assert got[name].dtype == want[name].dtype, name
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)
  np.testing.assert_array_equal(np.asarray(restored(TOKENS)[0]), np.asarray(model(TOKENS)[0]))


def test_layout_is_self_describing(model, saved):
  with open(saved / 'config.json') as f:
    assert json.load(f) == model.config.to_dict()
  assert checkpoint.load_config(saved) == model.config
  assert (saved / 'params').is_dir()
  assert checkpoint.tokenizer_path(saved) is None


def test_restore_in_other_dtype(model, saved):
  restored = checkpoint.load_params(saved, param_dtype=jnp.bfloat16)
  assert restored.embedder.input_embedding[...].dtype == jnp.bfloat16
  assert restored.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      np.asarray(restored.layers[0].mlp.linear[...]),
      np.asarray(model.layers[0].mlp.linear[...].astype(jnp.bfloat16)))


def test_restore_with_shardings(model, saved):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('fsdp',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  restored = checkpoint.load_params(saved, shardings=replicated)
  emb = restored.embedder.input_embedding[...]
  assert emb.sharding == replicated
  per_name = {name: replicated for name in flat_params(model)}
  per_name['embedder.input_embedding'] = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, 'fsdp'))
  restored = checkpoint.load_params(saved, shardings=per_name)
  assert restored.embedder.input_embedding[...].sharding == per_name['embedder.input_embedding']
  with pytest.raises(ValueError, match='no entry for'):
    checkpoint.load_params(saved, shardings={'final_norm.scale': replicated})


def test_tokenizer_file_is_copied(model, tmp_path):
  src = tmp_path / 'spm.model'
  src.write_bytes(b'not really a model, but bytes to copy')
  checkpoint.save_params(model, tmp_path / 'c', tokenizer=str(src))
  assert checkpoint.tokenizer_path(tmp_path / 'c') == str(tmp_path / 'c' / 'tokenizer.model')
  assert (tmp_path / 'c' / 'tokenizer.model').read_bytes() == src.read_bytes()


def test_directory_without_params(tmp_path):
  with pytest.raises(ValueError, match=r'no params/ directory.*not a gemma_jax checkpoint'):
    checkpoint.load_params(tmp_path)
  (tmp_path / 'params').mkdir()
  with pytest.raises(ValueError, match='no config.json'):
    checkpoint.load_params(tmp_path)


def test_config_params_mismatch(model, saved, tmp_path):
  bad = tmp_path / 'bad'
  bad.mkdir()
  os.symlink(saved / 'params', bad / 'params')
  config = model.config.replace(num_layers=5, attention_types=model.config.attention_types[:5])
  (bad / 'config.json').write_text(json.dumps(config.to_dict()))
  with pytest.raises(ValueError, match=r"unexpected parameters \['layers\.5\."):
    checkpoint.load_params(bad)


def test_refuses_to_overwrite(model, saved):
  with pytest.raises(ValueError, match='already exists'):
    checkpoint.save_params(model, saved)

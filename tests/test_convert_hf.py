"""load_hf: clear errors for bad directories, tensors and configs."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gemma_jax.convert import load_hf
from hf_models import make_hf_model


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  path = tmp_path_factory.mktemp('gemma1')
  make_hf_model('gemma1-mqa').save_pretrained(path)
  return path


def _copy_with(tmp_path, saved, tensors=None, config=None):
  out = tmp_path / 'model'
  out.mkdir()
  cfg = json.loads((saved / 'config.json').read_text())
  (out / 'config.json').write_text(json.dumps(config(cfg) if config else cfg))
  t = load_file(saved / 'model.safetensors')
  save_file(tensors(t) if tensors else t, out / 'model.safetensors')
  return out


def test_missing_tensor(tmp_path, saved):
  def drop(t):
    del t['model.layers.1.mlp.up_proj.weight']
    return t
  with pytest.raises(ValueError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'"):
    load_hf(_copy_with(tmp_path, saved, tensors=drop))


def test_misshaped_tensor(tmp_path, saved):
  def shrink(t):
    t['model.layers.0.self_attn.k_proj.weight'] = np.zeros((8, 64), np.float32)
    return t
  with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape "
                                       r"\(8, 64\), expected \(16, 64\)"):
    load_hf(_copy_with(tmp_path, saved, tensors=shrink))


def test_unexpected_tensor(tmp_path, saved):
  def add(t):
    t['model.layers.0.self_attn.q_proj.bias'] = np.zeros(64, np.float32)
    return t
  with pytest.raises(ValueError, match='unexpected tensors'):
    load_hf(_copy_with(tmp_path, saved, tensors=add))


def test_unsupported_architecture(tmp_path, saved):
  def llama(cfg):
    return {**cfg, 'model_type': 'llama', 'architectures': ['LlamaForCausalLM']}
  with pytest.raises(ValueError, match=r"config.json: architectures \['LlamaForCausalLM'\]"):
    load_hf(_copy_with(tmp_path, saved, config=llama))


def test_not_a_model_directory(tmp_path):
  with pytest.raises(ValueError, match='no config.json'):
    load_hf(tmp_path)

"""load_hf: clear errors for bad directories, tensors and configs; the text part of a multimodal
Gemma 4 checkpoint."""

import json
import logging

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from gemma_jax.convert import config_from_hf, load_hf
from gemma_jax.convert import hf as hf_lib
from hf_models import FAMILIES, hf_logits, make_hf_model


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


# --- Gemma 4: bad checkpoints fail with the tensor or key named, before any model is built. ---

@pytest.fixture(scope='module')
def saved_moe(tmp_path_factory):
  path = tmp_path_factory.mktemp('gemma4-moe')
  make_hf_model('gemma4-moe').save_pretrained(path)
  return path


@pytest.fixture(scope='module')
def saved_ple(tmp_path_factory):
  path = tmp_path_factory.mktemp('gemma4-ple')
  make_hf_model('gemma4-ple').save_pretrained(path)
  return path


@pytest.fixture
def no_build(monkeypatch):
  """Fails the test if a load gets as far as building a model."""
  def refuse(*args, **kwargs):
    raise AssertionError('the bad checkpoint reached model_from_params')
  monkeypatch.setattr(hf_lib, 'model_from_params', refuse)


def test_gemma4_missing_expert_tensor(tmp_path, saved_moe, no_build):
  def drop(t):
    del t['model.layers.0.experts.down_proj']
    return t
  with pytest.raises(ValueError, match=r"missing tensor 'model.layers.0.experts.down_proj' "
                                       r"\(expected shape \(5, 48, 24\)\)"):
    load_hf(_copy_with(tmp_path, saved_moe, tensors=drop))


def test_gemma4_wrong_per_layer_table(tmp_path, saved_ple, no_build):
  def one_layer_short(t):  # [V, L*I] with L-1 layers' slices
    t['model.embed_tokens_per_layer.weight'] = t['model.embed_tokens_per_layer.weight'][:, 6:]
    return t
  with pytest.raises(ValueError, match=r"'model.embed_tokens_per_layer.weight' has shape "
                                       r"\(256, 36\), expected \(256, 42\)"):
    load_hf(_copy_with(tmp_path, saved_ple, tensors=one_layer_short))


def test_gemma4_unknown_rope_type(tmp_path, saved_ple, no_build):
  def yarn(cfg):
    cfg['rope_parameters']['full_attention']['rope_type'] = 'yarn'
    return cfg
  with pytest.raises(ValueError, match=r"config.json: rope_type 'yarn' in 'full_attention' is "
                                       'not supported'):
    load_hf(_copy_with(tmp_path, saved_ple, config=yarn))


def test_gemma4_more_experts_per_token_than_experts(tmp_path, saved_moe, no_build):
  with pytest.raises(ValueError, match=r'config.json: top_k_experts=6 is larger than '
                                       r'num_experts=5'):
    load_hf(_copy_with(tmp_path, saved_moe, config=lambda cfg: {**cfg, 'top_k_experts': 6}))


def test_gemma4_bidirectional_text(tmp_path, saved_moe, no_build):
  """'all' (every token bidirectional) is refused; 'vision' is read in test_multimodal_*."""
  config = lambda cfg: {**cfg, 'use_bidirectional_attention': 'all'}
  with pytest.raises(ValueError, match=r"use_bidirectional_attention='all' is not supported"):
    load_hf(_copy_with(tmp_path, saved_moe, config=config))


# --- Gemma 4: the language model of a multimodal Gemma4ForConditionalGeneration checkpoint. ---

@pytest.fixture(scope='module')
def multimodal(tmp_path_factory):
  """A tiny Gemma4ForConditionalGeneration (text as tests/hf_models.py's 'gemma4-ple', with the
  26B/31B setting use_bidirectional_attention='vision'), saved with save_pretrained."""
  text = FAMILIES['gemma4-ple']()
  text.use_bidirectional_attention = 'vision'
  vision = transformers.Gemma4VisionConfig(
      hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
      num_key_value_heads=2, head_dim=8, position_embedding_size=64, patch_size=4)
  audio = transformers.Gemma4AudioConfig(
      hidden_size=16, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=(4, 4),
      output_proj_dims=16)
  config = transformers.Gemma4Config(text_config=text, vision_config=vision, audio_config=audio,
                                     initializer_range=0.1)
  torch.manual_seed(1)
  model = transformers.Gemma4ForConditionalGeneration(config).eval()
  with torch.no_grad():  # as make_hf_model: Gemma 4 norms multiply by their weight, centred on 1
    for name, p in model.named_parameters():
      if name.startswith('model.language_model.') and 'norm' in name:
        p.normal_(1.0, 0.5)
    for name, b in model.named_buffers():
      if name.endswith('layer_scalar'):
        b.uniform_(0.5, 1.5)
  path = tmp_path_factory.mktemp('gemma4-multimodal')
  model.save_pretrained(path)
  return path, model


def test_multimodal_checkpoint_loads_its_language_model(multimodal, caplog):
  path, reference = multimodal
  saved = json.loads((path / 'config.json').read_text())
  assert saved['model_type'] == 'gemma4' and 'text_config' in saved
  towers = [k for k in load_file(path / 'model.safetensors')
            if not k.startswith('model.language_model.') and k != 'lm_head.weight']
  assert any('vision_tower' in k for k in towers) and any('audio_tower' in k for k in towers)
  with caplog.at_level(logging.INFO, logger='gemma_jax.convert'):
    model = load_hf(path)
  assert f'reading the language model; skipping {len(towers)} vision/audio tensors' in caplog.text

  # transformers' own text-only model on the language model's weights is the same model ...
  text_only = transformers.Gemma4ForCausalLM(reference.config.text_config).eval()
  text_only.load_state_dict(
      {k.replace('model.language_model.', 'model.'): v for k, v in reference.state_dict().items()
       if k.startswith('model.language_model.') or k == 'lm_head.weight'}, strict=True)
  assert model.config.replace(name='') == config_from_hf(
      text_only.config.to_dict()).replace(name='')
  tokens = np.random.default_rng(0).integers(0, 256, (2, 20))
  want = hf_logits(reference, tokens)  # the multimodal model fed token ids only
  np.testing.assert_allclose(hf_logits(text_only, tokens), want, rtol=0, atol=1e-5)
  # ... and ours equals it.
  got = np.asarray(nnx.jit(lambda m, t: m(t)[0])(model, jnp.asarray(tokens)))  # one compile
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-5

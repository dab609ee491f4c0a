"""Presets: every one builds abstractly and has exactly transformers' parameter count."""

import jax
import pytest
import torch
import transformers
from flax import nnx

from gemma_jax.config import PRESETS, ModelConfig, get_preset
from gemma_jax.convert.hf import config_from_hf, hf_config_from_config
from gemma_jax.transformer import Transformer, count_params

REAL = [n for n in PRESETS if not n.startswith('tiny')]


def _hf_config(config: ModelConfig):
  # transformers' Gemma 1/2 vocabularies have 256000 rows; official checkpoints pad to 256128.
  vocab = 256_000 if config.family < 3 else config.vocab_size
  d = hf_config_from_config(config, vocab_size=vocab)
  return transformers.AutoConfig.for_model(d.pop('model_type'), **d), vocab


@pytest.mark.parametrize('name', REAL)
def test_preset_param_count_equals_transformers(name):
  config = get_preset(name)
  hf_config, vocab = _hf_config(config)
  with torch.device('meta'):
    hf = transformers.AutoModelForCausalLM.from_config(hf_config)
  hf_count = sum(p.numel() for p in hf.parameters())  # tied head counted once
  if config.family >= 4:
    # Gemma 4's layer_scalar is a buffer in transformers (loaded, never trained); ours is a
    # parameter (it trains with the rest), one per layer.
    hf_count += sum(b.numel() for n, b in hf.named_buffers() if n.endswith('layer_scalar'))
  abstract = nnx.eval_shape(lambda: Transformer(config.replace(vocab_size=vocab),
                                                rngs=nnx.Rngs(0)))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(abstract)))
  assert count_params(abstract) == hf_count


@pytest.mark.parametrize('name', REAL)
def test_preset_round_trips_through_hf_config(name):
  config = get_preset(name)
  hf_config, _ = _hf_config(config)
  back = config_from_hf(hf_config.to_dict())
  assert back.replace(name=config.name, vocab_size=config.vocab_size) == config


def test_transformers_defaults_agree_with_presets():
  """transformers' default configs are the Gemma 7B and Gemma 2 2B shapes."""
  for hf, ours in [(transformers.GemmaConfig(), 'gemma1-7b'),
                   (transformers.Gemma2Config(), 'gemma2-2b')]:
    got = config_from_hf(hf.to_dict())
    want = get_preset(ours)
    for field in ('num_layers', 'embed_dim', 'hidden_dim', 'num_heads', 'num_kv_heads', 'head_dim',
                  'query_pre_attn_scalar', 'attn_logits_soft_cap', 'final_logit_soft_cap',
                  'rope_base_local'):
      if ours == 'gemma1-7b' and field == 'query_pre_attn_scalar':
        continue
      assert getattr(got, field) == getattr(want, field), (ours, field)


def test_unknown_preset_names_the_known_ones():
  with pytest.raises(ValueError, match='gemma3-270m'):
    get_preset('gemma4-1t')


def test_config_json_round_trip():
  for config in PRESETS.values():
    assert ModelConfig.from_dict(config.to_dict()) == config
  with pytest.raises(ValueError, match='unknown keys'):
    ModelConfig.from_dict({**get_preset('tiny-gemma1').to_dict(), 'bogus': 1})


def test_unsupported_hf_config_is_a_clear_error():
  with pytest.raises(ValueError, match="model_type 'llama'"):
    config_from_hf({'model_type': 'llama', 'architectures': ['LlamaForCausalLM']})
  bad = transformers.GemmaConfig().to_dict()
  del bad['hidden_size']
  with pytest.raises(ValueError, match="missing key 'hidden_size'"):
    config_from_hf(bad)


def test_one_layer_pattern_rule_serves_presets_and_importers():
  """config.layer_pattern is the rule: the presets follow it, and an HF config without
  `layer_types` (older files) is read back with the same pattern for each generation."""
  from gemma_jax.config import PATTERN_PERIOD, AttentionType, layer_pattern
  G, LO = AttentionType.GLOBAL, AttentionType.LOCAL
  assert layer_pattern(4, 1) == (G, G, G, G)
  assert layer_pattern(4, 2) == (LO, G, LO, G)
  assert layer_pattern(7, 6) == (LO,) * 5 + (G, LO)
  with pytest.raises(ValueError, match='period'):
    layer_pattern(4, 0)
  for name in ('gemma1-2b', 'gemma2-9b', 'gemma3-1b', 'tiny-gemma3'):
    config = get_preset(name)
    assert config.attention_types == layer_pattern(config.num_layers,
                                                   PATTERN_PERIOD[config.family])
    hf = hf_config_from_config(config)
    hf.pop('layer_types', None)
    assert config_from_hf(hf).attention_types == config.attention_types, name
  hf = hf_config_from_config(get_preset('tiny-gemma3'))
  del hf['layer_types']
  hf['sliding_window_pattern'] = 3
  assert config_from_hf(hf).attention_types == layer_pattern(6, 3)

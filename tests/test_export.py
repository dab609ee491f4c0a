"""save_hf: transformers -> gemma_jax -> save_hf -> transformers is exact (tensors and logits)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax import checkpoint
from gemma_jax.convert import load_hf, save_hf

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
from hf_models import FAMILIES, hf_logits, make_hf_model  # noqa: E402

TOKENS = np.array([[2, 5, 77, 130, 9, 200, 31, 4, 18, 250, 66, 1]])


def _state(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items() if k != 'lm_head.weight'}


@pytest.mark.parametrize('family', list(FAMILIES))
def test_round_trip_through_native_checkpoint(family, tmp_path):
  source = make_hf_model(family, seed=1)
  source.save_pretrained(tmp_path / 'src')
  # transformers -> native checkpoint on disk -> back, as the CLI does it.
  checkpoint.save_params(load_hf(tmp_path / 'src'), tmp_path / 'native')
  save_hf(checkpoint.load_params(tmp_path / 'native'), tmp_path / 'out')

  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'out',
                                                           dtype=torch.float32).eval()
  assert type(back) is type(source)
  want, got = _state(source), _state(back)
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  np.testing.assert_array_equal(hf_logits(back, TOKENS), hf_logits(source, TOKENS))
  # From to_dict: Gemma 4 configs refuse attribute access to per-layer keys (num_key_value_heads).
  got_config, want_config = back.config.to_dict(), source.config.to_dict()
  for key in ('num_hidden_layers', 'num_key_value_heads', 'head_dim', 'sliding_window',
              'query_pre_attn_scalar', 'final_logit_softcapping', 'attn_logit_softcapping',
              'layer_types', 'rope_parameters', 'vocab_size', 'per_layer_config',
              'attention_k_eq_v', 'num_kv_shared_layers', 'use_double_wide_mlp',
              'hidden_size_per_layer_input', 'vocab_size_per_layer_input', 'enable_moe_block',
              'num_experts', 'top_k_experts', 'moe_intermediate_size'):
    if key == 'vocab_size_per_layer_input' and not want_config.get('hidden_size_per_layer_input'):
      continue  # unused without per-layer inputs
    assert got_config.get(key) == want_config.get(key), key


@pytest.fixture(scope='module')
def gemma3(tmp_path_factory):
  path = tmp_path_factory.mktemp('gemma3')
  make_hf_model('gemma3', seed=2).save_pretrained(path)
  return path


def test_sharded_bfloat16_with_trimmed_vocab(gemma3, tmp_path):
  model = load_hf(gemma3, dtype=jnp.bfloat16)
  save_hf(model, tmp_path / 'out', vocab_size=250, max_shard_bytes=20_000,
          tokenizer=_fake_tokenizer(tmp_path))
  files = sorted(p.name for p in (tmp_path / 'out').iterdir())
  assert 'model.safetensors.index.json' in files and 'tokenizer.model' in files
  shards = [f for f in files if f.endswith('.safetensors')]
  assert len(shards) > 2 and shards[0] == f'model-00001-of-{len(shards):05d}.safetensors'
  config = json.loads((tmp_path / 'out' / 'config.json').read_text())
  assert config['vocab_size'] == 250 and config['torch_dtype'] == 'bfloat16'

  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'out', dtype=torch.bfloat16)
  source = transformers.AutoModelForCausalLM.from_pretrained(gemma3, dtype=torch.bfloat16)
  got = {k: v.float().numpy() for k, v in back.state_dict().items()}
  for name, value in source.state_dict().items():
    value = value.float().numpy()
    if name in ('model.embed_tokens.weight', 'lm_head.weight'):
      value = value[:250]
    np.testing.assert_array_equal(got[name], value, err_msg=name)


def _fake_tokenizer(tmp_path):
  path = tmp_path / 'spm.model'
  path.write_bytes(b'sentencepiece bytes')
  return path


def test_refuses_non_empty_dir_and_bad_vocab(gemma3, tmp_path):
  model = load_hf(gemma3)
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'x').write_text('')
  with pytest.raises(ValueError, match='is not empty'):
    save_hf(model, tmp_path / 'full')
  with pytest.raises(ValueError, match=r'vocab_size=999 must be in 1\.\.256'):
    save_hf(model, tmp_path / 'out', vocab_size=999)

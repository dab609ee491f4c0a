"""load_official: Orbax checkpoints in the official (Kaggle) layout give transformers' logits.

Kaggle checkpoints cannot be downloaded here, so each test writes one with Orbax, exactly in the
released layout, from a random transformers model. The writer below restates the official einsum
conventions ('BTD,NDH->BTNH' for q, 'BSD,CKDH->CBSKH' for k/v, 'BTNH,NHD->BTD' for the output,
'...D,NDF->...NF' / transposed '...D,NFD->...NF' for the gating) independently of the importer.
"""

import numpy as np
import orbax.checkpoint as ocp
import pytest

import jax.numpy as jnp

from gemma_jax.config import get_preset
from gemma_jax.convert import load_official
from gemma_jax.convert.hf import config_from_hf, hf_config_from_config

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
from hf_models import hf_logits, make_hf_model  # noqa: E402

TOKENS = np.array([[2, 5, 77, 130, 9, 200, 31, 4, 18, 250, 66, 1, 40, 41]])
PAD_ROWS = 64  # Gemma 1/2 releases pad 256000 rows to 256128; these tests pad V to V + 64.


def official_tree(model, *, transposed_gating, pad_rows=0, nested=False, seed=0):
  """A transformers Gemma model's weights in the official layout (flat Kaggle form by default)."""
  c = model.config
  N, K, D, H = c.num_attention_heads, c.num_key_value_heads, c.hidden_size, c.head_dim
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  family = {'gemma': 1, 'gemma2': 2, 'gemma3_text': 3}[c.model_type]
  emb = sd['model.embed_tokens.weight']
  junk = np.random.default_rng(seed).normal(size=(pad_rows, D)).astype(emb.dtype)
  flat = {'transformer/embedder': {'input_embedding': np.concatenate([emb, junk])},
          'transformer/final_norm': {'scale': sd['model.norm.weight']}}

  def heads(w, n):  # HF [n*H, D] -> official (n, D, H)
    return w.reshape(n, H, D).transpose(0, 2, 1)

  for i in range(c.num_hidden_layers):
    hf, us = f'model.layers.{i}.', f'transformer/layer_{i}/'
    q = heads(sd[hf + 'self_attn.q_proj.weight'], N)
    k = heads(sd[hf + 'self_attn.k_proj.weight'], K)
    v = heads(sd[hf + 'self_attn.v_proj.weight'], K)
    if N == K:
      flat[us + 'attn/qkv_einsum'] = {'w': np.stack([q, k, v])}
    else:
      flat[us + 'attn/q_einsum'] = {'w': q}
      flat[us + 'attn/kv_einsum'] = {'w': np.stack([k, v])}
    o = sd[hf + 'self_attn.o_proj.weight']  # [D, N*H]
    flat[us + 'attn/attn_vec_einsum'] = {'w': o.reshape(D, N, H).transpose(1, 2, 0)}
    gate, up = sd[hf + 'mlp.gate_proj.weight'], sd[hf + 'mlp.up_proj.weight']  # [F, D]
    gating = np.stack([gate, up]) if transposed_gating else np.stack([gate.T, up.T])
    flat[us + 'mlp/gating_einsum'] = {'w': gating}
    flat[us + 'mlp/linear'] = {'w': sd[hf + 'mlp.down_proj.weight'].T}
    norms = {'pre_attention_norm': 'input_layernorm'}
    if family == 1:
      norms['pre_ffw_norm'] = 'post_attention_layernorm'
    else:
      norms.update(post_attention_norm='post_attention_layernorm',
                   pre_ffw_norm='pre_feedforward_layernorm',
                   post_ffw_norm='post_feedforward_layernorm')
    if family == 3:
      norms.update({'attn/_query_norm': 'self_attn.q_norm', 'attn/_key_norm': 'self_attn.k_norm'})
    for ours, theirs in norms.items():
      flat[us + ours] = {'scale': sd[f'{hf}{theirs}.weight']}
  if not nested:
    return flat
  tree = {}  # gemma.gm's nested form: {'transformer': {'layer_0': {'mlp': {'gating_einsum': x}}}}
  for key, leaves in flat.items():
    *parents, last = key.split('/')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = leaves['w'] if last in ('gating_einsum', 'linear') else leaves
  return tree


def _write(tree, path):
  ocp.PyTreeCheckpointer().save(path, tree)
  return path


def _assert_matches(model, reference, vocab):
  got = np.asarray(model(jnp.asarray(TOKENS))[0])[..., :vocab]
  want = hf_logits(reference, TOKENS)
  rel = np.abs(got - want).max() / np.abs(want).max()
  assert rel < 1e-5, rel
  assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize('family,transposed,pad', [
    ('gemma1-mqa', False, PAD_ROWS), ('gemma1-mha', False, PAD_ROWS),
    ('gemma2', True, PAD_ROWS), ('gemma3', True, 0)])
def test_flat_kaggle_layout(family, transposed, pad, tmp_path):
  reference = make_hf_model(family, seed=3)
  path = _write(official_tree(reference, transposed_gating=transposed, pad_rows=pad),
                tmp_path / 'ckpt')
  config = config_from_hf(reference.config.to_dict())
  model = load_official(path, config)  # Padding rows past config.vocab_size are dropped.
  assert model.embedder.input_embedding.shape == (256, 64)
  _assert_matches(model, reference, 256)


def test_nested_layout_keeps_padded_vocab(tmp_path):
  reference = make_hf_model('gemma2', seed=4)
  tree = official_tree(reference, transposed_gating=False, pad_rows=PAD_ROWS, nested=True)
  assert set(tree) == {'transformer'}
  config = config_from_hf(reference.config.to_dict()).replace(vocab_size=256 + PAD_ROWS)
  model = load_official(_write(tree, tmp_path / 'ckpt'), config, param_dtype=jnp.float32)
  assert model.embedder.input_embedding.shape == (256 + PAD_ROWS, 64)
  _assert_matches(model, reference, 256)


@pytest.fixture(scope='module')
def tiny_gemma3(tmp_path_factory):
  """A transformers model shaped like the 'tiny-gemma3' preset, saved in the official layout."""
  hf_config = transformers.Gemma3TextConfig(**hf_config_from_config(get_preset('tiny-gemma3')))
  hf_config.initializer_range = 0.1
  torch.manual_seed(5)
  reference = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
  path = _write(official_tree(reference, transposed_gating=True),
                tmp_path_factory.mktemp('official') / 'tiny-gemma3')
  return reference, path


def test_preset_by_name_and_bfloat16(tiny_gemma3):
  reference, path = tiny_gemma3
  model = load_official(path, 'tiny-gemma3')
  assert model.config == get_preset('tiny-gemma3')
  _assert_matches(model, reference, 512)
  half = load_official(path, 'tiny-gemma3', dtype=jnp.bfloat16)
  assert half.layers[0].mlp.gating_einsum[...].dtype == jnp.bfloat16
  assert half.layers[0].mlp.gating_einsum.shape == (2, 64, 128)


def test_wrong_preset(tiny_gemma3):
  _, path = tiny_gemma3
  with pytest.raises(ValueError, match=r"tiny-gemma3.*Does the preset 'tiny-gemma2' match"):
    load_official(path, 'tiny-gemma2')
  with pytest.raises(ValueError, match='Unknown model preset'):
    load_official(path, 'gemma9-1t')


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(ValueError, match='not a directory'):
    load_official(tmp_path / 'missing', 'tiny-gemma3')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='empty.*not an Orbax checkpoint'):
    load_official(tmp_path / 'empty', 'tiny-gemma3')

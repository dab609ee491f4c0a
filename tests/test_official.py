"""load_official: Orbax checkpoints in the official (Kaggle) layout give transformers' logits.

Kaggle checkpoints cannot be downloaded here, so each test writes one with Orbax, exactly in the
released layout, from a random transformers model. The writer below restates the official einsum
conventions ('BTD,NDH->BTNH' for q, 'BSD,CKDH->CBSKH' for k/v, 'BTNH,NHD->BTD' for the output,
'...D,NDF->...NF' / transposed '...D,NFD->...NF' for the gating) independently of the importer.
"""

import logging

import numpy as np
import orbax.checkpoint as ocp
import pytest

import jax.numpy as jnp
from flax import nnx

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


# --- Gemma 4: the gemma library's parameter tree (gemma/gm/nn/gemma4). ---

def gemma4_tree(model, *, flat, seed=0):
  """A transformers Gemma 4 model's weights as `gemma.gm.nn.gemma4` names and shapes them: the
  nested params tree (no 'transformer' root, dense gating without 'w'), or the flat Kaggle form
  ('transformer/...': {'w': ...}). KV-shared layers carry junk k/v weights and key norms, as the
  released checkpoints keep theirs; junk vision/audio weights stand in for the encoders."""
  c = model.config.to_dict()
  L, D, N = c['num_hidden_layers'], c['hidden_size'], c['num_attention_heads']
  types, I = c['layer_types'], c['hidden_size_per_layer_input']
  first_shared = L - c['num_kv_shared_layers']
  overrides = {int(i): v for i, v in c['per_layer_config'].items()}  # full-attention layers
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  rng = np.random.default_rng(seed)
  junk = lambda *shape: rng.normal(size=shape).astype(np.float32)
  tree = {'embedder': {'input_embedding': sd['model.embed_tokens.weight'],
                       'mm_input_projection': {'w': junk(8, D)},
                       'audio_input_projection': {'w': junk(8, D)}},
          'final_norm': {'scale': sd['model.norm.weight']},
          'vision_encoder': {'patch': {'w': junk(4, 8)}},
          'audio_encoder': {'conv': {'w': junk(4, 8)}}}
  if I:
    tree['embedder']['per_layer_embeddings'] = sd['model.embed_tokens_per_layer.weight'].reshape(
        -1, L, I)
    tree['embedder']['per_layer_model_projection'] = {
        'w': sd['model.per_layer_model_projection.weight'].T.reshape(D, L, I)}
    tree['embedder']['per_layer_projection_norm'] = {
        'scale': sd['model.per_layer_projection_norm.weight']}

  def gating(prefix):  # FeedForward: gating_einsum (2, F, D), linear (F, D)
    g = np.stack([sd[prefix + 'gate_proj.weight'], sd[prefix + 'up_proj.weight']])
    return {'gating_einsum': g, 'linear': sd[prefix + 'down_proj.weight'].T}

  for i, kind in enumerate(types):
    hf = f'model.layers.{i}.'
    H = overrides.get(i, {}).get('head_dim', c['head_dim'])
    q = sd[hf + 'self_attn.q_proj.weight']
    attn = {'q_einsum': {'w': q.reshape(N, H, D).transpose(0, 2, 1)},
            'attn_vec_einsum': {'w': sd[hf + 'self_attn.o_proj.weight'].reshape(D, N, H)
                                .transpose(1, 2, 0)},
            'query_norm': {'scale': sd[hf + 'self_attn.q_norm.weight']}}
    k_eq_v = c['attention_k_eq_v'] and kind == 'full_attention'
    if i >= first_shared:  # unused by the model; official checkpoints still hold them
      K = overrides.get(i, {}).get('num_key_value_heads', c['num_key_value_heads'])
      attn.update({'k_einsum': {'w': junk(K, D, H)}} if k_eq_v else
                  {'kv_einsum': {'w': junk(2, K, D, H)}})
      attn['key_norm'] = {'scale': junk(H)}
    else:
      K = sd[hf + 'self_attn.k_proj.weight'].shape[0] // H
      k = sd[hf + 'self_attn.k_proj.weight'].reshape(K, H, D).transpose(0, 2, 1)
      if k_eq_v:
        attn['k_einsum'] = {'w': k}
      else:
        v = sd[hf + 'self_attn.v_proj.weight'].reshape(K, H, D).transpose(0, 2, 1)
        attn['kv_einsum'] = {'w': np.stack([k, v])}
      attn['key_norm'] = {'scale': sd[hf + 'self_attn.k_norm.weight']}
    norm = lambda name: {'scale': sd[f'{hf}{name}.weight']}
    layer = {'attn': attn, 'skip_scale': sd[hf + 'layer_scalar'],
             'pre_attention_norm': norm('input_layernorm'),
             'post_attention_norm': norm('post_attention_layernorm'),
             'post_ffw_norm': norm('post_feedforward_layernorm')}
    if c['enable_moe_block']:
      E, F = c['num_experts'], c['moe_intermediate_size']
      layer.update(
          mlp2=gating(hf + 'mlp.'), pre_ffw2_norm=norm('pre_feedforward_layernorm'),
          post_ffw2_norm=norm('post_feedforward_layernorm_1'),
          pre_ffw_norm=norm('pre_feedforward_layernorm_2'),
          post_ffw1_norm=norm('post_feedforward_layernorm_2'),
          mlp={'router_logits': {'w': sd[hf + 'router.proj.weight'].T},
               'router_scale': sd[hf + 'router.scale'],
               'per_expert_scale': sd[hf + 'router.per_expert_scale'],
               'gating_einsum': {'w': sd[hf + 'experts.gate_up_proj'].reshape(E, 2, F, D)},
               'linear': {'w': sd[hf + 'experts.down_proj'].transpose(0, 2, 1)}})
    else:
      layer.update(mlp=gating(hf + 'mlp.'), pre_ffw_norm=norm('pre_feedforward_layernorm'))
    if I:
      layer.update(per_layer_input_gate={'w': sd[hf + 'per_layer_input_gate.weight'].T},
                   per_layer_projection={'w': sd[hf + 'per_layer_projection.weight'].T},
                   post_per_layer_input_norm=norm('post_per_layer_input_norm'))
    tree[f'layer_{i}'] = layer
  if not flat:
    return tree
  out = {}  # Kaggle's flat form: one entry per module path, leaves one level down

  def walk(node, path):
    for key, value in node.items():
      if isinstance(value, dict):
        walk(value, f'{path}/{key}')
      else:
        leaf = 'w' if key in ('gating_einsum', 'linear') else key
        module = path if leaf == key else f'{path}/{key}'
        out.setdefault(module, {})[leaf] = value
  walk(tree, 'transformer')
  return out


@pytest.mark.parametrize('family,flat', [('gemma4-ple', False), ('gemma4-moe', True)])
def test_gemma4_layout(family, flat, tmp_path, caplog):
  """PLE, KV sharing (unused k/v dropped), double-wide MLPs, k = v, MoE beside mlp2."""
  reference = make_hf_model(family, seed=6)
  tree = gemma4_tree(reference, flat=flat)
  assert ('transformer/layer_0/attn/q_einsum' in tree) == flat
  config = config_from_hf(reference.config.to_dict())
  with caplog.at_level(logging.INFO, logger='gemma_jax.convert'):
    model = load_official(_write(tree, tmp_path / 'ckpt'), config)
  shared = reference.config.num_kv_shared_layers
  if shared:  # each shared layer's k/v (or k) weights and key norm
    assert f'dropped {2 * shared} key/value arrays of KV-shared layers' in caplog.text
  assert 'skipped 4 multimodal arrays' in caplog.text
  got = np.asarray(nnx.jit(lambda m, t: m(t)[0])(model, jnp.asarray(TOKENS)))
  want = hf_logits(reference, TOKENS)
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-5

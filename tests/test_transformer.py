"""Properties of the decoder: causality, packing, cache == no cache, remat == no remat, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma_jax import sharding
from gemma_jax.config import get_preset
from gemma_jax.transformer import Transformer, flat_params, model_from_params

TINY = ['tiny-gemma1', 'tiny-gemma2', 'tiny-gemma3', 'tiny-gemma4', 'tiny-gemma4-moe']


def _model(name, **kw):
  return Transformer(get_preset(name), rngs=nnx.Rngs(0), **kw)


def _tokens(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(4, 512, shape), jnp.int32)


@pytest.mark.parametrize('name', TINY)
def test_causality(name):
  model = _model(name)
  tokens = _tokens((2, 20))
  base, _ = model(tokens)
  t = 11
  changed, _ = model(tokens.at[:, t].set((tokens[:, t] + 7) % 512))
  np.testing.assert_array_equal(base[:, :t], changed[:, :t])
  assert not np.allclose(base[:, t:], changed[:, t:])


@pytest.mark.parametrize('name', TINY)
def test_packed_row_equals_sequences_alone(name):
  model = _model(name)
  a, b = _tokens((1, 13), 1), _tokens((1, 9), 2)
  packed = jnp.concatenate([a, b, jnp.zeros((1, 2), jnp.int32)], axis=1)
  positions = jnp.concatenate([jnp.arange(13), jnp.arange(9), jnp.zeros(2, int)])[None]
  segments = jnp.asarray([[1] * 13 + [2] * 9 + [0] * 2])
  logits, _ = model(packed, positions=positions, segment_ids=segments)
  np.testing.assert_allclose(logits[:, :13], model(a)[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits[:, 13:22], model(b)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', TINY)
@pytest.mark.parametrize('prefill', [5, 13])  # 13 > window 8: a chunk longer than the ring
def test_cached_decoding_equals_full_forward(name, prefill):
  """Left-padded rows, prefill then one token at a time past several ring-buffer wraps."""
  model = _model(name)
  total, pad = 30, 3
  tokens = _tokens((2, total))
  full0, _ = model(tokens[:1, pad:])  # row 0 is left-padded by `pad`, so shorter
  full1, _ = model(tokens[1:])
  segments = jnp.ones((2, total), jnp.int32).at[0, :pad].set(0)
  positions = jnp.stack([jnp.maximum(jnp.arange(total) - pad, 0), jnp.arange(total)])
  cache = model.init_cache(2, cache_length=total)
  graphdef, state = nnx.split(model)
  step = jax.jit(lambda st, t, p, s, c: nnx.merge(graphdef, st)(t, p, s, c))
  got = []
  for start, end in [(0, prefill)] + [(i, i + 1) for i in range(prefill, total)]:
    logits, cache = step(state, tokens[:, start:end], positions[:, start:end],
                         segments[:, start:end], cache)
    got.append(logits)
  got = jnp.concatenate(got, axis=1)
  assert int(cache['end_index']) == total
  # Float32 summation order only. Gemma 4's test models with per-layer inputs reach 4e-5 absolute
  # on logits of ~5: for them, 2e-5 of the largest logit.
  atol = 2e-5 * max(1.0, float(jnp.abs(full1).max())) if name.startswith('tiny-gemma4') else 1e-5
  np.testing.assert_allclose(got[0, pad:], full0[0], rtol=1e-5, atol=atol)
  np.testing.assert_allclose(got[1], full1[0], rtol=1e-5, atol=atol)


def test_local_layers_keep_only_their_window():
  model = _model('tiny-gemma3')
  cache = model.init_cache(1, cache_length=64)
  sizes = [c['k'].shape[1] for c in cache['layers']]
  assert sizes == [8, 8, 8, 8, 8, 64]


def test_kv_shared_layers_have_no_cache_and_global_layers_their_own_shape():
  """tiny-gemma4: local, local, GLOBAL, then 2 KV-shared layers (local, GLOBAL) reading layers 1
  (local) and 2 (global); global layers have H 32 and one kv head."""
  config = get_preset('tiny-gemma4')
  assert [config.kv_source(i) for i in range(5)] == [None] * 3 + [1, 2]
  cache = _model('tiny-gemma4').init_cache(1, cache_length=64)
  shapes = [None if c is None else c['k'].shape for c in cache['layers']]
  assert shapes == [(1, 8, 2, 16), (1, 8, 2, 16), (1, 64, 1, 32), None, None]



@pytest.mark.parametrize('name,policy', [('tiny-gemma2', 'full'), ('tiny-gemma2', 'dots'),
                                         ('tiny-gemma4', 'full'), ('tiny-gemma4-moe', 'full')])
def test_remat_equals_no_remat(name, policy):
  tokens = _tokens((2, 12))

  @nnx.jit  # one compile instead of op-by-op dispatch of the backward pass
  def loss_and_grads(model):
    def loss(m):
      return jnp.mean(m(tokens)[0] ** 2)
    return nnx.value_and_grad(loss)(model)

  ref_loss, ref_grads = loss_and_grads(_model(name))
  loss, grads = loss_and_grads(_model(name, remat=policy))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('name', ['tiny-gemma3', 'tiny-gemma4', 'tiny-gemma4-moe'])
def test_params_carry_logical_axes(name):
  model = _model(name)
  names = set(sharding.LOGICAL_AXES) | {None}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata()['logical_axes']
    assert len(axes) == var.get_value().ndim and set(axes) <= names, path


def test_model_from_params_names_bad_keys():
  model = _model('tiny-gemma1')
  params = flat_params(model)
  bad = dict(params)
  del bad['layers.1.mlp.linear']
  with pytest.raises(ValueError, match=r"ckpt: missing parameter 'layers.1.mlp.linear'"):
    model_from_params(model.config, bad, source='ckpt')
  bad = {**params, 'layers.0.mlp.linear': np.zeros((3, 3))}
  with pytest.raises(ValueError, match=r"'layers.0.mlp.linear' has shape \(3, 3\), expected"):
    model_from_params(model.config, bad, source='ckpt')
  with pytest.raises(ValueError, match='unexpected parameters'):
    model_from_params(model.config, {**params, 'extra.w': np.zeros(1)}, source='ckpt')


def test_unknown_remat_policy():
  with pytest.raises(ValueError, match='remat policy'):
    _model('tiny-gemma1', remat='most')


def test_attention_kernel_comes_from_the_model_and_the_environment_at_call_time(monkeypatch):
  """The kernel of uncached forwards is a constructor value (part of the graphdef); the
  environment variable overrides it when a forward is traced, not when gemma_jax is imported."""
  config = get_preset('tiny-gemma1')
  tokens = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="Unknown attention kernel 'flash'"):
    Transformer(config, rngs=nnx.Rngs(0), attention='flash')
  model = Transformer(config, rngs=nnx.Rngs(0), attention='cudnn')
  assert {block.attn.impl for block in model.layers} == {'cudnn'}
  monkeypatch.delenv('GEMMA_JAX_ATTENTION', raising=False)
  with pytest.raises(ValueError, match='cudnn needs a GPU'):  # this machine has none
    model(tokens)
  monkeypatch.setenv('GEMMA_JAX_ATTENTION', 'xla')  # set after import and construction
  want, _ = Transformer(config, rngs=nnx.Rngs(0), attention='xla')(tokens)
  np.testing.assert_array_equal(model(tokens)[0], want)
  monkeypatch.setenv('GEMMA_JAX_ATTENTION', 'cudnn')
  with pytest.raises(ValueError, match='cudnn needs a GPU'):
    Transformer(config, rngs=nnx.Rngs(0))(tokens)
  monkeypatch.setenv('GEMMA_JAX_ATTENTION', 'fast')
  with pytest.raises(ValueError, match="GEMMA_JAX_ATTENTION='fast'"):
    model(tokens)

"""Properties of the optimiser pieces: the warmup + decay schedule (warmup clamped to `steps`),
the weight-decay mask on dotted parameter names, global-norm clipping, AdamW and Adafactor."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from gemma_jax import optim
from gemma_jax.config import get_preset
from gemma_jax.layers import param_name
from gemma_jax.transformer import Transformer


def small_config(**overrides):
  """The optimiser part of a training config: 8 steps, AdamW, warmup 2 (as test_trainer's)."""
  c = ml_collections.ConfigDict()
  c.steps, c.learning_rate = 8, 3e-3
  c.optimizer = dict(name='adamw', b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                     weight_decay_exclude='norm', warmup_steps=2, decay='cosine',
                     min_lr_ratio=0.1, clip_norm=1.0, grad_accum_steps=1)
  for key, value in overrides.items():
    group, _, name = key.rpartition('.')
    (c[group] if group else c)[name] = value
  return c


@functools.cache
def _params():
  """tiny-gemma1 parameters (vocabulary 128) drawn with numpy N(0, 0.1): no compilation."""
  abstract = nnx.eval_shape(lambda: Transformer(get_preset('tiny-gemma1').replace(vocab_size=128),
                                                rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype), params)


def _by_name(tree):
  return {param_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ---------------------------------------------------------------------------------------------
# Schedule.


def test_schedule_warmup_then_decay():
  """Linear warmup to the peak at warmup_steps, then cosine / linear / constant to the end."""
  c = small_config(steps=100, learning_rate=1.0, **{'optimizer.warmup_steps': 10,
                                                    'optimizer.min_lr_ratio': 0.1})
  for decay, mid in (('cosine', 0.55), ('linear', 0.55), ('constant', 1.0)):
    c.optimizer.decay = decay
    s = optim.make_schedule(c)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(55)) == pytest.approx(mid, abs=1e-6)
    assert float(s(100)) == pytest.approx(0.1 if decay != 'constant' else 1.0)


def test_warmup_longer_than_steps_is_clamped_to_steps():
  """warmup 20 > steps 8: a warmup of 8 steps, reaching the peak exactly at step 8."""
  c = small_config(steps=8, learning_rate=2.0, **{'optimizer.warmup_steps': 20})
  s = optim.make_schedule(c)
  values = [float(s(i)) for i in range(9)]
  np.testing.assert_allclose(values, [2.0 * i / 8 for i in range(9)], rtol=1e-6)


def test_negative_warmup_and_unknown_decay_raise():
  """Negative warmup and an unknown decay are refused, naming the config key."""
  with pytest.raises(ValueError, match='warmup_steps'):
    optim.make_schedule(small_config(**{'optimizer.warmup_steps': -1}))
  with pytest.raises(ValueError, match='optimizer.decay'):
    optim.make_schedule(small_config(**{'optimizer.decay': 'exponential'}))


# ---------------------------------------------------------------------------------------------
# Weight-decay mask (dotted names).


def test_weight_decay_mask_and_adafactor():
  """'norm' excludes the norm scales only; Adafactor with weight decay gives finite updates."""
  params = _params()
  mask = optim.decay_mask_fn('norm')(params)
  flat = _by_name(mask)
  assert flat['layers.0.attn.q_einsum.w'] and flat['embedder.input_embedding']
  assert not flat['layers.0.pre_attention_norm.scale'] and not flat['final_norm.scale']
  c = small_config(**{'optimizer.name': 'adafactor', 'optimizer.weight_decay': 0.1})
  tx, _ = optim.make_optimizer(c)
  updates, _ = jax.jit(lambda p: tx.update(p, tx.init(p), p))(params)
  assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))


def test_decay_mask_matches_dotted_names():
  """The regex sees 'layers.0.attn.q_einsum.w': dotted patterns select exactly those names."""
  params = _params()
  flat = _by_name(optim.decay_mask_fn(r'^layers\.0\.attn\.')(params))
  assert not flat['layers.0.attn.q_einsum.w'] and not flat['layers.0.attn.kv_einsum.w']
  assert flat['layers.1.attn.q_einsum.w'] and flat['layers.0.mlp.linear']
  assert all(_by_name(optim.decay_mask_fn('')(params)).values())  # '' decays everything


@pytest.mark.parametrize('exclude', ['layers/0/pre_attention_norm/scale', 'norm/scale'])
def test_slash_in_weight_decay_exclude_raises_naming_the_key(exclude):
  """Old slash paths are refused with the config key and the dotted spelling to use."""
  with pytest.raises(ValueError, match='weight_decay_exclude') as e:
    optim.make_optimizer(small_config(**{'optimizer.weight_decay_exclude': exclude}))
  assert 'dotted' in str(e.value) and exclude.replace('/', '[.]') in str(e.value)


def test_bad_regex_raises_naming_the_key():
  with pytest.raises(ValueError, match='weight_decay_exclude'):
    optim.decay_mask_fn('norm(')


def test_adamw_decays_only_unmasked_parameters():
  """With zero gradients the AdamW update is -lr * wd * p where decay applies, 0 elsewhere."""
  params = _params()
  c = small_config(**{'optimizer.weight_decay': 0.5, 'optimizer.warmup_steps': 0,
                      'optimizer.decay': 'constant', 'optimizer.clip_norm': 0.0})
  tx, _ = optim.make_optimizer(c)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates = _by_name(tx.update(zeros, tx.init(params), params)[0])
  values = _by_name(params)
  for name, u in updates.items():
    want = 0.0 if 'norm' in name else -c.learning_rate * 0.5 * np.asarray(values[name])
    np.testing.assert_allclose(u, np.broadcast_to(want, u.shape), rtol=1e-5, atol=1e-9,
                               err_msg=name)


# ---------------------------------------------------------------------------------------------
# Clipping and the two optimisers.


def _global_norm(tree):
  return float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))))


@pytest.mark.parametrize('clip_norm', [0.0, 1.0])
def test_clip_norm_bounds_the_update(clip_norm):
  """clip_norm c rescales a gradient of norm 100 to norm c (0: no clipping).

  eps = 1e6 makes AdamW's first step linear in the gradient (-lr g / (|g| + eps) ~ -lr g / eps),
  so the update's norm shows the clipped gradient's norm.
  """
  params = _params()
  lr, eps = 1.0, 1e6
  c = small_config(learning_rate=lr, **{'optimizer.eps': eps, 'optimizer.clip_norm': clip_norm,
                                        'optimizer.warmup_steps': 0,
                                        'optimizer.decay': 'constant'})
  tx, _ = optim.make_optimizer(c)
  grads = jax.tree.map(jnp.ones_like, params)
  grads = jax.tree.map(lambda g: g * (100.0 / _global_norm(grads)), grads)
  updates, _ = tx.update(grads, tx.init(params), params)
  want = (clip_norm or 100.0) * lr / eps
  assert _global_norm(updates) == pytest.approx(want, rel=1e-3)


def test_negative_clip_norm_and_unknown_optimizer_raise():
  with pytest.raises(ValueError, match='clip_norm'):
    optim.make_optimizer(small_config(**{'optimizer.clip_norm': -1.0}))
  with pytest.raises(ValueError, match='optimizer.name'):
    optim.make_optimizer(small_config(**{'optimizer.name': 'sgd'}))


@pytest.mark.parametrize('name', optim.OPTIMIZERS)
def test_adamw_and_adafactor_build_and_descend(name):
  """Both optimisers build; their first update is finite, shaped like the params and points
  against the gradient (a descent direction)."""
  params = _params()
  tx, schedule = optim.make_optimizer(small_config(**{'optimizer.name': name,
                                                      'optimizer.warmup_steps': 0}))
  grads = jax.tree.map(lambda p: jnp.sign(p) + 0.1, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  leaves = jax.tree.leaves(updates)
  assert all(np.isfinite(np.asarray(u)).all() for u in leaves)
  dot = sum(float(jnp.sum(u * g)) for u, g in zip(leaves, jax.tree.leaves(grads)))
  assert dot < 0
  assert float(schedule(0)) == pytest.approx(3e-3)  # no warmup: the first step is at the peak

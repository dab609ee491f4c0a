"""gemma_jax.train_state: the plan (shapes and shardings, no allocation) and the one way to create
a train state, for full fine-tuning and LoRA."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_jax import sharding, train_config, train_state
from gemma_jax.transformer import Transformer


def _config(**overrides):
  return train_config.plain_config(**{'model.preset': 'tiny-gemma1', 'seed': 3, **overrides})


def _leaves(tree):
  return jax.tree.leaves(tree)


def _seed_params(mc, seed):
  return jax.jit(lambda: nnx.state(Transformer(mc, rngs=nnx.Rngs(seed)), nnx.Param))()


def test_plan_allocates_nothing_and_the_state_matches_it():
  config = _config()
  mc = train_config.model_config(config)
  mesh = sharding.make_mesh({'fsdp': -1})
  plan = train_state.plan_train_state(mc, config, mesh)
  assert not plan.lora and 'frozen' not in plan.abstract
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in _leaves(plan.abstract))
  state = train_state.create_train_state(plan, mc, config)
  for got, want, shard in zip(_leaves(state), _leaves(plan.abstract), _leaves(plan.shardings),
                              strict=True):
    assert (got.shape, got.dtype) == (want.shape, want.dtype)
    assert got.sharding.is_equivalent_to(shard, got.ndim)
  assert int(state['step']) == 0
  # The initial weights are the model of the config's seed, bit for bit (the same jitted init).
  want = _seed_params(mc, 3)
  for got, ref in zip(_leaves(state['params']), _leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_lora_state_trains_fresh_adapters_over_the_frozen_base():
  config = _config(**{'lora.rank': 2, 'lora.targets': r'mlp\.linear'})
  mc = train_config.model_config(config)
  plan = train_state.plan_train_state(mc, config, sharding.make_mesh({'fsdp': -1}))
  assert plan.lora
  state = train_state.create_train_state(plan, mc, config)
  names = {'.'.join(map(str, p)) for p, _ in nnx.to_flat_state(state['params'])}
  assert names == {f'layers.{i}.mlp.linear_lora_{ab}' for i in range(mc.num_layers)
                   for ab in 'ab'}
  for path, var in nnx.to_flat_state(state['params']):
    if path[-1].endswith('_lora_b'):
      assert not np.asarray(var.get_value()).any()  # B = 0: a fresh adapter changes nothing
  base = _seed_params(mc, 3)
  for got, ref in zip(_leaves(state['frozen']), _leaves(base), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  assert jax.tree.structure(state['opt_state']) == jax.tree.structure(plan.abstract['opt_state'])
  n = mc.num_layers * 2 * (mc.hidden_dim + mc.embed_dim)  # rank 2: A [F, 2] and B [2, D]
  assert plan.describe_lora().startswith(f'{n:,} trained parameters (0.75% of the')


def test_init_state_and_split_model():
  config = _config()
  model = train_config.make_model(train_config.model_config(config), config)
  graphdef, params, frozen, rest = train_state.split_model(model, lora=False)
  assert frozen is None
  state = train_state.init_state(params, train_config.optim.make_optimizer(config)[0], 0)
  assert set(state) == {'step', 'params', 'opt_state', 'rng'}
  restored = nnx.merge(graphdef, state['params'], rest)
  tokens = jnp.zeros((1, 3), jnp.int32)
  np.testing.assert_array_equal(restored(tokens)[0], model(tokens)[0])

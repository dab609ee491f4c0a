"""gemma_jax.sharding: rules, specs, mesh errors, memory from abstract shapes, distributed env.

The multi-device properties (sharded train steps and decoding equal one device, sharded init,
resharding restore) live in tests/_sharded_cases.py: they need 8 devices, which on CPU must be
requested before JAX starts. When this process already has 8 devices they are collected here
directly; otherwise one test runs them in a fresh 8-device subprocess.
"""

import dataclasses
import math
import os
import pathlib
import subprocess
import sys

import jax
import optax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from gemma_jax import sharding as sh
from gemma_jax.config import get_preset
from gemma_jax.transformer import Transformer
from processes import CHEAP_XLA

_TESTS = pathlib.Path(__file__).resolve().parent
# The subprocess compiles cheaply too (processes.CHEAP_XLA); both sides of every comparison run
# under the same flags.
EIGHT_CPU_DEVICES = f'--xla_force_host_platform_device_count=8 {CHEAP_XLA}'

if jax.device_count() >= 8:
  from _sharded_cases import *  # noqa: F401,F403  (collected in this process)
else:

  def test_multi_device_cases_in_8_device_subprocess():
    env = dict(os.environ, XLA_FLAGS=EIGHT_CPU_DEVICES, JAX_PLATFORMS='cpu')
    proc = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider',
         str(_TESTS / '_sharded_cases.py')],
        cwd=_TESTS.parent, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f'8-device cases failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}'


def _abstract_mesh(data=1, fsdp=1, tensor=1):
  return AbstractMesh((data, fsdp, tensor), sh.MESH_AXES)


# ---------------------------------------------------------------------------------------------
# Rules and specs.


def test_default_rules_and_overrides():
  r = sh.ShardingRules()
  assert r.embed == r.expert == ('fsdp',) and r.batch == ('data', 'fsdp') and r.length == ()
  assert r.heads == r.kv_heads == r.mlp == r.vocab == ('tensor',)
  assert {f.name for f in dataclasses.fields(r)} == set(sh.LOGICAL_AXES)
  o = sh.ShardingRules.from_config({'embed': 'fsdp,tensor', 'mlp': None, 'batch': ['data']})
  assert o.embed == ('fsdp', 'tensor') and o.mlp == () and o.batch == ('data',)
  assert o.vocab == ('tensor',)  # untouched keys keep their defaults
  assert all(v == () for v in vars(sh.ShardingRules.no_sharding()).values())
  with pytest.raises(ValueError, match=r"unknown logical axis name\(s\) \['embedding'\]"):
    sh.ShardingRules.from_config({'embedding': 'fsdp'})
  with pytest.raises(ValueError, match=r"config.sharding_rules.mlp: unknown mesh axis 'model'"):
    sh.ShardingRules.from_config({'mlp': 'model'})


def test_spec_follows_rules_and_replicates_what_does_not_divide():
  mesh = _abstract_mesh(2, 2, 2)
  assert sh.logical_to_spec(('vocab', 'embed'), (512, 64), mesh) == P('tensor', 'fsdp')
  # MQA: one KV head cannot split over tensor=2 -> replicated, never an error.
  assert sh.logical_to_spec((None, 'kv_heads', 'embed', 'head_dim'), (2, 1, 64, 16), mesh) == \
      P(None, None, 'fsdp', None)
  # 6 rows do not divide data*fsdp=4 -> replicated.
  assert sh.logical_to_spec(('batch', 'length'), (6, 8), mesh) == P(None, None)
  # Size-1 axes are dropped: on (1, 8, 1) the batch goes over fsdp only.
  assert sh.logical_to_spec(('batch', 'length'), (8, 8), _abstract_mesh(fsdp=8)) == P('fsdp', None)


def test_a_mesh_axis_is_used_once_per_spec():
  mesh = _abstract_mesh(2, 2, 2)
  # batch claims (data, fsdp), so embed (-> fsdp) stays whole: a data-parallel activation.
  assert sh.logical_to_spec(('batch', 'length', 'embed'), (8, 4, 64), mesh) == \
      P(('data', 'fsdp'), None, None)
  rules = sh.ShardingRules(heads='tensor', head_dim='tensor')
  assert sh.logical_to_spec(('heads', 'head_dim'), (4, 16), mesh, rules) == P('tensor', None)
  # When batch does not divide it leaves fsdp free for embed.
  assert sh.logical_to_spec(('batch', 'length', 'embed'), (3, 4, 64), mesh) == \
      P(None, None, 'fsdp')


def test_param_shardings_cover_every_parameter():
  mesh = _abstract_mesh(1, 2, 4)
  abstract = nnx.eval_shape(lambda: Transformer(get_preset('tiny-gemma3'), rngs=nnx.Rngs(0)))
  specs = nnx.to_flat_state(sh.partition_specs(abstract, mesh))
  by_name = {'.'.join(map(str, p)): v.get_value() for p, v in specs}
  assert by_name['embedder.input_embedding'] == P('tensor', 'fsdp')
  assert by_name['layers.0.attn.q_einsum.w'] == P('tensor', 'fsdp', None)
  assert by_name['layers.0.attn.kv_einsum.w'] == P(None, None, 'fsdp', None)  # K=2 vs tensor=4
  assert by_name['layers.0.mlp.linear'] == P('tensor', 'fsdp')
  assert by_name['layers.0.attn._query_norm.scale'] == P(None)
  assert by_name['final_norm.scale'] == P('fsdp')
  assert len(by_name) == len(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))


def test_expert_weights_split_over_fsdp_by_expert_first():
  """MoE weights (E, D, 2, F) / (E, F, D): E claims fsdp (each device stores E / fsdp experts)
  and D, coming after it, stays whole; when E does not divide fsdp, D takes it instead."""
  abstract = nnx.eval_shape(lambda: Transformer(get_preset('tiny-gemma4-moe'), rngs=nnx.Rngs(0)))

  def moe_specs(mesh, rules=None):
    specs = nnx.to_flat_state(sh.partition_specs(abstract, mesh, rules))
    return {'.'.join(map(str, p[3:])): v.get_value() for p, v in specs
            if p[:3] == ('layers', 0, 'moe')}

  specs = moe_specs(_abstract_mesh(1, 2, 4))  # E = 8, D = 64, F = 32
  assert specs['gating_einsum'] == P('fsdp', None, None, 'tensor')
  assert specs['linear'] == P('fsdp', 'tensor', None)
  assert specs['router.w'] == P('fsdp', None) and specs['per_expert_scale'] == P(None)
  assert moe_specs(_abstract_mesh(fsdp=16))['gating_einsum'] == P(None, 'fsdp', None, None)
  no_expert = sh.ShardingRules(expert=None)
  assert moe_specs(_abstract_mesh(1, 2, 4), no_expert)['linear'] == P(None, 'tensor', 'fsdp')
  with pytest.raises(ValueError, match=r"config.sharding_rules.expert: unknown mesh axis 'ep'"):
    sh.ShardingRules.from_config({'expert': 'ep'})


def test_optimizer_states_get_their_parameters_shardings():
  mesh = _abstract_mesh(1, 2, 4)
  params = nnx.state(nnx.eval_shape(lambda: Transformer(get_preset('tiny-gemma2'),
                                                        rngs=nnx.Rngs(0))), nnx.Param)
  adamw = sh.partition_specs(jax.eval_shape(optax.adamw(1e-3).init, params), mesh)
  assert adamw[0].mu['embedder']['input_embedding'].get_value() == P('tensor', 'fsdp')
  assert adamw[0].count == P()
  # Adafactor's factored statistics have another rank than their parameter: replicated.
  adafactor = sh.partition_specs(jax.eval_shape(optax.adafactor(1e-3).init, params), mesh)
  specs = jax.tree.leaves(adafactor, is_leaf=lambda s: isinstance(s, P))
  assert specs and all(isinstance(s, P) for s in specs)


# ---------------------------------------------------------------------------------------------
# Mesh shapes and errors (the pure part; tests/_sharded_cases.py builds real meshes).


def test_mesh_shape_fills_and_rejects_bad_configs():
  assert sh.mesh_shape({'data': 2, 'fsdp': -1, 'tensor': 2}, 16) == (2, 4, 2)
  assert sh.mesh_shape({'tensor': 8}, 8) == (1, 1, 8)
  with pytest.raises(ValueError, match=r'the product 6 does not equal the number of devices, 8'):
    sh.mesh_shape({'data': 3, 'fsdp': 2, 'tensor': 1}, 8)
  with pytest.raises(ValueError, match=r"unknown mesh axis name\(s\) \['model'\]"):
    sh.mesh_shape({'data': 1, 'model': 8}, 8)
  with pytest.raises(ValueError, match=r'at most one axis may be -1, got 2 \(data, fsdp\)'):
    sh.mesh_shape({'data': -1, 'fsdp': -1}, 8)
  with pytest.raises(ValueError, match=r'8 devices cannot be split evenly into 3'):
    sh.mesh_shape({'data': 3, 'fsdp': -1}, 8)
  with pytest.raises(ValueError, match=r'config.mesh.fsdp=.x. is not an integer'):
    sh.mesh_shape({'fsdp': 'x'}, 8)


def test_make_mesh_errors_name_the_device_count():
  n = jax.device_count()
  with pytest.raises(ValueError, match=rf'product {3 * n} does not equal the number of devices, {n}'):
    sh.make_mesh({'data': 3 * n})
  mesh = sh.make_mesh({'data': -1})
  assert dict(mesh.shape) == {'data': n, 'fsdp': 1, 'tensor': 1}


# ---------------------------------------------------------------------------------------------
# Memory, from abstract shapes only.


def _params_and_adamw(preset):
  abstract = nnx.eval_shape(lambda: Transformer(get_preset(preset), rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  return {'params': params, 'opt_state': jax.eval_shape(optax.adamw(1e-4).init, params)}


def test_gemma1_7b_params_and_adamw_state_split_evenly_over_fsdp():
  state = _params_and_adamw('gemma1-7b')
  total = sh.per_device_bytes(state, _abstract_mesh())
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state['params']))
  assert total >= 3 * 4 * n_params  # params + mu + nu, float32
  assert 8.5e9 < n_params < 8.6e9  # 8.54B with the 256128-row embedding
  for fsdp in (8, 64):
    per_device = sh.per_device_bytes(state, _abstract_mesh(fsdp=fsdp))
    assert per_device <= 1.05 * total / fsdp, (fsdp, per_device, total)
  # Tensor parallelism splits it too (all of V, N, F divide 8).
  assert sh.per_device_bytes(state, _abstract_mesh(tensor=8)) <= 1.05 * total / 8


def test_gemma4_26b_a4b_params_and_adamw_state_split_evenly_with_experts_sharded():
  """26B MoE: the 128 experts of each layer (most of its weights) split over fsdp; past 128
  devices E no longer divides fsdp and D (2816) takes it instead, so it still splits evenly."""
  state = _params_and_adamw('gemma4-26b-a4b')
  total = sh.per_device_bytes(state, _abstract_mesh())
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state['params']))
  layer = state['params']['layers'][0]['moe']
  n_experts = math.prod(layer['gating_einsum'].shape) + math.prod(layer['linear'].shape)
  assert 25e9 < n_params < 26e9 and 30 * n_experts > 0.85 * n_params  # 90%
  for fsdp in (8, 128, 256):
    per_device = sh.per_device_bytes(state, _abstract_mesh(fsdp=fsdp))
    assert per_device <= 1.05 * total / fsdp, (fsdp, per_device, total)
  expert_bytes = lambda mesh: sh.per_device_bytes(layer['linear'], mesh)
  assert expert_bytes(_abstract_mesh(fsdp=8)) * 8 == expert_bytes(_abstract_mesh())


# ---------------------------------------------------------------------------------------------
# Activations.


def test_constrain_is_a_no_op_without_a_mesh():
  x = jax.numpy.ones((2, 3, 4))
  assert sh.constrain(x, ('batch', 'length', 'embed')) is x


def test_rules_round_trip_through_config_strings():
  rules = sh.ShardingRules(embed=('fsdp', 'tensor'), mlp=None)
  cfg = rules.to_config()
  assert cfg['embed'] == 'fsdp,tensor' and cfg['mlp'] == '' and cfg['batch'] == 'data,fsdp'
  assert cfg['expert'] == 'fsdp' and list(cfg) == list(sh.LOGICAL_AXES)
  assert sh.ShardingRules.from_config(cfg) == rules

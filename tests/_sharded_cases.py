"""Sharded == unsharded, on 8 devices: train steps, greedy decoding, sharded init, resharding.

Needs 8 devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8` on CPU, set before JAX
starts). tests/test_sharding.py runs this file in such a subprocess when the main pytest process
has fewer devices, and imports its tests directly when it has enough. The helpers at the top
(tiny model, packed batch, a trainer-like pure step) are shared with tests/multiprocess_worker.py.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from gemma_jax import distributed as dist
from gemma_jax import sharding as sh
from gemma_jax.config import get_preset
from gemma_jax.transformer import Transformer

PRESET = 'tiny-gemma2'  # GQA (K=2: sharded on tensor=2, replicated on tensor=4), local + global
BATCH, LENGTH = 8, 16


def make_model(preset: str = PRESET) -> Transformer:
  return Transformer(get_preset(preset), rngs=nnx.Rngs(0))


def make_batch(seed: int = 0, batch: int = BATCH, length: int = LENGTH) -> dict[str, np.ndarray]:
  """A packed SFT batch: two examples per row, loss on the second half of each, padded tail."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, 512, (batch, length + 1)).astype(np.int32)
  cut, end = length // 2 - 1, length - 2
  segment_ids = np.zeros((batch, length), np.int32)
  segment_ids[:, :cut], segment_ids[:, cut:end] = 1, 2
  positions = np.zeros((batch, length), np.int32)
  positions[:, :cut] = np.arange(cut)
  positions[:, cut:end] = np.arange(end - cut)
  loss_mask = ((positions >= 3) & (segment_ids > 0)).astype(np.float32)
  return {'tokens': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': loss_mask,
          'positions': positions, 'segment_ids': segment_ids}


def make_train_step(graphdef, tx):
  """Pure step like the trainer's: masked float32 token cross-entropy, AdamW update."""

  def loss_fn(params, batch):
    logits_BTV, _ = nnx.merge(graphdef, params)(
        batch['tokens'], positions=batch['positions'], segment_ids=batch['segment_ids'])
    logits_BTV = logits_BTV.astype(jnp.float32)
    target_BT = jnp.take_along_axis(logits_BTV, batch['targets'][..., None], axis=-1)[..., 0]
    loss_BT = jax.nn.logsumexp(logits_BTV, axis=-1) - target_BT
    return jnp.sum(loss_BT * batch['loss_mask']) / jnp.maximum(jnp.sum(batch['loss_mask']), 1.0)

  def step(state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state['params'], batch)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    return {'params': optax.apply_updates(state['params'], updates), 'opt_state': opt_state}, loss

  return step


def process_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's share of a global batch: the i-th of jax.process_count() row blocks."""
  n, i = jax.process_count(), jax.process_index()
  rows = len(batch['tokens']) // n
  return {k: v[i * rows:(i + 1) * rows] for k, v in batch.items()}


def run_training(mesh=None, steps: int = 2, batches=None):
  """(losses, final params) of `steps` AdamW steps; on `mesh` when given (state sharded by the
  default rules, each process's rows placed with put_batch, the step traced under use_mesh)."""
  graphdef, params = nnx.split(make_model())
  tx = optax.adamw(1e-3, weight_decay=0.1)
  step = make_train_step(graphdef, tx)
  state = {'params': params, 'opt_state': tx.init(params)}
  batches = batches or [make_batch(i) for i in range(steps)]
  losses = []
  if mesh is None:
    step = jax.jit(step)
    for b in batches:
      state, loss = step(state, {k: jnp.asarray(v) for k, v in b.items()})
      losses.append(float(loss))
  else:
    state_sh = sh.param_shardings(state, mesh)
    state = jax.device_put(state, state_sh)
    step = jax.jit(step, in_shardings=(state_sh, dist.batch_sharding(mesh)),
                   out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=0)
    with sh.use_mesh(mesh):
      for b in batches:
        state, loss = step(state, dist.put_batch(process_rows(b), mesh))
        losses.append(float(loss))
  return losses, state['params']


def greedy_decode(model, prompt_BT, mesh=None, steps: int = 6, cache_length: int = 24):
  """Cached greedy decoding in one jitted function: prefill, then a fori_loop of 1-token steps.

  Returns (tokens [B, steps], logits [B, steps, V]). On `mesh` the params and the cache are
  placed by the rules (cache_shardings) and stay so.
  """
  graphdef, params = nnx.split(model)
  B, T = prompt_BT.shape
  V = model.config.vocab_size
  cache = model.init_cache(B, cache_length)

  def decode(params, prompt_BT, cache):
    m = nnx.merge(graphdef, params)
    pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    logits, cache = m(prompt_BT, pos_BT, jnp.ones_like(prompt_BT), cache)
    out_BS = jnp.zeros((B, steps), jnp.int32).at[:, 0].set(jnp.argmax(logits[:, -1], -1))
    logits_BSV = jnp.zeros((B, steps, V), jnp.float32).at[:, 0].set(logits[:, -1])

    def body(i, carry):
      out_BS, logits_BSV, cache = carry
      tok_B1 = jax.lax.dynamic_slice_in_dim(out_BS, i - 1, 1, axis=1)
      pos_B1 = jnp.full((B, 1), T - 1 + i, jnp.int32)
      logits, cache = m(tok_B1, pos_B1, jnp.ones_like(tok_B1), cache)
      return (out_BS.at[:, i].set(jnp.argmax(logits[:, -1], -1)),
              logits_BSV.at[:, i].set(logits[:, -1]), cache)

    return jax.lax.fori_loop(1, steps, body, (out_BS, logits_BSV, cache))

  if mesh is None:
    out, logits, _ = jax.jit(decode)(params, prompt_BT, cache)
    return np.asarray(out), np.asarray(logits)
  p_sh, c_sh = sh.param_shardings(params, mesh), sh.cache_shardings(cache, mesh)
  b_sh = dist.batch_sharding(mesh)
  l_sh = dist.batch_sharding(mesh, ndim=3)
  params, cache = jax.device_put(params, p_sh), jax.device_put(cache, c_sh)
  with sh.use_mesh(mesh):
    out, logits, cache = jax.jit(decode, in_shardings=(p_sh, b_sh, c_sh),
                                 out_shardings=(b_sh, l_sh, c_sh))(
        params, jax.device_put(prompt_BT, b_sh), cache)
  assert cache['layers'][0]['k'].sharding.is_equivalent_to(c_sh['layers'][0]['k'], 4)
  return np.asarray(out), np.asarray(logits)


def assert_trees_close(got, want, rtol=1e-5, atol=0.0):
  """Per tensor, ||got - want|| <= rtol * ||want|| + atol (rtol=0: bitwise equal).

  Norm-wise rather than element-wise: AdamW's first steps move each weight by about
  lr * sign(grad), so a gradient entry that is ~0 up to float rounding (summed in a different
  order on another mesh) may legitimately move differently; the tensor as a whole may not.
  """
  flat_got, flat_want = nnx.to_flat_state(got), nnx.to_flat_state(want)
  assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
  for (path, a), (_, b) in zip(flat_got, flat_want):
    a, b = np.asarray(a.get_value()), np.asarray(b.get_value())
    if rtol == 0:
      np.testing.assert_array_equal(a, b, err_msg=str(path))
    else:
      diff, ref = np.linalg.norm(a - b), np.linalg.norm(b)
      assert diff <= rtol * ref + atol, \
          f'{path}: difference {diff:.2e} > {rtol:.0e} x {ref:.2e} + {atol:.0e}'


# ---------------------------------------------------------------------------------------------
# Tests (8 devices).

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]


@pytest.fixture(scope='module')
def reference_training():
  return run_training()


@pytest.mark.parametrize('shape', MESHES, ids=lambda s: 'x'.join(map(str, s)))
def test_train_steps_equal_single_device(shape, reference_training):
  mesh = sh.make_mesh(dict(zip(sh.MESH_AXES, shape)))
  losses, params = run_training(mesh)
  want_losses, want_params = reference_training
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  assert losses[1] < losses[0]  # the update did something
  assert_trees_close(params, want_params, rtol=1e-5)
  # The state really is sharded as the rules say.
  emb = params['embedder']['input_embedding'].get_value()
  want = sh.logical_to_spec(('vocab', 'embed'), emb.shape, mesh)
  assert emb.sharding.spec == want and len(emb.sharding.device_set) == 8


def test_sharded_greedy_decoding_equals_single_device():
  """A cached greedy loop with params and KV cache placed by the rules: same tokens and logits."""
  model = make_model()
  prompt = jnp.asarray(np.random.default_rng(3).integers(4, 512, (4, 7)), jnp.int32)
  want_tokens, want_logits = greedy_decode(model, prompt)
  for shape in [(1, 1, 8), (2, 1, 4)]:
    mesh = sh.make_mesh(dict(zip(sh.MESH_AXES, shape)))
    tokens, logits = greedy_decode(model, prompt, mesh)
    np.testing.assert_array_equal(tokens, want_tokens, err_msg=str(shape))
    # Random weights repeat tokens a lot; the logits of every step check the cache as well.
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5, err_msg=str(shape))


def test_sampler_on_a_mesh_equals_single_device():
  """gemma_jax.sampler.Sampler over a sharded model (under use_mesh): same tokens and logits."""
  from gemma_jax.sampler import Sampler
  prompts = [np.random.default_rng(i).integers(4, 512, n).tolist() for i, n in enumerate([5, 9, 3, 7])]
  want = Sampler(make_model(), cache_length=32).sample(prompts, max_new_tokens=6, return_logits=True)
  for shape in [(1, 1, 8), (2, 1, 4)]:
    mesh = sh.make_mesh(dict(zip(sh.MESH_AXES, shape)))
    model = sh.create_sharded_model(make_model, mesh)
    with sh.use_mesh(mesh):
      got = Sampler(model, cache_length=32).sample(prompts, max_new_tokens=6, return_logits=True)
    for g, w in zip(got, want):
      assert g.tokens == w.tokens, shape
      np.testing.assert_allclose(g.logits, w.logits, rtol=1e-5, atol=1e-5, err_msg=str(shape))


def test_create_sharded_model_is_sharded_and_equals_plain_init():
  mesh = sh.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  model = sh.create_sharded_model(make_model, mesh)
  state = nnx.state(model)
  q = state['layers'][0]['attn']['q_einsum']['w'].get_value()  # (N, D, H) = (4, 64, 16)
  assert q.sharding.spec == P('tensor', 'fsdp', None)
  assert q.addressable_shards[0].data.shape == (2, 32, 16)
  want = jax.jit(lambda: nnx.state(make_model()))()  # same program, one device
  assert_trees_close(state, want, rtol=0)


def test_make_mesh_on_8_devices():
  mesh = sh.make_mesh({'data': 2, 'fsdp': -1, 'tensor': 2})
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert mesh.axis_names == sh.MESH_AXES and mesh.devices.size == 8
  assert dict(sh.make_mesh().shape) == {'data': 1, 'fsdp': 8, 'tensor': 1}
  with pytest.raises(ValueError, match=r'product 6 does not equal the number of devices, 8'):
    sh.make_mesh({'data': 3, 'fsdp': 2, 'tensor': 1})
  with pytest.raises(ValueError, match=r'8 devices cannot be split evenly into 3'):
    sh.make_mesh({'data': 3, 'fsdp': -1})


def test_put_batch_places_rows_and_rejects_indivisible_batches():
  mesh = sh.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  batch = make_batch()
  placed = dist.put_batch(batch, mesh)
  assert placed['tokens'].sharding.spec == P(('data', 'fsdp'), None)
  np.testing.assert_array_equal(placed['tokens'], batch['tokens'])
  assert placed['tokens'].addressable_shards[0].data.shape == (2, LENGTH)
  bad = {k: v[:6] for k, v in batch.items()}
  with pytest.raises(ValueError, match=r"batch\['tokens'\] has size 6 .* 4 shards of mesh axes "
                                       r"\('data', 'fsdp'\)"):
    dist.put_batch(bad, mesh)


def test_constrain_applies_under_use_mesh_only():
  mesh = sh.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  f = jax.jit(lambda x: sh.constrain(x * 2, ('batch', 'length', 'vocab')))
  x = jnp.ones((4, 3, 8))
  with sh.use_mesh(mesh):
    y = f(x)
  assert y.sharding.spec == P(('data', 'fsdp'), None, 'tensor')
  with sh.use_mesh(mesh, sh.ShardingRules.no_sharding()):
    y = jax.jit(lambda x: sh.constrain(x * 3, ('batch', 'length', 'vocab')))(x)
  assert y.sharding.is_fully_replicated
  assert f(x).sharding.is_fully_replicated or len(f(x).sharding.device_set) == 1


def test_restore_onto_another_mesh(tmp_path):
  """Save on (8,1,1), restore on (2,2,2) through gemma_jax.checkpoint: identical params."""
  from gemma_jax.checkpoint import load_params, save_params
  model = sh.create_sharded_model(make_model, sh.make_mesh({'data': 8}))
  save_params(model, tmp_path / 'ckpt')
  mesh = sh.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  abstract = nnx.eval_shape(make_model)
  restored = load_params(tmp_path / 'ckpt', shardings=sh.param_shardings(abstract, mesh))
  got, want = nnx.state(restored), nnx.state(model)
  assert_trees_close(got, want, rtol=0)
  w = got['layers'][1]['mlp']['gating_einsum'].get_value()
  assert w.sharding.spec == P(None, 'fsdp', 'tensor') and w.sharding.mesh.shape == mesh.shape


def test_transformer_constrains_activations_at_block_boundaries():
  """Under use_mesh the forward pins the embedding table, x_BTD after the embedding and each block,
  and the logits."""
  graphdef, params = nnx.split(make_model())
  forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])
  tokens = jnp.zeros((8, 4), jnp.int32)
  assert 'sharding_constraint' not in forward.lower(params, tokens).as_text()
  with sh.use_mesh(sh.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})):
    lines = [l for l in forward.lower(params, tokens).as_text().splitlines()
             if 'sdy.sharding_constraint' in l]
  num_layers = get_preset(PRESET).num_layers
  # The embedding table (gathered over fsdp before the lookup), the residual stream after the
  # embedding and after each block, and the logits.
  assert len(lines) == num_layers + 3
  assert sum('[{"tensor"}, {}]' in l for l in lines) == 1
  assert sum('[{"data", "fsdp"}, {}, {}]' in l for l in lines) == num_layers + 1
  assert '[{"data", "fsdp"}, {}, {"tensor"}]' in lines[-1]


def _while_bodies(hlo: str) -> list[str]:
  """Texts of the computations used as while-loop bodies in compiled HLO."""
  import re
  names = re.findall(r'\bwhile\(.*?body=%?([\w.\-]+)', hlo)
  blocks = {}
  for block in hlo.split('\n\n'):
    m = re.match(r'\s*%?([\w.\-]+)\s', block.split('\n')[0].replace('ENTRY ', ''))
    if m:
      blocks[m.group(1)] = block
  return [blocks[n] for n in names]


def test_accumulated_gradients_equal_full_batch_and_all_reduce_once():
  graphdef, params = nnx.split(make_model())
  batch = make_batch(5, batch=16)
  denom = batch['loss_mask'].sum()

  def loss_fn(p, b):
    logits_BTV, _ = nnx.merge(graphdef, p)(b['tokens'], positions=b['positions'],
                                           segment_ids=b['segment_ids'])
    target_BT = jnp.take_along_axis(logits_BTV, b['targets'][..., None], axis=-1)[..., 0]
    loss_BT = jax.nn.logsumexp(logits_BTV, axis=-1) - target_BT
    return jnp.sum(loss_BT * b['loss_mask']) / denom

  grad_fn = jax.value_and_grad(loss_fn)
  want_loss, want_grads = jax.jit(grad_fn)(params, batch)
  for shape in [(8, 1, 1), (2, 2, 2)]:
    mesh = sh.make_mesh(dict(zip(sh.MESH_AXES, shape)))
    p_sh = sh.param_shardings(params, mesh)
    step = jax.jit(lambda p, b: dist.accumulate_gradients(grad_fn, p, b, 2, mesh),
                   in_shardings=(p_sh, dist.batch_sharding(mesh)), out_shardings=(None, p_sh))
    with sh.use_mesh(mesh):
      args = (jax.device_put(params, p_sh), dist.put_batch(batch, mesh))
      loss, grads = step(*args)
      hlo = step.lower(*args).compile().as_text()
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert_trees_close(grads, want_grads, rtol=1e-5)
    bodies = _while_bodies(hlo)
    assert len(bodies) == 1, shape
    if shape == (8, 1, 1):  # pure data parallelism: nothing crosses devices inside the loop
      assert 'all-reduce' not in bodies[0] and 'all-reduce' in hlo
  # The detector is not vacuous: a plain scan over micro-batches all-reduces inside its body.
  mesh = sh.make_mesh({'data': 8})

  def naive(p, b):
    micro = jax.tree.map(lambda x: x.reshape(2, 8, *x.shape[1:]), b)
    zeros = jax.tree.map(jnp.zeros_like, p)
    return jax.lax.scan(lambda acc, mb: (jax.tree.map(jnp.add, acc, grad_fn(p, mb)[1]), None),
                        zeros, micro)[0]

  p_sh = sh.param_shardings(params, mesh)
  hlo = jax.jit(naive, in_shardings=(p_sh, dist.batch_sharding(mesh)), out_shardings=p_sh).lower(
      jax.device_put(params, p_sh), dist.put_batch(batch, mesh)).compile().as_text()
  assert 'all-reduce' in _while_bodies(hlo)[0]


def test_import_places_weights_straight_onto_the_mesh(tmp_path):
  """model_from_params(shardings=...) (behind load_hf) puts every weight in its sharding."""
  from gemma_jax.transformer import flat_params, model_from_params, param_name
  model = make_model()
  mesh = sh.make_mesh({'data': 1, 'fsdp': 2, 'tensor': 4})
  specs = sh.param_shardings(nnx.eval_shape(make_model), mesh)
  by_name = {param_name(p): s.get_value() for p, s in nnx.to_flat_state(specs)}
  placed = model_from_params(model.config, {k: np.asarray(v) for k, v in flat_params(model).items()},
                             shardings=by_name)
  for name, value in flat_params(placed).items():
    assert value.sharding == by_name[name], name
  w = flat_params(placed)['layers.0.mlp.gating_einsum']
  assert w.sharding.spec == P(None, 'fsdp', 'tensor')
  tokens = jnp.asarray(make_batch()['tokens'])
  np.testing.assert_allclose(placed(tokens)[0], model(tokens)[0], rtol=1e-5, atol=1e-5)


def test_fused_head_loss_on_meshes_equals_single_device_and_reduces_once():
  """The trainer's head-fused chunked loss (gemma_jax.loss) on a mesh equals the unfused loss on
  one device, and its scan over chunks all-reduces nothing on pure data parallelism: each batch
  shard keeps its own head-gradient accumulator (summed once, after the loop)."""
  from gemma_jax import loss as loss_lib
  from gemma_jax.trainer import make_loss_fn
  graphdef, params, rest = nnx.split(make_model(), nnx.Param, ...)
  batch = make_batch(7)
  grad_fn = lambda chunk: jax.value_and_grad(make_loss_fn(graphdef, rest, chunk), has_aux=True)
  (want_loss, want_correct), want_grads = jax.jit(lambda p, b: grad_fn(0)(p, b, 10.0))(params, batch)

  def compiled(mesh):
    p_sh = sh.param_shardings(params, mesh)
    step = jax.jit(lambda p, b: grad_fn(4)(p, b, 10.0),
                   in_shardings=(p_sh, dist.batch_sharding(mesh)), out_shardings=(None, p_sh))
    with sh.use_mesh(mesh):
      args = (jax.device_put(params, p_sh), dist.put_batch(batch, mesh))
      return step(*args), step.lower(*args).compile().as_text()

  for shape in [(8, 1, 1), (2, 2, 2), (1, 2, 4)]:
    mesh = sh.make_mesh(dict(zip(sh.MESH_AXES, shape)))
    ((loss, correct), grads), hlo = compiled(mesh)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert float(correct) == float(want_correct)
    assert_trees_close(grads, want_grads, rtol=1e-5)
    bodies = _while_bodies(hlo)
    assert len(bodies) == 1, shape
    if shape == (8, 1, 1):
      assert 'all-reduce' not in bodies[0] and 'all-reduce' in hlo
  # The check is not vacuous: one shared accumulator is all-reduced inside the loop.
  original = loss_lib.shard_count
  loss_lib.shard_count = lambda axis, dim: 1
  try:
    _, hlo = compiled(sh.make_mesh({'data': 8}))
  finally:
    loss_lib.shard_count = original
  assert 'all-reduce' in _while_bodies(hlo)[0]


def _lora_steps_equal_single_device(model, shapes, grad_accum_steps):
  """Adapters trained, base frozen, through the trainer's own jitted step with its shardings on
  meshes `shapes`, with the head-fused loss: the same losses and adapters as one device, and the
  frozen base bit-identical. Returns the single-device losses."""
  from gemma_jax import lora, train_state, trainer
  lora.add_lora(model, rank=2, alpha=4.0)
  graphdef, params, frozen, rest = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
  tx = optax.adamw(1e-2)
  batches = [make_batch(i) for i in range(2)]

  def run(mesh):
    step = trainer.make_train_step(graphdef, rest, tx, optax.constant_schedule(1e-2),
                                   grad_accum_steps=grad_accum_steps, loss_chunk=8, mesh=mesh)
    state = train_state.init_state(params, tx, 0, frozen)
    abstract = jax.eval_shape(lambda: state)
    if mesh is None:
      fn = jax.jit(step)
    else:
      fn = trainer.jit_train_step(step, mesh, abstract)
      state = jax.device_put(state, train_state.state_shardings(mesh, abstract))
    losses = []
    with sh.use_mesh(mesh) if mesh is not None else contextlib.nullcontext():
      for b in batches:
        state, metrics = fn(state, b if mesh is None else dist.put_batch(b, mesh))
        losses.append(float(metrics['loss']))
    return losses, state

  want_losses, want = run(None)
  assert_trees_close(want['frozen'], frozen, rtol=0)
  for shape in shapes:
    losses, got = run(sh.make_mesh(dict(zip(sh.MESH_AXES, shape))))
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert_trees_close(got['params'], want['params'], rtol=1e-5)
    assert_trees_close(got['frozen'], frozen, rtol=0)
  return want_losses


def test_lora_train_steps_on_a_mesh_equal_single_device():
  """LoRA (gemma_jax.lora) on (2,2,2) and (1,2,4), with 2 micro-batches."""
  _lora_steps_equal_single_device(make_model(), [(2, 2, 2), (1, 2, 4)], grad_accum_steps=2)


def test_train_and_eval_steps_constrain_whoever_traces_them():
  """The trainer's steps enter their mesh and rules themselves: traced outside `use_mesh` they
  lower to the same program, activation constraints included, as traced inside it."""
  from gemma_jax import train_state, trainer
  graphdef, params, rest = nnx.split(make_model(), nnx.Param, ...)
  tx = optax.adamw(1e-3)
  mesh = sh.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  rules = sh.ShardingRules(mlp=None)  # not the defaults: the step must carry its own rules
  abstract = jax.eval_shape(lambda: train_state.init_state(params, tx, 0))
  batch = jax.eval_shape(lambda: dist.put_batch(make_batch(), mesh))
  train = trainer.jit_train_step(
      trainer.make_train_step(graphdef, rest, tx, optax.constant_schedule(1e-3), mesh=mesh,
                              rules=rules), mesh, abstract, rules)
  evaluate = jax.jit(trainer.make_eval_step(graphdef, rest, mesh=mesh, rules=rules))
  constraints = lambda fn, args: [l.split('=', 1)[1] for l in fn.lower(*args).as_text().splitlines()
                                  if 'sdy.sharding_constraint' in l]
  for fn, args in ((train, (abstract, batch)), (evaluate, (abstract['params'], batch))):
    outside = constraints(fn, args)
    with sh.use_mesh(mesh, sh.ShardingRules()):  # a caller's context with other rules
      inside = constraints(fn, args)
    assert outside == inside
    assert len(outside) >= get_preset(PRESET).num_layers + 2
  # Not vacuous: the bare loss function (no mesh of its own) is unconstrained outside use_mesh.
  loss_fn = jax.jit(lambda p, b: trainer.make_loss_fn(graphdef, rest)(p, b, 1.0))
  assert 'sdy.sharding_constraint' not in loss_fn.lower(abstract['params'], batch).as_text()



def test_moe_train_step_with_experts_sharded_equals_single_device():
  """tiny-gemma4-moe (8 experts, top 2; MoE in every block) through the trainer's jitted step,
  on (data, fsdp) = (2, 4) with the expert weights split over fsdp (each device stores 2 of the
  8 experts, D whole): one AdamW step gives the loss, gradients and params of one device.

  The gradients are read from Adam's first moment (mu = (1 - b1) g after one step) and compared
  to 1e-5. The new params are compared entry-wise: Adam's first update is ~lr * sign(g), so an
  entry whose gradient is float rounding away from 0 may move differently (here up to 3e-4 of a
  MoE tensor's norm: the norm-wise 1e-5 of the other sharded tests would fail on them)."""
  from gemma_jax import train_state, trainer
  graphdef, params, rest = nnx.split(make_model('tiny-gemma4-moe'), nnx.Param, ...)
  lr, b1 = 1e-3, 0.9
  tx = optax.adamw(lr, b1=b1, weight_decay=0.1)
  batch = make_batch(0)

  def run(mesh, accum=1):
    step = trainer.make_train_step(graphdef, rest, tx, optax.constant_schedule(lr), mesh=mesh,
                                   grad_accum_steps=accum)
    # A copy: device_put may place a replicated leaf in the very buffer it was given on CPU, and
    # the step donates its state.
    state = train_state.init_state(jax.tree.map(jnp.copy, params), tx, 0)
    if mesh is None:
      state, metrics = jax.jit(step)(state, batch)
    else:
      abstract = jax.eval_shape(lambda: state)
      state = jax.device_put(state, train_state.state_shardings(mesh, abstract))
      with sh.use_mesh(mesh):
        state, metrics = trainer.jit_train_step(step, mesh, abstract)(
            state, dist.put_batch(batch, mesh))
    grads = jax.tree.map(lambda mu: mu / (1 - b1), state['opt_state'][0].mu)
    return float(metrics['loss']), float(metrics['grad_norm']), grads, state['params']

  want_loss, want_norm, want_grads, want = run(None)
  mesh = sh.make_mesh({'data': 2, 'fsdp': 4, 'tensor': 1})
  moe_specs = sh.param_shardings(params, mesh)['layers'][0]['moe']
  assert moe_specs['gating_einsum'].get_value().spec == P('fsdp', None, None, None)
  assert moe_specs['linear'].get_value().spec == P('fsdp', None, None)
  loss, norm, grads, got = run(mesh)
  np.testing.assert_allclose([loss, norm], [want_loss, want_norm], rtol=1e-5)
  # atol: the last block's layer_scalar has a ~1e-7 gradient, all rounding (the final RMSNorm
  # makes the loss invariant to its scale, up to eps).
  assert_trees_close(grads, want_grads, rtol=1e-5, atol=1e-6)
  diff = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel() for a, b in
                         zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)])
  assert diff.max() <= 2 * lr and np.mean(diff > 1e-6) < 1e-3, (diff.max(), np.mean(diff > 1e-6))
  w = got['layers'][1]['moe']['gating_einsum'].get_value()  # (E, D, 2, F) = (8, 64, 2, 32)
  assert w.sharding.spec == P('fsdp', None, None, None)
  assert w.addressable_shards[0].data.shape == (2, 64, 2, 32)
  # Two micro-batches on data=2: the experts' ragged_dot cannot be vmapped over data replicas,
  # so accumulation sums the replicas per micro-batch (distributed.accumulate_gradients).
  loss, norm, grads, _ = run(mesh, accum=2)
  np.testing.assert_allclose([loss, norm], [want_loss, want_norm], rtol=1e-5)
  assert_trees_close(grads, want_grads, rtol=1e-5, atol=1e-6)


def test_moe_dispatch_sorts_only_its_batch_shards_rows():
  """With the batch split 8 ways, each device sorts and dispatches its own B/8 x T x k rows (the
  compiled program's only sort has 1 x 16 x 2 = 32 entries, not the global 256) and the result
  equals the unsharded block."""
  import re  # pylint: disable=g-import-not-at-top
  from gemma_jax.moe import MoE  # pylint: disable=g-import-not-at-top
  config = get_preset('tiny-gemma4-moe')
  make = lambda: MoE(config, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
  mesh = sh.make_mesh({'fsdp': 8})
  graphdef, state = nnx.split(sh.create_sharded_model(make, mesh))
  x = jax.random.normal(jax.random.key(1), (8, 16, config.embed_dim))
  x_sharded = jax.device_put(x, NamedSharding(mesh, P(('data', 'fsdp'))))

  def forward(state, x):
    with sh.tracing_under(mesh):
      return nnx.merge(graphdef, state)(x, x * 0.5)

  compiled = jax.jit(forward).lower(state, x_sharded).compile()
  sorts = re.findall(r'= \(s32\[(\d+)\]\{0\}, s32\[\d+\]\{0\}\) sort\(', compiled.as_text())
  assert sorts == ['32'], sorts
  reference = make()(x, x * 0.5)
  np.testing.assert_allclose(compiled(state, x_sharded), reference, rtol=1e-5, atol=1e-6)


def test_quantized_greedy_decoding_on_meshes_equals_single_device():
  """int4 weights (gemma_jax.quant; int8 shares the code) shard by their float weight's logical
  axes (values and scales alike) and decode on (2,2,2) to the same tokens and logits as one
  device."""
  from gemma_jax import quant
  prompt_BT = jnp.asarray(make_batch(5)['tokens'][:, :8])
  model = quant.quantize(make_model(), 'int4', 8)
  want_tokens, want_logits = greedy_decode(model, prompt_BT)
  tokens, logits = greedy_decode(model, prompt_BT, sh.make_mesh({'data': 2, 'fsdp': 2,
                                                                 'tensor': 2}))
  np.testing.assert_array_equal(tokens, want_tokens)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
  # Values [N, D/2, H] and scales [N, D/8, H] take the float weight's rules: N over tensor,
  # D over fsdp.
  shardings = sh.param_shardings(nnx.state(model), sh.make_mesh({'data': 1, 'fsdp': 2,
                                                                  'tensor': 4}))
  q_einsum = shardings['layers'][0]['attn']['q_einsum']
  assert q_einsum['w'].get_value().spec == P('tensor', 'fsdp', None)
  assert q_einsum['w_qscale'].get_value().spec == P('tensor', 'fsdp', None)


def test_qlora_train_steps_on_a_mesh_equal_single_device():
  """QLoRA: adapters over an int4 base (gemma_jax.quant) on (1,2,4) equal one device, and the
  quantized base stays bit-identical."""
  from gemma_jax import quant
  model = quant.quantize(make_model(), 'int4', 8)
  losses = _lora_steps_equal_single_device(model, [(1, 2, 4)], grad_accum_steps=1)
  assert losses[1] != losses[0]


def _objective_steps(objective, batches, names, mesh=None):
  """(metrics [steps, names], final state) of the trainer's jitted steps of `objective` (full
  fine-tuning with a frozen reference copy, AdamW) over `batches`: on one device, or on `mesh`
  with 2 micro-batches."""
  from gemma_jax import train_state, trainer
  graphdef, params, rest = nnx.split(make_model(), nnx.Param, ...)
  tx = optax.adamw(1e-2)
  step = trainer.make_train_step(graphdef, rest, tx, optax.constant_schedule(1e-2),
                                 grad_accum_steps=1 if mesh is None else 2,
                                 objective=objective, mesh=mesh)
  state = train_state.init_state(params, tx, 0, reference=True)
  abstract = jax.eval_shape(lambda: state)
  fn = jax.jit(step) if mesh is None else trainer.jit_train_step(step, mesh, abstract)
  if mesh is not None:
    state = jax.device_put(state, train_state.state_shardings(mesh, abstract))
  out = []
  with sh.use_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    for b in batches:
      state, metrics = fn(state, b if mesh is None else dist.put_batch(b, mesh))
      out.append([float(metrics[k]) for k in names])
  return np.array(out), state


def test_dpo_train_steps_on_a_mesh_equal_single_device():
  """The DPO objective (full fine-tuning: the state carries a frozen reference copy) through the
  trainer's jitted step on (2,2,2) with 2 micro-batches: the same losses, reward margins and
  params as one device; the reference stays bit-identical."""
  from gemma_jax.objectives.dpo import DPO
  # [P, 2, T] pairs: rows 2p and 2p+1 of a packed batch as chosen and rejected.
  pairs = [{k: v.reshape(BATCH // 2, 2, LENGTH) for k, v in make_batch(i).items()}
           for i in range(2)]
  names = ('loss', 'reward_margin', 'pairs')
  want, want_state = _objective_steps(DPO(beta=0.5), pairs, names)
  assert want[0, 0] == np.float32(np.log(2.0)) and want[1, 1] != 0.0
  got, got_state = _objective_steps(DPO(beta=0.5), pairs, names,
                                    sh.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2}))
  # The margin is a difference of sequence log-probs of ~-30: compare it absolutely.
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert_trees_close(got_state['params'], want_state['params'], rtol=1e-5)
  assert_trees_close(got_state['reference'], want_state['reference'], rtol=0)
  assert_trees_close(want_state['reference'], nnx.split(make_model(), nnx.Param, ...)[1], rtol=0)


@pytest.mark.parametrize('loss_type', ['grpo', 'dapo'])
def test_grpo_train_steps_on_a_mesh_equal_single_device(loss_type):
  """The GRPO objective (full fine-tuning with a KL to the frozen reference copy, clipped ratios
  against old log-probs) through the trainer's jitted step on (2,2,2) with 2 micro-batches: the
  same losses, KL, clipped fractions and params as one device."""
  from gemma_jax.objectives.grpo import GRPO
  objective = GRPO(loss_type=loss_type, beta=0.04, epsilon_high=0.28, temperature=0.7,
                   max_completion_length=LENGTH)
  rng = np.random.default_rng(0)
  batches = []
  for i in range(2):
    b = make_batch(i)
    mask = b['loss_mask']
    b['advantages'] = rng.normal(size=(BATCH, 1)).astype(np.float32) * mask
    b['old_logps'] = (rng.normal(-5, 1, size=mask.shape) * mask).astype(np.float32)
    batches.append(b)
  names = ('loss', 'kl', 'clip_fraction', 'completion_tokens')
  want, want_state = _objective_steps(objective, batches, names)
  assert want[1, 1] > 0 and want[0, 2] > 0  # the KL and the clipping are at work
  got, got_state = _objective_steps(objective, batches, names,
                                    sh.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2}))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Params after two AdamW steps: a norm scale of ~0.1 differs by ~1e-6 (summation order).
  assert_trees_close(got_state['params'], want_state['params'], rtol=1e-4)


def test_grpo_job_on_two_meshes_samples_and_learns_the_same(tmp_path):
  """A whole GRPO job (rollouts sampled from the sharded LoRA model, rewards, 2 steps) on
  (2,2,2) and on (1,8,1): the same completions every step (the batch CRC), rewards and losses."""
  from gemma_jax import trainer
  from test_grpo import grpo_config, _train_values

  def run(name, mesh):
    c = grpo_config(tmp_path, steps=2, **{f'mesh.{k}': v for k, v in mesh.items()})
    trainer.train(c, str(tmp_path / name))
    return _train_values(str(tmp_path / name))

  a = run('a', {'data': 2, 'fsdp': 2, 'tensor': 2})
  b = run('b', {'data': 1, 'fsdp': 8, 'tensor': 1})
  assert [r['batch_crc32'] for r in a] == [r['batch_crc32'] for r in b]
  assert [r['reward'] for r in a] == [r['reward'] for r in b]
  np.testing.assert_allclose([r['loss'] for r in a], [r['loss'] for r in b], rtol=1e-5,
                             atol=1e-6)

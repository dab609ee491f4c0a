"""Properties of the trainer: it learns, masks, packs and accumulates exactly, matches
transformers + torch on one AdamW step, and stops, resumes and reports as documented."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gemma_jax import (checkpoint, data, data_sources, initial_weights, optim, sharding, train_config,
                       train_state, trainer)
from gemma_jax.train_checkpoints import TrainCheckpoints
from gemma_jax.config import get_preset
from gemma_jax.tokenizer import Tokenizer
from gemma_jax.transformer import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, 'data', 'quickstart_tokenizer.model')
TRAIN = os.path.join(ROOT, 'data', 'quickstart_train.jsonl')
EVAL = os.path.join(ROOT, 'data', 'quickstart_eval.jsonl')
V = 128  # the quickstart tokenizer's vocabulary


@pytest.fixture(scope='module')
def tok():
  return Tokenizer(TOKENIZER)


def _lines(path, n):
  with open(path) as f:
    return [next(f) for _ in range(n)]


def small_config(tmp_path, num_train=64, **overrides):
  """A tiny job: tiny-gemma1 on the first `num_train` quickstart records."""
  train_path, eval_path = tmp_path / 'train.jsonl', tmp_path / 'eval.jsonl'
  train_path.write_text(''.join(_lines(TRAIN, num_train)))
  eval_path.write_text(''.join(_lines(EVAL, 8)))
  c = train_config.base_config()
  c.steps, c.batch_size, c.seq_len, c.learning_rate = 8, 4, 32, 3e-3
  c.log_every, c.eval_every, c.eval_batches, c.checkpoint_every = 1, 4, 2, 4
  c.model.preset, c.model.vocab_size, c.model.tokenizer = 'tiny-gemma1', V, TOKENIZER
  c.data.path, c.data.eval_path = str(train_path), str(eval_path)
  c.optimizer.warmup_steps = 2
  return override(c, overrides)


def override(c, overrides):
  """`c` with {'a.b': value} overrides applied (as train.py's --config.a.b=value would)."""
  for key, value in overrides.items():
    group, _, name = key.rpartition('.')
    (c[group] if group else c)[name] = value
  return c


@functools.cache
def _split(name='tiny-gemma1', dtype=jnp.float32):
  """(graphdef, params, rest) of a tiny model with the quickstart vocabulary, built once.

  Weights are drawn with numpy (N(0, 0.1), norms included), which costs no compilation."""
  abstract = nnx.eval_shape(lambda: Transformer(get_preset(name).replace(vocab_size=V),
                                                rngs=nnx.Rngs(0), dtype=dtype))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype), params)
  return graphdef, params, rest


@functools.cache
def _jitted(graphdef):
  """(logits, (loss, correct), grads) of a batch, in one compiled function per model."""
  loss_fn = trainer.make_loss_fn(graphdef, nnx.State({}))

  def run(params, batch):
    count = jnp.maximum(jnp.sum(batch['loss_mask']), 1.0)
    logits, _ = nnx.merge(graphdef, params)(batch['tokens'], positions=batch['positions'],
                                            segment_ids=batch['segment_ids'])
    return logits, *jax.value_and_grad(loss_fn, has_aux=True)(params, batch, count)

  return jax.jit(run)


def _batches(tok, n, seq_len=32, batch_size=4, packing=True, tmp_path=None):
  cfg = {'path': TRAIN, 'packing': packing}
  it = iter(data.make_dataset(cfg, tok, seq_len=seq_len, batch_size=batch_size, seed=0))
  return [next(it) for _ in range(n)]


def _loss_and_grads(name, batch):
  graphdef, params, _ = _split(name)
  _, (loss, _), grads = _jitted(graphdef)(params, batch)
  return loss, grads


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _assert_adamw_params_close(a, b, rtol=1e-5):
  """Per tensor, ||a - b|| <= rtol ||b||. Norm-wise, not element-wise: AdamW's first step moves
  each weight by about lr * sign(grad), so an entry whose gradient is ~0 up to float rounding
  (summed in another order) may move differently; the tensor as a whole may not (as in
  tests/_sharded_cases.py)."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    assert np.linalg.norm(x - y) <= rtol * np.linalg.norm(y), np.linalg.norm(x - y)


# ---------------------------------------------------------------------------------------------
# Loss: masking, normalisation, packing, accumulation.


def test_loss_is_mean_cross_entropy_over_response_tokens(tok):
  batch = _batches(tok, 1)[0]
  graphdef, params, _ = _split()
  logits, (loss, correct), _ = _jitted(graphdef)(params, batch)
  logits = np.asarray(logits, np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  ce = -np.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
  mask = batch['loss_mask']
  assert 0 < mask.sum() < (batch['segment_ids'] > 0).sum()  # prompts are masked out
  np.testing.assert_allclose(float(loss), (ce * mask).sum() / mask.sum(), rtol=1e-5)
  hits = (logits.argmax(-1) == batch['targets']) * mask
  assert float(correct) == hits.sum()


def test_gradients_ignore_prompt_targets(tok):
  batch = _batches(tok, 1)[0]
  scrambled = dict(batch)
  rng = np.random.default_rng(0)
  noise = rng.integers(0, V, batch['targets'].shape).astype(np.int32)
  scrambled['targets'] = np.where(batch['loss_mask'] > 0, batch['targets'], noise)
  assert (scrambled['targets'] != batch['targets']).any()
  loss_a, grads_a = _loss_and_grads('tiny-gemma1', batch)
  loss_b, grads_b = _loss_and_grads('tiny-gemma1', scrambled)
  assert float(loss_a) == float(loss_b)
  for x, y in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_packed_batch_equals_unpacked(tok):
  """The same examples, packed into one row vs one per row: loss and grads agree (<= 1e-5)."""
  records = [m for _, m in data_sources.read_jsonl(TRAIN)[:3]]
  enc = [data.encode_example(m, tok, 64) for m in records]
  T = sum(len(e['tokens']) for e in enc) + 3
  packed = {k: np.zeros((1, T), np.float32 if k == 'loss_mask' else np.int32)
            for k in ('tokens', 'targets', 'loss_mask', 'positions', 'segment_ids')}
  unpacked = {k: np.zeros((3, T), v.dtype) for k, v in packed.items()}
  start = 0
  for i, e in enumerate(enc):
    n = len(e['tokens'])
    for dst, row, at in ((packed, 0, start), (unpacked, i, 0)):
      dst['tokens'][row, at:at + n] = e['tokens']
      dst['targets'][row, at:at + n] = e['targets']
      dst['loss_mask'][row, at:at + n] = e['loss_mask']
      dst['positions'][row, at:at + n] = np.arange(n)
      dst['segment_ids'][row, at:at + n] = i + 1 if dst is packed else 1
    start += n
  # tiny-gemma3: sliding-window (8 < example length) and global layers.
  loss_p, grads_p = _loss_and_grads('tiny-gemma3', packed)
  loss_u, grads_u = _loss_and_grads('tiny-gemma3', unpacked)
  np.testing.assert_allclose(float(loss_p), float(loss_u), rtol=1e-5)
  _assert_trees_close(grads_p, grads_u, rtol=1e-5, atol=1e-5)


def test_accumulation_equals_one_large_batch(tok):
  """k = 4 micro-batches of 2 rows give the gradient of the 8-row batch (SGD lr 1: the update
  is the gradient), the same loss and the same grad norm."""
  batch = _batches(tok, 1, batch_size=8)[0]
  tx, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
  results = []
  for k in (1, 4):
    graphdef, params, rest = _split()
    state = train_state.init_state(params, tx, 0)
    step = jax.jit(trainer.make_train_step(graphdef, rest, tx, schedule, grad_accum_steps=k))
    new_state, metrics = step(state, batch)
    update = jax.tree.map(lambda a, b: a - b, new_state['params'], params)
    results.append((update, metrics))
  (u1, m1), (u4, m4) = results
  for key in ('loss', 'grad_norm', 'accuracy', 'target_tokens'):
    np.testing.assert_allclose(float(m1[key]), float(m4[key]), rtol=1e-5)
  _assert_trees_close(u1, u4, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', ['tiny-gemma1', 'tiny-gemma2', 'tiny-gemma4-moe'])  # soft-caps
def test_head_fused_loss_chunks_give_the_same_step(tok, name):
  """loss_chunk = 8 (seq 32: four chunks) and 24 (a padded tail), with and without accumulation:
  the same loss, accuracy, grad norm and AdamW update as the unfused loss."""
  batch = _batches(tok, 1, batch_size=4)[0]
  tx, schedule = optax.adamw(1e-3, weight_decay=0.1), optax.constant_schedule(1e-3)
  graphdef, params, rest = _split(name)
  runs = {}
  for chunk, k in ((0, 1), (8, 1), (24, 1), (8, 2)):
    step = jax.jit(trainer.make_train_step(graphdef, rest, tx, schedule, grad_accum_steps=k,
                                           loss_chunk=chunk))
    runs[chunk, k] = step(train_state.init_state(params, tx, 0), batch)
  want_state, want = runs.pop((0, 1))
  for state, metrics in runs.values():
    for key in ('loss', 'accuracy', 'grad_norm'):
      np.testing.assert_allclose(float(metrics[key]), float(want[key]), rtol=1e-5)
    _assert_adamw_params_close(state['params'], want_state['params'])
  evals = [jax.jit(trainer.make_eval_step(graphdef, rest, c))(params, batch) for c in (0, 8)]
  for key in ('loss_sum', 'correct_sum', 'count'):
    np.testing.assert_allclose(float(evals[1][key]), float(evals[0][key]), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Optimiser pieces.


def test_bfloat16_compute_keeps_float32_master_weights(tok):
  graphdef, params, rest = _split(dtype=jnp.bfloat16)
  tx = optax.adamw(1e-3)
  step = jax.jit(trainer.make_train_step(graphdef, rest, tx, optax.constant_schedule(1e-3)))
  state, metrics = step(train_state.init_state(params, tx, 0), _batches(tok, 1)[0])
  assert {x.dtype for x in jax.tree.leaves(state['params'])} == {jnp.dtype(jnp.float32)}
  assert np.isfinite(float(metrics['loss']))


# ---------------------------------------------------------------------------------------------
# The job: train(), train.py, checkpoints.


def _final_params(workdir):
  return nnx.state(checkpoint.load_params(os.path.join(workdir, 'final')), nnx.Param)


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_overfits_tiny_dataset_and_writes_outputs(tmp_path, monkeypatch):
  """Memorises 4 examples (loss < 0.05); one compile of the step; every output is written."""
  jitted = []
  original = trainer.jit_train_step
  monkeypatch.setattr(trainer, 'jit_train_step',
                      lambda *a, **k: jitted.append(original(*a, **k)) or jitted[-1])
  workdir = str(tmp_path / 'run')
  c = small_config(tmp_path, num_train=4, steps=80, learning_rate=1e-2, log_every=10,
                   eval_every=40, checkpoint_every=40,
                   **{'exact_match.examples': 4, 'exact_match.max_new_tokens': 12})
  result = trainer.train(c, workdir)
  assert result['train']['loss'] < 0.05
  assert jitted[0]._cache_size() == 1  # eval and checkpoints never recompiled the step
  records = _records(workdir)
  train_steps = [r['step'] for r in records if 'loss' in r]
  assert train_steps == [1, 10, 20, 30, 40, 50, 60, 70, 80]
  assert {'loss', 'learning_rate', 'grad_norm', 'accuracy'} <= set(records[-3])
  assert [r['step'] for r in records if 'eval_loss' in r] == [40, 80]
  assert [r['step'] for r in records if 'eval_exact_match' in r] == [0, 80]
  assert 'exact_match_before' in result['eval']
  assert os.path.getsize(os.path.join(workdir, 'loss_curve.png')) > 1000
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(os.path.join(workdir,
                                                                                'tensorboard')))
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['40', '80']
  assert os.path.isfile(os.path.join(workdir, 'final', 'tokenizer.model'))
  final = _final_params(workdir)
  restored, _ = TrainCheckpoints(workdir, c.keep_checkpoints).restore(
      80, *_abstract_state(c, workdir))
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(restored['params']), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _abstract_state(c, workdir):
  mc, _ = initial_weights.model_and_tokenizer(c, workdir, resume=True)
  plan = train_state.plan_train_state(mc, c, sharding.make_mesh(c.mesh))
  return plan.abstract, plan.shardings


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / 'run')
  c = small_config(tmp_path, learning_rate=1e30, checkpoint_every=1, eval_every=0,
                   **{'optimizer.clip_norm': 0.0, 'optimizer.warmup_steps': 0,
                      'optimizer.decay': 'constant'})
  with pytest.raises(trainer.NonFiniteLossError, match=r'last good checkpoint \(step 1\)'):
    trainer.train(c, workdir)
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['1']
  assert not os.path.exists(os.path.join(workdir, 'final'))
  state, _ = TrainCheckpoints(workdir, c.keep_checkpoints).restore(1, *_abstract_state(c, workdir))
  assert int(state['step']) == 1


def test_vocab_mismatch_is_refused(tmp_path):
  c = small_config(tmp_path, **{'model.vocab_size': 64})
  with pytest.raises(train_config.ConfigError,
                     match='128 pieces but the model has only 64 embedding rows'):
    trainer.train(c, str(tmp_path / 'run'))


def test_one_adamw_step_matches_transformers_and_torch(tmp_path):
  """Same weights, same batch, one AdamW step with clipping and weight decay: our loss, grad
  norm and updated weights equal transformers + torch's."""
  torch = pytest.importorskip('torch')
  from gemma_jax.convert import config_from_hf, hf_tensors_from_model, model_from_hf_tensors
  from hf_models import make_hf_model

  hf = make_hf_model('gemma3')  # local + global layers, QK-norm, post-norms
  hf.train()
  tensors = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
  model = model_from_hf_tensors(config_from_hf(hf.config.to_dict()), tensors)
  B, T = 2, 24
  rng = np.random.default_rng(0)
  # No <pad> (id 0) in the inputs: torch's Embedding(padding_idx=0) never updates that row.
  ids = rng.integers(1, hf.config.vocab_size, (B, T + 1)).astype(np.int32)
  mask = np.ones((B, T), np.float32)
  mask[:, :7] = 0  # a prompt
  mask[1, 20:] = 0
  batch = {'tokens': ids[:, :-1], 'targets': ids[:, 1:], 'loss_mask': mask,
           'positions': np.tile(np.arange(T, dtype=np.int32), (B, 1)),
           'segment_ids': np.ones((B, T), np.int32)}
  c = small_config(tmp_path, learning_rate=1e-3, **{
      'optimizer.warmup_steps': 0, 'optimizer.decay': 'constant', 'optimizer.weight_decay': 0.1,
      'optimizer.weight_decay_exclude': '', 'optimizer.clip_norm': 0.5})
  tx, schedule = optim.make_optimizer(c)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  step = jax.jit(trainer.make_train_step(graphdef, rest, tx, schedule))
  state, metrics = step(train_state.init_state(params, tx, 0), batch)

  logits = hf(torch.as_tensor(batch['tokens'], dtype=torch.long)).logits.float()
  m = torch.as_tensor(mask).bool()
  loss = torch.nn.functional.cross_entropy(
      logits[m], torch.as_tensor(batch['targets'], dtype=torch.long)[m])
  loss.backward()
  grad_norm = torch.nn.utils.clip_grad_norm_(hf.parameters(), 0.5)
  opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=0.1)
  opt.step()

  assert abs(float(metrics['loss']) - loss.item()) <= 1e-5 * loss.item()
  assert abs(float(metrics['grad_norm']) - grad_norm.item()) <= 1e-4 * grad_norm.item()
  ours = hf_tensors_from_model(nnx.merge(graphdef, state['params'], rest))
  theirs = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  assert set(ours) <= set(theirs)
  # Adam's first step is ~lr * sign(g): where |g| is near eps (1e-8) float rounding of g moves
  # the update by up to lr, so a few such elements may differ; all others agree to 2e-6.
  diff = np.concatenate([np.abs(v - theirs[k]).ravel() for k, v in ours.items()])
  assert diff.max() <= 2e-3 and np.mean(diff > 2e-6) < 1e-3, (diff.max(), np.mean(diff > 2e-6))


def test_trains_from_tfds_by_name_with_accumulation_and_adafactor(tmp_path):
  """A TFDS dataset (array_record, written without TensorFlow) read by name + data_dir."""
  records = [json.loads(line) for line in _lines(TRAIN, 48)]
  data_dir = str(tmp_path / 'tfds')
  data_sources.write_tfds_dataset({'train': records, 'validation': records[:8]}, 'tiny_sft', data_dir)
  c = small_config(tmp_path, steps=10, learning_rate=1e-2, eval_every=5, checkpoint_every=10, **{
      'data.source': 'tfds', 'data.name': 'tiny_sft', 'data.data_dir': data_dir,
      'data.path': '', 'data.eval_path': '', 'data.eval_split': 'validation',
      'optimizer.name': 'adafactor', 'optimizer.grad_accum_steps': 2})
  workdir = str(tmp_path / 'run')
  trainer.train(c, workdir)
  losses = [r['loss'] for r in _records(workdir) if 'loss' in r]
  evals = [r['eval_loss'] for r in _records(workdir) if 'eval_loss' in r]
  assert len(losses) == 10 and losses[-1] < 0.8 * losses[0]
  assert len(evals) == 2 and evals[1] < evals[0]


def test_initial_weights_from_a_native_checkpoint(tmp_path):
  """model.init='native': the tokenizer and weights come from a save_params directory, placed
  on the state's shardings with the config's master-weight dtype."""
  graphdef, params, rest = _split()
  ckpt = str(tmp_path / 'ckpt')
  checkpoint.save_params(nnx.merge(graphdef, params, rest), ckpt, TOKENIZER)
  c = small_config(tmp_path, **{'model.init': 'native', 'model.init_path': ckpt,
                                'model.tokenizer': '', 'model.vocab_size': 0})
  train_config.validate_config(c)
  mc, tokenizer = initial_weights.model_and_tokenizer(c, str(tmp_path / 'run'), resume=False)
  assert mc.vocab_size == V and tokenizer.vocab_size == V
  abstract, shardings = _abstract_state(c, str(tmp_path / 'run'))
  loaded = initial_weights.initial_params(mc, c, shardings['params'])
  for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

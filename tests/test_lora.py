"""gemma_jax.lora: adapters equal PEFT's LoRA on transformers, merge exactly, train only
themselves, and survive checkpoints and export."""

import itertools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from flax import nnx

from gemma_jax import (checkpoint, data, evaluate, lora, sharding, train_config, train_state,
                       trainer)
from gemma_jax.config import get_preset
from gemma_jax.convert import load_hf
from gemma_jax.tokenizer import Tokenizer
from gemma_jax.transformer import Transformer
from hf_models import hf_logits, make_hf_model
from test_trainer import small_config

TOKENS = np.random.default_rng(0).integers(0, 256, (2, 12))


def _model(name='tiny-gemma1', **changes):
  return Transformer(get_preset(name).replace(**changes), rngs=nnx.Rngs(0))


def _randomise_b(model, seed=1, std=0.1):
  """Non-zero B factors (a fresh adapter's B is zero and changes nothing)."""
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    if str(path[-1]).endswith('_lora_b'):
      var.set_value(jnp.asarray(rng.normal(0, std, var.shape), jnp.float32))


MODELS = {
    'gemma1 (q + kv)': lambda: _model('tiny-gemma1'),
    'gemma1 MHA (fused qkv)': lambda: _model('tiny-gemma1', num_kv_heads=4),
    'gemma2': lambda: _model('tiny-gemma2'),
    'gemma3': lambda: _model('tiny-gemma3'),
}


@pytest.mark.parametrize('name', sorted(MODELS))
def test_fresh_adapters_change_nothing_and_merging_equals_the_adapted_model(name):
  model = MODELS[name]()
  tokens = jnp.asarray(TOKENS % model.config.vocab_size)
  base, _ = model(tokens)
  names = lora.add_lora(model, rank=3, alpha=6.0, rngs=nnx.Rngs(1))
  per_layer = 4 if 'fused' in name else 5  # attn_vec, gating, linear + qkv or q and kv
  assert len(names) == per_layer * model.config.num_layers
  assert any('qkv_einsum' in n for n in names) == ('fused' in name)
  np.testing.assert_array_equal(model(tokens)[0], base)  # B = 0
  _randomise_b(model)
  adapted, _ = model(tokens)
  adapted_decode, _ = model(tokens[:, :4])  # the few-rows (decoding) projection path
  assert float(jnp.abs(adapted - base).max()) > 0.1
  assert sorted(lora.merge_lora(model)) == sorted(names)
  assert not nnx.state(model, nnx.LoRAParam)
  merged, _ = model(tokens)
  np.testing.assert_allclose(merged, adapted, rtol=1e-5, atol=1e-5 * float(jnp.abs(adapted).max()))
  np.testing.assert_allclose(model(tokens[:, :4])[0], adapted_decode, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('preset', ['tiny-gemma4', 'tiny-gemma4-moe'])
def test_gemma4_adapters_cover_every_projection_and_merge_exactly(preset):
  """Gemma 4's own projections (k-only global layers, per-layer inputs, the router, each
  expert's gate/up and down weights) take adapters; the experts' ragged LoRA path equals the
  merged weights (an independent computation: lora_delta's einsum, not ragged_dot)."""
  model = _model(preset)
  tokens = jnp.asarray(TOKENS % model.config.vocab_size)
  base, _ = model(tokens)
  names = lora.add_lora(model, rank=3, alpha=6.0, rngs=nnx.Rngs(1))
  want = ['layers.2.attn.k_einsum.w', 'layers.4.attn.q_einsum.w'] if preset == 'tiny-gemma4' \
      else ['layers.0.moe.gating_einsum', 'layers.0.moe.linear', 'layers.0.moe.router.w']
  if preset == 'tiny-gemma4':
    want += ['embedder.per_layer_model_projection.w', 'layers.0.per_layer_input_gate.w',
             'layers.0.per_layer_projection.w']
    assert not any(n.startswith(('layers.3.attn.k', 'layers.4.attn.k'))
                   for n in names)  # KV-shared: no k/v weights
  assert set(want) <= set(names)
  np.testing.assert_array_equal(model(tokens)[0], base)  # B = 0
  _randomise_b(model)
  adapted, _ = model(tokens)
  assert float(jnp.abs(adapted - base).max()) > 0.1
  if preset == 'tiny-gemma4-moe':
    a = model.layers[0].moe.gating_einsum_lora_a
    assert a.shape == (8, 64, 3)  # one pair per expert: [E, D, r]
  lora.merge_lora(model)
  merged, _ = model(tokens)
  np.testing.assert_allclose(merged, adapted, rtol=1e-5, atol=1e-5 * float(jnp.abs(adapted).max()))


# PEFT adapts each projection separately: (our weight's owner, attribute, stack index, PEFT
# module). k and v (and q in the fused MHA case) share one of our weights, gate and up another.
_PEFT = [('attn', 'q_einsum', None, 'self_attn.q_proj'), ('attn', 'kv_einsum', 0, 'self_attn.k_proj'),
         ('attn', 'kv_einsum', 1, 'self_attn.v_proj'), ('attn', 'qkv_einsum', 0, 'self_attn.q_proj'),
         ('attn', 'qkv_einsum', 1, 'self_attn.k_proj'), ('attn', 'qkv_einsum', 2, 'self_attn.v_proj'),
         ('attn', 'attn_vec_einsum', None, 'self_attn.o_proj'),
         ('mlp', 'gating_einsum', 0, 'mlp.gate_proj'), ('mlp', 'gating_einsum', 1, 'mlp.up_proj'),
         ('mlp', 'linear', None, 'mlp.down_proj')]


@pytest.mark.parametrize('family', ['gemma1-mqa', 'gemma1-mha', 'gemma2', 'gemma3'])
def test_adapters_equal_peft_lora_on_transformers(family, tmp_path):
  """PEFT LoRA (r 4, alpha 8, every projection, random A and B) on a transformers model, and our
  adapters holding the same factors, give the same logits (float32)."""
  hf = make_hf_model(family)
  hf.save_pretrained(tmp_path)
  base_ref = hf_logits(hf, TOKENS)
  ours = load_hf(tmp_path)
  r, H = 4, ours.config.head_dim
  targets = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']
  peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=r, lora_alpha=8, target_modules=targets,
                                                       lora_dropout=0.0, init_lora_weights=False))
  peft_model.eval()
  lora.add_lora(ours, rank=r, alpha=8.0)
  modules = dict(peft_model.named_modules())
  copied = 0
  for i, layer in enumerate(ours.layers):
    for owner_name, weight, index, hf_name in _PEFT:
      owner = getattr(layer, owner_name)
      module, attr = (owner, weight) if owner_name == 'mlp' else (getattr(owner, weight, None), 'w')
      if module is None:
        continue  # q/kv on an MHA model, qkv otherwise
      peft_module = modules[f'base_model.model.model.layers.{i}.{hf_name}']
      a_ri = peft_module.lora_A['default'].weight.detach().numpy()  # [r, in]
      b_or = peft_module.lora_B['default'].weight.detach().numpy()  # [out, r]
      if weight == 'attn_vec_einsum':  # in (N, H), out D
        a, b = a_ri.T.reshape(-1, H, r), b_or.T
      elif owner_name == 'mlp':  # in D or F, out F or D
        a, b = a_ri.T, b_or.T
      else:  # q, k, v: in D, out (heads, H)
        a, b = a_ri.T, b_or.T.reshape(r, -1, H)
      var_a, var_b = getattr(module, f'{attr}_lora_a'), getattr(module, f'{attr}_lora_b')
      if index is None:
        var_a.set_value(jnp.asarray(a))
        var_b.set_value(jnp.asarray(b))
      else:
        var_a.set_value(var_a[...].at[index].set(a))
        var_b.set_value(var_b[...].at[index].set(b))
      copied += 1
  assert copied == 7 * ours.config.num_layers
  with torch.no_grad():
    ref = peft_model(torch.as_tensor(TOKENS, dtype=torch.long)).logits.float().numpy()
  assert float(np.abs(ref - base_ref).max()) > 0.05 * float(np.abs(ref).max())  # LoRA bites
  logits, _ = ours(jnp.asarray(TOKENS))
  np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4 * float(np.abs(ref).max()))


def test_targets_pick_weights_by_name_and_bad_ones_are_errors():
  model = _model('tiny-gemma2')
  names = lora.add_lora(model, rank=2, alpha=2.0, targets=r'mlp\.|layers\.1\.attn\.q_')
  assert names == ['layers.0.mlp.gating_einsum', 'layers.0.mlp.linear', 'layers.1.attn.q_einsum.w',
                   'layers.1.mlp.gating_einsum', 'layers.1.mlp.linear']
  with pytest.raises(ValueError, match="targets 'embed' match no projection weight"):
    lora.add_lora(_model(), rank=2, alpha=2.0, targets='embed')
  with pytest.raises(ValueError, match='rank must be >= 1'):
    lora.add_lora(_model(), rank=0, alpha=2.0)


def test_lora_config_errors_name_the_key(tmp_path):
  for overrides, match in (({'lora.rank': -1}, r'config\.lora\.rank=-1'),
                           ({'lora.rank': 2, 'lora.targets': 'nothing'},
                            r"config\.lora\.targets='nothing'"),
                           ({'lora.rank': 2, 'lora.targets': '(['}, r"config\.lora\.targets='\(\['")):
    with pytest.raises(train_config.ConfigError, match=match):
      train_config.validate_config(small_config(tmp_path, **overrides))


def test_lora_step_trains_only_the_adapters():
  """One AdamW step of a LoRA state: the adapters move (B first of all), the frozen base comes
  back bit-identical, and the optimiser state covers the adapters only."""
  model = _model('tiny-gemma3')
  lora.add_lora(model, rank=2, alpha=4.0)
  graphdef, params, frozen, rest = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
  tx = optax.adamw(1e-2)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 256, (2, 17)).astype(np.int32)
  batch = {'tokens': tokens[:, :-1], 'targets': tokens[:, 1:],
           'loss_mask': np.ones((2, 16), np.float32),
           'positions': np.tile(np.arange(16, dtype=np.int32), (2, 1)),
           'segment_ids': np.ones((2, 16), np.int32)}
  step = jax.jit(trainer.make_train_step(graphdef, rest, tx, optax.constant_schedule(1e-2)))
  state = train_state.init_state(params, tx, 0, frozen)
  new_state, metrics = step(state, batch)
  assert float(metrics['grad_norm']) > 0
  for a, b in zip(jax.tree.leaves(new_state['frozen']), jax.tree.leaves(frozen), strict=True):
    np.testing.assert_array_equal(a, b)
  moved = [float(jnp.abs(a - b).max()) for a, b in
           zip(jax.tree.leaves(new_state['params']), jax.tree.leaves(params), strict=True)]
  assert min(moved) > 0
  n_opt = sum(x.size for x in jax.tree.leaves(new_state['opt_state']))
  n_lora = sum(x.size for x in jax.tree.leaves(params))
  assert n_opt <= 2 * n_lora + 4


def test_lora_job_checkpoints_adapters_only_resumes_and_exports_merged(tmp_path):
  """train()'s path with lora.rank > 0: the loss falls; checkpoints hold the adapters and no base
  weights; a run resumed from step 4 ends where an uninterrupted one does; final/ is a plain model
  whose held-out loss equals the adapted model's."""
  overrides = {'lora.rank': 4, 'lora.alpha': 8.0, 'learning_rate': 1e-2, 'steps': 8,
               'eval_every': 8, 'checkpoint_every': 4}
  c = small_config(tmp_path, **overrides)
  full = trainer.train(c, str(tmp_path / 'full'))
  with open(tmp_path / 'full' / 'metrics.jsonl') as f:
    first_loss = next(json.loads(line)['loss'] for line in f if '"loss"' in line)
  assert full['train']['loss'] < first_loss

  meta = (tmp_path / 'full' / 'checkpoints' / '8' / 'state' / '_METADATA').read_text()
  assert 'q_einsum' in meta and 'w_lora_a' in meta and 'w_lora_b' in meta
  assert 'frozen' not in meta and 'input_embedding' not in meta

  shutil.copytree(tmp_path / 'full', tmp_path / 'resumed')
  shutil.rmtree(tmp_path / 'resumed' / 'checkpoints' / '8')  # as if stopped after step 4's save
  resumed = trainer.train(c, str(tmp_path / 'resumed'))
  np.testing.assert_allclose(resumed['train']['loss'], full['train']['loss'], rtol=1e-6)
  np.testing.assert_allclose(resumed['eval']['loss'], full['eval']['loss'], rtol=1e-6)

  exported = checkpoint.load_params(full['export_dir'])
  assert not nnx.state(exported, nnx.LoRAParam)
  graphdef, params, rest = nnx.split(exported, nnx.Param, ...)
  mesh = sharding.make_mesh(c.mesh)
  batches = data.job_dataset(c, Tokenizer(checkpoint.tokenizer_path(full['export_dir'])),
                             split='eval')
  merged = evaluate.held_out_loss(jax.jit(trainer.make_eval_step(graphdef, rest, mesh=mesh)),
                                  params, itertools.islice(iter(batches), c.eval_batches), mesh,
                                  None)
  np.testing.assert_allclose(merged['loss'], full['eval']['loss'], rtol=1e-5)
  np.testing.assert_allclose(merged['accuracy'], full['eval']['accuracy'], rtol=1e-6)

"""gemma_jax.quant: the int8 / int4 format, quantized models, checkpoints, QLoRA and the real
Gemma 3 270M's quality and bytes. Sharded quantized decoding and QLoRA steps: tests/_sharded_cases.py;
GGUF Q8_0 / Q4_0 mapping: tests/test_gguf_quant.py."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma_jax import checkpoint, lora, quant
from gemma_jax.config import get_preset
from gemma_jax.transformer import Transformer, count_params

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = jnp.asarray([[2, 17, 99, 4, 250, 31, 8, 77, 5, 300]], jnp.int32)


def tiny(preset='tiny-gemma3', seed=0):
  return Transformer(get_preset(preset), rngs=nnx.Rngs(seed))


def _vars(model, kind):
  return [v for _, v in nnx.to_flat_state(nnx.state(model, kind))]


# ---------------------------------------------------------------------------------------------
# Arrays.


def test_int4_packing_round_trips_every_value_along_any_axis():
  q = jnp.asarray(np.random.default_rng(0).integers(-8, 8, (4, 6, 8)), jnp.int8)
  for axis in (-1, -2, 0):
    packed = quant.pack_int4(q, axis)
    assert packed.dtype == jnp.int8 and packed.shape[axis] == q.shape[axis] // 2
    np.testing.assert_array_equal(quant.unpack_int4(packed, axis), q)


@pytest.mark.parametrize('bits,group', [(8, 0), (8, 4), (4, 4), (4, 0)])
def test_quantize_array_error_is_at_most_half_a_step(bits, group):
  """Round to nearest on a symmetric grid: |w - q * scale| <= scale / 2 everywhere, the scale
  has the documented shape, and values stay in range."""
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 16, 5)) * jnp.arange(1, 17)[None, :, None]
  q, scale = quant.quantize_array(w, bits=bits, axis=-2, contracted=(-2,), group_size=group)
  assert scale.shape == ((3, 1, 5) if group == 0 else (3, 16 // group, 5))
  back = quant.dequantize_array(q, scale, bits=bits, axis=-2, dtype=jnp.float32)
  step = jnp.repeat(scale, 16 // scale.shape[1], axis=1)
  assert float(jnp.max(jnp.abs(back - w) - step / 2)) <= 1e-6
  values = quant.unpack_int4(q, -2) if bits == 4 else q
  assert int(jnp.max(jnp.abs(values))) <= 2**(bits - 1) - 1


# ---------------------------------------------------------------------------------------------
# Models.


# Gemma 4's per-layer tables and Gemma 1's fused qkv are quantized in tests/test_sample_cli.py and
# tests/test_gguf_quant.py.
@pytest.mark.parametrize('preset,mode', [('tiny-gemma3', 'int4'), ('tiny-gemma4-moe', 'int8')])
def test_quantized_model_computes_with_its_dequantized_weights(preset, mode):
  """A quantized model is the float model whose weights are the dequantized values: its logits
  equal those of `quant.dequantize` of itself, every projection and table is quantized (norms
  are not), and it keeps its call signature and parameter count."""
  model = tiny(preset)
  n = count_params(model)
  quant.quantize(model, mode, 8)
  weights = _vars(model, quant.QuantizedWeight)
  n_targets = sum(len(getattr(m, 'einsums', {})) + len(getattr(m, 'tables', ()))
                  for _, m in nnx.iter_modules(model))
  assert len(weights) == n_targets and len(_vars(model, quant.QuantScale)) == n_targets
  assert all(w.get_value().dtype == jnp.int8 for w in weights)
  assert count_params(model) == n
  got, _ = model(TOKENS)
  want, _ = quant.dequantize(nnx.clone(model))(TOKENS)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))))
  assert not quant.is_quantized(quant.dequantize(model))


def test_quantized_bytes_and_variable_types():
  model = tiny()
  f32 = quant.param_bytes(model)
  q8 = quant.param_bytes(quant.quantize(tiny(), 'int8', 0))
  q4 = quant.param_bytes(quant.quantize(tiny(), 'int4', 16))
  assert q8 < 0.27 * f32 and q4 < 0.2 * f32
  model = quant.quantize(model, 'int4', 16)
  _, values, scales, rest = nnx.split(model, quant.QuantizedWeight, quant.QuantScale, ...)
  assert jax.tree.leaves(values) and jax.tree.leaves(scales)
  # Both are nnx.Params: a checkpoint (and LoRA's frozen base) takes them with the float ones.
  params = _vars(model, nnx.Param)
  floats = [v for v in params if type(v) is nnx.Param]  # norms
  assert floats and len(params) == (len(jax.tree.leaves(values)) + len(jax.tree.leaves(scales))
                                    + len(floats))
  assert model.embedder.input_embedding.shape == (512, 64)  # the float shape
  assert model.embedder.input_embedding.get_value().shape == (512, 32)  # two int4 per byte


def test_bad_quantization_arguments_name_the_value_and_change_nothing():
  model = tiny()
  before = jax.tree.map(np.asarray, nnx.state(model))
  with pytest.raises(ValueError, match="Unknown quantization mode 'int3'"):
    quant.quantize(model, 'int3')
  with pytest.raises(ValueError, match=r'group size 24 does not divide axis 1 \(length 64\) '
                     r'of embedder\.input_embedding'):
    quant.quantize(model, 'int4', 24)
  with pytest.raises(ValueError, match='even'):
    quant.spec('int4', 7)
  assert not quant.is_quantized(model)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model)), before)


def test_quantized_checkpoint_round_trips_bit_identically(tmp_path):
  model = quant.quantize(tiny(), 'int4', 8)
  quant.quantize(model, 'int8', 0)  # nothing left to quantize: a no-op
  checkpoint.save_params(model, tmp_path / 'q')
  back = checkpoint.load_params(tmp_path / 'q')
  jax.tree.map(np.testing.assert_array_equal, nnx.state(back, nnx.Param),
               nnx.state(model, nnx.Param))
  assert quant.describe(back) == quant.describe(model)
  np.testing.assert_array_equal(back(TOKENS)[0], model(TOKENS)[0])


def test_convert_quantize_writes_what_load_params_reads(tmp_path):
  """`python -m gemma_jax.convert --from hf ... --quantize int4` = quantizing the imported model
  in memory, bit for bit; a bad group size is an error before anything is written."""
  from gemma_jax.convert import __main__ as cli
  from gemma_jax.convert import load_hf, save_hf
  save_hf(tiny('tiny-gemma2'), tmp_path / 'hf')
  assert cli.main(['--from', 'hf', '--src', str(tmp_path / 'hf'), '--dst', str(tmp_path / 'q'),
                   '--quantize', 'int4', '--group-size', '16']) == 0
  want = quant.quantize(load_hf(tmp_path / 'hf'), 'int4', 16)
  got = checkpoint.load_params(tmp_path / 'q')
  jax.tree.map(np.testing.assert_array_equal, nnx.state(got, nnx.Param),
               nnx.state(want, nnx.Param))
  assert cli.main(['--from', 'hf', '--src', str(tmp_path / 'hf'), '--dst', str(tmp_path / 'bad'),
                   '--quantize', 'int4', '--group-size', '24']) == 1
  assert not (tmp_path / 'bad').exists()
  # --to hf writes the dequantized weights.
  assert cli.main(['--to', 'hf', '--src', str(tmp_path / 'q'), '--dst', str(tmp_path / 'out')]) == 0
  np.testing.assert_allclose(load_hf(tmp_path / 'out')(TOKENS)[0], got(TOKENS)[0], atol=1e-5)


def test_lora_over_a_quantized_base_merges_into_a_float_model():
  model = quant.quantize(tiny(), 'int4', 16)
  lora.add_lora(model, 4, 8.0)
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    var.set_value(jax.random.normal(jax.random.PRNGKey(3), var.shape) * 0.05)
  adapted, _ = model(TOKENS)
  merged = lora.merge_lora(model)
  assert merged and isinstance(model.layers[0].attn.q_einsum.w, nnx.Param)
  assert not isinstance(model.layers[0].attn.q_einsum.w, quant.QuantizedWeight)
  np.testing.assert_allclose(model(TOKENS)[0], adapted, atol=2e-5 * float(jnp.max(jnp.abs(adapted))))


def test_qlora_config_errors_before_any_work():
  from gemma_jax.train_config import ConfigError, base_config, validate_config
  c = base_config()
  c.data.path = os.path.join(_REPO, 'data', 'quickstart_train.jsonl')
  c.model.quantize = 'int4'
  with pytest.raises(ConfigError, match=r'config.model.quantize=.int4. .*lora.rank > 0'):
    validate_config(c)
  c.lora.rank = 2
  c.model.quant_group_size = 24
  with pytest.raises(ConfigError, match='quant_group_size=24: .* does not divide'):
    validate_config(c)
  c.model.quant_group_size = 16
  validate_config(c)
  c.model.quantize = 'int2'
  with pytest.raises(ConfigError, match="config.model.quantize='int2'"):
    validate_config(c)


@pytest.mark.slow  # ~25 s; QLoRA steps: tests/_sharded_cases.py; the 270M run: README
def test_qlora_training_job_keeps_the_base_and_exports(tmp_path):
  """train.py with model.quantize=int4 and LoRA: loss falls, the frozen quantized base is the
  same after training, and WORKDIR/final is the merged float model (or, with
  model.export_quantized, quantized again)."""
  from gemma_jax import trainer
  from gemma_jax.train_config import base_config
  c = base_config()
  c.update_from_flattened_dict({
      'steps': 6, 'batch_size': 4, 'seq_len': 32, 'learning_rate': 3e-3, 'log_every': 3,
      'eval_every': 0, 'checkpoint_every': 3, 'model.quantize': 'int4',
      'model.quant_group_size': 16, 'model.export_quantized': True, 'lora.rank': 4,
      'model.tokenizer': os.path.join(_REPO, 'data', 'quickstart_tokenizer.model'),
      'model.vocab_size': 128,
      'data.path': os.path.join(_REPO, 'data', 'quickstart_train.jsonl')})
  out = trainer.train(c, str(tmp_path / 'job'))
  final = checkpoint.load_params(out['export_dir'])
  assert quant.is_quantized(final)
  base = quant.quantize(Transformer(final.config, rngs=nnx.Rngs(c.seed)), 'int4', 16)
  # The embedding is not adapted: exported as the very same quantized table as model.init's.
  np.testing.assert_array_equal(final.embedder.input_embedding.get_value(),
                                base.embedder.input_embedding.get_value())


# ---------------------------------------------------------------------------------------------
# The real Gemma 3 270M (bench/quant_quality.py prints the same figures for other group sizes).


def test_real_270m_int8_and_int4_quality_and_bytes(real):
  """Teacher-forced on held-out text (data/heldout_text.txt, 762 positions): int8 (groups of
  32) agrees with the float model's top-1 token at >= 97% of positions; int4 (groups of 32) is
  held to its measured level (58.7%: the issue's 90% bar is not met by round-to-nearest int4 on
  this model, README). Device bytes: int8 <= 0.30x float32, int4 <= 0.18x, embedding included.
  int8 decodes the real prompts greedily to the float model's 32 first tokens, but for one
  prompt (measured)."""
  sys.path.insert(0, os.path.join(_REPO, 'bench'))
  from quant_quality import heldout_tokens
  from gemma_jax.sampler import Sampler
  from conftest import REAL_PROMPTS
  model, tokenizer, _, float_completions = real
  tokens = heldout_tokens(tokenizer)
  ref = model(tokens)[0][0, :-1]
  f32 = quant.param_bytes(model)
  for mode, min_top1, max_bytes in (('int8', 0.97, 0.30), ('int4', 0.55, 0.18)):
    q = quant.quantize(nnx.merge(*nnx.split(model)), mode)  # the float model stays as it is
    a = quant.agreement(ref, q(tokens)[0][0, :-1])
    ratio = quant.param_bytes(q) / f32
    print(f'\n{mode}: top-1 agreement {100 * a["top1"]:.1f}% of {a["positions"]} positions, '
          f'mean KL(float || {mode}) {a["kl"]:.4f} nats, {ratio:.3f}x float32 bytes')
    assert a['positions'] >= 500 and a['top1'] >= min_top1
    assert ratio <= max_bytes
    if mode == 'int8':
      got = Sampler(q, tokenizer, cache_length=256).sample(REAL_PROMPTS, 32)
      differ = sum(g.tokens[:32] != w.tokens[:32] for g, w in zip(got, float_completions))
      print(f'int8 greedy: {differ} of {len(REAL_PROMPTS)} prompts differ from float in 32 tokens')
      assert differ <= 1  # measured: 1 of 4 (README)


def test_quantized_moe_decoding_gathers_then_dequantizes_only_the_used_experts():
  """Decode-sized inputs on a quantized MoE model: the gather path dequantizes [R, ...] expert
  rows, never all E experts, and its output equals the grouped matmul's over dequantized
  weights."""
  from gemma_jax import moe
  model = quant.quantize(tiny('tiny-gemma4-moe'), 'int8', 8)
  layer = next(m for _, m in nnx.iter_modules(model) if isinstance(m, moe.MoE))
  x_BTD = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 64))
  E = layer.gating_einsum.shape[0]
  jaxpr = str(jax.make_jaxpr(lambda x: layer(x, x))(x_BTD))
  assert f'f32[{E},64,2,' not in jaxpr  # no dequantized copy of every expert's gating weight
  got = layer(x_BTD, x_BTD)
  want = quant.dequantize(nnx.clone(model))
  layer_f = next(m for _, m in nnx.iter_modules(want) if isinstance(m, moe.MoE))
  np.testing.assert_allclose(got, layer_f(x_BTD, x_BTD), rtol=1e-5, atol=1e-6)

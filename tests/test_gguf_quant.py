"""Quantized GGUF loads (gemma_jax.convert.gguf_quant): Q8_0 / Q4_0 blocks kept as they are.

The references are gguf's own dequantization and `quant.quantize` of the float load: a weight
loaded exactly must dequantize to the float load's weight bit for bit with the file's integers
and scales in groups of 32; any other weight must be what `quant.quantize` makes of the float
load; so the logits equal those of the float load quantized that way. Tiny files are written with
tests/test_gguf.py's writers (llama.cpp's names and conventions).
"""

import collections
import logging
import re
import types

import gguf
import numpy as np
import pytest

import jax.numpy as jnp
from flax import nnx

from gemma_jax import quant
from gemma_jax.config import get_preset
from gemma_jax.convert import gguf_quant
from gemma_jax.convert.gguf import config_from_gguf, gguf_sources, load_gguf, open_gguf
from gemma_jax.convert.hf import _layout, hf_config_from_config
from gemma_jax.layers import param_name
from gemma_jax.transformer import Transformer, flat_params

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
import test_gguf  # noqa: E402  (the tiny-file writers)

Q8, Q4 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0
F16, F32 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
_PROJECTIONS = ('token_embd', 'attn_q', 'attn_k', 'attn_v', 'attn_output', 'ffn_gate', 'ffn_up',
                'ffn_down')
TOKENS = np.array([[2, 40, 300, 7, 299, 262, 5, 100, 31, 4, 18, 250, 66, 1, 9, 3, 77, 8]])


# --- The file's own integers, decoded here from GGML's block layout (ggml-common.h). ---

def _file_blocks(t):
  """(int values [*HF shape], f16 scales widened [..., n/32]) of a Q8_0 / Q4_0 tensor: a block
  is the f16 scale d, then 32 int8 values (Q8_0), or 16 bytes whose low nibbles are values 0-15
  and high nibbles values 16-31, each stored + 8 (Q4_0)."""
  shape = tuple(int(d) for d in reversed(t.shape))
  raw = np.asarray(t.data).reshape(-1, 34 if t.tensor_type == Q8 else 18)
  d = raw[:, :2].copy().view(np.float16).astype(np.float32)
  if t.tensor_type == Q8:
    q = raw[:, 2:].copy().view(np.int8)
  else:
    q = np.concatenate([raw[:, 2:] % 16, raw[:, 2:] // 16], axis=1).astype(np.int8) - 8
  return q.reshape(shape), d.reshape(*shape[:-1], -1)


def _values(var) -> np.ndarray:
  """The int values of a QuantizedWeight, int4 unpacked."""
  v = var.get_value()
  if var.get_metadata('bits') == 4:
    v = quant.unpack_int4(v, var.get_metadata('axis'))
  return np.asarray(v)


# --- Every layout kind, tensor by tensor (no file): blocks land on our groups of 32. ---

def _fake_tensor(name, w, qtype):
  """What GGUFReader gives for `w` stored as `qtype` (the fields gguf_quant reads)."""
  return types.SimpleNamespace(name=name, tensor_type=qtype, data=gguf.quants.quantize(w, qtype),
                               shape=np.array(w.shape[::-1]))


_CONFIGS = {
    'gemma1-fused-qkv': get_preset('tiny-gemma1').replace(num_kv_heads=4, head_dim=32),
    'gemma3-narrow-heads': get_preset('tiny-gemma3'),  # H = 16: o_proj blocks straddle heads
    'gemma4-ple': get_preset('tiny-gemma4').replace(per_layer_input_dim=32),
    'gemma4-moe': get_preset('tiny-gemma4-moe'),
}


@pytest.mark.parametrize('qtype,bits', [(Q8, 8), (Q4, 4), (Q4, 8)])
@pytest.mark.parametrize('name', list(_CONFIGS))
def test_every_layout_kind_maps_blocks_exactly(name, qtype, bits):
  """For every weight quant.quantize replaces: the values and scales read from the blocks
  dequantize to gguf's dequantization moved into our layout, bit for bit, with one scale per 32
  values along the group axis; only an output projection with heads narrower than 32 refuses.
  MoE: the experts also split (ffn_gate_exps + ffn_up_exps)."""
  config = _CONFIGS[name]
  abstract = nnx.eval_shape(
      lambda: quant.quantize(Transformer(config, rngs=nnx.Rngs(0)), 'int8', 0))
  axes = {param_name(p): v.get_metadata('axis') for p, v in nnx.to_flat_state(nnx.state(abstract))
          if isinstance(v, quant.QuantizedWeight)}
  rng = np.random.default_rng(0)
  kinds = collections.Counter()
  for entry in _layout(config):
    if entry.ours not in axes:
      continue
    sources, floats = [], []
    for hf, shape in zip(entry.hf, entry.shapes):
      w = rng.normal(size=shape).astype(np.float32)
      parts = np.split(w, 2, axis=1) if hf.endswith('gate_up_proj') else [w]
      tensors = tuple(_fake_tensor(f'{hf}:{i}', p, qtype) for i, p in enumerate(parts))
      sources.append((tensors, False))
      floats.append(np.concatenate(
          [gguf.quants.dequantize(t.data, qtype).reshape(p.shape) for t, p in zip(tensors, parts)],
          axis=1))
    got = gguf_quant.exact(entry, sources, axes[entry.ours], bits)
    layer = entry.ours.split('.')[1] if entry.ours.startswith('layers.') else None
    straddles = entry.ours.endswith('attn_vec_einsum.w') and config.layer_head_dim(
        config.attention_types[int(layer)]) % 32 != 0
    if straddles:
      assert isinstance(got, str) and 'do not fall on groups of 32' in got, (entry.ours, got)
      kinds['refused'] += 1
      continue
    assert not isinstance(got, str), (entry.ours, got)
    q, scale = got
    want = np.asarray(entry.to_ours(*floats))
    a = axes[entry.ours] % want.ndim
    assert scale.dtype == np.float32
    assert scale.shape == want.shape[:a] + (want.shape[a] // 32,) + want.shape[a + 1:], entry.ours
    assert q.shape[a] == want.shape[a] * bits // 8, entry.ours
    np.testing.assert_array_equal(
        np.asarray(quant.dequantize_array(q, scale, bits=bits, axis=axes[entry.ours],
                                          dtype=jnp.float32)), want, err_msg=entry.ours)
    kinds[re.sub(r'^layers\.\d+\.', '', entry.ours)] += 1
  print(f'\n{name}: {dict(kinds)}')
  assert (kinds['refused'] > 0) == (name != 'gemma1-fused-qkv')
  assert ('attn.qkv_einsum.w' in kinds) == (name == 'gemma1-fused-qkv')
  if name == 'gemma4-ple':
    assert {'embedder.per_layer_input_embedding', 'embedder.per_layer_model_projection.w',
            'per_layer_input_gate.w', 'per_layer_projection.w'} <= set(kinds)
  if name == 'gemma4-moe':
    assert {'moe.router.w', 'moe.gating_einsum', 'moe.linear'} <= set(kinds)


# --- Whole files: the quantized load against the float load. ---

def _gemma3_file(path, qtypes):
  """tests/test_gguf.py's tiny Gemma 3 (H = 32, 7 layers) with `qtypes` {GGUF kind: type}; the
  other tensors F32."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(test_gguf, '_QUANT', qtypes)
    test_gguf.write_tiny_gguf(path, test_gguf._tiny_hf_model('gemma3'), 'gemma3')
  return path


def _gemma4_file(path, config, outtype, split_experts=False):
  """A random transformers Gemma 4 of `config` written as llama.cpp does (test_gguf's writer:
  projections in `outtype`, norms, routers and scales F32)."""
  hf_config = transformers.Gemma4TextConfig(
      **hf_config_from_config(config.replace(vocab_size=test_gguf.GEMMA4_V)))
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
  test_gguf.write_gemma4_gguf(path, model, outtype=outtype, split_experts=split_experts)
  return path


def _expected_exact(path, mode) -> set[str]:
  """Our weights whose GGUF tensors are all of a type `mode` keeps exactly, less the output
  projections whose heads are narrower than a block."""
  reader = open_gguf(path)
  config = config_from_gguf(reader, str(path))
  sources = gguf_sources(reader, str(path), config)
  ok = {Q8, Q4} if mode == 'int8' else {Q4}
  names = set()
  for entry in _layout(config):
    if {t.tensor_type for n in entry.hf for t in sources[n][0]} <= ok:
      if entry.ours.endswith('attn_vec_einsum.w'):
        kind = config.attention_types[int(entry.ours.split('.')[1])]
        if config.layer_head_dim(kind) % 32:
          continue
      names.add(entry.ours)
  return names


def _quantized(model) -> dict[str, tuple]:
  flat = {param_name(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  return {n: (v, flat[n + quant.SCALE_SUFFIX].get_value()) for n, v in flat.items()
          if isinstance(v, quant.QuantizedWeight)}


def _specs(model):
  abstract = nnx.eval_shape(lambda: Transformer(model.config, rngs=nnx.Rngs(0)))
  return quant.specs_from_shapes(abstract, {n: np.shape(v) for n, v in flat_params(model).items()})


def _logits(model):
  return np.asarray(nnx.jit(lambda m, t: m(t)[0])(model, jnp.asarray(TOKENS)))


def check_against_float_load(path, mode, group_size):
  """Loads `path` quantized and as floats and checks every weight (exact: dequantizes to the
  float weight bit for bit, in groups of 32; else: quant.quantize's values and scales) and the
  logits. Returns (the quantized model, the names loaded exactly)."""
  model, _ = load_gguf(path, quantize=mode, group_size=group_size)
  ref, _ = load_gguf(path)
  requested = quant.spec(mode, group_size)
  exact = _expected_exact(path, mode)
  everything = nnx.eval_shape(  # every weight quant.quantize replaces (names only: per channel)
      lambda: quant.quantize(Transformer(ref.config, rngs=nnx.Rngs(0)), mode, 0))
  specs = _specs(model)
  assert set(specs) == set(_quantized(everything))  # what quant.quantize replaces, no more
  floats = flat_params(ref)
  # The float load, quantized where the quantized load had to requantize: the reference.
  reference = quant.quantize(ref, {n: requested for n in specs if n not in exact})
  requantized = flat_params(reference)
  for name, (var, scale) in _quantized(model).items():
    assert var.get_metadata('bits') == requested.bits, name
    if name in exact:  # the float weight, one scale per 32 values along the group axis
      a = var.get_metadata('axis')
      assert scale.shape[a] * 32 == var.shape[a] and scale.ndim == var.ndim, name
      np.testing.assert_array_equal(np.asarray(var.dequantize(scale, jnp.float32)),
                                    np.asarray(floats[name]), err_msg=name)
    else:  # what quant.quantize makes of the float weight
      np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(requantized[name]),
                                    err_msg=name)
      np.testing.assert_array_equal(np.asarray(scale),
                                    np.asarray(requantized[name + quant.SCALE_SUFFIX]),
                                    err_msg=name)
  got, want = _logits(model), _logits(reference)
  rel = float(np.abs(got - want).max() / np.abs(want).max())
  print(f'\n{path.name} {mode}: {len(exact)} exact, {len(specs) - len(exact)} requantized, '
        f'logits max|d|/max|ref| = {rel:.1e}')
  assert rel < 1e-5
  return model, exact


# Q4_0 widened to int8 is covered per weight kind by test_every_layout_kind_maps_blocks_exactly.
@pytest.mark.parametrize('qtype,mode', [(Q8, 'int8'), (Q4, 'int4')])
def test_q8_0_q4_0_file_loads_exactly(qtype, mode, tmp_path):
  """Every projection and the embedding Q8_0 / Q4_0: all loaded exactly, the integers and scales
  are the file's (Q4_0 widened under int8), and the logits are the float load's."""
  path = _gemma3_file(tmp_path / 'q.gguf', {k: qtype for k in _PROJECTIONS})
  model, exact = check_against_float_load(path, mode, group_size=16)  # not for exact weights
  assert exact == set(_quantized(model))  # every weight: the logits compare with the float load
  reader = open_gguf(path)
  file = {t.name: t for t in reader.tensors}
  for gguf_name, var, transposed in [('token_embd.weight', model.embedder.input_embedding, False),
                                      ('blk.3.ffn_down.weight', model.layers[3].mlp.linear, True)]:
    q, _ = _file_blocks(file[gguf_name])
    assert var.get_metadata('bits') == quant.BITS[mode]
    assert _values(var).dtype == np.int8
    np.testing.assert_array_equal(_values(var), q.T if transposed else q,  # down: [D, F] -> (F, D)
                                  err_msg=gguf_name)
  np.testing.assert_array_equal(np.asarray(model.embedder.input_embedding_qscale.get_value()),
                                _file_blocks(file['token_embd.weight'])[1])
  np.testing.assert_array_equal(np.asarray(model.layers[3].mlp.linear_qscale.get_value()),
                                _file_blocks(file['blk.3.ffn_down.weight'])[1].T)


@pytest.mark.parametrize('mode,group_size', [('int8', 0), ('int4', 32)])
def test_mixed_file(mode, group_size, tmp_path, caplog):
  """F32 / F16 tensors next to Q8_0 ones: the float ones get the requested mode (quant.quantize's
  result on the float load); under int8 the Q8_0 ones are kept (a stack of Q8_0 and F16, k and v,
  is requantized with a log line naming it), under int4 requantized."""
  qtypes = {'attn_q': Q8, 'attn_k': Q8, 'attn_v': F16, 'attn_output': Q8, 'ffn_gate': F16,
            'ffn_up': F16, 'ffn_down': Q8}  # token_embd F32
  path = _gemma3_file(tmp_path / 'mixed.gguf', qtypes)
  with caplog.at_level(logging.INFO, logger='gemma_jax.convert'):
    model, exact = check_against_float_load(path, mode, group_size)
  specs = _specs(model)
  requested = quant.spec(mode, group_size)
  assert specs['embedder.input_embedding'] == requested  # F32
  assert specs['layers.0.mlp.gating_einsum'] == requested  # F16 + F16
  assert specs['layers.0.attn.kv_einsum.w'] == requested  # Q8_0 + F16
  for name in ('layers.0.attn.q_einsum.w', 'layers.0.attn.attn_vec_einsum.w',
               'layers.0.mlp.linear'):
    assert specs[name] == (quant.QuantSpec(8, 32) if mode == 'int8' else requested), name
  assert len(exact) == (3 * 7 if mode == 'int8' else 0)
  stacked = [r.getMessage() for r in caplog.records if 'kv_einsum' in r.getMessage()]
  assert len(stacked) == (7 if mode == 'int8' else 0), stacked  # under int4 no Q8_0 is exact
  assert all('(F16+Q8_0): only part of the stack is exact; requantized to int8 per channel' in m
             for m in stacked), stacked


@pytest.mark.parametrize('preset,outtype,mode,group_size', [('tiny-gemma4', Q4, 'int4', 16),
                                                            ('tiny-gemma4-moe', Q8, 'int8', 0)])
def test_gemma4_file(preset, outtype, mode, group_size, tmp_path, caplog):
  """Gemma 4 as llama.cpp writes it: per-layer tables and projections (PLE), experts (split)
  and routers (F32: requantized); sliding layers' heads of 16 split Q8_0 blocks, so their output
  projections are requantized and a log line says so; the global layers' (32) are exact."""
  config = get_preset(preset)
  if preset == 'tiny-gemma4':
    config = config.replace(per_layer_input_dim=32)
  path = _gemma4_file(tmp_path / 'g4.gguf', config, outtype, split_experts=config.num_experts > 0)
  with caplog.at_level(logging.INFO, logger='gemma_jax.convert'):
    model, exact = check_against_float_load(path, mode, group_size)
  specs = _specs(model)
  local = [i for i, t in enumerate(config.attention_types) if config.layer_head_dim(t) == 16]
  glob = [i for i, t in enumerate(config.attention_types) if config.layer_head_dim(t) == 32]
  assert local and glob
  for i in local:
    assert f'layers.{i}.attn.attn_vec_einsum.w' not in exact
  for i in glob:
    assert f'layers.{i}.attn.attn_vec_einsum.w' in exact
  refused = [r.getMessage() for r in caplog.records if 'do not fall on groups' in r.getMessage()]
  assert len(refused) == len(local), refused
  if config.per_layer_input_dim:
    assert {'embedder.per_layer_input_embedding', 'embedder.per_layer_model_projection.w',
            'layers.0.per_layer_input_gate.w', 'layers.0.per_layer_projection.w'} <= exact
  if config.num_experts:
    assert {'layers.0.moe.gating_einsum', 'layers.0.moe.linear'} <= exact
    assert specs['layers.0.moe.router.w'] == quant.spec(mode, group_size)  # F32 router


def _retype(path, tensor_name, qtype):
  """Rewrites the type of an F32 tensor in a GGUF file's tensor table to another 4-byte type (the
  entry: name length u64, name, n_dims u32, dims u64 each, type u32, data offset u64)."""
  t = next(t for t in open_gguf(path).tensors if t.name == tensor_name)
  assert t.tensor_type == F32
  offset = t.field.offset + 8 + len(t.name.encode()) + 4 + 8 * len(t.shape)
  with open(path, 'r+b') as f:
    f.seek(offset)
    assert np.frombuffer(f.read(4), np.uint32)[0] == F32
    f.seek(offset)
    f.write(np.uint32(qtype).tobytes())


def test_type_gguf_cannot_dequantize(tmp_path):
  path = _gemma3_file(tmp_path / 'i32.gguf', {'attn_q': Q8})
  _retype(path, 'blk.2.attn_k.weight', gguf.GGMLQuantizationType.I32)
  assert {t.name: t.tensor_type for t in open_gguf(path).tensors}['blk.2.attn_k.weight'] == (
      gguf.GGMLQuantizationType.I32)
  for mode in (None, 'int8'):
    with pytest.raises(ValueError, match=r"i32\.gguf: tensor 'blk\.2\.attn_k\.weight' uses I32"):
      load_gguf(path, quantize=mode)


def test_bad_arguments(tmp_path):
  path = tmp_path / 'absent.gguf'
  with pytest.raises(ValueError, match='Unknown quantization mode'):
    load_gguf(path, quantize='int3')
  with pytest.raises(ValueError, match='group_size=32 needs quantize'):
    load_gguf(path, group_size=32)


def test_requantized_group_size_must_divide(tmp_path):
  """A group size that does not divide a requantized weight's group axis names the weight."""
  path = _gemma3_file(tmp_path / 'f.gguf', {})
  with pytest.raises(ValueError, match=r'group size 48 does not divide .* of embedder\.'):
    load_gguf(path, quantize='int4', group_size=48)


# --- The real Gemma 3 270M (Q4_K_M): its Q8_0 embedding is loaded exactly. ---

@pytest.mark.slow  # ~25 s: reads the real file again; the tiny files above prove the mapping.
def test_real_model_q8_0_embedding(gguf_path):
  """The file holds Q8_0 (token_embd, attn_v), Q5_0, Q4_K, Q6_K and F32 tensors; under int8 the
  embedding (63% of the model) is the file's integers and scales and dequantizes to gguf's
  dequantization; attn_v is stacked with a Q5_0 attn_k and requantized per channel. The file's
  header is read once (load_gguf less the tokenizer, which the tiny files cover)."""
  reader = open_gguf(gguf_path)
  kinds = collections.defaultdict(set)
  for t in reader.tensors:
    kinds[t.tensor_type.name].add(t.name.split('.')[-2] if t.name.startswith('blk.') else t.name)
  print('\n' + '\n'.join(f'{k}: {sorted(v)}' for k, v in sorted(kinds.items())))
  assert kinds['Q8_0'] == {'token_embd.weight', 'attn_v'} and 'Q4_0' not in kinds
  config = config_from_gguf(reader, str(gguf_path))
  model = gguf_quant.load_quantized(reader, str(gguf_path), config, 'int8', 0,
                                    dtype=jnp.float32, param_dtype=jnp.float32)
  specs = _specs(model)
  assert specs['embedder.input_embedding'] == quant.QuantSpec(8, 32)
  assert all(s == quant.QuantSpec(8, 0) for n, s in specs.items() if n.startswith('layers.'))
  table = next(t for t in reader.tensors if t.name == 'token_embd.weight')
  q, d = _file_blocks(table)
  emb = model.embedder
  np.testing.assert_array_equal(np.asarray(emb.input_embedding.get_value()), q)
  np.testing.assert_array_equal(np.asarray(emb.input_embedding_qscale.get_value()), d)
  rows = np.array([0, 2, 106, 4_000, 262_143])
  np.testing.assert_array_equal(
      np.asarray(emb.input_embedding.dequantize_rows(emb.input_embedding.get_value()[rows],
                                                     emb.input_embedding_qscale.get_value()[rows],
                                                     jnp.float32)),
      gguf.quants.dequantize(table.data[rows], Q8))

"""GGUF import: `load_gguf(path) -> (Transformer, Tokenizer)` for llama.cpp's gemma .. gemma4.

Facts this importer relies on (llama.cpp's `convert_hf_to_gguf.py`, transformers' GGUF loader):
- Tensors are stored row-major with GGUF's dimension list reversed: a tensor whose GGUF shape is
  [in, out] is a numpy [out, in] array, i.e. already Hugging Face's Linear orientation. Gemma q/k
  weights are not permuted (only llama's are).
- Every `*norm.weight` is stored with 1 added (llama.cpp's norms multiply by the weight); our
  scales are zero-centred, so 1 is subtracted here, in float32 as transformers does.
- Only the global RoPE base is stored; Gemma 3's local base (10k) comes from the preset. The
  query scale and the layer pattern are not stored either: they come from the Gemma generation and,
  when the shapes match a known size (e.g. Gemma 2/3 27B use (D/N)**-0.5), from its preset.

Gemma 4 (llama.cpp's `Gemma4Model` converter and `src/models/gemma4.cpp`; read, not run):
- Norms are stored as they are (Gemma 4 multiplies by its norm weights), not + 1.
- Per-layer metadata arrays: `sliding_window_pattern` (True = sliding), `head_count_kv` (global
  layers' own kv-head count), `feed_forward_length` (doubled on KV-shared layers when the MLPs are
  double-wide). `key_length`/`value_length` are the global layers' head dim, `*_swa` the sliding
  layers'; `shared_kv_layers` counts the last layers that reuse keys and values (they may lack
  attn_k/attn_v); `embedding_length_per_layer_input` is the per-layer input width (0: none).
- Global layers' partial ('proportional') RoPE is a generated `rope_freqs.weight`: a frequency
  factor per pair, 1 for the rotated ones and 1e30 (no rotation) for the rest; the sliding base is
  `rope.freq_base_swa`.
- k = v global layers have no attn_v. MoE layers: `ffn_gate_inp.weight` (router), `.scale`
  tensors for the router scale (`ffn_gate_inp.scale`) and the per-expert scale
  (`ffn_down_exps.scale`), experts fused `ffn_gate_up_exps` [E, 2F, D] (gate rows, then up) or
  split `ffn_gate_exps` + `ffn_up_exps`, and `ffn_down_exps` [E, D, F]. `layer_output_scale` is the
  layer scalar. Per-layer input tensors: `per_layer_token_embd` [V, L*I], `per_layer_model_proj`,
  `per_layer_proj_norm`, and per layer `inp_gate`, `proj`, `post_norm`.
Dequantisation uses the `gguf` package's own routines (`gguf.quants.dequantize`).

Quantized loads (`load_gguf(..., quantize='int8' | 'int4')`, gemma_jax.convert.gguf_quant):
- Kept exactly, no float round trip: Q8_0 (blocks of 32 int8 values q and an f16 scale d,
  w = d * q) -> int8 in groups of 32 under 'int8'; Q4_0 (blocks of 32 nibbles, w = d * (nibble -
  8)) -> int4 in groups of 32 under 'int4', widened to int8 in groups of 32 under 'int8'. The mode
  sets the bits: under 'int4' a Q8_0 tensor is requantized. f16 scales widen exactly to our
  float32 ones; `group_size` applies to requantized weights only. GGUF's blocks run along the
  innermost (input) axis, our contraction axis, so this holds wherever our layout puts each block
  inside one group along the weight's group axis, which is checked for every weight: an output
  projection whose heads are narrower than 32 (H % 32 != 0) splits blocks, and a stacked weight
  (Gemma 1's qkv, k/v, gate/up, split experts) needs all of its tensors exact; other weights are
  requantized (a log line says so).
- Requantized: F32, F16, BF16, Q4_1, Q5_0, Q5_1, the K-quants (Q2_K .. Q6_K), the IQ and TQ types
  are dequantised with gguf's routines and quantized by `quant.quantize`'s rules for the requested
  mode and group size, with the same result as quantizing the float load.
- Types gguf cannot dequantise (I8 .. I64, F64, Q8_1, Q8_K, Q1_0): ValueError naming the tensor.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from gemma_jax import config as config_lib
from gemma_jax import quant
from gemma_jax.config import AttentionType, ModelConfig
from gemma_jax.convert.config_checks import MAX_LAYERS, MAX_SIZE, check_config, integer, number

log = logging.getLogger('gemma_jax.convert')

SUPPORTED_ARCHITECTURES = ('gemma', 'gemma2', 'gemma3', 'gemma4')
_FAMILY = {'gemma': 1, 'gemma2': 2, 'gemma3': 3, 'gemma4': 4}
GLOBAL, LOCAL = AttentionType.GLOBAL, AttentionType.LOCAL

# GGUF per-layer tensor -> (HF per-layer tensor, is a norm stored as 1 + scale).
_LAYER_NAMES = {
    'attn_q': ('self_attn.q_proj', False),
    'attn_k': ('self_attn.k_proj', False),
    'attn_v': ('self_attn.v_proj', False),
    'attn_output': ('self_attn.o_proj', False),
    'attn_q_norm': ('self_attn.q_norm', True),
    'attn_k_norm': ('self_attn.k_norm', True),
    'attn_norm': ('input_layernorm', True),
    'post_attention_norm': ('post_attention_layernorm', True),
    'ffn_norm': ('pre_feedforward_layernorm', True),
    'post_ffw_norm': ('post_feedforward_layernorm', True),
    'ffn_gate': ('mlp.gate_proj', False),
    'ffn_up': ('mlp.up_proj', False),
    'ffn_down': ('mlp.down_proj', False),
}
# Gemma 1 has no post-attention norm; Hugging Face calls its pre-feed-forward norm
# `post_attention_layernorm`.
_GEMMA1_LAYER_NAMES = dict(_LAYER_NAMES, ffn_norm=('post_attention_layernorm', True))
_GLOBAL_NAMES = {'token_embd': ('model.embed_tokens', False), 'output_norm': ('model.norm', True)}
_LAYER_RE = re.compile(r'blk\.(\d+)\.(\w+)\.(weight|scale)')
# Gemma 4: GGUF name (past 'blk.N.') -> HF name (past 'model.layers.N.'); no norm is shifted.
_GEMMA4_LAYER_NAMES = {
    **{f'{k}.weight': f'{hf}.weight' for k, (hf, _) in _LAYER_NAMES.items()},
    'pre_ffw_norm_2.weight': 'pre_feedforward_layernorm_2.weight',
    'post_ffw_norm_1.weight': 'post_feedforward_layernorm_1.weight',
    'post_ffw_norm_2.weight': 'post_feedforward_layernorm_2.weight',
    'layer_output_scale.weight': 'layer_scalar',
    'inp_gate.weight': 'per_layer_input_gate.weight',
    'proj.weight': 'per_layer_projection.weight',
    'post_norm.weight': 'post_per_layer_input_norm.weight',
    'ffn_gate_inp.weight': 'router.proj.weight',
    'ffn_gate_inp.scale': 'router.scale',
    'ffn_down_exps.scale': 'router.per_expert_scale',
    'ffn_gate_up_exps.weight': 'experts.gate_up_proj',
    'ffn_down_exps.weight': 'experts.down_proj',
    'ffn_gate_exps.weight': 'experts.gate_proj',  # split experts: fused into gate_up_proj below
    'ffn_up_exps.weight': 'experts.up_proj',
}
_GEMMA4_GLOBAL_NAMES = {
    'token_embd.weight': 'model.embed_tokens.weight', 'output_norm.weight': 'model.norm.weight',
    'per_layer_token_embd.weight': 'model.embed_tokens_per_layer.weight',
    'per_layer_model_proj.weight': 'model.per_layer_model_projection.weight',
    'per_layer_proj_norm.weight': 'model.per_layer_projection_norm.weight'}
_ROPE_FREQS = 'rope_freqs.weight'  # Gemma 4: read into the config, not a weight


def open_gguf(path: str | os.PathLike):
  """Opens a GGUF file with `gguf.GGUFReader` once `gguf_checks.check_gguf` has bounded its
  header; ValueError naming the file when it is not one, or is truncated or corrupt."""
  import gguf  # Deferred: only the GGUF paths need the package.

  from gemma_jax.convert.gguf_checks import check_gguf  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f'{path}: GGUF file not found.')
  check_gguf(path)  # bounds every count and size before gguf's reader trusts them
  try:
    return gguf.GGUFReader(path, 'r')
  except Exception as e:  # The reader raises assorted errors on short or corrupt files.
    size = os.path.getsize(path)
    raise ValueError(f'{path}: truncated or corrupt GGUF file ({size} bytes): could not read its '
                     f'header and tensor table ({type(e).__name__}: {e}).') from e


def _value(reader, key: str, default: Any = None) -> Any:
  """A metadata value: scalars as Python numbers, strings as str, arrays as lists."""
  field = reader.fields.get(key)
  if field is None:
    return default
  return field.contents()


def _uniform(path: str, key: str, value: Any) -> Any:
  """Per-layer metadata arrays (allowed by GGUF) must be uniform for Gemma."""
  if isinstance(value, list):
    if len(set(value)) != 1:
      raise ValueError(f'{path}: {key} varies per layer ({value}); not a Gemma layout.')
    return value[0]
  return value


def architecture(reader, path: str) -> str:
  """The file's `general.architecture`, checked to be one this importer supports."""
  arch = _value(reader, 'general.architecture')
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f'{path}: unsupported GGUF architecture {arch!r}; gemma_jax imports '
                     f'{", ".join(SUPPORTED_ARCHITECTURES)}.')
  return arch


def _matching_preset(family: int, L: int, D: int, F: int, N: int, K: int, H: int):
  for preset in config_lib.PRESETS.values():
    if (preset.family, preset.num_layers, preset.embed_dim, preset.hidden_dim, preset.num_heads,
        preset.num_kv_heads, preset.head_dim) == (family, L, D, F, N, K, H):
      return preset
  return None


def _attention_types(reader, path: str, arch: str, L: int, family: int):
  """Per-layer attention: `{arch}.attention.sliding_window_pattern` when present (a period, or
  one bool per layer, True = sliding), else the generation's period (`config.layer_pattern`, as
  llama.cpp assumes: Gemma 2: 2, Gemma 3: 6)."""
  key = f'{arch}.attention.sliding_window_pattern'
  pattern = _value(reader, key, config_lib.PATTERN_PERIOD[family])
  if isinstance(pattern, list):
    if len(pattern) != L:
      raise ValueError(f'{path}: {key} has {len(pattern)} entries for {L} layers.')
    return tuple(LOCAL if sliding else GLOBAL for sliding in pattern)
  return config_lib.layer_pattern(L, integer(path, key, pattern, 1))


def config_from_gguf(reader, path: str = '<gguf>') -> ModelConfig:
  """ModelConfig from a GGUF file's metadata (`{arch}.block_count`, `.embedding_length`, ...)."""
  arch = architecture(reader, path)
  family = _FAMILY[arch]

  def get(key, default=None, required=True):
    value = _value(reader, f'{arch}.{key}', default)
    if value is None and required:
      raise ValueError(f'{path}: GGUF metadata has no {arch}.{key}; cannot build the model config.')
    return _uniform(path, f'{arch}.{key}', value)

  def size(key, default=None, lo=1, hi=MAX_SIZE):
    return integer(path, f'{arch}.{key}', get(key, default), lo, hi)

  embedding = _tensor_info(reader, 'token_embd.weight')
  if embedding is None or len(embedding.shape) != 2:
    raise ValueError(f'{path}: no token_embd.weight tensor of 2 dimensions.')
  V = int(embedding.shape[1])  # GGUF order: [D, V].
  eps = float(f"{number(path, 'rms epsilon', get('attention.layer_norm_rms_epsilon', 1e-6)):.6g}")
  if family == 4:
    from gemma_jax.convert.gguf_gemma4 import gemma4_config  # pylint: disable=g-import-not-at-top
    config = gemma4_config(reader, path, V, eps)
    check_config(config, path)
    return config
  L = size('block_count', hi=MAX_LAYERS)
  D, F, N = size('embedding_length'), size('feed_forward_length'), size('attention.head_count')
  K = size('attention.head_count_kv', N)
  H = size('attention.key_length', D // N)
  if size('attention.value_length', H) != H:
    raise ValueError(f'{path}: {arch}.attention.value_length differs from key_length; '
                     'Gemma uses one head dimension.')
  preset = _matching_preset(family, L, D, F, N, K, H)
  common = dict(num_layers=L, embed_dim=D, hidden_dim=F, num_heads=N, num_kv_heads=K, head_dim=H,
                vocab_size=V, rms_norm_eps=eps, family=family,
                max_seq_len=get('context_length', 8192),
                rope_base_global=float(get('rope.freq_base', 10_000.0)))
  if family == 1:
    cfg = dict(attention_types=config_lib.layer_pattern(L, config_lib.PATTERN_PERIOD[1]),
               rope_base_local=common['rope_base_global'])
  elif family == 2:
    cfg = dict(attention_types=_attention_types(reader, path, arch, L, family),
               rope_base_local=common['rope_base_global'],
               sliding_window=get('attention.sliding_window', 4096),
               attn_logits_soft_cap=get('attn_logit_softcapping', 50.0),
               final_logit_soft_cap=get('final_logit_softcapping', 30.0),
               query_pre_attn_scalar=preset.query_pre_attn_scalar if preset else H,
               use_post_attn_norm=True, use_post_ffw_norm=True)
  else:
    scaling = get('rope.scaling.type', 'none', required=False)
    cfg = dict(attention_types=_attention_types(reader, path, arch, L, family),
               sliding_window=get('attention.sliding_window',
                                  preset.sliding_window if preset else None),
               query_pre_attn_scalar=preset.query_pre_attn_scalar if preset else H,
               rope_base_local=preset.rope_base_local if preset else 10_000.0,
               rope_scale_global=(float(get('rope.scaling.factor', 1.0))
                                  if scaling == 'linear' else 1.0),
               use_post_attn_norm=True, use_post_ffw_norm=True, use_qk_norm=True)
  name = preset.name if preset else f'gguf-{arch}-{_value(reader, "general.name", "model")}'
  try:
    config = ModelConfig(name=name, **common, **cfg)
  except (ValueError, TypeError) as e:
    raise ValueError(f'{path}: the GGUF metadata does not make a valid config: {e}') from None
  check_config(config, path)
  return config



def _tensor_info(reader, name: str):
  return next((t for t in reader.tensors if t.name == name), None)


def _dequantize(t, path: str) -> np.ndarray:
  """A GGUF tensor as float32 numpy in Hugging Face's orientation (GGUF's dims reversed)."""
  import gguf  # Deferred: only the GGUF paths need the package.

  shape = tuple(int(d) for d in reversed(t.shape))
  try:
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
  except NotImplementedError as e:
    raise ValueError(f'{path}: tensor {t.name!r} uses {t.tensor_type.name}, which the gguf '
                     f'package cannot dequantise ({e}).') from e


def gguf_sources(reader, path: str, config: ModelConfig
                 ) -> dict[str, tuple[tuple[Any, ...], bool]]:
  """{HF name: (its GGUF tensors, whether it is a norm stored as 1 + scale)} of every weight in
  the file, nothing read yet: one tensor each, two for Gemma 4's split experts (ffn_gate_exps,
  ffn_up_exps: [E, F, D] each, HF's fused gate_up_proj [E, 2F, D], gate rows first as llama.cpp
  fuses them). Raises ValueError naming the file and the tensor for a name Gemma does not have."""
  sources = {}
  for t in reader.tensors:
    if t.name == 'output.weight':
      log.warning('%s: ignoring output.weight: Gemma ties the output head to token_embd.', path)
      continue
    if config.family == 4 and t.name == _ROPE_FREQS:
      continue  # read by gguf_gemma4.gemma4_config
    hf, is_norm = _hf_name(t.name, config.family)
    if hf is None:
      raise ValueError(f'{path}: unexpected tensor {t.name!r} for a Gemma {config.family} model.')
    sources[hf] = ((t,), is_norm)
  for gate in [k for k in sources if k.endswith('.experts.gate_proj')]:
    up = gate[:-len('gate_proj')] + 'up_proj'
    if up not in sources:
      raise ValueError(f'{path}: {gate!r} (ffn_gate_exps) has no matching ffn_up_exps.')
    sources[gate[:-len('gate_proj')] + 'gate_up_proj'] = (
        sources.pop(gate)[0] + sources.pop(up)[0], False)
  # A lone up_proj is left for the model builder to report as unexpected.
  return sources


def hf_tensor(source: tuple[tuple[Any, ...], bool], path: str) -> np.ndarray:
  """One entry of `gguf_sources` dequantised to float32: split experts fused, 1 taken off norms
  (in float32, as transformers does)."""
  tensors, is_norm = source
  parts = [_dequantize(t, path) for t in tensors]
  w = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
  return w - np.float32(1.0) if is_norm else w


def hf_tensors_from_gguf(reader, path: str, config: ModelConfig) -> dict[str, np.ndarray]:
  """All tensors dequantised to float32 and renamed to Hugging Face's names and conventions."""
  sources = gguf_sources(reader, path, config)
  tensors = {}
  for i, (name, source) in enumerate(sources.items()):
    tensors[name] = hf_tensor(source, path)
    if (i + 1) % 50 == 0 or i + 1 == len(sources):
      log.info('%s: dequantised %d/%d tensors', os.path.basename(path), i + 1, len(sources))
  return tensors


def _hf_name(name: str, family: int) -> tuple[str | None, bool]:
  """(HF name, whether it is a norm stored as 1 + scale) of a GGUF tensor; (None, _) if unknown."""
  m = _LAYER_RE.fullmatch(name)
  if family == 4:
    if m and f'{m.group(2)}.{m.group(3)}' in _GEMMA4_LAYER_NAMES:
      return f'model.layers.{m.group(1)}.{_GEMMA4_LAYER_NAMES[f"{m.group(2)}.{m.group(3)}"]}', False
    return _GEMMA4_GLOBAL_NAMES.get(name), False
  layer_names = _GEMMA1_LAYER_NAMES if family == 1 else _LAYER_NAMES
  if m and m.group(3) == 'weight' and m.group(2) in layer_names:
    hf, is_norm = layer_names[m.group(2)]
    return f'model.layers.{m.group(1)}.{hf}.weight', is_norm
  if name.endswith('.weight') and name[:-7] in _GLOBAL_NAMES:
    hf, is_norm = _GLOBAL_NAMES[name[:-7]]
    return f'{hf}.weight', is_norm
  return None, False


def load_gguf(path: str | os.PathLike, dtype=jnp.float32, *, param_dtype=None,
              quantize: str | None = None, group_size: int | None = None, shardings=None):
  """Loads a llama.cpp GGUF file (Gemma 1/2/3/4) as `(Transformer, Tokenizer)`.

  Float load (`quantize` None): quantised tensors are dequantised to float32 on the host, then
  stored in `param_dtype` (default: `dtype`, the compute dtype). `quantize` 'int8' / 'int4'
  (`group_size`: see gemma_jax.quant.spec): projection weights and embedding tables come back
  quantized by gemma_jax.quant, Q8_0 / Q4_0 tensors without a float round trip (module
  docstring; gemma_jax.convert.gguf_quant), the rest as `quant.quantize` would make them from the
  float load; norms stay float. Each array is placed on its sharding when `shardings` is given
  (see `transformer.model_from_params`; quantized, a dict or State must also name every
  `_qscale`). Raises ValueError naming the file for a file that is not GGUF, a truncated file, an
  architecture other than gemma .. gemma4, a tokenizer whose vocabulary size differs from the
  embedding's, or a tensor type the gguf package cannot dequantise.
  """
  from gemma_jax.convert.gguf_tokenizer import sentencepiece_model_from_gguf
  from gemma_jax.convert.hf import model_from_hf_tensors
  from gemma_jax.tokenizer import Tokenizer

  if quantize is None and group_size is not None:
    raise ValueError(f'load_gguf: group_size={group_size} needs quantize=\'int8\' or \'int4\'.')
  if quantize is not None:
    quant.spec(quantize, group_size)  # a bad mode or group size fails before the file is read
  path = os.fspath(path)
  reader = open_gguf(path)
  config = config_from_gguf(reader, path)
  num_tokens = len(reader.fields['tokenizer.ggml.tokens'].data) if (
      'tokenizer.ggml.tokens' in reader.fields) else None
  if num_tokens is not None and num_tokens != config.vocab_size:
    raise ValueError(f'{path}: vocabulary mismatch: the tokenizer has {num_tokens} tokens but '
                     f'token_embd.weight has {config.vocab_size} rows.')
  log.info('%s: %s (%d layers, D=%d, V=%d)', os.path.basename(path), config.name,
           config.num_layers, config.embed_dim, config.vocab_size)
  tokenizer = Tokenizer(sentencepiece_model_from_gguf(reader), source=path)
  if quantize is not None:
    from gemma_jax.convert.gguf_quant import load_quantized  # pylint: disable=g-import-not-at-top
    model = load_quantized(reader, path, config, quantize, group_size, dtype=dtype,
                           param_dtype=param_dtype or dtype, shardings=shardings)
    return model, tokenizer
  tensors = hf_tensors_from_gguf(reader, path, config)
  model = model_from_hf_tensors(config, tensors, dtype=dtype, param_dtype=param_dtype or dtype,
                                source=path, shardings=shardings)
  return model, tokenizer

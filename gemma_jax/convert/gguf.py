"""GGUF import: `load_gguf(path) -> (Transformer, Tokenizer)` for llama.cpp's gemma, gemma2, gemma3.

Facts this importer relies on (llama.cpp's `convert_hf_to_gguf.py`, transformers' GGUF loader):
- Tensors are stored row-major with GGUF's dimension list reversed: a tensor whose GGUF shape is
  [in, out] is a numpy [out, in] array, i.e. already Hugging Face's Linear orientation. Gemma q/k
  weights are not permuted (only llama's are).
- Every `*norm.weight` is stored with 1 added (llama.cpp's norms multiply by the weight); our
  scales are zero-centred, so 1 is subtracted here, in float32 as transformers does.
- Only the global RoPE base is stored; Gemma 3's local base (10k) comes from the preset. The
  query scale and the layer pattern are not stored either: they come from the Gemma generation and,
  when the shapes match a known size (e.g. Gemma 2/3 27B use (D/N)**-0.5), from its preset.
Dequantisation uses the `gguf` package's own routines (`gguf.quants.dequantize`).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from gemma_jax import config as config_lib
from gemma_jax.config import AttentionType, ModelConfig

log = logging.getLogger('gemma_jax.convert')

SUPPORTED_ARCHITECTURES = ('gemma', 'gemma2', 'gemma3')
_FAMILY = {'gemma': 1, 'gemma2': 2, 'gemma3': 3}
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
_LAYER_RE = re.compile(r'blk\.(\d+)\.(\w+)\.weight')


def open_gguf(path: str | os.PathLike):
  """Opens a GGUF file with `gguf.GGUFReader`; ValueError naming the file when it is not one."""
  import gguf  # Deferred: only the GGUF paths need the package.

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f'{path}: GGUF file not found.')
  with open(path, 'rb') as f:
    if f.read(4) != b'GGUF':
      raise ValueError(f'{path}: not a GGUF file (it does not start with the magic bytes "GGUF").')
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
  return config_lib.layer_pattern(L, int(pattern))


def config_from_gguf(reader, path: str = '<gguf>') -> ModelConfig:
  """ModelConfig from a GGUF file's metadata (`{arch}.block_count`, `.embedding_length`, ...)."""
  arch = architecture(reader, path)
  family = _FAMILY[arch]

  def get(key, default=None, required=True):
    value = _value(reader, f'{arch}.{key}', default)
    if value is None and required:
      raise ValueError(f'{path}: GGUF metadata has no {arch}.{key}; cannot build the model config.')
    return _uniform(path, f'{arch}.{key}', value)

  L, D, F = get('block_count'), get('embedding_length'), get('feed_forward_length')
  N = get('attention.head_count')
  K = get('attention.head_count_kv', N)
  H = get('attention.key_length', D // N)
  if get('attention.value_length', H) != H:
    raise ValueError(f'{path}: {arch}.attention.value_length differs from key_length; '
                     'Gemma uses one head dimension.')
  embedding = next((t for t in reader.tensors if t.name == 'token_embd.weight'), None)
  if embedding is None:
    raise ValueError(f'{path}: no token_embd.weight tensor.')
  V = int(embedding.shape[1])  # GGUF order: [D, V].
  preset = _matching_preset(family, L, D, F, N, K, H)
  eps = float(f"{get('attention.layer_norm_rms_epsilon', 1e-6):.6g}")  # 1e-6 stored as float32.
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
  return ModelConfig(name=name, **common, **cfg)


def hf_tensors_from_gguf(reader, path: str, config: ModelConfig) -> dict[str, np.ndarray]:
  """All tensors dequantised to float32 and renamed to Hugging Face's names and conventions."""
  import gguf  # Deferred, as above.

  layer_names = _GEMMA1_LAYER_NAMES if config.family == 1 else _LAYER_NAMES
  tensors = {}
  for i, t in enumerate(reader.tensors):
    if t.name == 'output.weight':
      log.warning('%s: ignoring output.weight: Gemma ties the output head to token_embd.', path)
      continue
    m = _LAYER_RE.fullmatch(t.name)
    if m and m.group(2) in layer_names:
      hf, is_norm = layer_names[m.group(2)]
      hf = f'model.layers.{m.group(1)}.{hf}'
    elif t.name.endswith('.weight') and t.name[:-7] in _GLOBAL_NAMES:
      hf, is_norm = _GLOBAL_NAMES[t.name[:-7]]
    else:
      raise ValueError(f'{path}: unexpected tensor {t.name!r} for a Gemma {config.family} model.')
    shape = tuple(int(d) for d in reversed(t.shape))
    try:
      w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
    except NotImplementedError as e:
      raise ValueError(f'{path}: tensor {t.name!r} uses {t.tensor_type.name}, which the gguf '
                       f'package cannot dequantise ({e}).') from e
    tensors[f'{hf}.weight'] = w - np.float32(1.0) if is_norm else w
    if (i + 1) % 50 == 0 or i + 1 == len(reader.tensors):
      log.info('%s: dequantised %d/%d tensors', os.path.basename(path), i + 1, len(reader.tensors))
  return tensors


def load_gguf(path: str | os.PathLike, dtype=jnp.float32, *, param_dtype=None, shardings=None):
  """Loads a llama.cpp GGUF file (Gemma 1/2/3) as `(Transformer, Tokenizer)`.

  Quantised tensors are dequantised to float32 on the host, then stored in `param_dtype` (default:
  `dtype`, the compute dtype), each placed on its sharding when `shardings` is given (see
  `transformer.model_from_params`). Raises ValueError naming the file for a file that is not
  GGUF, a truncated file, an architecture other than gemma/gemma2/gemma3, or a tokenizer whose
  vocabulary size differs from the embedding's.
  """
  from gemma_jax.convert.gguf_tokenizer import sentencepiece_model_from_gguf
  from gemma_jax.convert.hf import model_from_hf_tensors
  from gemma_jax.tokenizer import Tokenizer

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
  tensors = hf_tensors_from_gguf(reader, path, config)
  model = model_from_hf_tensors(config, tensors, dtype=dtype, param_dtype=param_dtype or dtype,
                                source=path, shardings=shardings)
  return model, tokenizer

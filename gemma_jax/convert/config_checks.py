"""The values a model config read from a file may hold: one rule for every reader.

GGUF metadata, transformers' config.json and a native checkpoint's config.json all end in a
`ModelConfig`, and a damaged file can put anything in them: a string where a count belongs, NaN,
-1, 10**12 layers (whose layer pattern alone would not fit in memory), 1e308 as a bool. The
readers read each number through `integer` / `number` (bounded before anything is built from it)
and check the finished config with `check_config`. Errors are ValueErrors naming the file and key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

MAX_LAYERS = 4096  # Gemma's largest has 62; a bound before a per-layer tuple is built
MAX_SIZE = 2**31 - 1  # any dimension or count
_POSITIVE = {'num_layers', 'embed_dim', 'hidden_dim', 'num_heads', 'head_dim', 'num_kv_heads',
             'vocab_size', 'max_seq_len', 'sliding_window', 'global_head_dim',
             'num_global_kv_heads', 'per_layer_vocab_size', 'query_pre_attn_scalar',
             'attn_logits_soft_cap', 'final_logit_soft_cap', 'rope_base_global',
             'rope_base_local', 'rope_scale_global', 'rope_scale_local', 'rms_norm_eps',
             'rope_fraction_global'}


def integer(source: str, key: str, value: Any, lo: int = 0, hi: int = MAX_SIZE) -> int:
  """`value` as an int in [lo, hi] (an integral float such as 4.0 is accepted); else a
  ValueError naming `source` and `key`."""
  if (isinstance(value, bool) or not isinstance(value, (int, float))
      or (isinstance(value, float) and not value.is_integer())):
    raise ValueError(f'{source}: {key} must be an integer, got {_show(value)}.')
  if not lo <= value <= hi:
    raise ValueError(f'{source}: {key} = {_show(value)} is outside [{lo}, {hi}].')
  return int(value)


def number(source: str, key: str, value: Any, positive: bool = False) -> float:
  """`value` as a finite float (positive when asked); else a ValueError naming the key."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f'{source}: {key} must be a number, got {_show(value)}.')
  if abs(value) >= 2**1024 or not math.isfinite(value) or (positive and value <= 0):
    raise ValueError(f'{source}: {key} = {_show(value)} must be finite'
                     f'{" and positive" if positive else ""}.')
  return float(value)


def _show(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + '...'


def check_config(config, source: str) -> None:
  """Raises ValueError naming `source` and the field unless every field of `config` (a
  ModelConfig) has its annotated type, finite numbers, sizes in range and positive scales."""
  for field in dataclasses.fields(config):
    value, kind = getattr(config, field.name), str(field.type)
    key = field.name
    if value is None and 'None' in kind:
      continue
    if kind.startswith('int'):
      hi = MAX_LAYERS if key == 'num_layers' else 4 if key == 'family' else MAX_SIZE
      integer(source, key, value, 1 if key in _POSITIVE or key == 'family' else 0, hi)
    elif kind.startswith('float'):
      number(source, key, value, positive=key in _POSITIVE)
      if key == 'rope_fraction_global' and value > 1:
        raise ValueError(f'{source}: rope_fraction_global = {value} is above 1.')
    elif kind == 'bool' and not isinstance(value, bool):
      raise ValueError(f'{source}: {key} must be true or false, got {_show(value)}.')
    elif kind == 'str' and not isinstance(value, str):
      raise ValueError(f'{source}: {key} must be a string, got {_show(value)}.')

"""Checks a GGUF file's structure before the `gguf` package parses it, and its metadata's types.

The `gguf` package's GGUFReader trusts every count and size a file declares. An array declaring
2**60 numbers makes it loop for ever (past the end of the file it reads empty slices, which never
advance), and the element count of a tensor is a product of uint64s that wraps around. So
`check_gguf` walks the header first, with Python integers and bounds taken from the file's own
size: every count must fit in the bytes left, every tensor's data (its shape times its type's
bytes per block) must lie inside the file, dimensions must be 1 to 4 and below 2**63, types must
be known, strings UTF-8, `general.alignment` a power of two. The keys gemma_jax reads must hold the kind of value
it reads (`_KEY_KINDS`). Errors are ValueErrors naming the file, the key or tensor and the byte
offset. Nothing here allocates more than the file's header.

`gguf_fields(path)` returns the same walk's integer fields (counts, lengths, types, dimensions,
offsets) with their offsets: the fuzz tests overwrite them with hostile values.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import NamedTuple

# GGUF value types (gguf.GGUFValueType) -> bytes of a scalar; 8 = string, 9 = array.
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_INTS, _FLOATS, _BOOL, _STRING, _ARRAY = {0, 1, 2, 3, 4, 5, 10, 11}, {6, 12}, {7}, 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_DEPTH = 2  # arrays of arrays: allowed by the format, two levels at most here
_RECORDED_ELEMENTS = 4  # array elements whose fields gguf_fields reports, per array


class Field(NamedTuple):
  """An integer field of a GGUF header: where it is, its width in bytes and what it holds."""

  offset: int
  width: int
  kind: str  # 'count', 'length', 'type', 'dim', 'offset', 'value'
  label: str


def _kinds() -> dict[str, set[int]]:
  """What each key gemma_jax reads must hold: a set of value types; arrays as 100 + item type."""
  numbers = _INTS | _FLOATS
  per_layer = numbers | _BOOL | {100 + t for t in numbers | _BOOL}
  kinds = {'general.architecture': {_STRING}, 'general.name': {_STRING},
           'general.alignment': {4},
           'tokenizer.ggml.model': {_STRING}, 'tokenizer.ggml.tokens': {100 + _STRING},
           'tokenizer.ggml.merges': {100 + _STRING},
           'tokenizer.ggml.scores': {100 + t for t in numbers},
           'tokenizer.ggml.token_type': {100 + t for t in _INTS},
           'tokenizer.ggml.add_space_prefix': _BOOL | _INTS}
  for name in ('bos', 'eos', 'unknown', 'padding'):
    kinds[f'tokenizer.ggml.{name}_token_id'] = set(_INTS)
  for arch in ('gemma', 'gemma2', 'gemma3', 'gemma4'):
    for key in ('block_count', 'embedding_length', 'feed_forward_length', 'context_length',
                'attention.head_count', 'attention.head_count_kv', 'attention.key_length',
                'attention.value_length', 'attention.key_length_swa',
                'attention.value_length_swa', 'attention.sliding_window',
                'attention.sliding_window_pattern', 'attention.shared_kv_layers',
                'attention.layer_norm_rms_epsilon', 'rope.freq_base', 'rope.freq_base_swa',
                'rope.scaling.factor', 'attn_logit_softcapping', 'final_logit_softcapping',
                'embedding_length_per_layer_input', 'expert_count', 'expert_used_count',
                'expert_feed_forward_length'):
      kinds[f'{arch}.{key}'] = per_layer
    kinds[f'{arch}.rope.scaling.type'] = {_STRING}
  return kinds


_KEY_KINDS = _kinds()


class _Walk:
  """Reads a GGUF header with bounds on every read; records its integer fields when asked."""

  def __init__(self, path: str, buf, record: bool):
    self.path, self.buf, self.size, self.pos = path, buf, len(buf), 0
    self.fields: list[Field] | None = [] if record else None
    self.order = '<'

  def fail(self, what: str, offset: int | None = None) -> ValueError:
    at = self.pos if offset is None else offset
    return ValueError(f'{self.path}: truncated or corrupt GGUF file: {what} (at byte {at} of '
                      f'{self.size}).')

  def int(self, fmt: str, kind: str, label: str, record: bool = True) -> int:
    width = struct.calcsize(fmt)
    if self.pos + width > self.size:
      raise self.fail(f'{label} runs past the end of the file')
    (value,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
    if record and self.fields is not None:
      self.fields.append(Field(self.pos, width, kind, label))
    self.pos += width
    return value

  def skip(self, n: int, label: str) -> None:
    if n > self.size - self.pos:
      raise self.fail(f'{label} declares {n} bytes but only {self.size - self.pos} are left')
    self.pos += n

  def string(self, label: str, record: bool = True) -> str:
    n = self.int('Q', 'length', f'length of {label}', record)
    start = self.pos
    self.skip(n, label)
    raw = bytes(self.buf[start:self.pos])
    try:
      return raw.decode('utf-8')
    except UnicodeDecodeError:
      raise self.fail(f'{label} is not UTF-8 ({raw[:40]!r})', start) from None

  def count(self, label: str, min_bytes: int, record: bool = True) -> int:
    n = self.int('Q', 'count', label, record)
    if n * min_bytes > self.size - self.pos:
      raise self.fail(f'{label} is {n}, more than the {self.size - self.pos} bytes left can hold')
    return n

  def value(self, vtype: int, label: str, depth: int = 0, record: bool = True) -> int | None:
    """Skips one value of type `vtype`; returns an array's item type (else None)."""
    if vtype in _SCALAR:
      if record and self.fields is not None and vtype in _INTS:
        self.fields.append(Field(self.pos, _SCALAR[vtype], 'value', label))
      self.skip(_SCALAR[vtype], label)
      return None
    if vtype == _STRING:
      self.string(label, record)
      return None
    if vtype != _ARRAY:
      raise self.fail(f'{label} has unknown value type {vtype}', self.pos - 4)
    if depth >= _MAX_DEPTH:
      raise self.fail(f'{label} nests arrays deeper than {_MAX_DEPTH} levels')
    item = self.int('I', 'type', f'item type of {label}', record)
    if item not in _SCALAR and item not in (_STRING, _ARRAY):
      raise self.fail(f'{label} has unknown item type {item}', self.pos - 4)
    n = self.count(f'element count of {label}', _SCALAR.get(item, 8 if item == _STRING else 12),
                   record)
    if item in _SCALAR:
      self.skip(n * _SCALAR[item], label)
      return item
    for i in range(n):
      rec = record and i < _RECORDED_ELEMENTS
      if item == _ARRAY:
        self.value(_ARRAY, f'{label}[{i}]', depth + 1, rec)
      else:
        self.string(f'{label}[{i}]', rec)
    return item


def _walk(path: str, record: bool) -> list[Field]:
  import gguf  # Deferred: only the GGUF paths need the package.

  with open(path, 'rb') as f:
    size = os.fstat(f.fileno()).st_size
    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b''
  try:
    with memoryview(buf) as view:
      return _walk_buffer(path, view, record, gguf.GGML_QUANT_SIZES)
  finally:
    if size:
      buf.close()


def _walk_buffer(path: str, buf, record: bool, quant_sizes) -> list[Field]:
  w = _Walk(path, buf, record)
  if bytes(buf[:4]) != b'GGUF':
    raise ValueError(f'{path}: not a GGUF file (it does not start with the magic bytes "GGUF").')
  w.pos = 4
  if w.size >= 8 and struct.unpack_from('<I', buf, 4)[0] & 0xFFFF == 0:
    w.order = '>'  # written on a machine of the other byte order (as gguf.GGUFReader detects)
  version = w.int('I', 'value', 'version')
  if version not in (2, 3):
    raise w.fail(f'version {version} is not 2 or 3', 4)
  n_tensors = w.count('tensor count', 24)
  n_keys = w.count('metadata key count', 13)
  alignment, keys = 32, set()
  for k in range(n_keys):
    key = w.string(f'metadata key {k}')
    if key in keys:
      raise w.fail(f'metadata key {key!r} appears twice')
    keys.add(key)
    vtype = w.int('I', 'type', f'value type of {key}')
    start = w.pos
    item = w.value(vtype, key)
    kinds = _KEY_KINDS.get(key)
    kind = vtype if item is None else 100 + item
    if kinds is not None and kind not in kinds:
      raise w.fail(f'metadata {key!r} has value type {vtype}'
                   f'{"" if item is None else f" of item type {item}"}, which gemma_jax cannot '
                   'read as this key', start - 4)
    if key == 'general.alignment':
      alignment = struct.unpack_from(w.order + 'I', buf, start)[0]
      if alignment == 0 or alignment & (alignment - 1):
        raise w.fail(f'general.alignment {alignment} is not a power of two', start)
  tensors, names = [], set()
  for t in range(n_tensors):
    name = w.string(f'name of tensor {t}')
    if name in names:
      raise w.fail(f'tensor {name!r} appears twice')
    names.add(name)
    n_dims = w.int('I', 'count', f'dimension count of tensor {name}')
    if not 1 <= n_dims <= _MAX_DIMS:
      raise w.fail(f'tensor {name!r} has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)', w.pos - 4)
    dims = [w.int('Q', 'dim', f'dimension {i} of tensor {name}') for i in range(n_dims)]
    ttype = w.int('I', 'type', f'type of tensor {name}')
    if ttype not in {int(t) for t in quant_sizes}:
      raise w.fail(f'tensor {name!r} has unknown type {ttype}', w.pos - 4)
    offset = w.int('Q', 'offset', f'data offset of tensor {name}')
    block, type_size = quant_sizes[next(t for t in quant_sizes if int(t) == ttype)]
    if any(d >= 2**63 for d in dims) or dims[0] % block:
      raise w.fail(f'tensor {name!r} has shape {dims}: dimensions must be below 2**63 and the '
                   f'first a multiple of its type\'s block of {block}')
    elements = 1
    for d in dims:
      elements *= d
    tensors.append((name, dims, elements * type_size // block, offset))
  data_start = -(-w.pos // alignment) * alignment
  for name, dims, n_bytes, offset in tensors:
    if offset % alignment:
      raise w.fail(f'tensor {name!r} has data offset {offset}, not a multiple of the alignment '
                   f'{alignment}')
    if data_start + offset + n_bytes > w.size:
      raise w.fail(f'tensor {name!r} of shape {dims} needs {n_bytes} bytes at byte '
                   f'{data_start + offset}, past the end of the file', data_start + offset)
  return w.fields or []


def check_gguf(path: str | os.PathLike) -> None:
  """Raises ValueError naming the file, the key or tensor and the offset unless the file's header
  is within bounds (see the module docstring)."""
  _walk(os.fspath(path), record=False)


def gguf_fields(path: str | os.PathLike) -> list[Field]:
  """The integer fields of a GGUF header, for tests that overwrite them (the file must pass
  `check_gguf`)."""
  return _walk(os.fspath(path), record=True)

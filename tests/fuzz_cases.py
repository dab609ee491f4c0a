"""Deterministic mutations of real files, and a runner that classifies what each reader makes of them.

Used by tests/test_fuzz.py (a fixed-seed sample in CI) and bench/fuzz.py (a longer run); the
files and their readers are made by tests/fuzz_files.py.

Mutations (each a function of a `random.Random`, so a seed fixes a run): byte flips, truncation at
a random offset, hostile values (0, -1, 2**31 - 1, 2**63, 2**64 - 1, 10**12, ...) written over the
integer fields where a header keeps counts, lengths, dimensions, types and offsets (GGUF: the
fields `gguf_checks.gguf_fields` lists; safetensors: its header length; SentencePiece: the
protobuf length prefixes), JSON mutations (a value replaced by another type, a hostile number,
deleted, or the document cut), wrong dtypes and shapes and offsets in a safetensors header, deeply
nested and non-UTF-8 JSONL lines, and damaged, emptied or deleted Orbax files.

Outcomes of a case (`run_case`):
  error   ValueError whose message names the mutated file or directory: the clear error
  same    loaded, equal to the unmutated file's result (padding, an unread key, a name)
  data    loaded with the same config but other numbers or text (tensor data, a piece's or a
          message's text: nothing in these formats can tell)
  config  loaded with another config (a metadata number changed into another valid one)
  crash   any other exception, or a ValueError that does not name the file
  hang    still running after the reader's time limit
  memory  peak RSS grew by more than `MEMORY_BOUND_MB` during the case
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import struct
import time
from typing import Any, Callable

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, 'data', 'quickstart_tokenizer.model')
TRAIN_JSONL = os.path.join(REPO, 'data', 'quickstart_train.jsonl')
MEMORY_BOUND_MB = 256  # peak RSS growth allowed in one case (the files are at most 7 MB)
OUTCOMES = ('error', 'same', 'data', 'config', 'crash', 'hang', 'memory')
_HOSTILE = (0, 1, 2, 255, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 10**12, 2**62, 2**63 - 1, 2**63,
            2**64 - 1)
_JSON_HOSTILE = (None, 'garbage', '', -1, 0, 1.5, 10**12, 2**64, 10**400, -(10**12), 1e308,
                 float('nan'), float('inf'), True, [], {}, [1, 2], {'a': 1}, '1' * 10_000)

Changes = dict[str, Any]  # relative path ('' for a lone file) -> new bytes, or None: deleted
Mutator = Callable[[random.Random], tuple[str, Changes]]


@dataclasses.dataclass
class Reader:
  """A reader under test: `load(path)` -> (config part, data part) of what it read."""

  name: str
  base: str  # the unmutated file or directory
  load: Callable[[str], tuple[Any, Any]]
  mutators: list[Mutator]
  timeout_s: float = 30.0


@dataclasses.dataclass
class Outcome:
  reader: str
  mutation: str
  kind: str  # one of OUTCOMES
  message: str
  seconds: float
  rss_growth_mb: float


class _Hang(BaseException):  # BaseException: a reader's `except Exception` cannot swallow it
  pass


def _fingerprint(value) -> str:
  digest = hashlib.sha256()
  for item in value:
    digest.update(np.ascontiguousarray(item).tobytes() if isinstance(item, np.ndarray)
                  else repr(item).encode())
  return digest.hexdigest()


def model_print(model, tokenizer=None) -> tuple[Any, Any]:
  """(config, hash of the parameters and tokenizer) of a loaded model."""
  from gemma_jax.transformer import flat_params
  params = flat_params(model)
  config = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
  tok = tokenizer_print(tokenizer) if tokenizer is not None else (None, None)
  return (config, tok[0]), _fingerprint([tok[1]] + [np.asarray(params[k]) for k in sorted(params)])


def tokenizer_print(tok) -> tuple[Any, Any]:
  return ((tok.vocab_size, tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id, tok.chat_format,
           tok.start_of_turn_id, tok.end_of_turn_id),
          hashlib.sha256(tok.serialized_model_proto()).hexdigest())


# Mutators. Each takes the unmutated bytes and returns a Mutator.

def flips(data: bytes, rel: str = '', lo: int = 0, hi: int | None = None,
          where: str = '') -> Mutator:
  hi = len(data) if hi is None else hi

  def mutate(rng):
    out, spots = bytearray(data), []
    for _ in range(rng.randint(1, 3)):
      i = rng.randrange(lo, hi)
      out[i] ^= rng.randint(1, 255)
      spots.append(i)
    return f'flip {where}bytes {spots}', {rel: bytes(out)}
  return mutate


def truncation(data: bytes, rel: str = '') -> Mutator:
  def mutate(rng):
    cut = rng.randrange(len(data))
    return f'cut at {cut} of {len(data)}', {rel: data[:cut]}
  return mutate


def int_fields(data: bytes, fields, rel: str = '') -> Mutator:
  """Hostile values over integer fields [(offset, width, label)] (little-endian)."""
  def mutate(rng):
    offset, width, label = rng.choice(fields)
    old = int.from_bytes(data[offset:offset + width], 'little')
    value = rng.choice(_HOSTILE + (old + 1, old - 1, rng.getrandbits(8 * width))) % 2**(8 * width)
    out = data[:offset] + value.to_bytes(width, 'little') + data[offset + width:]
    return f'{label} {old} -> {value}', {rel: out}
  return mutate


def _json_paths(node, path=()):
  yield path
  items = node.items() if isinstance(node, dict) else (
      enumerate(node) if isinstance(node, list) else ())
  for key, child in items:
    yield from _json_paths(child, path + (key,))


def mutate_json(doc, rng: random.Random) -> tuple[str, Any]:
  """(description, a copy of `doc` with one value replaced by a hostile one, or deleted)."""
  doc = json.loads(json.dumps(doc))
  path = rng.choice([p for p in _json_paths(doc) if p] or [()])
  if not path:
    return 'document replaced', rng.choice(_JSON_HOSTILE)
  parent = doc
  for key in path[:-1]:
    parent = parent[key]
  if rng.random() < 0.15:
    del parent[path[-1]]
    return f'deleted {"/".join(map(str, path))}', doc
  value = rng.choice(_JSON_HOSTILE)
  parent[path[-1]] = value
  return f'{"/".join(map(str, path))} = {str(value)[:40]}', doc


def json_values(data: bytes, rel: str = '') -> Mutator:
  def mutate(rng):
    what, doc = mutate_json(json.loads(data), rng)
    return what, {rel: json.dumps(doc).encode()}
  return mutate


def safetensors_header(data: bytes, rel: str) -> Mutator:
  """Wrong dtypes, shapes and offsets in the JSON header (the header length kept right)."""
  n = struct.unpack('<Q', data[:8])[0]
  header, body = json.loads(data[8:8 + n]), data[8 + n:]

  def mutate(rng):
    h = json.loads(json.dumps(header))
    name = rng.choice(sorted(k for k in h if k != '__metadata__'))
    field = rng.choice(['dtype', 'shape', 'data_offsets', 'json'])
    if field == 'dtype':
      h[name]['dtype'] = rng.choice(['F64', 'F16', 'BF16', 'I8', 'U8', 'BOOL', 'I64', 'F8_E4M3',
                                     'XYZ', 5, None])
    elif field == 'shape':
      shape = list(h[name]['shape'])
      pick = rng.choice([10**12, -1, 0, 2**63, 2**64, 1.5, 'x', None])
      if shape and rng.random() < 0.7:
        shape[rng.randrange(len(shape))] = pick
      else:
        shape.append(pick)
      h[name]['shape'] = shape
    elif field == 'data_offsets':
      b, e = h[name]['data_offsets']
      h[name]['data_offsets'] = rng.choice([[0, 10**12], [-1, e], [e, b], [b, e + 4],
                                            [b + 1, e + 1], [0, 0], [b, 2**64], ['a', e], [b]])
    else:
      what, h = mutate_json(h, rng)
      name = what
    text = json.dumps(h).encode()
    return f'header {field} of {name}', {rel: struct.pack('<Q', len(text)) + text + body}
  return mutate


def _proto_lengths(data: bytes, start: int = 0, end: int | None = None, depth: int = 0):
  """(offset, width) of the length prefixes of a protobuf message's length-delimited fields,
  into the pieces (field 1) of a SentencePiece ModelProto."""
  end, pos, out = len(data) if end is None else end, start, []

  def varint(p):
    value, shift = 0, 0
    while True:
      b = data[p]
      value |= (b & 0x7F) << shift
      p, shift = p + 1, shift + 7
      if b < 0x80:
        return value, p
  while pos < end:
    tag, pos = varint(pos)
    wire = tag & 7
    if wire == 0:
      _, pos = varint(pos)
    elif wire == 1:
      pos += 8
    elif wire == 5:
      pos += 4
    elif wire == 2:
      length, after = varint(pos)
      out.append((pos, after - pos, f'length of field {tag >> 3}'))
      if depth == 0 and tag >> 3 == 1 and len(out) < 40:
        out += _proto_lengths(data, after, after + length, depth + 1)
      pos = after + length
    else:
      break
  return out


def proto_lengths(data: bytes, rel: str = '') -> Mutator:
  fields = _proto_lengths(data)

  def mutate(rng):
    offset, width, label = rng.choice(fields)
    value = rng.choice(_HOSTILE + (0, 1, 127))
    enc, v = bytearray(), value
    while True:
      enc.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
      v >>= 7
      if not v:
        break
    return f'{label} at {offset} -> {value}', {rel: data[:offset] + bytes(enc) +
                                                data[offset + width:]}
  return mutate


def jsonl_lines(data: bytes, rel: str = '') -> Mutator:
  lines = data.decode().splitlines()
  raw = ['{"messages": ' + '[' * 100_000 + ']' * 100_000 + '}', '\udcff', '{"prompt": ' +
         '1' * 5000 + ', "response": "x"}', '{"messages": {"role": 1, "content": 2}}',
         '{"messages": {"role": ["user", "model"], "content": ["a"]}}', '[1, 2]', 'null',
         '{"prompt": "a", "response": {"x": 1}}', '\x00' * 10]

  def mutate(rng):
    i = rng.randrange(len(lines))
    out = list(lines)
    if rng.random() < 0.5:
      what, doc = mutate_json(json.loads(lines[i]), rng)
      out[i] = json.dumps(doc)
    else:
      out[i] = rng.choice(raw)
      what = f'raw {out[i][:30]!r}'
    text = '\n'.join(out).encode('utf-8', 'surrogateescape')
    return f'line {i + 1}: {what}', {rel: text}
  return mutate


def files_of(directory: str, mutators_for: Callable[[bytes, str], list[Mutator]]) -> Mutator:
  """A mutation of one file (chosen per case) of a directory: deleted, emptied, or mutated."""
  rels = sorted(os.path.relpath(os.path.join(r, f), directory)
                for r, _, fs in os.walk(directory) for f in fs)
  contents = {rel: open(os.path.join(directory, rel), 'rb').read() for rel in rels}

  def mutate(rng):
    rel = rng.choice(rels)
    if rng.random() < 0.1:
      return f'{rel}: deleted', {rel: None}
    if rng.random() < 0.1 or not contents[rel]:
      return f'{rel}: emptied', {rel: b''}
    what, changes = rng.choice(mutators_for(contents[rel], rel))(rng)
    return f'{rel}: {what}', changes
  return mutate


def _binary_or_json(data: bytes, rel: str) -> list[Mutator]:
  out = [flips(data, rel), truncation(data, rel)]
  try:
    json.loads(data)
    out.append(json_values(data, rel))
  except ValueError:
    pass
  return out


def _materialize(reader: Reader, changes: Changes, case_dir: str) -> str:
  if os.path.exists(case_dir):
    shutil.rmtree(case_dir)
  if os.path.isdir(reader.base):
    root = os.path.join(case_dir, os.path.basename(reader.base))
    shutil.copytree(reader.base, root)
  else:
    os.makedirs(case_dir)
    root = os.path.join(case_dir, os.path.basename(reader.base))
  for rel, content in changes.items():
    path = os.path.join(root, rel) if rel else root
    if content is None:
      os.remove(path)
    else:
      with open(path, 'wb') as f:
        f.write(content)
  return root


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(reader: Reader, mutation: str, changes: Changes, case_dir: str,
             baseline: tuple[Any, Any] | None) -> Outcome:
  """Runs `reader` on its file with `changes` applied, under a time limit; classifies it
  against `baseline`, what it read from the unmutated file (None: that is an error too)."""
  root = _materialize(reader, changes, case_dir)

  def alarm(signum, frame):
    raise _Hang()

  previous = signal.signal(signal.SIGALRM, alarm)
  rss, start = _rss_mb(), time.perf_counter()
  message = ''
  try:
    signal.setitimer(signal.ITIMER_REAL, reader.timeout_s)
    try:
      got = reader.load(root)
    finally:
      signal.setitimer(signal.ITIMER_REAL, 0)
    kind = ('config' if baseline is None else 'same' if got == baseline
            else 'data' if got[0] == baseline[0] else 'config')
  except _Hang:
    kind, message = 'hang', f'still running after {reader.timeout_s} s'
  except ValueError as e:
    message = str(e)
    kind = 'error' if root in message else 'crash'
  except Exception as e:  # pylint: disable=broad-except
    kind, message = 'crash', f'{type(e).__name__}: {e}'
  finally:
    signal.signal(signal.SIGALRM, previous)
  growth = _rss_mb() - rss
  if growth > MEMORY_BOUND_MB:
    kind = 'memory'
  return Outcome(reader.name, mutation, kind, message.replace(root, '<file>')[:300],
                 time.perf_counter() - start, growth)


def run(readers: dict[str, Reader], cases: dict[str, int], seed: int, workdir: str,
        progress: Callable[[Outcome], None] | None = None) -> list[Outcome]:
  """`cases[name]` mutated files per reader, fixed by `seed`; returns every outcome."""
  outcomes = []
  for name, n in cases.items():
    reader = readers[name]
    try:  # also warms the reader up before RSS is measured
      baseline = reader.load(reader.base)
    except ValueError as e:  # a file broken as made (the real GGUF cut after its tensor table)
      baseline = None
      outcomes.append(Outcome(name, 'unmutated', 'error' if reader.base in str(e) else 'crash',
                              str(e).replace(reader.base, '<file>')[:300], 0.0, 0.0))
    rng = random.Random(f'{seed}:{name}')
    for i in range(n):
      mutation, changes = rng.choice(reader.mutators)(rng)
      outcome = run_case(reader, mutation, changes, os.path.join(workdir, 'case'), baseline)
      outcomes.append(outcome)
      if progress:
        progress(outcome)
  return outcomes


def table(outcomes: list[Outcome]) -> str:
  """A Markdown table per reader: cases, each outcome's count, slowest case, peak RSS growth."""
  rows = ['| reader | cases | ' + ' | '.join(OUTCOMES) + ' | slowest s | max RSS growth MB |',
          '|---' * (len(OUTCOMES) + 4) + '|']
  for name in dict.fromkeys(o.reader for o in outcomes):
    mine = [o for o in outcomes if o.reader == name]
    counts = [sum(o.kind == k for o in mine) for k in OUTCOMES]
    rows.append(f'| {name} | {len(mine)} | ' + ' | '.join(map(str, counts)) +
                f' | {max(o.seconds for o in mine):.2f} | '
                f'{max(o.rss_growth_mb for o in mine):.0f} |')
  return '\n'.join(rows)

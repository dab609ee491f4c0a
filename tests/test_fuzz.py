"""Every file reader against mutated and truncated real files (tests/fuzz_cases.py, on the files of tests/fuzz_files.py).

A fixed-seed sample of 400 mutated files over all readers (GGUF, safetensors, HF config.json,
native config.json, Orbax params, SentencePiece, JSONL, and the real Gemma 3 270M GGUF cut after
its tensor table) must end, each one, in the clear error (a ValueError naming the file) or in a
load; none may raise anything else, run past its time limit or grow peak RSS by more than
fuzz_cases.MEMORY_BOUND_MB (256 MB) in one case; the whole sample may grow it by 512 MB at most.
Files declaring 10**12-element tensors or 2**60-element arrays fail before anything is
allocated (tracemalloc: under 64 MB). No loader runs code from a file. The CLIs print one line.
The longer run is `python bench/fuzz.py`.
"""

from __future__ import annotations

import builtins
import os
import pathlib
import pickle
import re
import struct
import subprocess
import sys
import tracemalloc

import pytest

import fuzz_cases
import fuzz_files

_REPO = pathlib.Path(__file__).resolve().parent.parent
SAMPLE = {'gguf': 80, 'safetensors': 50, 'hf-config': 40, 'native-config': 40, 'orbax': 40,
          'official': 30,
          'sentencepiece': 60, 'jsonl': 60, 'gguf-real-header': 30}
SEED = 15
SAMPLE_RSS_BOUND_MB = 512


@pytest.fixture(scope='module')
def readers(tmp_path_factory, gguf_path):
  return fuzz_files.make_readers(str(tmp_path_factory.mktemp('fuzz')), str(gguf_path))


@pytest.fixture(scope='module')
def sample(readers, tmp_path_factory):
  start = fuzz_cases._rss_mb()
  outcomes = fuzz_cases.run(readers, SAMPLE, SEED, str(tmp_path_factory.mktemp('cases')))
  return outcomes, fuzz_cases._rss_mb() - start


@pytest.mark.parametrize('reader', list(SAMPLE))
def test_fuzz_sample(reader, sample):
  outcomes, _ = sample
  mine = [o for o in outcomes if o.reader == reader]
  bad = [f'{o.kind}: {o.mutation}: {o.message}' for o in mine
         if o.kind in ('crash', 'hang', 'memory')]
  assert not bad, '\n'.join(bad)
  assert len([o for o in mine if o.mutation != 'unmutated']) == SAMPLE[reader]
  errors = [o for o in mine if o.kind == 'error']
  assert len(errors) >= len(mine) // 3, fuzz_cases.table(mine)  # the sample reaches the checks
  assert all('<file>' in o.message for o in errors)  # each names the mutated file or directory
  if reader in ('gguf-real-header', 'jsonl'):  # every mutation leaves these broken
    assert len(errors) == len(mine), fuzz_cases.table(mine)


def test_fuzz_sample_memory(sample):
  outcomes, growth = sample
  assert max(o.rss_growth_mb for o in outcomes) <= fuzz_cases.MEMORY_BOUND_MB
  assert growth <= SAMPLE_RSS_BOUND_MB, fuzz_cases.table(outcomes)


def _set(data: bytes, offset: int, width: int, value: int) -> bytes:
  return data[:offset] + value.to_bytes(width, 'little') + data[offset + width:]


def test_huge_declared_sizes_fail_before_allocating(readers, tmp_path):
  from gemma_jax.convert.gguf import load_gguf
  from gemma_jax.convert.gguf_checks import gguf_fields
  from gemma_jax.convert.hf import load_hf
  base = readers['gguf'].base
  data = open(base, 'rb').read()
  fields = {f.label: f for f in gguf_fields(base)}
  dim = fields['dimension 1 of tensor token_embd.weight']
  count = fields['element count of tokenizer.ggml.scores']
  hf = pathlib.Path(readers['safetensors'].base)
  st = (hf / 'model.safetensors').read_bytes()
  cases = {
      'tensor of 10**12 elements': _set(data, dim.offset, 8, 10**12 // 64),
      'tensor of 2**64 - 1 rows': _set(data, dim.offset, 8, 2**64 - 1),
      'array of 2**60 scores': _set(data, count.offset, 8, 2**60),
      'metadata of 2**63 keys': _set(data, fields['metadata key count'].offset, 8, 2**63)}
  tracemalloc.start()
  try:
    for what, mutated in cases.items():
      path = tmp_path / f'{what.replace(" ", "_")}.gguf'
      path.write_bytes(mutated)
      with pytest.raises(ValueError, match=re.escape(str(path))):
        load_gguf(path)
    header = b'{"model.embed_tokens.weight": {"dtype": "F32", "shape": [1000000, 1000000], ' \
             b'"data_offsets": [0, 4000000000000]}}'
    for what, mutated in {'safetensors tensor of 10**12 elements':
                          struct.pack('<Q', len(header)) + header + st[8:64],
                          'safetensors header of 2**63 bytes': _set(st, 0, 8, 2**63)}.items():
      (tmp_path / what).mkdir()
      (tmp_path / what / 'config.json').write_bytes((hf / 'config.json').read_bytes())
      (tmp_path / what / 'model.safetensors').write_bytes(mutated)
      with pytest.raises(ValueError, match='model.safetensors: not a valid safetensors file'):
        load_hf(tmp_path / what)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < 64 * 2**20, peak


def test_no_loader_executes_code_from_a_file(readers, monkeypatch):
  """pickle, eval, exec and torch.load raise while every reader reads its file; and the package
  source neither uses them nor passes trust_remote_code."""
  def refuse(*args, **kwargs):
    raise AssertionError('a loader tried to run code from a file')
  for module, name in [(pickle, 'load'), (pickle, 'loads'), (pickle, 'Unpickler'),
                       (builtins, 'eval'), (builtins, 'exec')]:
    monkeypatch.setattr(module, name, refuse)
  if 'torch' in sys.modules:
    monkeypatch.setattr(sys.modules['torch'], 'load', refuse)
  for name, reader in readers.items():
    if name != 'gguf-real-header':
      reader.load(reader.base)
  monkeypatch.undo()
  pattern = re.compile(r'\bimport pickle|\bpickle\.|trust_remote_code|allow_pickle|torch\.load|'
                       r'\b(?:eval|exec)\(|\bimport (?:dill|marshal|cloudpickle)')
  sources = sorted((_REPO / 'gemma_jax').rglob('*.py')) + [_REPO / 'sample.py', _REPO / 'train.py']
  hits = [f'{p}:{i}' for p in sources for i, line in enumerate(p.read_text().splitlines(), 1)
          if pattern.search(line)]
  assert not hits, hits


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=str(_REPO), JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                        env=env, cwd=_REPO)


def test_clis_print_one_line(readers, tmp_path):
  """The convert CLI on a truncated GGUF and on a bad safetensors header, sample.py on a native
  checkpoint with a damaged config.json: exit 1, one error line, no traceback."""
  gguf = tmp_path / 'cut.gguf'
  gguf.write_bytes(open(readers['gguf'].base, 'rb').read()[:5000])
  hf = tmp_path / 'hf'
  hf.mkdir()
  (hf / 'config.json').write_bytes(open(os.path.join(readers['safetensors'].base, 'config.json'),
                                        'rb').read())
  (hf / 'model.safetensors').write_bytes(struct.pack('<Q', 10) + b'{"a": [1, ' + b'\0' * 64)
  native = tmp_path / 'native'
  import shutil
  shutil.copytree(readers['native-config'].base, native)
  (native / 'config.json').write_text('{"name": "x", "num_layers": "six"}')
  runs = [('python -m gemma_jax.convert', 'cut.gguf: truncated or corrupt GGUF file',
           _cli('-m', 'gemma_jax.convert', '--from', 'gguf', '--src', str(gguf), '--dst',
                str(tmp_path / 'a'))),
          ('python -m gemma_jax.convert', 'model.safetensors: not a valid safetensors file',
           _cli('-m', 'gemma_jax.convert', '--from', 'hf', '--src', str(hf), '--dst',
                str(tmp_path / 'b'))),
          ('sample.py', 'config.json: not a valid ModelConfig',
           _cli('sample.py', '--ckpt', str(native), '--prompt', 'hi'))]
  for prog, message, run in runs:
    assert run.returncode == 1, run.stderr
    assert 'Traceback' not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if 'error:' in line]
    assert len(lines) == 1 and lines[0].startswith(f'{prog}: error: '), run.stderr
    assert message in lines[0], lines[0]
  assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()
